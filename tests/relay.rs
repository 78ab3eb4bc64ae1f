//! The relay through wskeep with TLS in front of the test upstream: echo at the framing
//! boundaries, fragmentation, subprotocols, forwarded headers, refusals, 502/504, the endings
//! table, the plain HTTP proxy with large streamed bodies, oversized messages and bad input.
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::{Sidecar, TestCert, TestUpstream};
use wskeep::tools::client::{self, ClientOptions};

const LIMIT: Duration = Duration::from_secs(5);

/// A sidecar with TLS in front of a fresh test upstream.
async fn setup(extra: &str) -> (TestCert, TestUpstream, Sidecar) {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), extra)).await;
    (cert, upstream, sidecar)
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the upstream has recorded a close frame and returns the first one.
async fn upstream_close(upstream: &TestUpstream) -> (u16, String) {
    let closes = upstream.closes.clone();
    wait_for("the upstream to receive a close frame", LIMIT, || !closes.lock().unwrap().is_empty()).await;
    upstream.closes.lock().unwrap()[0].clone()
}

fn close_of(msg: Option<Message>) -> (u16, String) {
    match msg {
        Some(Message::Close(Some(f))) => (u16::from(f.code), f.reason.to_string()),
        other => panic!("expected a close frame with a code, got {other:?}"),
    }
}

/// An HTTP/1.1 connection over TLS to the sidecar, driven by hyper's client.
async fn http_conn<B>(addr: SocketAddr, cert: &TestCert) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = common::tls_connect(addr, cert).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// A WebSocket upgrade request with a fixed valid key and extra headers.
fn upgrade_request(port: u16, path: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut b = Request::get(path)
        .header("host", format!("localhost:{port}"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new()).unwrap()
}

/// Sends an upgrade request over a raw TLS connection; returns the response (body unread).
async fn raw_upgrade(addr: SocketAddr, cert: &TestCert, path: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut sender = http_conn(addr, cert).await;
    tokio::time::timeout(LIMIT, sender.send_request(upgrade_request(addr.port(), path, headers)))
        .await
        .expect("an answer within the limit")
        .unwrap()
}

async fn body_text(response: Response<Incoming>) -> String {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

// === echo and framing ===

#[tokio::test]
async fn echoes_text_and_binary_at_every_length_boundary() {
    let (cert, _upstream, sidecar) = setup("[limits]\nmax_message_size = \"2MiB\"\n").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/echo", &[]).await;
    for size in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
        let text: String = (0..size).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        ws.send(Message::text(text.clone())).await.unwrap();
        match common::next_message(&mut ws, LIMIT).await {
            Some(Message::Text(got)) => assert!(got.as_str() == text, "text of {size} bytes came back changed"),
            other => panic!("text of {size} bytes: got {other:?}"),
        }
        let data = pattern(size);
        ws.send(Message::binary(data.clone())).await.unwrap();
        match common::next_message(&mut ws, LIMIT).await {
            Some(Message::Binary(got)) => assert!(got[..] == data[..], "binary of {size} bytes came back changed"),
            other => panic!("binary of {size} bytes: got {other:?}"),
        }
    }
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_messages_total{direction="client_to_upstream"}"#), 14.0);
    assert_eq!(common::metric(&text, r#"wskeep_messages_total{direction="upstream_to_client"}"#), 14.0);
}

#[tokio::test]
async fn a_fragmented_message_arrives_whole() {
    let (cert, _upstream, sidecar) = setup("").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/echo", &[]).await;
    let parts = ["frag", "mented ", "message"];
    ws.feed(Message::Frame(WsFrame::message(parts[0], OpCode::Data(Data::Text), false))).await.unwrap();
    ws.feed(Message::Frame(WsFrame::message(parts[1], OpCode::Data(Data::Continue), false))).await.unwrap();
    ws.send(Message::Frame(WsFrame::message(parts[2], OpCode::Data(Data::Continue), true))).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("fragmented message")));

    // Binary too, with a large first fragment.
    let data = pattern(100_000);
    ws.feed(Message::Frame(WsFrame::message(data[..70_000].to_vec(), OpCode::Data(Data::Binary), false)))
        .await
        .unwrap();
    ws.send(Message::Frame(WsFrame::message(data[70_000..].to_vec(), OpCode::Data(Data::Continue), true)))
        .await
        .unwrap();
    match common::next_message(&mut ws, LIMIT).await {
        Some(Message::Binary(got)) => assert!(got[..] == data[..], "the reassembled binary message differs"),
        other => panic!("expected the binary message back, got {other:?}"),
    }
    // wskeep relayed each as one message.
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_messages_total{direction="client_to_upstream"}"#), 2.0);
    assert_eq!(
        common::metric(&text, r#"wskeep_message_bytes_total{direction="client_to_upstream"}"#),
        (18 + 100_000) as f64
    );
}

// === handshake ===

#[tokio::test]
async fn the_client_gets_the_subprotocol_the_upstream_chose() {
    let (cert, upstream, sidecar) = setup("").await;

    let response = raw_upgrade(sidecar.addr, &cert, "/proto", &[("sec-websocket-protocol", "v1, v2")]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "v2");
    assert_eq!(upstream.last_request().header("sec-websocket-protocol"), Some("v1, v2"));
    // And the connection works.
    let io = hyper::upgrade::on(response).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Client, None).await;
    ws.send(Message::text("after v2")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("after v2")));

    let response = raw_upgrade(sidecar.addr, &cert, "/proto", &[("sec-websocket-protocol", "v1")]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(response.headers().get("sec-websocket-protocol").is_none(), "no subprotocol was chosen");
}

#[tokio::test]
async fn end_to_end_headers_reach_the_upstream() {
    let (cert, upstream, sidecar) = setup("").await;
    let headers = [
        ("cookie", "session=abc; theme=dark"),
        ("authorization", "Bearer t0ken"),
        ("origin", "https://app.example"),
        ("user-agent", "relay-test/1.0"),
        ("x-custom", "kept"),
        ("x-forwarded-for", "203.0.113.7"),
        ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame"),
    ];
    let mut ws = common::wss(sidecar.addr, &cert, "/hdr?room=7&token=s3cret", &headers).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("hi")));

    let seen = upstream.last_request();
    assert_eq!(seen.uri, "/hdr?room=7&token=s3cret");
    for (name, value) in &headers[..5] {
        assert_eq!(seen.header(name), Some(*value), "{name} must reach the upstream unchanged");
    }
    // The client is not in `listen.trusted_proxies`: its own X-Forwarded-For cannot speak for
    // others, and is replaced by the address wskeep saw (tests/networks.rs: kept from a trusted one).
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some(format!("localhost:{}", sidecar.addr.port()).as_str()));
    assert_eq!(seen.header("host"), Some(upstream.addr.to_string().as_str()));
    // permessage-deflate is passed through (tests/compression.rs); other extensions are not.
    assert_eq!(seen.header("sec-websocket-extensions"), Some("permessage-deflate; client_max_window_bits"));
    // Exactly one X-Forwarded-For line.
    assert_eq!(seen.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for")).count(), 1);
}

#[tokio::test]
async fn x_forwarded_for_is_set_when_absent() {
    let (cert, upstream, sidecar) = setup("").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/", &[]).await;
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("x")));
    assert_eq!(upstream.last_request().header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn an_upstream_refusal_reaches_the_client_whole() {
    let (cert, _upstream, sidecar) = setup("").await;
    let response = raw_upgrade(sidecar.addr, &cert, "/refuse", &[]).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(response.headers().get("x-reason").unwrap(), "test");
    assert!(response.headers().get("sec-websocket-accept").is_none());
    assert_eq!(body_text(response).await, "forbidden by upstream");
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="upstream_refused"}"#), 1.0);
}

#[tokio::test]
async fn a_closed_upstream_port_gives_502() {
    let cert = common::test_cert();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let sidecar = common::start_sidecar(common::test_config(closed, Some(&cert), "")).await;
    let response = raw_upgrade(sidecar.addr, &cert, "/", &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="upstream_unreachable"}"#), 1.0);
}

#[tokio::test]
async fn a_silent_upstream_gives_504_after_the_response_timeout() {
    let cert = common::test_cert();
    // Accepts TCP and holds every socket without a byte in answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let extra = "response_timeout = \"300ms\"\n"; // appended to [upstream]
    let sidecar = common::start_sidecar(common::test_config(addr, Some(&cert), extra)).await;
    let started = Instant::now();
    let response = raw_upgrade(sidecar.addr, &cert, "/", &[]).await;
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(took >= Duration::from_millis(300), "answered before the timeout: {took:?}");
    assert!(took < Duration::from_secs(3), "answered long after the timeout: {took:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the upstream was reached");
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="upstream_timeout"}"#), 1.0);
    holder.abort();
}

// === endings ===

#[tokio::test]
async fn a_client_close_is_relayed_with_its_code_and_reason() {
    let (cert, upstream, sidecar) = setup("").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/", &[]).await;
    ws.send(Message::text("warm up")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("warm up")));
    ws.close(Some(CloseFrame { code: CloseCode::from(4000), reason: "bye".into() })).await.unwrap();
    // The client's close is answered ...
    assert_eq!(close_of(common::next_message(&mut ws, LIMIT).await), (4000, "bye".to_string()));
    // ... and the upstream got the same code and reason.
    assert_eq!(upstream_close(&upstream).await, (4000, "bye".to_string()));
    let admin = sidecar.admin;
    let series = r#"wskeep_connection_duration_seconds_count{end="client_close"}"#;
    let deadline = Instant::now() + LIMIT;
    while common::metric(&common::scrape(admin).await, series) != 1.0 {
        assert!(Instant::now() < deadline, "the connection was never counted as client_close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_upstream_close_is_relayed_with_its_code_and_reason() {
    let (cert, _upstream, sidecar) = setup("").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/", &[]).await;
    ws.send(Message::text("close:4001:done")).await.unwrap();
    assert_eq!(close_of(common::next_message(&mut ws, LIMIT).await), (4001, "done".to_string()));
    // tungstenite answered the close; the stream then ends.
    // Nothing follows the close. (wskeep ends the TLS connection without a close_notify, which
    // rustls reports as an unexpected EOF.)
    let after = tokio::time::timeout(LIMIT, ws.next()).await.expect("the connection ends");
    assert!(!matches!(after, Some(Ok(_))), "nothing may follow the close: {after:?}");
    let admin = sidecar.admin;
    let series = r#"wskeep_connection_duration_seconds_count{end="upstream_close"}"#;
    let deadline = Instant::now() + LIMIT;
    while common::metric(&common::scrape(admin).await, series) != 1.0 {
        assert!(Instant::now() < deadline, "the connection was never counted as upstream_close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A WebSocket over a raw TLS connection, framed by hand: tungstenite's client turns a received
/// 1014 (which it has no variant for) into 1002 "Protocol violation", hiding the code wskeep sent.
async fn raw_ws(addr: SocketAddr, cert: &TestCert, path: &str) -> TokioIo<hyper::upgrade::Upgraded> {
    let response = raw_upgrade(addr, cert, path, &[]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    TokioIo::new(hyper::upgrade::on(response).await.unwrap())
}

/// Writes one final, masked client frame.
async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(io: &mut W, opcode: u8, payload: &[u8]) {
    assert!(payload.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    io.write_all(&frame).await.unwrap();
}

/// Reads one unmasked server frame: (opcode, payload).
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(io: &mut R) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await.unwrap();
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => io.read_u16().await.unwrap() as usize,
        127 => io.read_u64().await.unwrap() as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.unwrap();
    (head[0] & 0x0f, payload)
}

#[tokio::test]
async fn a_killed_upstream_gets_the_client_1014_within_a_second() {
    let (cert, upstream, sidecar) = setup("").await;
    let mut io = raw_ws(sidecar.addr, &cert, "/").await;
    write_frame(&mut io, 0x1, b"alive").await;
    assert_eq!(read_frame(&mut io).await, (0x1, b"alive".to_vec()));
    upstream.kill.cancel();
    let started = Instant::now();
    let (opcode, payload) = tokio::time::timeout(LIMIT, read_frame(&mut io)).await.expect("a close frame");
    assert!(started.elapsed() < Duration::from_secs(1), "the close took {:?}", started.elapsed());
    assert_eq!(opcode, 0x8, "a close frame");
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
    assert_eq!((code, reason.as_str()), (1014, "upstream connection lost"));
    // Answer it, as a client does; wskeep then ends the connection.
    write_frame(&mut io, 0x8, &payload[..2]).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, io.read_to_end(&mut rest)).await.expect("wskeep ends the connection");
}

#[tokio::test]
async fn a_vanished_client_gets_the_upstream_1001_client_gone() {
    let (cert, upstream, sidecar) = setup("").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/", &[]).await;
    ws.send(Message::text("alive")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("alive")));
    drop(ws); // no close frame, no TLS close_notify: just the TCP connection going away
    assert_eq!(upstream_close(&upstream).await, (1001, "client gone".to_string()));
}

#[tokio::test]
async fn an_oversized_message_gets_1009_and_the_upstream_1001() {
    let (cert, upstream, sidecar) = setup("[limits]\nmax_message_size = \"1MiB\"\n").await;
    let ws = common::wss(sidecar.addr, &cert, "/", &[]).await;
    let (mut tx, mut rx) = ws.split();
    // Sent from its own task: wskeep stops reading once it has refused the frame.
    let sender = tokio::spawn(async move {
        let _ = tx.send(Message::binary(vec![7u8; 3 << 20])).await;
        tx
    });
    let (code, reason) = close_of(common::next_message(&mut rx, LIMIT).await);
    assert_eq!(code, 1009, "reason {reason:?}");
    let (code, _) = upstream_close(&upstream).await;
    assert_eq!(code, 1001);
    assert!(upstream.seen.lock().unwrap().len() == 1);
    drop(sender);
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_messages_total{direction="client_to_upstream"}"#), 0.0);
}

// === bad input on other sockets ===

async fn echo(ws: &mut common::TlsWs) {
    let msg = Message::text(format!("still here {}", fastrand::u32(..)));
    ws.send(msg.clone()).await.unwrap();
    assert_eq!(common::next_message(ws, LIMIT).await, Some(msg));
}

#[tokio::test]
async fn garbage_and_plaintext_on_the_tls_port_do_not_disturb_others() {
    let (cert, _upstream, sidecar) = setup("").await;
    let mut ws = common::wss(sidecar.addr, &cert, "/", &[]).await;
    echo(&mut ws).await;
    let garbage: Vec<u8> = (0..2048u32).map(|i| (i * 7919 % 256) as u8).collect();
    let answer = common::send_junk(sidecar.addr, &garbage, false, LIMIT).await;
    assert!(!answer.starts_with(b"HTTP/"), "no HTTP answer to garbage");
    echo(&mut ws).await;
    let answer = common::send_junk(sidecar.addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", false, LIMIT).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "plaintext must not be served on the TLS port");
    echo(&mut ws).await;
    // A half-finished TLS record, then the end of the stream.
    drop(TcpStream::connect(sidecar.addr).await.unwrap());
    let _ = common::send_junk(sidecar.addr, &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01], true, LIMIT).await;
    echo(&mut ws).await;
    // The sidecar still accepts new clients.
    let mut second = common::wss(sidecar.addr, &cert, "/", &[]).await;
    echo(&mut second).await;
    echo(&mut ws).await;
    let text = common::scrape(sidecar.admin).await;
    assert!(common::metric(&text, "wskeep_tls_handshake_failures_total") >= 3.0, "{text}");
}

// === the plain HTTP proxy with large streamed bodies ===

const BIG: u64 = 50 << 20;
const CHUNK: usize = 64 << 10;

/// A hyper upstream: POST /upload counts the body as it streams in and answers the count;
/// GET /download streams `BIG` bytes in chunks.
async fn start_http_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(match (req.method().as_str(), req.uri().path()) {
                        ("POST", "/upload") => {
                            let mut body = req.into_body();
                            let mut count = 0u64;
                            let mut largest = 0usize;
                            while let Some(frame) = body.frame().await {
                                if let Ok(data) = frame.unwrap().into_data() {
                                    count += data.len() as u64;
                                    largest = largest.max(data.len());
                                }
                            }
                            Response::new(Full::new(Bytes::from(format!("{count} {largest}"))).boxed())
                        }
                        ("GET", "/download") => {
                            let chunk = Bytes::from(vec![0x5a; CHUNK]);
                            let frames = futures_util::stream::iter(
                                (0..BIG / CHUNK as u64).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
                            );
                            Response::new(BodyExt::boxed(StreamBody::new(frames)))
                        }
                        _ => {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"no")).boxed());
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    })
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn streams_50_mib_up_and_down_through_the_http_proxy() {
    let cert = common::test_cert();
    let upstream = start_http_upstream().await;
    let sidecar = common::start_sidecar(common::test_config(upstream, Some(&cert), "")).await;

    // Upload: a chunked body (no Content-Length), produced as it is sent.
    let mut sender = http_conn(sidecar.addr, &cert).await;
    let chunk = Bytes::from(vec![0xa5; CHUNK]);
    let frames = futures_util::stream::iter(
        (0..BIG / CHUNK as u64).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let request = Request::post("/upload").header("host", "localhost").body(StreamBody::new(frames)).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
        .await
        .expect("the upload completes")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer = body_text(response).await;
    let (count, largest) = answer.split_once(' ').unwrap();
    assert_eq!(count.parse::<u64>().unwrap(), BIG);
    // The upstream saw the body in pieces, not as one buffered blob.
    assert!(largest.parse::<usize>().unwrap() < (1 << 20), "largest piece {largest}");

    // Download: counted as it streams.
    let mut sender = http_conn::<Empty<Bytes>>(sidecar.addr, &cert).await;
    let request = Request::get("/download").header("host", "localhost").body(Empty::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut count = 0u64;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                assert!(data.iter().all(|&b| b == 0x5a));
                count += data.len() as u64;
            }
        }
    })
    .await
    .expect("the download completes");
    assert_eq!(count, BIG);
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_http_requests_total{code="200"}"#), 2.0);
}

/// wskeep's JSON pong is a data frame: it waits for the end of an upstream message whose first
/// fragment is already on its way to the client, never landing between its fragments (RFC 6455
/// §5.4). Read with wskeep's frame client, which shows the frames as they come.
#[tokio::test]
async fn a_json_pong_waits_for_the_end_of_an_upstream_fragmented_message() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let url = format!("wss://localhost:{}/", sidecar.addr.port());
    let options = ClientOptions { insecure: true, timeout: Some(LIMIT), ..Default::default() };
    let mut conn = client::connect(&url, &options).await.unwrap();
    let mut next_data_frame = async || loop {
        let frame = tokio::time::timeout(LIMIT, conn.reader.read_frame()).await.unwrap().unwrap().unwrap();
        if frame.opcode < client::OP_CLOSE {
            return (frame.fin, frame.opcode, String::from_utf8(frame.payload.to_vec()).unwrap());
        }
    };
    conn.writer.send(client::OP_TEXT, b"fragments:").await.unwrap();
    assert_eq!(next_data_frame().await, (false, client::OP_TEXT, "first ".into()));
    conn.writer.send(client::OP_TEXT, br#"{"type":"ping","id":7}"#).await.unwrap();
    conn.writer.send(client::OP_TEXT, b"continue").await.unwrap();
    assert_eq!(next_data_frame().await, (true, client::OP_CONTINUATION, "last".into()));
    let (fin, opcode, pong) = next_data_frame().await;
    assert!(fin && opcode == client::OP_TEXT && pong.contains("pong") && pong.contains(r#""id":7"#), "{pong}");
}
