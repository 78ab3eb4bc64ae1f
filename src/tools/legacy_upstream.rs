//! A legacy upstream that behaves like the orchestrator of DESIGN.md, for `demo` and the tests:
//! a read deadline that only a protocol pong resets (Go's `SetReadDeadline` in a pong handler),
//! protocol pings at half the deadline, `{"type":"ping"}` answered with `{"type":"pong"}`, every
//! other message echoed. When the deadline fires it drops the TCP connection without a close
//! frame, as a Go server that closes its `net.Conn` does: the client sees 1006.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::tools::bench::echo::websocket_config;

#[derive(Debug, Clone)]
pub struct LegacyOptions {
    /// The read deadline, reset only by a pong.
    pub deadline: Duration,
    /// Protocol pings to the client (the orchestrator sends them at half the deadline).
    pub ping_interval: Duration,
    /// Stream messages of this size as fast as the connection takes them (slow-consumer tests).
    pub stream_size: Option<usize>,
}

impl LegacyOptions {
    pub fn with_deadline(deadline: Duration) -> LegacyOptions {
        LegacyOptions { deadline, ping_interval: deadline / 2, stream_size: None }
    }
}

/// What the legacy upstream saw, across all its connections.
#[derive(Debug, Default)]
pub struct LegacyStats {
    pub connections: AtomicU64,
    pub deadlines_fired: AtomicU64,
    pub pongs_received: AtomicU64,
    pub json_pings_answered: AtomicU64,
    pub messages_echoed: AtomicU64,
    pub messages_streamed: AtomicU64,
    /// Close codes received from its clients (1005 for a close frame without a code).
    pub closes_received: std::sync::Mutex<Vec<u16>>,
}

/// Starts the legacy upstream on `addr`; it serves until the runtime ends.
pub async fn start(addr: SocketAddr, options: LegacyOptions) -> std::io::Result<(SocketAddr, Arc<LegacyStats>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let stats = Arc::new(LegacyStats::default());
    let shared = stats.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp, options.clone(), shared.clone()));
        }
    });
    Ok((local, stats))
}

async fn serve(tcp: TcpStream, options: LegacyOptions, stats: Arc<LegacyStats>) {
    let _ = tcp.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(websocket_config(16 << 20))).await else {
        return;
    };
    stats.connections.fetch_add(1, Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (replies, mut outgoing) = mpsc::channel::<Message>(64);

    let writer_options = options.clone();
    let writer_stats = stats.clone();
    let writer = tokio::spawn(async move {
        let mut ping =
            tokio::time::interval_at(Instant::now() + writer_options.ping_interval, writer_options.ping_interval);
        let payload = writer_options.stream_size.map(|n| bytes::Bytes::from(vec![b'x'; n]));
        loop {
            let next = tokio::select! {
                biased;
                _ = ping.tick() => Message::Ping(bytes::Bytes::from_static(b"legacy")),
                reply = outgoing.recv() => match reply {
                    Some(m) => m,
                    None => return,
                },
                _ = std::future::ready(()), if payload.is_some() => {
                    writer_stats.messages_streamed.fetch_add(1, Relaxed);
                    Message::Binary(payload.clone().unwrap_or_default())
                }
            };
            if sink.send(next).await.is_err() {
                return;
            }
        }
    });

    let mut deadline = Instant::now() + options.deadline;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) => break,
            Err(_) => {
                // The read deadline fired: drop the connection, no close frame.
                stats.deadlines_fired.fetch_add(1, Relaxed);
                break;
            }
        };
        let reply = match next {
            Message::Pong(_) => {
                stats.pongs_received.fetch_add(1, Relaxed);
                deadline = Instant::now() + options.deadline;
                continue;
            }
            Message::Text(text) => match json_ping_reply(text.as_str()) {
                Some(pong) => {
                    stats.json_pings_answered.fetch_add(1, Relaxed);
                    Message::text(pong)
                }
                None => {
                    stats.messages_echoed.fetch_add(1, Relaxed);
                    Message::Text(text)
                }
            },
            Message::Binary(data) => {
                stats.messages_echoed.fetch_add(1, Relaxed);
                Message::Binary(data)
            }
            Message::Close(frame) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                stats.closes_received.lock().unwrap_or_else(|e| e.into_inner()).push(code);
                // tungstenite queued the answer; reading once more flushes it and sees the end.
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
                break;
            }
            Message::Ping(_) | Message::Frame(_) => continue,
        };
        if replies.send(reply).await.is_err() {
            break;
        }
    }
    writer.abort();
}

fn json_ping_reply(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value.get("type")? != "ping" {
        return None;
    }
    let mut reply = serde_json::json!({"type": "pong"});
    if let Some(id) = value.get("id") {
        reply["id"] = id.clone();
    }
    Some(reply.to_string())
}
