//! Hostile and malformed input: each gets the right answer (a TLS failure, 400, 405, 431, 426, or
//! a close frame with 1002, 1007 or 1009) and has no effect on other connections. Every test keeps
//! one healthy echo connection open across the abuse and checks that it still echoes afterwards.
//! A hostile upstream too: a 101 that breaks RFC 6455 gets the client 502.
//!
//! Close codes are read with wskeep's own frame client, which reports them raw (tungstenite's
//! client turns a received 1014 into 1002), and malformed frames are written with `queue_raw`
//! after a proper handshake.
mod common;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wskeep::tools::client::{self, ClientOptions, Connection, Incoming};

use common::{Sidecar, TestCert, TestUpstream};

const LIMIT: Duration = Duration::from_secs(5);
const MAX_MESSAGE: usize = 1 << 20;

struct Setup {
    cert: TestCert,
    upstream: TestUpstream,
    sidecar: Sidecar,
    healthy: common::TlsWs,
}

/// A TLS sidecar (1 MiB messages, 1 s handshake timeout) and one healthy echo connection.
async fn setup() -> Setup {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let extra = "[limits]\nmax_message_size = \"1MiB\"\n";
    let mut config = common::test_config(upstream.addr, Some(&cert), extra);
    config.listen.handshake_timeout = Duration::from_secs(1);
    let sidecar = common::start_sidecar(config).await;
    let mut healthy = common::wss(sidecar.addr, &cert, "/", &[]).await;
    echo(&mut healthy).await;
    Setup { cert, upstream, sidecar, healthy }
}

impl Setup {
    /// The healthy connection still echoes, and the sidecar still takes new clients.
    async fn still_healthy(&mut self) {
        echo(&mut self.healthy).await;
        let mut fresh = common::wss(self.sidecar.addr, &self.cert, "/", &[]).await;
        echo(&mut fresh).await;
        fresh.close(None).await.unwrap();
        echo(&mut self.healthy).await;
    }

    async fn metrics(&self) -> String {
        common::scrape(self.sidecar.admin).await
    }
}

async fn echo(ws: &mut common::TlsWs) {
    let msg = Message::text(format!("still here {}", fastrand::u32(..)));
    ws.send(msg.clone()).await.unwrap();
    assert_eq!(common::next_message(ws, LIMIT).await, Some(msg), "the healthy connection echoes");
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

// === the TLS port ===

/// A TLS alert record (content type 21), or nothing at all: never an HTTP answer or a handshake.
fn assert_alert_or_nothing(answer: &[u8], what: &str) {
    assert!(answer.is_empty() || answer[0] == 21, "{what}: wskeep answered {:?}", &answer[..answer.len().min(32)]);
}

#[tokio::test]
async fn garbage_and_truncated_tls_records_fail_alone() {
    let mut s = setup().await;
    let addr = s.sidecar.addr;
    // Random bytes; a record of an unknown content type; a handshake record that announces more
    // than TLS allows; a ClientHello cut short, both ending the stream and holding it open (the
    // handshake timeout, 1 s here, ends the latter).
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert_alert_or_nothing(&common::send_junk(addr, &garbage, false, LIMIT).await, "garbage");
    assert_alert_or_nothing(
        &common::send_junk(addr, &[0x63, 0x03, 0x03, 0x00, 0x02, 1, 2], false, LIMIT).await,
        "bad type",
    );
    let huge = [0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb];
    assert_alert_or_nothing(&common::send_junk(addr, &huge, false, LIMIT).await, "oversized record");
    let hello = client_hello_prefix();
    assert_alert_or_nothing(&common::send_junk(addr, &hello, true, LIMIT).await, "truncated hello, EOF");
    let started = Instant::now();
    assert_alert_or_nothing(&common::send_junk(addr, &hello, false, LIMIT).await, "truncated hello, held open");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "closed after {took:?}");
    // A connection that sends nothing at all is also ended by the handshake timeout.
    assert!(common::send_junk(addr, b"", false, LIMIT).await.is_empty());
    s.still_healthy().await;
    let text = s.metrics().await;
    assert!(common::metric(&text, "wskeep_tls_handshake_failures_total") >= 6.0, "{text}");
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 1.0);
}

/// The first 60 bytes of a real ClientHello record (the rest never comes).
fn client_hello_prefix() -> Vec<u8> {
    let mut record = vec![0x16, 0x03, 0x01, 0x01, 0x00]; // handshake, 256 bytes announced
    record.extend_from_slice(&[0x01, 0x00, 0x00, 0xfc, 0x03, 0x03]); // ClientHello, TLS 1.2
    record.extend((0..49u8).map(|i| i.wrapping_mul(37)));
    record
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_refused_at_once() {
    let mut s = setup().await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let started = Instant::now();
        let answer = common::send_junk(s.sidecar.addr, request, false, LIMIT).await;
        assert!(started.elapsed() < Duration::from_millis(900), "not refused at once: {:?}", started.elapsed());
        assert!(!answer.starts_with(b"HTTP/"), "plaintext must not be served on the TLS port");
        assert_alert_or_nothing(&answer, "plain HTTP");
    }
    assert!(s.upstream.seen.lock().unwrap().len() == 1, "only the healthy connection reached the upstream");
    s.still_healthy().await;
}

// === HTTP heads ===

/// Sends `request` over TLS (from its own task: wskeep may answer before it has read it all) and
/// reads the response head and body: (status, head, body).
async fn exchange(s: &Setup, request: Vec<u8>) -> (u16, String, String) {
    let tls = common::tls_connect(s.sidecar.addr, &s.cert).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        wr
    });
    let response = tokio::time::timeout(LIMIT, read_response(&mut rd)).await.expect("an HTTP answer in time");
    drop(writer);
    response
}

async fn read_response<R: AsyncRead + Unpin>(rd: &mut R) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = response.parse(&buf) {
            let status = response.code.unwrap();
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| std::str::from_utf8(h.value).unwrap().trim().parse::<usize>().unwrap());
            while buf.len() < len + length {
                let n = rd.read(&mut chunk).await.unwrap_or(0);
                assert!(n > 0, "the body was cut short");
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..len]).to_ascii_lowercase();
            return (status, head, String::from_utf8_lossy(&buf[len..len + length]).into_owned());
        }
        let n = rd.read(&mut chunk).await.unwrap_or(0);
        assert!(n > 0, "the connection ended without a response: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn malformed_request_lines_and_headers_get_400() {
    let mut s = setup().await;
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET /\x01path HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n folded: continuation\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",
    ];
    for &request in cases {
        let (status, _, _) = exchange(&s, request.to_vec()).await;
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(request));
        echo(&mut s.healthy).await;
    }
    // Nothing malformed reached the upstream (it saw only the healthy handshake).
    assert_eq!(s.upstream.seen.lock().unwrap().len(), 1);
    s.still_healthy().await;
}

#[tokio::test]
async fn oversized_heads_get_431() {
    let mut s = setup().await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let big = |extra: &str, filler: usize| {
        format!("GET /big HTTP/1.1\r\nHost: x\r\n{extra}X-Filler: {}\r\n\r\n", "f".repeat(filler)).into_bytes()
    };
    let many = |extra: &str, n: usize| {
        let lines: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
        format!("GET /many HTTP/1.1\r\nHost: x\r\n{extra}{lines}\r\n").into_bytes()
    };
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "p".repeat(40 * 1024)).into_bytes();
    for (name, request) in [
        ("one 40 KiB header", big("", 40 * 1024)),
        ("a 33 KiB head", big("", 33 * 1024)),
        ("a 1 MiB header", big("", 1 << 20)),
        ("a 40 KiB upgrade", big(upgrade, 40 * 1024)),
        ("200 headers", many("", 200)),
        ("200 headers on an upgrade", many(upgrade, 200)),
        ("a 40 KiB request target", long_target),
    ] {
        let (status, _, _) = exchange(&s, request).await;
        assert!(status == 431 || (name.contains("target") && status == 414), "{name}: got {status}");
        echo(&mut s.healthy).await;
    }
    // Just under the limit is served (the echo upstream refuses a plain GET: any answer but 431).
    let (status, _, _) = exchange(&s, big("", 30 * 1024)).await;
    assert_ne!(status, 431, "a 30 KiB head is within the 32 KiB limit");
    s.still_healthy().await;
}

#[tokio::test]
async fn bad_upgrade_requests_get_400_or_426_with_the_supported_version() {
    let mut s = setup().await;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let request = |method: &str, lines: &str| {
        format!("{method} /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{lines}\r\n")
            .into_bytes()
    };
    let cases = [
        ("no key", request("GET", "Sec-WebSocket-Version: 13\r\n"), 400),
        ("short key", request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n"), 400),
        (
            "key not base64",
            request("GET", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n"),
            400,
        ),
        ("two keys", request("GET", &format!("Sec-WebSocket-Version: 13\r\n{key}{key}")), 400),
        ("POST", request("POST", &format!("Sec-WebSocket-Version: 13\r\n{key}Content-Length: 0\r\n")), 400),
        ("no version", request("GET", key), 426),
        ("version 8", request("GET", &format!("Sec-WebSocket-Version: 8\r\n{key}")), 426),
        ("version junk", request("GET", &format!("Sec-WebSocket-Version: 13, 8\r\n{key}")), 426),
        (
            "two versions",
            request("GET", &format!("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\n{key}")),
            426,
        ),
    ];
    for (name, bytes, want) in cases {
        let (status, head, _) = exchange(&s, bytes).await;
        assert_eq!(status, want, "{name}");
        if want == 426 {
            assert!(head.contains("\r\nsec-websocket-version: 13\r\n"), "{name}: 426 names the version: {head}");
        }
        echo(&mut s.healthy).await;
    }
    // HTTP/1.0 cannot upgrade.
    let (status, _, _) = exchange(&s, format!("GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}\r\n").into_bytes()).await;
    assert_eq!(status, 400, "HTTP/1.0");
    assert_eq!(s.upstream.seen.lock().unwrap().len(), 1, "no bad upgrade reached the upstream");
    let text = s.metrics().await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="bad_request"}"#), 10.0, "{text}");
    s.still_healthy().await;
}

// === HTTP request rules ===

/// RFC 9112 §3.2 and the rules of a proxy that is not a tunnel: an HTTP/1.1 request without
/// `Host`, or with two, gets 400, and so does an upgrade that carries a body (its bytes would be
/// taken for the WebSocket stream); `CONNECT` gets 405. None of them reaches the upstream.
#[tokio::test]
async fn requests_without_one_host_or_with_an_upgrade_body_get_400_and_connect_405() {
    let mut s = setup().await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let body = r#"{"smuggled":"yes"}"#;
    let cases = [
        ("plain, no Host", "GET /x HTTP/1.1\r\n\r\n".to_string(), 400),
        ("plain, two Hosts", "GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), 400),
        ("plain, Host with user information", "GET /x HTTP/1.1\r\nHost: u@a\r\n\r\n".into(), 400),
        ("upgrade, no Host", format!("GET /ws HTTP/1.1\r\n{upgrade}\r\n"), 400),
        ("upgrade, two Hosts", format!("GET /ws HTTP/1.1\r\nHost: a\r\nHost: a\r\n{upgrade}\r\n"), 400),
        (
            "upgrade with Content-Length",
            format!("GET /ws HTTP/1.1\r\nHost: x\r\n{upgrade}Content-Length: {}\r\n\r\n{body}", body.len()),
            400,
        ),
        (
            "upgrade with Transfer-Encoding",
            format!(
                "GET /ws HTTP/1.1\r\nHost: x\r\n{upgrade}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
        ("CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".into(), 405),
    ];
    for (name, request, want) in cases {
        let (status, head, _) = exchange(&s, request.into_bytes()).await;
        assert_eq!(status, want, "{name}");
        if want == 405 {
            assert!(head.contains("\r\nallow: get, "), "{name}: 405 lists the methods: {head}");
        }
        echo(&mut s.healthy).await;
    }
    // HTTP/1.0 needs no Host: it is proxied (the echo upstream refuses a plain GET, but answers).
    let (status, _, _) = exchange(&s, b"GET /old HTTP/1.0\r\n\r\n".to_vec()).await;
    assert!(status != 400 && status != 0, "an HTTP/1.0 request without Host got {status}");

    assert_eq!(s.upstream.seen.lock().unwrap().len(), 1, "no refused request reached the upstream");
    let text = s.metrics().await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="bad_request"}"#), 4.0, "{text}");
    assert_eq!(common::metric(&text, r#"wskeep_http_requests_total{code="400"}"#), 3.0, "{text}");
    assert_eq!(common::metric(&text, r#"wskeep_http_requests_total{code="405"}"#), 1.0, "{text}");
    s.still_healthy().await;
}

/// A client cannot pass itself off as another address: its own `X-Real-IP` is replaced by the
/// address wskeep sees, and so are its `Forwarded` (RFC 7239) and `X-Forwarded-For` (a client
/// outside `listen.trusted_proxies` cannot speak for others): the upstream reads wskeep's own
/// element only.
#[tokio::test]
async fn client_supplied_forwarded_and_x_real_ip_cannot_spoof_the_peer() {
    let mut s = setup().await;
    let spoof = [("forwarded", "for=203.0.113.66;proto=https"), ("x-real-ip", "203.0.113.66")];
    let mut ws = common::wss(s.sidecar.addr, &s.cert, "/spoof", &spoof).await;
    echo(&mut ws).await;
    let seen = s.upstream.last_request();
    let port = s.sidecar.addr.port();
    assert_eq!(seen.header("forwarded"), Some(format!("for=127.0.0.1;proto=https;host=\"localhost:{port}\"").as_str()));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    for name in ["forwarded", "x-real-ip"] {
        assert_eq!(seen.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).count(), 1, "{name}");
    }
    s.still_healthy().await;
}

// === an upstream that breaks the handshake ===

/// The upstream's 101 is checked in full (RFC 6455 §4.1): one that lacks `Upgrade: websocket`
/// or `Connection: upgrade`, has a wrong accept key, or picks an extension or a subprotocol that
/// was not offered gets the client 502, counted as `upstream_bad_handshake` (an upstream
/// failure), and the upstream connection is dropped without a WebSocket.
#[tokio::test]
async fn an_upstream_101_that_breaks_rfc_6455_gets_the_client_502() {
    let cert = common::test_cert();
    let (upstream, mut upstreams) = common::raw_upstream().await;
    let sidecar = common::start_sidecar(common::test_config(upstream, Some(&cert), "")).await;
    // The response headers, given the right accept key.
    type Headers = fn(&str) -> String;
    let cases: [(&str, Headers); 6] = [
        ("no Upgrade", |a| format!("Connection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\n")),
        ("Upgrade: h2c", |a| format!("Upgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\n")),
        ("no Connection", |a| format!("Upgrade: websocket\r\nSec-WebSocket-Accept: {a}\r\n")),
        ("wrong accept key", |_| {
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n".into()
        }),
        ("an extension not offered", |a| {
            format!("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n")
        }),
        ("a subprotocol not offered", |a| {
            format!("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\nSec-WebSocket-Protocol: v9\r\n")
        }),
    ];
    for (name, headers) in cases {
        let url = format!("wss://localhost:{}/bad", sidecar.addr.port());
        let options = ClientOptions {
            ca_file: Some(cert.cert.clone()),
            timeout: Some(LIMIT),
            subprotocols: vec!["v1".into()],
            ..Default::default()
        };
        let client = tokio::spawn(async move { client::connect(&url, &options).await.map(|_| ()) });
        let (head, mut tcp) = tokio::time::timeout(LIMIT, upstreams.recv()).await.unwrap().unwrap();
        assert!(!head.to_ascii_lowercase().contains("sec-websocket-extensions"), "nothing is offered: {head}");
        let answer = format!("HTTP/1.1 101 Switching Protocols\r\n{}\r\n", headers(&common::accept_for(&head)));
        tcp.write_all(answer.as_bytes()).await.unwrap();
        match client.await.unwrap() {
            Err(client::ClientError::Refused { status: 502, .. }) => {}
            other => panic!("{name}: expected 502, got {other:?}"),
        }
        // wskeep drops the upstream connection: no WebSocket was established.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "{name}: the upstream connection was kept open");
        assert!(rest.is_empty(), "{name}: wskeep wrote {rest:?} after a bad 101");
    }
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="upstream_bad_handshake"}"#), 6.0);
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="upstream_unreachable"}"#), 0.0);
    assert_eq!(common::metric(&text, "wskeep_connections_total"), 0.0);
}

// === malformed frames after a proper handshake ===

/// A client frame with the given first byte (FIN, RSV, opcode), masked or not.
fn frame(first: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=65535 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    frame(first, true, payload)
}

async fn frame_client(s: &Setup) -> Connection {
    let url = format!("wss://localhost:{}/", s.sidecar.addr.port());
    let options = ClientOptions { insecure: true, timeout: Some(LIMIT), ..Default::default() };
    let mut conn = client::connect(&url, &options).await.unwrap();
    // A round trip first, so the upstream leg is certainly open and relaying.
    conn.writer.send(client::OP_TEXT, b"hello").await.unwrap();
    let reply = tokio::time::timeout(LIMIT, conn.reader.read_message()).await.unwrap().unwrap();
    assert_eq!(reply, Some(Incoming::Text("hello".into())));
    conn
}

/// The next close frame wskeep sends (data frames before it are returned too).
async fn read_close(conn: &mut Connection, limit: Duration) -> ((Option<u16>, String), Vec<Incoming>) {
    tokio::time::timeout(limit, async {
        let mut before = Vec::new();
        loop {
            match conn.reader.read_message().await {
                Ok(Some(Incoming::Close(code, reason))) => return ((code, reason), before),
                Ok(Some(other)) => before.push(other),
                other => panic!("the connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame in time")
}

/// Answers wskeep's close and checks that it then ends the connection.
async fn answer_close(conn: &mut Connection, code: u16) {
    conn.writer.queue_close(Some(code), "");
    let _ = conn.writer.flush().await;
    assert_ends(conn, "wskeep ends the connection after the closing handshake").await;
}

/// Waits for the upstream to record its `n`th close frame and returns it.
async fn nth_upstream_close(upstream: &TestUpstream, n: usize) -> (u16, String) {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(close) = upstream.closes.lock().unwrap().get(n - 1) {
            return close.clone();
        }
        assert!(Instant::now() < deadline, "the upstream never got close #{n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Each case: after a good round trip, the client writes `bytes`; wskeep must answer with a close
/// frame carrying `code`, end the connection, and send the upstream 1001 "client gone".
async fn refused(s: &mut Setup, cases: &[(&str, Vec<u8>)], code: u16) {
    let relayed = r#"wskeep_messages_total{direction="client_to_upstream"}"#;
    let relayed_before = common::metric(&s.metrics().await, relayed);
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let mut conn = frame_client(s).await;
        conn.writer.queue_raw(bytes);
        conn.writer.flush().await.unwrap();
        let ((got, reason), before) = read_close(&mut conn, LIMIT).await;
        assert_eq!(got, Some(code), "{name}: reason {reason:?}");
        assert!(before.is_empty(), "{name}: nothing relayed before the close: {before:?}");
        answer_close(&mut conn, code).await;
        assert_eq!(nth_upstream_close(&s.upstream, i + 1).await, (1001, "client gone".into()), "{name}");
        echo(&mut s.healthy).await;
    }
    let text = s.metrics().await;
    let sent = format!(r#"wskeep_close_codes_total{{code="{code}",direction="sent",side="client"}}"#);
    assert_eq!(common::metric(&text, &sent), cases.len() as f64, "{text}");
    let ended = r#"wskeep_connection_duration_seconds_count{end="client_error"}"#;
    assert_eq!(common::metric(&text, ended), cases.len() as f64, "{text}");
    // The refused frames were never relayed: only each case's round trip and healthy echo were.
    assert_eq!(common::metric(&text, relayed) - relayed_before, (2 * cases.len()) as f64, "{text}");
    s.still_healthy().await;
}

#[tokio::test]
async fn protocol_violations_get_1002() {
    let mut s = setup().await;
    let cases = vec![
        ("unmasked text", frame(0x81, false, b"hi")),
        ("unmasked ping", frame(0x89, false, b"")),
        ("RSV1 without an extension", masked(0xc1, b"hi")),
        ("RSV2", masked(0xa1, b"hi")),
        ("RSV3", masked(0x91, b"hi")),
        ("RSV on a ping", masked(0x89 | 0x40, b"")),
        ("reserved data opcode 3", masked(0x83, b"hi")),
        ("reserved data opcode 7", masked(0x87, b"")),
        ("reserved control opcode 0xB", masked(0x8b, b"")),
        ("reserved control opcode 0xF", masked(0x8f, b"x")),
        ("a 126-byte ping", masked(0x89, &[0x70; 126])),
        ("a 64 KiB pong", masked(0x8a, &vec![0; 65536])),
        ("a 126-byte close", masked(0x88, &[&1000u16.to_be_bytes()[..], &[b'r'; 124]].concat())),
        ("a ping without FIN", masked(0x09, b"p")),
        ("a close without FIN", masked(0x08, &1000u16.to_be_bytes())),
        ("a continuation without a start", masked(0x80, b"orphan")),
        ("a new message inside a fragmented one", [masked(0x01, b"part"), masked(0x81, b"new")].concat()),
        ("a one-byte close", masked(0x88, &[0x03])),
        // RFC 6455 §5.2: a protocol error, not a message too big.
        (
            "a 64-bit length with its top bit set",
            [&[0x82, 0x80 | 127][..], &u64::MAX.to_be_bytes(), &[1, 2, 3, 4]].concat(),
        ),
        ("a length not in its shortest form", [0x82, 0x80 | 126, 0, 5, 1, 2, 3, 4, 9, 9, 9, 9, 9].to_vec()),
    ];
    refused(&mut s, &cases, 1002).await;
}

/// A close with a code no endpoint may send is a protocol error like any other: the client gets
/// 1002, the upstream 1001 "client gone" (never the forbidden code). The client has closed
/// already, so wskeep does not wait for another close from it: it ends the connection at once,
/// and records the close the client sent, not a missing one (1006).
#[tokio::test]
async fn a_close_with_a_forbidden_code_gets_1002_and_the_upstream_1001() {
    let mut s = setup().await;
    let codes = [0u16, 999, 1004, 1005, 1015, 1016, 2999, 5000, u16::MAX];
    for (i, code) in codes.into_iter().enumerate() {
        let mut conn = frame_client(&s).await;
        conn.writer.queue_raw(&masked(0x88, &[&code.to_be_bytes()[..], b"bye"].concat()));
        conn.writer.flush().await.unwrap();
        let ((got, _), _) = read_close(&mut conn, LIMIT).await;
        assert_eq!(got, Some(1002), "close code {code}");
        let started = Instant::now();
        assert_ends_without_another_close(&mut conn).await;
        assert!(started.elapsed() < shutdown_close_bound() / 2, "close code {code}: waited {:?}", started.elapsed());
        assert_eq!(nth_upstream_close(&s.upstream, i + 1).await, (1001, "client gone".into()), "close code {code}");
        echo(&mut s.healthy).await;
    }
    let text = s.metrics().await;
    let missing = r#"wskeep_close_codes_total{code="1006",direction="received",side="client"}"#;
    assert_eq!(common::metric(&text, missing), 0.0, "{text}");
    s.still_healthy().await;
}

/// One bad frame and then a Close, in one write, as a peer that breaks the rules and hangs up
/// sends them: the close is honoured (answered with 1002, not waited for a second time), and
/// counted as the close it is.
#[tokio::test]
async fn a_close_right_after_a_refused_frame_is_honoured() {
    let mut s = setup().await;
    let mut conn = frame_client(&s).await;
    let close = masked(0x88, &[&1000u16.to_be_bytes()[..], b"done"].concat());
    conn.writer.queue_raw(&[masked(0xc1, b"rsv1"), close].concat());
    conn.writer.flush().await.unwrap();
    let ((got, _), _) = read_close(&mut conn, LIMIT).await;
    assert_eq!(got, Some(1002));
    let started = Instant::now();
    assert_ends_without_another_close(&mut conn).await;
    assert!(started.elapsed() < shutdown_close_bound() / 2, "waited {:?} for a close that came", started.elapsed());
    assert_eq!(nth_upstream_close(&s.upstream, 1).await, (1001, "client gone".into()));
    let text = s.metrics().await;
    let received = |code: &str| {
        common::metric(
            &text,
            &format!(r#"wskeep_close_codes_total{{code="{code}",direction="received",side="client"}}"#),
        )
    };
    assert_eq!((received("1000"), received("1006")), (1.0, 0.0), "{text}");
    s.still_healthy().await;
}

fn shutdown_close_bound() -> Duration {
    wskeep::shutdown::CLOSE_BOUND
}

/// The connection ends (EOF or reset) with the client sending nothing more.
async fn assert_ends_without_another_close(conn: &mut Connection) {
    assert_ends(conn, "wskeep ends the connection without waiting for a second close").await;
}

/// Reads until the connection ends (EOF or reset), within `LIMIT`.
async fn assert_ends(conn: &mut Connection, what: &str) {
    let rest = tokio::time::timeout(LIMIT, async { while let Ok(Some(_)) = conn.reader.read_frame().await {} }).await;
    assert!(rest.is_ok(), "{what}");
}

#[tokio::test]
async fn invalid_utf8_gets_1007() {
    let mut s = setup().await;
    let cases = vec![
        ("a lone continuation byte", masked(0x81, &[b'a', 0x80, b'b'])),
        ("an overlong encoding", masked(0x81, &[0xc0, 0xaf])),
        ("a surrogate", masked(0x81, &[0xed, 0xa0, 0x80])),
        ("past U+10FFFF", masked(0x81, &[0xf4, 0x90, 0x80, 0x80])),
        ("a sequence cut at the end", masked(0x81, &[b'o', b'k', 0xe2, 0x82])),
        (
            "invalid in the last fragment",
            [masked(0x01, b"fine "), masked(0x00, b"so far "), masked(0x80, &[0xff])].concat(),
        ),
        ("a sequence cut across fragments and never finished", [masked(0x01, &[0xe2]), masked(0x80, &[0x82])].concat()),
        ("a close reason", masked(0x88, &[&1000u16.to_be_bytes()[..], &[0xff, 0xfe]].concat())),
    ];
    refused(&mut s, &cases, 1007).await;
}

#[tokio::test]
async fn utf8_split_across_fragments_is_fine() {
    let mut s = setup().await;
    let mut conn = frame_client(&s).await;
    // "€" is e2 82 ac: split over three fragments, with a ping in between.
    conn.writer.queue_raw(
        &[masked(0x01, &[b'[', 0xe2]), masked(0x89, b"p"), masked(0x00, &[0x82]), masked(0x80, &[0xac, b']'])].concat(),
    );
    conn.writer.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(tokio::time::timeout(LIMIT, conn.reader.read_message()).await.unwrap().unwrap().unwrap());
    }
    assert!(got.contains(&Incoming::Pong("p".into())), "{got:?}");
    assert!(got.contains(&Incoming::Text("[€]".into())), "{got:?}");
    s.still_healthy().await;
}

#[tokio::test]
async fn a_frame_announcing_a_huge_length_gets_1009_at_once_without_allocating_it() {
    let mut s = setup().await;
    let header = |first: u8, len: u64| {
        let mut out = vec![first, 0x80 | 127];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[1, 2, 3, 4]); // the mask; no payload follows
        out
    };
    let rss_before = rss_bytes();
    let mut cases = Vec::new();
    for (name, first, len) in [
        ("binary, 2^40 bytes", 0x82u8, 1u64 << 40),
        ("text, 2^63 - 1 bytes", 0x81, i64::MAX as u64),
        ("first fragment, 4 GiB", 0x02, 4 << 30),
        ("binary, one byte over the limit", 0x82, MAX_MESSAGE as u64 + 1),
    ] {
        let mut conn = frame_client(&s).await;
        conn.writer.queue_raw(&header(first, len));
        conn.writer.flush().await.unwrap();
        let started = Instant::now();
        // The payload never comes: the answer must follow from the header alone.
        let ((code, reason), _) = read_close(&mut conn, LIMIT).await;
        assert_eq!(code, Some(1009), "{name}: {reason:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "{name}: took {:?}", started.elapsed());
        answer_close(&mut conn, 1009).await;
        cases.push(name);
        assert_eq!(nth_upstream_close(&s.upstream, cases.len()).await, (1001, "client gone".into()), "{name}");
        echo(&mut s.healthy).await;
    }
    // Fragments that add up to more than the limit, each within it.
    let mut conn = frame_client(&s).await;
    let part = vec![b'x'; 400 * 1024];
    let writer = tokio::spawn(async move {
        conn.writer.queue_raw(&[masked(0x02, &part), masked(0x00, &part), masked(0x80, &part)].concat());
        let _ = conn.writer.flush().await;
        conn
    });
    let mut conn = writer.await.unwrap();
    let ((code, _), _) = read_close(&mut conn, LIMIT).await;
    assert_eq!(code, Some(1009), "fragments over the limit");
    answer_close(&mut conn, 1009).await;
    assert_eq!(nth_upstream_close(&s.upstream, cases.len() + 1).await.0, 1001);
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "RSS grew by {} MiB", grown >> 20);
    s.still_healthy().await;
}

#[tokio::test]
async fn a_ping_flood_is_answered_or_dropped_never_queued_without_bound() {
    const PINGS: usize = 20_000;
    let mut s = setup().await;
    let conn = frame_client(&s).await;
    let Connection { mut reader, mut writer, .. } = conn;
    let rss_before = rss_bytes();
    let started = Instant::now();
    // The writer floods 125-byte pings as fast as the socket takes them.
    let flood = tokio::spawn(async move {
        let payload = [0x5a; 125];
        for i in 0..PINGS {
            writer.queue(client::OP_PING, true, &payload);
            if i % 256 == 255 {
                writer.flush().await.unwrap();
            }
        }
        writer.queue(client::OP_TEXT, true, b"after the flood");
        writer.flush().await.unwrap();
        writer
    });
    // The reader reads nothing for half a second, then slowly (a pause every 64 frames) until the
    // text after the flood arrives.
    let reading = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut pongs = 0usize;
        loop {
            match reader.read_message().await.unwrap() {
                Some(Incoming::Pong(p)) => {
                    assert_eq!(&p[..], &[0x5a; 125][..]);
                    pongs += 1;
                    if pongs % 64 == 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Some(Incoming::Text(t)) => {
                    assert_eq!(&t[..], b"after the flood");
                    return (pongs, reader);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    // Meanwhile the healthy connection answers promptly.
    for _ in 0..5 {
        let t = Instant::now();
        echo(&mut s.healthy).await;
        assert!(t.elapsed() < Duration::from_secs(1), "the healthy echo took {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut writer = tokio::time::timeout(Duration::from_secs(30), flood).await.expect("the flood is read").unwrap();
    let (pongs, mut reader) =
        tokio::time::timeout(Duration::from_secs(30), reading).await.expect("the text after the flood").unwrap();
    let took = started.elapsed();
    assert!((1..=PINGS).contains(&pongs), "{pongs} pongs");
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
    // The connection is still usable and closes normally.
    writer.queue_close(Some(1000), "done");
    writer.flush().await.unwrap();
    let mut conn_close = None;
    while conn_close.is_none() {
        match tokio::time::timeout(LIMIT, reader.read_message()).await.unwrap().unwrap() {
            Some(Incoming::Close(code, _)) => conn_close = code,
            Some(Incoming::Pong(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(conn_close, Some(1000));
    assert_eq!(nth_upstream_close(&s.upstream, 1).await, (1000, "done".into()));
    let text = s.metrics().await;
    let answered = common::metric(&text, r#"wskeep_pings_answered_total{side="client"}"#);
    assert_eq!(answered, PINGS as f64, "every ping was read (answered or its pong replaced)");
    eprintln!("{PINGS} pings in {took:?}: {pongs} pongs came back, RSS +{} KiB", grown >> 10);
    s.still_healthy().await;
}

/// A client that floods pings and reads nothing: whatever wskeep does (stop reading, or answer
/// only the latest ping), the pongs it holds for that client stay bounded, not one per ping.
#[tokio::test]
async fn a_ping_flood_from_a_client_that_reads_nothing_is_not_buffered() {
    const PINGS: usize = 400_000;
    let mut s = setup().await;
    let Connection { mut reader, mut writer, .. } = frame_client(&s).await;
    let rss_before = rss_bytes();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_writer = stop.clone();
    let flood = tokio::spawn(async move {
        let payload = [0x5a; 125];
        let mut sent = 0;
        while sent < PINGS && !stop_writer.load(std::sync::atomic::Ordering::Relaxed) {
            for _ in 0..256 {
                writer.queue(client::OP_PING, true, &payload);
            }
            writer.flush().await.unwrap();
            sent += 256;
        }
        writer.queue(client::OP_TEXT, true, b"after the flood");
        writer.flush().await.unwrap();
        (sent, writer)
    });
    // Two seconds of flood (or all of it) with nobody reading.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !flood.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let grown = rss_bytes().saturating_sub(rss_before);
    echo(&mut s.healthy).await;
    let mut pongs = 0usize;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reader.read_message().await.unwrap() {
                Some(Incoming::Pong(_)) => pongs += 1,
                Some(Incoming::Text(t)) => return assert_eq!(&t[..], b"after the flood"),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("the text after the flood");
    let (sent, mut writer) = flood.await.unwrap();
    eprintln!("{sent} pings sent to a client reading nothing: {pongs} pongs, RSS +{} KiB", grown >> 10);
    // Socket buffers hold some pongs; wskeep itself holds at most a few. 400,000 queued pongs
    // would be 50 MB.
    assert!(grown < 24 << 20, "RSS grew by {} MiB", grown >> 20);
    assert!(pongs <= sent && pongs < 120_000, "{pongs} pongs for {sent} pings");
    writer.queue_close(Some(1000), "");
    writer.flush().await.unwrap();
    s.still_healthy().await;
}
