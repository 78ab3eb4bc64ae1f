//! `wskeep bench`: the load generator behind the README's figures, and the neutral echo upstream
//! it measures against. Every scenario is bounded in connections and time, prints a human
//! summary and ends with one JSON line.

pub mod echo;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::tools::client::{self, ClientOptions, Connection, Incoming, Target, OP_BINARY, OP_PONG, OP_TEXT};

#[derive(Clone)]
pub struct Common {
    pub url: String,
    pub insecure: bool,
    /// Trust this PEM bundle instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Open the WebSockets as streams of HTTP/2 connections (RFC 8441), this many per connection.
    pub http2_streams: Option<usize>,
    http2: Option<Arc<client::Http2Sessions>>,
}

impl Common {
    pub fn new(url: String, insecure: bool, ca_file: Option<PathBuf>, http2_streams: Option<usize>) -> Common {
        Common { url, insecure, ca_file, http2_streams, http2: None }
    }

    /// Sets up the HTTP/2 sessions, if asked for; before the first `open`.
    fn prepare(&mut self) -> Result<(), client::ClientError> {
        if let (Some(streams), None) = (self.http2_streams, &self.http2) {
            self.http2 = Some(Arc::new(client::Http2Sessions::new(&self.url, self.options(None), streams)?));
        }
        Ok(())
    }

    fn options(&self, bind: Option<IpAddr>) -> ClientOptions {
        ClientOptions {
            insecure: self.insecure,
            ca_file: self.ca_file.clone(),
            bind,
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        }
    }

    async fn open(&self, bind: Option<IpAddr>) -> Result<Connection, client::ClientError> {
        match &self.http2 {
            Some(sessions) => sessions.open(bind).await,
            None => client::connect(&self.url, &self.options(bind)).await,
        }
    }
}

/// The messages `throughput` sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageKind {
    pub binary: bool,
    /// permessage-deflate: offered, required, and every message sent with RSV1.
    pub compressed: bool,
}

/// Echoed messages per second with `window` messages in flight on each connection.
pub async fn throughput(
    common: &Common,
    conns: usize,
    size: usize,
    window: usize,
    duration: Duration,
    kind: MessageKind,
) -> Result<serde_json::Value, client::ClientError> {
    let echoed = Arc::new(AtomicU64::new(0));
    let mut options = common.options(None);
    if kind.compressed {
        options.headers.push(("Sec-WebSocket-Extensions".into(), "permessage-deflate".into()));
    }
    let http2 = match common.http2_streams {
        Some(streams) => Some(client::Http2Sessions::new(&common.url, options.clone(), streams)?),
        None => None,
    };
    let mut connections = Vec::with_capacity(conns);
    for _ in 0..conns {
        let conn = match &http2 {
            Some(sessions) => sessions.open(None).await?,
            None => client::connect(&common.url, &options).await?,
        };
        if kind.compressed && !conn.extensions.as_deref().is_some_and(|e| e.starts_with("permessage-deflate")) {
            return Err(client::ClientError::Handshake("the server did not agree to permessage-deflate".into()));
        }
        connections.push(conn);
    }
    let start = Instant::now();
    let stop = start + duration;
    let plain = vec![b'x'; size];
    let payload: Arc<[u8]> = if kind.compressed { crate::inflate::stored(&plain) } else { plain }.into();
    let opcode = if kind.binary { OP_BINARY } else { OP_TEXT } | if kind.compressed { crate::frame::RSV1 } else { 0 };
    // A resumable session (wskeep's [resume]) keeps every message until the client acks it.
    let resumable = common.url.contains("wskeep_resume=1");
    let mut tasks = Vec::new();
    for conn in connections {
        let Connection { mut reader, mut writer, .. } = conn;
        let window = Arc::new(Semaphore::new(window));
        let (echoed, payload, credits) = (echoed.clone(), payload.clone(), window.clone());
        // What the reader received, for the sender to acknowledge.
        let (received, to_ack) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let due_ack = to_ack.clone();
        let sender = tokio::spawn(async move {
            let mut acked = 0;
            while Instant::now() < stop {
                let Ok(permit) = tokio::time::timeout_at(stop, credits.acquire()).await else { break };
                let Ok(permit) = permit else { break };
                permit.forget();
                let due = due_ack.load(Relaxed);
                if due > acked {
                    acked = due;
                    writer.queue(OP_TEXT, true, &crate::resume::control::ack(due));
                }
                writer.queue(opcode, true, &payload);
                // Batch while credits are available; flush when the window is full.
                if credits.available_permits() == 0 && writer.flush().await.is_err() {
                    break;
                }
            }
            let _ = writer.flush().await;
            writer
        });
        tasks.push(tokio::spawn(async move {
            while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(stop, reader.read_message()).await {
                if let Incoming::Text(t) = &msg {
                    if resumable && t.starts_with(crate::resume::control::PREFIX) {
                        continue;
                    }
                }
                if matches!(msg, Incoming::Text(_) | Incoming::Binary(_)) {
                    echoed.fetch_add(1, Relaxed);
                    window.add_permits(1);
                    if resumable {
                        let n = received.fetch_add(1, Relaxed) + 1;
                        if n % 64 == 0 {
                            to_ack.store(n, Relaxed);
                        }
                    }
                }
            }
            if let Ok(mut writer) = sender.await {
                writer.queue_close(Some(1000), "bench done");
                let _ = writer.flush().await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = echoed.load(Relaxed);
    let rate = n as f64 / secs;
    println!(
        "throughput: {conns} connections, {size} B {}, window {window}: {n} echoed in {secs:.1}s = {rate:.0} msg/s, {:.1} MB/s",
        match (kind.binary, kind.compressed) {
            (true, false) => "binary",
            (false, false) => "text",
            (true, true) => "binary, compressed",
            (false, true) => "text, compressed",
        },
        rate * size as f64 / 1e6
    );
    Ok(json!({"scenario": "throughput", "conns": conns, "size": size, "window": window, "messages": n,
        "seconds": secs, "messages_per_second": rate, "megabytes_per_second": rate * size as f64 / 1e6}))
}

/// Round-trip time percentiles at a fixed aggregate rate, one message in flight per connection.
pub async fn latency(
    common: &Common,
    conns: usize,
    rate: f64,
    duration: Duration,
    size: usize,
) -> Result<serde_json::Value, client::ClientError> {
    let mut common = common.clone();
    common.prepare()?;
    let mut connections = Vec::with_capacity(conns);
    for _ in 0..conns {
        connections.push(common.open(None).await?);
    }
    let per_conn = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now();
    let stop = start + duration;
    let payload: Arc<[u8]> = vec![b'x'; size].into();
    let mut tasks = Vec::new();
    for (i, mut conn) in connections.into_iter().enumerate() {
        let payload = payload.clone();
        // Spread the connections' send times evenly over one period.
        let first = start + per_conn.mul_f64(i as f64 / conns as f64);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval_at(first, per_conn);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if Instant::now() >= stop {
                    break;
                }
                let sent = Instant::now();
                if conn.writer.send(OP_TEXT, &payload).await.is_err() {
                    break;
                }
                // Answer the proxy's pings while waiting for the echo, as any client would.
                let echoed = loop {
                    match conn.reader.read_message().await {
                        Ok(Some(Incoming::Text(_))) => break true,
                        Ok(Some(Incoming::Ping(p))) => {
                            if conn.writer.send(OP_PONG, &p).await.is_err() {
                                break false;
                            }
                        }
                        Ok(Some(Incoming::Pong(_))) => {}
                        _ => break false,
                    }
                };
                if !echoed {
                    break;
                }
                samples.push(sent.elapsed().as_micros() as u64);
            }
            conn.writer.queue_close(Some(1000), "bench done");
            let _ = conn.writer.flush().await;
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    let (p50, p90, p99, p999, max) = (pct(0.5), pct(0.9), pct(0.99), pct(0.999), all.last().copied().unwrap_or(0));
    println!(
        "latency: {conns} connections at {rate:.0} msg/s for {duration:?}: {} samples; p50 {p50}µs p90 {p90}µs p99 {p99}µs p99.9 {p999}µs max {max}µs",
        all.len()
    );
    Ok(json!({"scenario": "latency", "conns": conns, "rate": rate, "samples": all.len(),
        "p50_us": p50, "p90_us": p90, "p99_us": p99, "p999_us": p999, "max_us": max}))
}

/// Opens `conns` connections (from several 127.0.0.x source addresses), reports the handshake
/// rate, holds them for `hold`, and counts those that ended early. Each connection answers
/// pings from the moment it is open, as a browser would.
/// `drop_all`: once all are open, every connection is dropped without a close frame (with
/// `wskeep_resume=1` in the URL: wskeep's detached sessions), and the hold then measures those.
pub async fn idle(
    common: &Common,
    conns: usize,
    hold: Duration,
    parallel: usize,
    drop_all: bool,
) -> Result<serde_json::Value, client::ClientError> {
    let mut common = common.clone();
    common.prepare()?;
    let target = Target::parse(&common.url)?;
    let loopback = target.host.starts_with("127.") || target.host == "localhost";
    let limiter = Arc::new(Semaphore::new(parallel.max(1)));
    let (lost, pings) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let release = tokio_util::sync::CancellationToken::new();
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        // 127.0.0.2 .. 127.0.0.33: about 28k ephemeral ports each.
        let bind = loopback.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 32) as u8)));
        let (common, limiter, opened_tx) = (common.clone(), limiter.clone(), opened_tx.clone());
        let (lost, pings, release) = (lost.clone(), pings.clone(), release.clone());
        tasks.push(tokio::spawn(async move {
            let conn = match limiter.acquire_owned().await {
                Ok(_permit) => common.open(bind).await.ok(),
                Err(_) => None,
            };
            let _ = opened_tx.send(conn.is_some());
            let Some(mut conn) = conn else { return };
            if drop_all {
                // Held until every connection is open, then dropped: TCP ends, no close frame.
                release.cancelled().await;
                return;
            }
            loop {
                tokio::select! {
                    _ = release.cancelled() => break,
                    msg = conn.reader.read_message() => match msg {
                        Ok(Some(Incoming::Ping(p))) => {
                            pings.fetch_add(1, Relaxed);
                            if conn.writer.send(OP_PONG, &p).await.is_err() {
                                lost.fetch_add(1, Relaxed);
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        _ => {
                            lost.fetch_add(1, Relaxed);
                            return;
                        }
                    },
                }
            }
            conn.writer.queue_close(Some(1000), "bench done");
            let _ = conn.writer.flush().await;
        }));
    }
    drop(opened_tx);
    // Each task reports once, when its handshake has succeeded or failed.
    let (mut opened, mut failed) = (0u64, 0u64);
    for _ in 0..conns {
        match opened_rx.recv().await {
            Some(true) => opened += 1,
            _ => failed += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = opened as f64 / secs;
    println!("idle: opened {opened} of {conns} in {secs:.1}s = {rate:.0} handshakes/s; holding for {hold:?}");
    if drop_all {
        release.cancel();
        println!("idle: dropped them all without a close frame");
    }
    tokio::time::sleep(hold).await;
    release.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (lost, pings) = (lost.load(Relaxed), pings.load(Relaxed));
    println!("idle: {lost} connection(s) lost during the hold, {failed} failed to open, {pings} pings answered");
    Ok(json!({"scenario": "idle", "conns": conns, "opened": opened, "failed": failed,
        "handshakes_per_second": rate, "lost": lost, "pings_answered": pings, "hold_seconds": hold.as_secs_f64()}))
}
