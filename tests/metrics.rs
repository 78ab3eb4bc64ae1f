//! The exported numbers: scripted endings against the metrics table and the endings table of
//! DESIGN.md, the admin endpoints, `promtool check metrics`, and a real Prometheus scraping the
//! admin port (including every query of `deploy/dashboard_queries.txt`).
//!
//! Real sockets on 127.0.0.1, port 0; every wait polls with a bound instead of sleeping.

mod common;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Bound on every wait that involves only wskeep and the test upstream.
const LIMIT: Duration = Duration::from_secs(10);
/// How often polls look again.
const POLL: Duration = Duration::from_millis(20);

// === helpers ===

/// Opens `ws://{addr}{path}` through a plain-TCP sidecar.
async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp).await.unwrap();
    ws
}

/// A sample's value, or `None` when the series is not exported at all (unlike `common::metric`,
/// which reads a missing series as 0 and so cannot tell a typo from a zero).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
}

fn close_codes(side: &str, direction: &str, code: &str) -> String {
    format!(r#"wskeep_close_codes_total{{code="{code}",direction="{direction}",side="{side}"}}"#)
}

fn ended(end: &str) -> String {
    format!(r#"wskeep_connection_duration_seconds_count{{end="{end}"}}"#)
}

/// Polls `check` until it returns `Some`, or panics with what it last saw.
async fn poll<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last seen:\n{last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Scrapes until `series` has exactly `want`; returns that scrape.
async fn wait_sample(admin: SocketAddr, series: &str, want: f64) -> String {
    poll(LIMIT, &format!("{series} == {want}"), || async {
        let text = common::scrape(admin).await;
        match sample(&text, series) {
            Some(v) if v == want => Ok(text),
            v => Err(format!("{series} = {v:?}")),
        }
    })
    .await
}

fn assert_sample(text: &str, series: &str, want: f64) {
    assert_eq!(sample(text, series), Some(want), "{series}\n--- /metrics ---\n{text}");
}

/// Reads the client until the connection ends; returns the close frame it was sent, if any.
async fn read_to_end(ws: &mut Ws) -> Option<CloseFrame> {
    let mut close = None;
    tokio::time::timeout(LIMIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                close = frame;
            }
        }
    })
    .await
    .expect("the connection ends within the limit");
    close
}

/// A clean client close with `code`, waiting for the closing handshake to finish.
async fn close_client(ws: &mut Ws, code: u16) {
    ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: "bye".into() })).await.unwrap();
    read_to_end(ws).await;
}

/// Sends `text` and waits for the upstream's echo.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(common::next_message(ws, LIMIT).await, Some(Message::text(text)));
}

/// Keeps reading the client (so tungstenite answers wskeep's pings) until `done` holds for a scrape.
async fn pump_until(ws: &mut Ws, admin: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("unexpected client message while pumping: {other:?}"),
            },
            _ = tick.tick() => {
                let text = common::scrape(admin).await;
                if done(&text) {
                    return text;
                }
                assert!(Instant::now() < deadline, "timed out waiting for {what}\n--- /metrics ---\n{text}");
            }
        }
    }
}

/// Sends a raw request head and returns the response status (without waiting for the body).
async fn raw_status(addr: SocketAddr, head: &str) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, async {
        let mut buf = [0u8; 4096];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response head within the limit");
    String::from_utf8_lossy(&raw).get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn upgrade_head(path: &str, key: Option<&str>) -> String {
    let key = key.map_or(String::new(), |k| format!("Sec-WebSocket-Key: {k}\r\n"));
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n{key}\r\n"
    )
}

fn keepalive(client_ping: &str, client_timeout: &str, upstream_ping: &str) -> String {
    format!(
        "[client_keepalive]\nping_interval = \"{client_ping}\"\ntimeout = \"{client_timeout}\"\n\
         [upstream_keepalive]\nping_interval = \"{upstream_ping}\"\n"
    )
}

// === endings ===

#[tokio::test]
async fn client_close_1000_is_counted_on_both_legs() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    echo(&mut ws, "hi").await;
    close_client(&mut ws, 1000).await;

    let text = wait_sample(sidecar.admin, &ended("client_close"), 1.0).await;
    assert_sample(&text, &close_codes("client", "received", "1000"), 1.0);
    // The client's close is answered with the same code.
    assert_sample(&text, &close_codes("client", "sent", "1000"), 1.0);
    assert_sample(&text, &close_codes("upstream", "sent", "1000"), 1.0);
    // The upstream's answer to it.
    assert_sample(&text, &close_codes("upstream", "received", "1000"), 1.0);
    for end in ["upstream_close", "client_timeout", "client_error", "upstream_timeout", "upstream_error", "shutdown"] {
        assert_sample(&text, &ended(end), 0.0);
    }
    assert_eq!(*upstream.closes.lock().unwrap(), vec![(1000, "bye".to_string())]);
}

#[tokio::test]
async fn upstream_close_4001_is_relayed_and_counted_as_4xxx() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    ws.send(Message::text("close:4001:x")).await.unwrap();
    let close = read_to_end(&mut ws).await.expect("the client is sent a close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4001, "x"));

    let text = wait_sample(sidecar.admin, &ended("upstream_close"), 1.0).await;
    assert_sample(&text, &close_codes("upstream", "received", "4xxx"), 1.0);
    assert_sample(&text, &close_codes("client", "sent", "4xxx"), 1.0);
    // The client's answer echoes the code.
    assert_sample(&text, &close_codes("client", "received", "4xxx"), 1.0);
    assert_sample(&text, &close_codes("upstream", "sent", "4xxx"), 1.0);
    assert_eq!(sample(&text, &close_codes("upstream", "received", "other")), None, "no stray code class");
    assert_sample(&text, &ended("client_close"), 0.0);
}

/// A WebSocket client on a raw socket, to see close frames on the wire: tungstenite rewrites a
/// received code it does not know (1014 among them) into 1002 "Protocol violation".
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let head = upgrade_head(path, Some("dGhlIHNhbXBsZSBub25jZQ=="));
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut ws = RawWs { tcp, buf: Vec::new() };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await;
        };
        let head: Vec<u8> = ws.buf.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        ws
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(LIMIT, self.tcp.read(&mut chunk)).await.expect("data within the limit").unwrap();
        assert!(n > 0, "the connection ended");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next frame (unmasked, as a server sends it): (opcode, payload).
    async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return (opcode, payload);
                }
            }
            self.fill().await;
        }
    }

    /// Writes one masked frame (payload under 126 bytes).
    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) {
        assert!(payload.len() < 126);
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// Reads until a close frame: its code and reason.
    async fn read_close(&mut self) -> (u16, String) {
        loop {
            let (opcode, payload) = self.read_frame().await;
            if opcode == 0x8 {
                assert!(payload.len() >= 2, "a close frame with a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
    }
}

#[tokio::test]
async fn upstream_killed_sends_1014_to_the_client() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let mut ws = RawWs::connect(sidecar.addr, "/chat").await;
    ws.write_frame(0x1, b"hi").await;
    assert_eq!(ws.read_frame().await, (0x1, b"hi".to_vec()));
    upstream.kill.cancel();
    let (code, reason) = ws.read_close().await;
    assert_eq!((code, reason.as_str()), (1014, "upstream connection lost"));
    // Answer the close, as a browser would.
    ws.write_frame(0x8, &code.to_be_bytes()).await;

    let text = wait_sample(sidecar.admin, &ended("upstream_error"), 1.0).await;
    assert_sample(&text, &close_codes("upstream", "received", "1006"), 1.0);
    assert_sample(&text, &close_codes("client", "sent", "1014"), 1.0);
    assert_sample(&text, &close_codes("client", "received", "1014"), 1.0);
    assert_eq!(sample(&text, &close_codes("upstream", "sent", "1001")), None, "nothing can be written upstream");
}

/// The client vanishes (a reset) after its upgrade request, while wskeep waits for the upstream:
/// the upstream's 101 is then passed on to a dead socket, so only the upstream leg upgrades. That
/// leg gets 1001 "client gone" and a closing handshake, not a bare TCP drop, and the ending is
/// counted like any other `client_error`. The client sends a frame right behind its request (as
/// eager clients do), so wskeep learns of the reset only when it writes the 101.
#[tokio::test]
async fn a_client_gone_before_its_101_gets_the_upstream_1001_and_is_counted() {
    let (upstream_addr, mut upstreams) = common::raw_upstream().await;
    let sidecar = common::start_sidecar(common::test_config(upstream_addr, None, "")).await;
    let client = tokio::net::TcpSocket::new_v4().unwrap();
    // Linger 0: closing sends a reset.
    client.set_zero_linger().unwrap();
    let mut client = client.connect(sidecar.addr).await.unwrap();
    let mut request = upgrade_head("/gone", Some("dGhlIHNhbXBsZSBub25jZQ==")).into_bytes();
    request.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    client.write_all(&request).await.unwrap();
    let (head, mut upstream) = tokio::time::timeout(LIMIT, upstreams.recv()).await.unwrap().unwrap();
    drop(client);
    let accept = common::accept_for(&head);
    let answer =
        format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
    upstream.write_all(answer.as_bytes()).await.unwrap();

    // A masked close frame (wskeep is the client on this leg): 1001 "client gone".
    let mut frame = [0u8; 6];
    tokio::time::timeout(LIMIT, upstream.read_exact(&mut frame))
        .await
        .expect("wskeep writes within the limit")
        .expect("a close frame, not the end of the connection");
    assert_eq!(frame[0], 0x88, "a close frame: {frame:?}");
    assert_eq!(frame[1] & 0x80, 0x80, "masked");
    let mut payload = vec![0u8; (frame[1] & 0x7f) as usize];
    upstream.read_exact(&mut payload).await.unwrap();
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= frame[2 + i % 4];
    }
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    assert_eq!(&payload[2..], b"client gone");
    // The closing handshake completes: the answer, then wskeep ends the connection.
    upstream.write_all(&[0x88, 0x02, 0x03, 0xe8]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, upstream.read_to_end(&mut rest)).await.expect("wskeep ends the leg").unwrap();

    let text = wait_sample(sidecar.admin, &ended("client_error"), 1.0).await;
    assert_sample(&text, &close_codes("upstream", "sent", "1001"), 1.0);
    assert_sample(&text, &close_codes("upstream", "received", "1000"), 1.0);
    assert_sample(&text, &close_codes("client", "received", "1006"), 1.0);
    assert_sample(&text, "wskeep_connections_total", 0.0);
    assert_sample(&text, "wskeep_connections_active", 0.0);
}

#[tokio::test]
async fn silent_client_times_out_and_upstream_gets_1001() {
    let upstream = common::TestUpstream::start().await;
    let config = common::test_config(upstream.addr, None, &keepalive("100ms", "300ms", "0s"));
    let sidecar = common::start_sidecar(config).await;
    // A client that is not polled: it neither reads nor answers pings.
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    let started = Instant::now();

    let closes = upstream.closes.clone();
    let seen = poll(LIMIT, "the upstream to be sent a close", || {
        let closes = closes.clone();
        async move {
            let seen = closes.lock().unwrap().clone();
            if seen.is_empty() {
                Err("no close yet".into())
            } else {
                Ok(seen)
            }
        }
    })
    .await;
    assert_eq!(seen, vec![(1001, "client timed out".to_string())]);
    assert!(started.elapsed() >= Duration::from_millis(250), "timed out too early: {:?}", started.elapsed());

    // Now read: the pings it never answered, then the 1001 wskeep could still write.
    let close = read_to_end(&mut ws).await.expect("the client is sent a close frame");
    assert_eq!(u16::from(close.code), 1001, "{close:?}");

    let text = wait_sample(sidecar.admin, &ended("client_timeout"), 1.0).await;
    assert_sample(&text, &close_codes("upstream", "sent", "1001"), 1.0);
    assert_sample(&text, &close_codes("client", "sent", "1001"), 1.0);
    assert!(common::metric(&text, r#"wskeep_pings_sent_total{side="client"}"#) >= 1.0, "{text}");
    assert_sample(&text, r#"wskeep_pongs_received_total{side="client"}"#, 0.0);
}

#[tokio::test]
async fn upgrade_failures_are_counted_by_reason() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;

    let tcp = TcpStream::connect(sidecar.addr).await.unwrap();
    let refused = tokio_tungstenite::client_async(format!("ws://{}/refuse", sidecar.addr), tcp).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected the upstream's 403, got {other:?}"),
    }
    assert_eq!(raw_status(sidecar.addr, &upgrade_head("/chat", None)).await, 400);

    let text = wait_sample(sidecar.admin, r#"wskeep_upgrade_failures_total{reason="upstream_refused"}"#, 1.0).await;
    let text = if sample(&text, r#"wskeep_upgrade_failures_total{reason="bad_request"}"#) == Some(1.0) {
        text
    } else {
        wait_sample(sidecar.admin, r#"wskeep_upgrade_failures_total{reason="bad_request"}"#, 1.0).await
    };
    for reason in [
        "upstream_unreachable",
        "upstream_timeout",
        "upstream_bad_handshake",
        "limit",
        "handshake_limit",
        "local_limit",
        "draining",
    ] {
        assert_sample(&text, &format!(r#"wskeep_upgrade_failures_total{{reason="{reason}"}}"#), 0.0);
    }
    assert_sample(&text, "wskeep_connections_total", 0.0);
    // The request without a key never reached the upstream; the refused one did.
    assert_eq!(upstream.seen.lock().unwrap().len(), 1);
}

// === histograms and counters ===

#[tokio::test]
async fn duration_histogram_count_and_sum_match_the_lifetime() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let before_connect = Instant::now();
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    echo(&mut ws, "hi").await;
    // wskeep's clock for this connection surely started before the echo came back.
    let opened = Instant::now();
    // The lifetime under test: held open on purpose.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let held = opened.elapsed();
    close_client(&mut ws, 1000).await;

    let text = wait_sample(sidecar.admin, &ended("client_close"), 1.0).await;
    let upper = before_connect.elapsed();
    let sum = sample(&text, r#"wskeep_connection_duration_seconds_sum{end="client_close"}"#).expect("a _sum");
    assert!(
        held.as_secs_f64() - 0.01 <= sum && sum <= upper.as_secs_f64() + 0.01,
        "duration sum {sum} outside [{held:?}, {upper:?}]"
    );
    assert_sample(&text, r#"wskeep_connection_duration_seconds_bucket{end="client_close",le="1"}"#, 1.0);
    assert_sample(&text, r#"wskeep_connection_duration_seconds_bucket{end="client_close",le="+Inf"}"#, 1.0);
    assert_sample(&text, r#"wskeep_connection_duration_seconds_sum{end="upstream_close"}"#, 0.0);

    // A second, shorter connection adds to the same series.
    let before_second = Instant::now();
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    close_client(&mut ws, 1000).await;
    let text = wait_sample(sidecar.admin, &ended("client_close"), 2.0).await;
    let second_upper = before_second.elapsed();
    let sum2 = sample(&text, r#"wskeep_connection_duration_seconds_sum{end="client_close"}"#).unwrap();
    assert!(sum2 > sum && sum2 - sum <= second_upper.as_secs_f64() + 0.01, "{sum} then {sum2}");
}

#[tokio::test]
async fn rtt_histograms_fill_when_pings_are_answered() {
    let upstream = common::TestUpstream::start().await;
    let config = common::test_config(upstream.addr, None, &keepalive("100ms", "5s", "100ms"));
    let sidecar = common::start_sidecar(config).await;
    let mut ws = ws_connect(sidecar.addr, "/chat").await;

    let text = pump_until(&mut ws, sidecar.admin, "RTT samples on both legs", |t| {
        common::metric(t, r#"wskeep_ping_rtt_seconds_count{side="client"}"#) > 0.0
            && common::metric(t, r#"wskeep_ping_rtt_seconds_count{side="upstream"}"#) > 0.0
    })
    .await;
    for side in ["client", "upstream"] {
        let count = common::metric(&text, &format!(r#"wskeep_ping_rtt_seconds_count{{side="{side}"}}"#));
        let sum = common::metric(&text, &format!(r#"wskeep_ping_rtt_seconds_sum{{side="{side}"}}"#));
        assert!(sum > 0.0 && sum < count, "{side}: rtt sum {sum} for {count} loopback pings");
        let bucket = format!(r#"wskeep_ping_rtt_seconds_bucket{{side="{side}",le="1"}}"#);
        assert_eq!(common::metric(&text, &bucket), count, "loopback pings answer within 1 s");
        assert!(common::metric(&text, &format!(r#"wskeep_pings_sent_total{{side="{side}"}}"#)) > 0.0, "{text}");
        assert!(common::metric(&text, &format!(r#"wskeep_pongs_received_total{{side="{side}"}}"#)) > 0.0, "{text}");
        // wskeep's pings are hop-by-hop: neither peer pinged wskeep.
        assert_sample(&text, &format!(r#"wskeep_pings_answered_total{{side="{side}"}}"#), 0.0);
    }
    close_client(&mut ws, 1000).await;
}

#[tokio::test]
async fn message_and_byte_counters_are_exact() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    let sent = vec![
        Message::text("one.."),
        Message::binary(vec![1u8; 1000]),
        Message::text("two.."),
        Message::binary(vec![2u8; 1000]),
        Message::text("three"),
    ];
    for msg in &sent {
        ws.send(msg.clone()).await.unwrap();
    }
    for msg in &sent {
        assert_eq!(common::next_message(&mut ws, LIMIT).await.as_ref(), Some(msg));
    }
    let text = wait_sample(sidecar.admin, r#"wskeep_messages_total{direction="upstream_to_client"}"#, 5.0).await;
    assert_sample(&text, r#"wskeep_messages_total{direction="client_to_upstream"}"#, 5.0);
    assert_sample(&text, r#"wskeep_message_bytes_total{direction="client_to_upstream"}"#, 2015.0);
    assert_sample(&text, r#"wskeep_message_bytes_total{direction="upstream_to_client"}"#, 2015.0);

    // Close frames are not messages.
    close_client(&mut ws, 1000).await;
    let text = wait_sample(sidecar.admin, &ended("client_close"), 1.0).await;
    assert_sample(&text, r#"wskeep_messages_total{direction="client_to_upstream"}"#, 5.0);
    assert_sample(&text, r#"wskeep_messages_total{direction="upstream_to_client"}"#, 5.0);
    assert_sample(&text, r#"wskeep_message_bytes_total{direction="upstream_to_client"}"#, 2015.0);
}

#[tokio::test]
async fn json_pings_are_answered_and_counted_but_not_relayed() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let mut ws = ws_connect(sidecar.addr, "/chat").await;
    ws.send(Message::text(r#"{"type":"ping","id":7}"#)).await.unwrap();
    let pong = common::next_message(&mut ws, LIMIT).await.expect("a JSON pong");
    let pong: Value = serde_json::from_str(pong.to_text().unwrap()).unwrap();
    assert_eq!((pong["type"].as_str(), pong["id"].as_i64()), (Some("pong"), Some(7)));
    let text = wait_sample(sidecar.admin, "wskeep_json_pings_answered_total", 1.0).await;
    assert_sample(&text, r#"wskeep_messages_total{direction="client_to_upstream"}"#, 0.0);
    close_client(&mut ws, 1000).await;
}

#[tokio::test]
async fn active_gauge_and_total_counter_follow_connections() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let text = common::scrape(sidecar.admin).await;
    assert_sample(&text, "wskeep_connections_active", 0.0);
    assert_sample(&text, "wskeep_connections_total", 0.0);

    let mut first = ws_connect(sidecar.addr, "/a").await;
    let text = wait_sample(sidecar.admin, "wskeep_connections_active", 1.0).await;
    assert_sample(&text, "wskeep_connections_total", 1.0);
    let mut second = ws_connect(sidecar.addr, "/b").await;
    let text = wait_sample(sidecar.admin, "wskeep_connections_active", 2.0).await;
    assert_sample(&text, "wskeep_connections_total", 2.0);

    close_client(&mut first, 1000).await;
    let text = wait_sample(sidecar.admin, "wskeep_connections_active", 1.0).await;
    assert_sample(&text, "wskeep_connections_total", 2.0);
    second.send(Message::text("close:1000:done")).await.unwrap();
    read_to_end(&mut second).await;
    let text = wait_sample(sidecar.admin, "wskeep_connections_active", 0.0).await;
    assert_sample(&text, "wskeep_connections_total", 2.0);
    let ends: f64 = ["client_close", "upstream_close"].iter().map(|e| common::metric(&text, &ended(e))).sum();
    assert_eq!(ends, 2.0, "{text}");
}

// === admin endpoints ===

async fn connections_json(admin: SocketAddr) -> (String, Value) {
    let (status, body) = common::http_get(admin, "/connections").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (body, json)
}

#[tokio::test]
async fn connections_endpoint_lists_live_connections_without_query_strings() {
    let upstream = common::TestUpstream::start().await;
    let config = common::test_config(upstream.addr, None, &keepalive("100ms", "5s", "100ms"));
    let sidecar = common::start_sidecar(config).await;
    let tcp = TcpStream::connect(sidecar.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{}/room/42?token=secret", sidecar.addr), tcp).await.unwrap();
    assert_eq!(upstream.last_request().uri, "/room/42?token=secret", "the upstream gets the query");
    echo(&mut ws, "hello").await;
    echo(&mut ws, "again").await;

    // Keep answering pings until both legs have a round-trip time.
    let admin = sidecar.admin;
    let deadline = Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (body, list) = loop {
        tokio::select! {
            msg = ws.next() => assert!(matches!(msg, Some(Ok(Message::Ping(_)))), "{msg:?}"),
            _ = tick.tick() => {
                let (body, list) = connections_json(admin).await;
                let rtt = |leg: &str| list[0][leg]["last_rtt_seconds"].is_number();
                if rtt("client") && rtt("upstream") {
                    break (body, list);
                }
                assert!(Instant::now() < deadline, "no RTT on both legs: {body}");
            }
        }
    };
    let list = list.as_array().expect("a JSON array");
    assert_eq!(list.len(), 1, "{body}");
    let conn = &list[0];
    assert!(conn["id"].as_u64().is_some(), "{body}");
    assert_eq!(conn["peer"].as_str(), Some(local.to_string().as_str()), "{body}");
    assert_eq!(conn["path"].as_str(), Some("/room/42"), "{body}");
    let age = conn["age_seconds"].as_f64().expect("age_seconds");
    assert!((0.0..LIMIT.as_secs_f64()).contains(&age), "{body}");
    for leg in ["client", "upstream"] {
        let l = &conn[leg];
        let since = l["since_last_frame_seconds"].as_f64().expect("since_last_frame_seconds");
        assert!(since >= 0.0 && since <= age, "{leg}: {body}");
        let rtt = l["last_rtt_seconds"].as_f64().unwrap();
        assert!(rtt > 0.0 && rtt < 1.0, "{leg}: {body}");
        assert_eq!(l["messages"].as_u64(), Some(2), "{leg}: {body}");
        assert_eq!(l["bytes"].as_u64(), Some(10), "{leg}: {body}");
    }
    assert!(!body.contains("secret"), "the query string leaked into /connections: {body}");
    let text = common::scrape(admin).await;
    assert!(!text.contains("secret"), "the query string leaked into /metrics");
    assert!(!text.contains("/room"), "a path became a metric label");

    close_client(&mut ws, 1000).await;
    poll(LIMIT, "an empty /connections", || async {
        let (body, list) = connections_json(admin).await;
        if list.as_array().is_some_and(|l| l.is_empty()) {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
}

async fn status(admin: SocketAddr, path: &str) -> u16 {
    common::http_get(admin, path).await.unwrap().0
}

async fn wait_status(admin: SocketAddr, path: &str, want: u16) {
    poll(LIMIT, &format!("{path} -> {want}"), || async {
        match status(admin, path).await {
            s if s == want => Ok(()),
            s => Err(s.to_string()),
        }
    })
    .await
}

#[tokio::test]
async fn health_and_readiness_follow_the_drain() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    assert_eq!(status(sidecar.admin, "/healthz").await, 200);
    assert_eq!(status(sidecar.admin, "/readyz").await, 200);
    sidecar.drain.start();
    wait_status(sidecar.admin, "/readyz", 503).await;
    assert_eq!(status(sidecar.admin, "/healthz").await, 200, "draining is not unhealthy");

    // The same through the admin endpoint.
    let other = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    assert_eq!(status(other.admin, "/readyz").await, 200);
    let (code, body) = common::http_get(other.admin, "/drain").await.unwrap();
    assert_eq!(code, 202, "{body}");
    wait_status(other.admin, "/readyz", 503).await;
    assert_eq!(status(other.admin, "/healthz").await, 200);
    assert_eq!(status(other.admin, "/nope").await, 404);
}

// === promtool and a real Prometheus ===

/// Serves a variety of traffic: closed connections, pings and RTTs on both legs, a JSON ping,
/// an upstream refusal, a request without a key, and a plain HTTP request. Returns with
/// `wskeep_connections_total` = 3 and every connection closed.
async fn varied_traffic(sidecar: &common::Sidecar, cert: Option<&common::TestCert>) {
    let (addr, admin) = (sidecar.addr, sidecar.admin);
    if let Some(cert) = cert {
        let mut ws = common::wss(addr, cert, "/chat?token=secret", &[]).await;
        ws.send(Message::text(r#"{"type":"ping","id":1}"#)).await.unwrap();
        assert!(common::next_message(&mut ws, LIMIT).await.is_some_and(|m| m.is_text()));
        ws.send(Message::text("close:4001:x")).await.unwrap();
        tokio::time::timeout(LIMIT, async { while let Some(Ok(_)) = ws.next().await {} })
            .await
            .expect("the connection ends");
    } else {
        let mut ws = ws_connect(addr, "/chat?token=secret").await;
        ws.send(Message::text(r#"{"type":"ping","id":1}"#)).await.unwrap();
        assert!(common::next_message(&mut ws, LIMIT).await.is_some_and(|m| m.is_text()));
        ws.send(Message::text("close:4001:x")).await.unwrap();
        read_to_end(&mut ws).await;
    }
    // Pings answered on both legs (RTTs), then a client close.
    let mut ws = ws_connect_any(addr, cert).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let text = common::scrape(admin).await;
        if common::metric(&text, r#"wskeep_ping_rtt_seconds_count{side="client"}"#) > 0.0
            && common::metric(&text, r#"wskeep_ping_rtt_seconds_count{side="upstream"}"#) > 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "no RTTs\n{text}");
        let _ = tokio::time::timeout(Duration::from_millis(50), ws.next()).await;
    }
    ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await.unwrap();
    let _ = tokio::time::timeout(LIMIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    // A third, plain one.
    let mut ws = ws_connect_any(addr, cert).await;
    ws.send(Message::binary(vec![0u8; 100])).await.unwrap();
    assert!(common::next_message(&mut ws, LIMIT).await.is_some_and(|m| m.is_binary()));
    ws.send(Message::Close(None)).await.unwrap();
    let _ = tokio::time::timeout(LIMIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;

    let head = upgrade_head("/refuse", Some("dGhlIHNhbXBsZSBub25jZQ=="));
    if let Some(cert) = cert {
        let mut tls = common::tls_connect(addr, cert).await;
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 403"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        // A plain HTTP request, proxied to the upstream (which is not an HTTP server).
        let mut tls = common::tls_connect(addr, cert).await;
        tls.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(LIMIT, tls.read_to_end(&mut raw)).await;
        assert!(raw.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(&raw));
    } else {
        assert_eq!(raw_status(addr, &head).await, 403);
        assert_eq!(raw_status(addr, &upgrade_head("/chat", None)).await, 400);
        let (code, _) = common::http_get(addr, "/health").await.unwrap();
        assert!(code >= 200, "a plain HTTP answer");
    }

    let text = wait_sample(admin, "wskeep_connections_active", 0.0).await;
    assert_sample(&text, "wskeep_connections_total", 3.0);
    let text = poll(LIMIT, "3 ended connections", || async {
        let text = common::scrape(admin).await;
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("wskeep_connection_duration_seconds_count{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        if n == 3.0 {
            Ok(text)
        } else {
            Err(format!("{n} ended"))
        }
    })
    .await;
    assert!(common::metric(&text, "wskeep_json_pings_answered_total") >= 1.0);
    assert!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="upstream_refused"}"#) >= 1.0);
    assert!(text.contains("wskeep_http_requests_total{code="), "a plain HTTP request was counted\n{text}");
}

type AnyWs = Box<dyn WsLike>;
trait WsLike:
    futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
    + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
    + Unpin
    + Send
{
}
impl<T> WsLike for T where
    T: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin
        + Send
{
}

async fn ws_connect_any(addr: SocketAddr, cert: Option<&common::TestCert>) -> AnyWs {
    match cert {
        Some(cert) => Box::new(common::wss(addr, cert, "/chat", &[]).await),
        None => Box::new(ws_connect(addr, "/chat").await),
    }
}

/// The keepalive of the Prometheus tests: pings on both legs, so RTTs are measured.
fn pinging() -> String {
    keepalive("100ms", "10s", "100ms")
}

#[tokio::test]
async fn promtool_accepts_the_exposition_after_traffic() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, &pinging())).await;
    varied_traffic(&sidecar, None).await;
    let text = common::scrape(sidecar.admin).await;
    assert!(!text.contains("secret"));
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("promtool is required (apt-get install -y prometheus): {e}"));
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server scraping one target every second, killed when dropped (also on panic).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: wskeep\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        // A free loopback port: bound, then released for Prometheus.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("/usr/bin/prometheus is required (apt-get install -y prometheus): {e}"));
        let prometheus = Prometheus { child, addr, log, _dir: dir };
        let log = prometheus.log.clone();
        poll(Duration::from_secs(20), "Prometheus to be ready", || {
            let log = log.clone();
            async move {
                match http10_get(addr, "/-/ready").await {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default())),
                }
            }
        })
        .await;
        prometheus
    }

    /// Runs an instant query; returns `data` of the answer.
    async fn query(&self, promql: &str) -> Result<Value, String> {
        let (code, body) = http10_get(self.addr, &format!("/api/v1/query?query={}", urlencode(promql)))
            .await
            .map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
        if code != 200 || json["status"] != "success" {
            return Err(format!("{promql}: {code} {body}"));
        }
        Ok(json["data"].clone())
    }

    /// The single value of a query whose answer is one sample.
    async fn value(&self, promql: &str) -> Result<f64, String> {
        let data = self.query(promql).await?;
        let result = data["result"].as_array().ok_or(format!("{promql}: {data}"))?;
        match result.as_slice() {
            [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()).ok_or(format!("{promql}: {data}")),
            _ => Err(format!("{promql}: {data}")),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An HTTP/1.0 GET (so the answer is neither chunked nor kept alive): (status, body).
async fn http10_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_admin_port() {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    for _ in 0..3 {
        let mut ws = ws_connect(sidecar.addr, "/chat?token=secret").await;
        echo(&mut ws, "hi").await;
        close_client(&mut ws, 1000).await;
    }
    wait_sample(sidecar.admin, &ended("client_close"), 3.0).await;

    let prometheus = Prometheus::start(sidecar.admin).await;
    let checks = [
        (r#"up{job="wskeep"}"#, 1.0),
        (r#"wskeep_connections_total{job="wskeep"}"#, 3.0),
        (r#"sum(wskeep_connection_duration_seconds_count{job="wskeep"})"#, 3.0),
        (r#"wskeep_connection_duration_seconds_count{job="wskeep",end="client_close"}"#, 3.0),
        (r#"wskeep_connections_active{job="wskeep"}"#, 0.0),
    ];
    poll(Duration::from_secs(20), "Prometheus to see the sidecar's numbers", || async {
        let mut wrong = Vec::new();
        for (promql, want) in checks {
            match prometheus.value(promql).await {
                Ok(v) if v == want => {}
                other => wrong.push(format!("{promql} = {other:?}, want {want}")),
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("{}\n--- prometheus log ---\n{}", wrong.join("\n"), prometheus.log()))
        }
    })
    .await;
    drop(prometheus);
}

/// One PromQL query per line; blank lines and `#` comments are skipped.
fn dashboard_queries() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/dashboard_queries.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data() {
    let queries = dashboard_queries();
    assert!(!queries.is_empty(), "deploy/dashboard_queries.txt lists no query");
    // TLS, so that the certificate expiry gauge is set.
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), &pinging())).await;
    varied_traffic(&sidecar, Some(&cert)).await;

    let prometheus = Prometheus::start(sidecar.admin).await;
    // rate() and increase() need two samples in their window: poll until every query answers.
    poll(Duration::from_secs(30), "every dashboard query to return data", || async {
        let mut empty = Vec::new();
        for promql in &queries {
            match prometheus.query(promql).await {
                Ok(data) if data["resultType"] != "vector" && data["resultType"] != "matrix" => {}
                Ok(data) if data["result"].as_array().is_some_and(|r| !r.is_empty()) => {}
                other => empty.push(format!("{promql} -> {other:?}")),
            }
        }
        if empty.is_empty() {
            Ok(())
        } else {
            Err(format!("{} of {} queries empty:\n{}", empty.len(), queries.len(), empty.join("\n")))
        }
    })
    .await;
    drop(prometheus);
}
