//! WebSockets over HTTP/2 (RFC 8441) through the library's server over TLS, with an h2 client
//! (the `h2` crate, hyper's own) doing what a browser cannot be made to do: reset a stream, open
//! many on one connection, stop reading one. The upstream is the real test upstream
//! (tokio-tungstenite over HTTP/1.1), or one written for the case.
mod common;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const LIMIT: Duration = Duration::from_secs(10);

// === an h2 client ===

/// One h2 stream as a byte stream, for tungstenite. Received data is released to the flow
/// control window only as it is read, so a reader that stops reading stops the sender.
struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
}

impl AsyncRead for H2Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        while me.pending.is_empty() {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    me.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = me.pending.len().min(buf.remaining());
        buf.put_slice(&me.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        me.send.reserve_capacity(buf.len());
        loop {
            let capacity = me.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                me.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(io::Error::other)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

type H2Ws = WebSocketStream<H2Io>;

/// The frames the server sent, in order: (type, flags, stream id). Read off the plaintext as the
/// h2 client receives it, so a test can tell which came before which.
#[derive(Default)]
struct FrameLog {
    unparsed: Vec<u8>,
    frames: Vec<(u8, u8, u32)>,
}

const DATA: u8 = 0;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;

impl FrameLog {
    fn feed(&mut self, bytes: &[u8]) {
        self.unparsed.extend_from_slice(bytes);
        while self.unparsed.len() >= 9 {
            let len = u32::from_be_bytes([0, self.unparsed[0], self.unparsed[1], self.unparsed[2]]) as usize;
            if self.unparsed.len() < 9 + len {
                break;
            }
            let id = u32::from_be_bytes(self.unparsed[5..9].try_into().unwrap()) & 0x7fff_ffff;
            self.frames.push((self.unparsed[3], self.unparsed[4], id));
            self.unparsed.drain(..9 + len);
        }
    }
}

/// The client's TLS stream, with every byte received fed to a `FrameLog`.
struct Tap<T> {
    io: T,
    log: Arc<Mutex<FrameLog>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        self.log.lock().unwrap().feed(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

struct H2Conn {
    client: SendRequest<Bytes>,
    log: Arc<Mutex<FrameLog>>,
    port: u16,
}

/// TLS with ALPN `h2` only, then an h2 connection whose 64 KiB stream windows sit in a 1 MiB
/// connection window (so one stream that stops reading does not stop the others); waits until
/// the server's SETTINGS allowed extended CONNECT.
async fn h2_connect(addr: SocketAddr, cert: &common::TestCert) -> H2Conn {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "wskeep offers h2");
    let log = Arc::new(Mutex::new(FrameLog::default()));
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(64 * 1024)
        .initial_connection_window_size(1 << 20)
        .handshake::<_, Bytes>(Tap { io: tls, log: log.clone() })
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let deadline = Instant::now() + LIMIT;
    while !client.is_extended_connect_protocol_enabled() {
        assert!(Instant::now() < deadline, "the server never sent SETTINGS_ENABLE_CONNECT_PROTOCOL");
        // The SETTINGS frame is read by the connection task; a request round trip lets it in.
        let (response, _) = client
            .send_request(http::Request::get(format!("https://localhost:{}/", addr.port())).body(()).unwrap(), true)
            .unwrap();
        let _ = response.await;
        client = client.ready().await.unwrap();
    }
    H2Conn { client, log, port: addr.port() }
}

impl H2Conn {
    /// An extended CONNECT for a WebSocket on `path`: the open WebSocket and the response head,
    /// or the refusal's status and body.
    async fn websocket(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(H2Ws, http::response::Parts), (u16, String)> {
        let mut request = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://localhost:{}{path}", self.port))
            .header("sec-websocket-version", "13");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let mut request = request.body(()).unwrap();
        request.extensions_mut().insert(h2::ext::Protocol::from_static("websocket"));
        let mut client = self.client.clone().ready().await.unwrap();
        let (response, send) = client.send_request(request, false).unwrap();
        let response = tokio::time::timeout(LIMIT, response).await.expect("an answer to the CONNECT").unwrap();
        let (parts, recv) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err((parts.status.as_u16(), read_body(recv).await));
        }
        let io = H2Io { send, recv, pending: Bytes::new() };
        Ok((WebSocketStream::from_raw_socket(io, Role::Client, None).await, parts))
    }

    /// A plain GET: status, headers and body.
    async fn get(&self, path: &str) -> (http::response::Parts, String) {
        let request = http::Request::get(format!("https://localhost:{}{path}", self.port)).body(()).unwrap();
        let mut client = self.client.clone().ready().await.unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let (parts, body) = response.await.unwrap().into_parts();
        (parts, read_body(body).await)
    }

    fn frames(&self) -> Vec<(u8, u8, u32)> {
        self.log.lock().unwrap().frames.clone()
    }
}

async fn read_body(mut body: RecvStream) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The next data or close message, answering pings (tungstenite does) and skipping pongs.
async fn next_message(ws: &mut H2Ws) -> Option<Message> {
    common::next_message(ws, LIMIT).await
}

/// Waits (bounded) until `series` reaches `want` in the sidecar's metrics.
async fn await_metric(admin: SocketAddr, series: &str, want: f64) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let text = common::scrape(admin).await;
        if common::metric(&text, series) >= want {
            return text;
        }
        assert!(Instant::now() < deadline, "{series} never reached {want}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn await_closes(closes: &Mutex<Vec<(u16, String)>>, n: usize) -> Vec<(u16, String)> {
    let deadline = Instant::now() + LIMIT;
    while closes.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    closes.lock().unwrap().clone()
}

fn ending(end: &str) -> String {
    format!(r#"wskeep_connection_duration_seconds_count{{end="{end}"}}"#)
}

const UPGRADES_H2: &str = r#"wskeep_websocket_upgrades_total{http_version="2"}"#;
const UPGRADES_H1: &str = r#"wskeep_websocket_upgrades_total{http_version="1.1"}"#;

// === the tests ===

/// Data both ways, a subprotocol, the client's ping answered, a JSON ping answered by wskeep,
/// wskeep's own pings answered by the client, and a close relayed: as over HTTP/1.1. The
/// connection is listed and counted as HTTP/2.
#[tokio::test]
async fn a_websocket_over_http2_is_relayed_and_kept_alive() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let keepalive = "[client_keepalive]\nping_interval = \"100ms\"\ntimeout = \"5s\"\n";
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), keepalive)).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let (mut ws, head) =
        h2.websocket("/voice?token=secret", &[("sec-websocket-protocol", "v1, v2"), ("cookie", "a=b")]).await.unwrap();
    assert_eq!(head.headers.get("sec-websocket-protocol").unwrap(), "v2");
    assert!(head.headers.get("sec-websocket-accept").is_none(), "{head:?}");
    let seen = upstream.last_request();
    assert_eq!(seen.uri, "/voice?token=secret");
    assert_eq!(seen.header("cookie"), Some("a=b"));
    assert_eq!(seen.header("x-forwarded-host"), Some(format!("localhost:{}", sidecar.addr.port()).as_str()));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::text("hello")));
    let big = vec![5u8; 300 * 1024]; // larger than both h2 windows: flow control both ways
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::binary(big)));
    ws.send(Message::Ping(Bytes::from_static(b"are you there"))).await.unwrap();
    let pong = tokio::time::timeout(LIMIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) if p.as_ref() == b"are you there" => return p,
                Some(Ok(_)) => {}
                other => panic!("no pong: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(pong.as_ref(), b"are you there");
    ws.send(Message::text(r#"{"type":"ping","id":7}"#)).await.unwrap();
    let Some(Message::Text(pong)) = next_message(&mut ws).await else { panic!("no JSON pong") };
    let pong: serde_json::Value = serde_json::from_str(&pong).unwrap();
    assert_eq!(pong, serde_json::json!({"type": "pong", "id": 7}));

    // wskeep's pings reach the client and its pongs come back: tungstenite queues the answer as
    // it reads the ping and writes it with the next message.
    tokio::time::timeout(LIMIT, async { while !matches!(ws.next().await, Some(Ok(Message::Ping(_)))) {} })
        .await
        .expect("wskeep pings the client");
    ws.send(Message::text("after the ping")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::text("after the ping")));
    let text = await_metric(sidecar.admin, r#"wskeep_pongs_received_total{side="client"}"#, 1.0).await;
    assert_eq!(common::metric(&text, UPGRADES_H2), 1.0, "{text}");
    assert_eq!(common::metric(&text, UPGRADES_H1), 0.0, "{text}");
    assert_eq!(common::metric(&text, "wskeep_json_pings_answered_total"), 1.0);
    assert_eq!(common::metric(&text, r#"wskeep_pings_answered_total{side="client"}"#), 1.0);
    let (_, list) = common::http_get(sidecar.admin, "/connections").await.unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["http_version"], "2", "{list}");
    assert_eq!(list[0]["path"], "/voice");

    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() })).await.unwrap();
    assert!(matches!(next_message(&mut ws).await, Some(Message::Close(_)) | None));
    assert_eq!(await_closes(&upstream.closes, 1).await, [(1000, "done".to_string())]);
    let text = await_metric(sidecar.admin, &ending("client_close"), 1.0).await;
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 0.0);
}

/// A plain request over h2 goes to the HTTP/1.1 upstream with `:authority` as the forwarded
/// host, and its answer comes back without the hop-by-hop headers HTTP/2 forbids.
#[tokio::test]
async fn a_plain_request_over_http2_is_proxied_to_the_http1_upstream() {
    let cert = common::test_cert();
    let (addr, mut heads) = common::raw_upstream().await;
    let sidecar = common::start_sidecar(common::test_config(addr, Some(&cert), "")).await;
    let answer = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((head, mut tcp)) = heads.recv().await {
            // The request for /hello is answered with hop-by-hop headers; any other (the client's
            // first request) with a closed connection, so the next one comes on a new one.
            let done = head.starts_with("GET /hello");
            let reply = if done {
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Up: yes\r\n\r\nhello"
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            tcp.write_all(reply.as_bytes()).await.unwrap();
            seen.push(head);
            if done {
                return seen;
            }
        }
        seen
    });
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let (head, body) = h2.get("/hello?x=1").await;
    assert_eq!((head.status.as_u16(), body.as_str()), (200, "hello"));
    assert_eq!(head.headers.get("x-up").unwrap(), "yes");
    assert!(head.headers.get("connection").is_none() && head.headers.get("keep-alive").is_none());
    let seen = tokio::time::timeout(LIMIT, answer).await.unwrap().unwrap();
    let request = seen.last().unwrap().to_ascii_lowercase();
    assert!(request.starts_with("get /hello?x=1 http/1.1\r\n"), "{request}");
    assert!(request.contains(&format!("\r\nhost: {addr}\r\n")), "{request}");
    assert!(request.contains(&format!("\r\nx-forwarded-host: localhost:{}\r\n", sidecar.addr.port())), "{request}");
}

/// Twenty WebSockets on one HTTP/2 connection, their messages interleaved, each relayed to its
/// own upstream connection and back to its own stream.
#[tokio::test]
async fn many_websockets_share_one_http2_connection() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let mut sockets = Vec::new();
    for i in 0..20 {
        sockets.push(h2.websocket(&format!("/s{i}"), &[]).await.unwrap().0);
    }
    for round in 0..5 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            ws.send(Message::text(format!("{i}:{round}"))).await.unwrap();
        }
        for (i, ws) in sockets.iter_mut().enumerate() {
            assert_eq!(next_message(ws).await, Some(Message::text(format!("{i}:{round}"))));
        }
    }
    let text = await_metric(sidecar.admin, UPGRADES_H2, 20.0).await;
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 20.0);
    assert_eq!(upstream.seen.lock().unwrap().len(), 20);
    for ws in &mut sockets {
        ws.close(None).await.unwrap();
    }
    await_metric(sidecar.admin, &ending("client_close"), 20.0).await;
}

/// A stream the client resets is the client gone, as a dropped TCP connection is: the upstream
/// gets 1001 and the ending is `client_error`; the connection's other streams carry on.
#[tokio::test]
async fn a_reset_stream_is_a_client_error_and_spares_the_connection() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let (mut kept, _) = h2.websocket("/kept", &[]).await.unwrap();
    let (mut reset, _) = h2.websocket("/reset", &[]).await.unwrap();
    reset.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut reset).await, Some(Message::text("before")));
    reset.get_mut().send.send_reset(h2::Reason::CANCEL);
    assert_eq!(await_closes(&upstream.closes, 1).await, [(1001, "client gone".to_string())]);
    let text = await_metric(sidecar.admin, &ending("client_error"), 1.0).await;
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 1.0, "{text}");
    kept.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut kept).await, Some(Message::text("still here")));
    let (mut after, _) = h2.websocket("/after", &[]).await.unwrap();
    after.send(Message::text("new stream")).await.unwrap();
    assert_eq!(next_message(&mut after).await, Some(Message::text("new stream")));
}

/// A stream whose reader stops: its flow-control window fills, wskeep stops reading the
/// streaming upstream rather than buffering, and the silent client is the one that timed out
/// (as over HTTP/1.1, tests/endings.rs), while another stream of the same connection still
/// flows.
#[tokio::test]
async fn a_stream_that_stops_reading_times_out_alone() {
    let cert = common::test_cert();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let kept = closes.clone();
    // The first upstream connection streams 16 KiB messages until its close; the others echo.
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((tcp, _)) = listener.accept().await {
            let config = wskeep::tools::bench::echo::websocket_config(1 << 20);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await else { continue };
            let streaming = std::mem::take(&mut first);
            let closes = kept.clone();
            tokio::spawn(async move {
                let (mut sink, mut stream) = ws.split();
                if !streaming {
                    while let Some(Ok(msg)) = stream.next().await {
                        if msg.is_text() && sink.send(msg).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let reader = tokio::spawn(async move {
                    while let Some(Ok(msg)) = stream.next().await {
                        if let Message::Close(frame) = msg {
                            let entry =
                                frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                            closes.lock().unwrap().push(entry);
                            return;
                        }
                    }
                });
                let chunk = Bytes::from(vec![7u8; 16 * 1024]);
                while !reader.is_finished() {
                    if sink.send(Message::Binary(chunk.clone())).await.is_err() {
                        break;
                    }
                }
                let _ = reader.await;
            });
        }
    });
    let keepalive = "[client_keepalive]\nping_interval = \"300ms\"\ntimeout = \"1s\"\n";
    let sidecar = common::start_sidecar(common::test_config(addr, Some(&cert), keepalive)).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let (mut stuck, _) = h2.websocket("/stream", &[]).await.unwrap();
    let (mut other, _) = h2.websocket("/echo", &[]).await.unwrap();
    // The stuck one talks, and never reads.
    let talker = tokio::spawn(async move {
        for i in 0..100u32 {
            if stuck.send(Message::text(format!("still talking {i}"))).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stuck
    });
    // The other one keeps talking and reading (which answers wskeep's pings) all along.
    let flowing = tokio::spawn(async move {
        for i in 0..30 {
            other.send(Message::text(format!("flowing {i}"))).await.unwrap();
            assert_eq!(next_message(&mut other).await, Some(Message::text(format!("flowing {i}"))));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        other
    });
    let text = await_metric(sidecar.admin, &ending("client_timeout"), 1.0).await;
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 1.0, "{text}");
    assert_eq!(await_closes(&closes, 1).await.first(), Some(&(1001, "client timed out".to_string())));
    // What wskeep read from the upstream and held is bounded by the windows, not the stream.
    let relayed = common::metric(&text, r#"wskeep_message_bytes_total{direction="upstream_to_client"}"#);
    assert!(relayed < 2.0 * 1024.0 * 1024.0, "{relayed} bytes relayed to a client that read nothing");
    let mut other = flowing.await.unwrap();
    other.send(Message::text("after")).await.unwrap();
    assert_eq!(next_message(&mut other).await, Some(Message::text("after")));
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, &ending("client_timeout")), 1.0, "{text}");
    talker.abort();
}

/// A drain sends 1001 on every WebSocket stream, and the connection's GOAWAY comes only after
/// those streams have ended (Firefox resets its WebSocket streams on GOAWAY).
#[tokio::test]
async fn a_drain_closes_http2_websockets_before_goaway() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let config = "[shutdown]\ndrain_timeout = \"300ms\"\n";
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), config)).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let (mut a, _) = h2.websocket("/a", &[]).await.unwrap();
    let (mut b, _) = h2.websocket("/b", &[]).await.unwrap();
    let streams = [&a, &b].map(|ws| u32::from(ws.get_ref().send.stream_id()));
    // A second connection with no WebSocket gets its GOAWAY at once.
    let plain = h2_connect(sidecar.addr, &cert).await;
    sidecar.drain.start();
    let deadline = Instant::now() + LIMIT;
    while !plain.frames().iter().any(|f| f.0 == GOAWAY) {
        assert!(Instant::now() < deadline, "no GOAWAY on the connection without WebSockets");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!h2.frames().iter().any(|f| f.0 == GOAWAY), "GOAWAY while WebSockets were open: {:?}", h2.frames());
    for ws in [&mut a, &mut b] {
        match next_message(ws).await {
            Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("no 1001: {other:?}"),
        }
        // tungstenite answered the close as it read it.
        let _ = next_message(ws).await;
    }
    let frames = loop {
        let frames = h2.frames();
        if frames.iter().any(|f| f.0 == GOAWAY) {
            break frames;
        }
        assert!(Instant::now() < deadline, "no GOAWAY after the WebSockets closed: {frames:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let goaway = frames.iter().position(|f| f.0 == GOAWAY).unwrap();
    for id in streams {
        let end = frames.iter().position(|f| f.2 == id && (f.0 == DATA && f.1 & END_STREAM != 0 || f.0 == 3));
        assert!(end.is_some_and(|end| end < goaway), "stream {id} not ended before GOAWAY: {frames:?}");
    }
    let text = await_metric(sidecar.admin, &ending("shutdown"), 2.0).await;
    assert_eq!(common::metric(&text, UPGRADES_H2), 2.0);
    assert_eq!(
        await_closes(&upstream.closes, 2).await,
        [(1001, "going away".to_string()), (1001, "going away".to_string())]
    );
}

/// The limits: an HTTP/2 connection advertises `listen.http2_max_streams`, and
/// `listen.max_connections` counts each WebSocket stream besides the connection it came on, so
/// the upstream never sees more WebSockets than it allows.
#[tokio::test]
async fn streams_are_bounded_per_connection_and_by_max_connections() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.http2_max_streams = 2;
    config.listen.max_connections = 4;
    let sidecar = common::start_sidecar(config).await;
    let first = h2_connect(sidecar.addr, &cert).await;
    assert_eq!(first.client.current_max_send_streams(), 2);
    // One slot for the connection, one per WebSocket: three of four.
    let (mut a, _) = first.websocket("/a", &[]).await.unwrap();
    let (_b, _) = first.websocket("/b", &[]).await.unwrap();
    // The second connection takes the last slot; its WebSocket finds none.
    let second = h2_connect(sidecar.addr, &cert).await;
    let refused = second.websocket("/c", &[]).await.err().expect("a WebSocket past max_connections is refused");
    assert_eq!(refused.0, 503, "{refused:?}");
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="limit"}"#), 1.0, "{text}");
    assert_eq!(common::metric(&text, UPGRADES_H2), 2.0);
    // A closed WebSocket gives its slot back.
    a.close(None).await.unwrap();
    let _ = next_message(&mut a).await;
    drop(a);
    await_metric(sidecar.admin, &ending("client_close"), 1.0).await;
    let (mut c, _) = second.websocket("/c", &[]).await.expect("a slot came free");
    c.send(Message::text("in")).await.unwrap();
    assert_eq!(next_message(&mut c).await, Some(Message::text("in")));
}

/// `wskeep bench --http2 N` (the h2 rows of tests/bench/compare.sh): WebSockets opened as
/// streams, N per connection, echoed through wskeep.
#[tokio::test]
async fn the_load_generator_speaks_http2() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let url = format!("wss://localhost:{}/", sidecar.addr.port());
    let bench = wskeep::tools::bench::Common::new(url, true, None, Some(4));
    let kind = wskeep::tools::bench::MessageKind::default();
    let report = wskeep::tools::bench::throughput(&bench, 10, 64, 4, Duration::from_millis(300), kind).await.unwrap();
    assert!(report["messages"].as_u64().unwrap() > 0, "{report}");
    let text = await_metric(sidecar.admin, UPGRADES_H2, 10.0).await;
    assert_eq!(common::metric(&text, UPGRADES_H1), 0.0, "{text}");
    let report = wskeep::tools::bench::idle(&bench, 10, Duration::from_millis(100), 4, false).await.unwrap();
    assert_eq!((report["opened"].as_u64(), report["lost"].as_u64()), (Some(10), Some(0)), "{report}");
}

/// `listen.idle_timeout` on HTTP/2: a connection with no request and no WebSocket for that long
/// gets its GOAWAY; one whose WebSocket is open keeps going, however quiet.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_unless_it_carries_a_websocket() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.idle_timeout = Duration::from_millis(200);
    let sidecar = common::start_sidecar(config).await;
    let idle = h2_connect(sidecar.addr, &cert).await;
    let busy = h2_connect(sidecar.addr, &cert).await;
    let (mut ws, _) = busy.websocket("/quiet", &[]).await.unwrap();
    let deadline = Instant::now() + LIMIT;
    while !idle.frames().iter().any(|f| f.0 == GOAWAY) {
        assert!(Instant::now() < deadline, "no GOAWAY on an idle connection: {:?}", idle.frames());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three more idle periods on the quiet WebSocket's connection: still open.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!busy.frames().iter().any(|f| f.0 == GOAWAY), "{:?}", busy.frames());
    ws.send(Message::text("still open")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::text("still open")));
}

/// What an HTTP/2 WebSocket handshake must carry: version 13 (426 with the supported version
/// otherwise, as on HTTP/1.1), and `:protocol websocket` (another protocol is a plain CONNECT:
/// 405). Each refusal ends its stream only.
#[tokio::test]
async fn bad_extended_connects_are_refused_on_their_stream() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let connect = |protocol: &'static str, version: &str| {
        let mut request = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://localhost:{}/x", h2.port))
            .header("sec-websocket-version", version)
            .body(())
            .unwrap();
        request.extensions_mut().insert(h2::ext::Protocol::from_static(protocol));
        request
    };
    for (request, want) in [(connect("websocket", "8"), 426), (connect("webtransport", "13"), 405)] {
        let mut client = h2.client.clone().ready().await.unwrap();
        let (response, _) = client.send_request(request, false).unwrap();
        let response = tokio::time::timeout(LIMIT, response).await.unwrap().unwrap();
        assert_eq!(response.status().as_u16(), want);
        if want == 426 {
            assert_eq!(response.headers().get("sec-websocket-version").unwrap(), "13");
        }
    }
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_upgrade_failures_total{reason="bad_request"}"#), 1.0, "{text}");
    assert!(upstream.seen.lock().unwrap().is_empty(), "nothing reached the upstream");
    let (mut ws, _) = h2.websocket("/fine", &[]).await.unwrap();
    ws.send(Message::text("ok")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::text("ok")));
}

/// `listen.http2 = false`: a client offering `h2` and `http/1.1` gets HTTP/1.1.
#[tokio::test]
async fn http2_off_offers_only_http1() {
    use rustls::pki_types::pem::PemObject;
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.http2 = false;
    let sidecar = common::start_sidecar(config).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(sidecar.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut ws = common::wss(sidecar.addr, &cert, "/h1", &[]).await;
    ws.send(Message::text("one")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("one")));
    let text = await_metric(sidecar.admin, UPGRADES_H1, 1.0).await;
    assert_eq!(common::metric(&text, UPGRADES_H2), 0.0);
}

/// The real binary: a WebSocket over HTTP/2 ends with a `connection closed` line that says
/// `http_version` 2, and SIGTERM closes an open one with 1001 before the process exits 0.
#[tokio::test]
async fn the_binary_logs_the_transport_and_drains_http2_websockets() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let (tls_cert, tls_key) = (cert.cert.display().to_string(), cert.key.display().to_string());
    let mut wskeep = common::binary::Wskeep::start_with(|port, admin| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\ntls_cert = {tls_cert:?}\ntls_key = {tls_key:?}\n\
             [admin]\naddr = \"127.0.0.1:{admin}\"\n[upstream]\nurl = \"ws://{}\"\n\
             [shutdown]\ndrain_timeout = \"300ms\"\n[log]\nformat = \"json\"\n",
            upstream.addr
        )
    })
    .await;
    let h2 = h2_connect(wskeep.addr, &cert).await;
    let (mut first, _) = h2.websocket("/first", &[]).await.unwrap();
    first.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut first).await, Some(Message::text("hi")));
    first.close(None).await.unwrap();
    let line = wskeep.wait_log_line(&["connection closed", "/first"], LIMIT).await;
    assert!(line.contains(r#""http_version":"2""#), "{line}");
    assert!(line.contains(r#""end":"client_close""#), "{line}");

    let (mut second, _) = h2.websocket("/second", &[]).await.unwrap();
    wskeep.signal("TERM");
    match next_message(&mut second).await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("no 1001 on the HTTP/2 stream: {other:?}"),
    }
    let _ = next_message(&mut second).await;
    let status = wskeep.wait_exit(LIMIT).await.expect("wskeep exits after the drain");
    assert!(status.success(), "{status:?}");
    assert_eq!(await_closes(&upstream.closes, 2).await.last(), Some(&(1001, "going away".to_string())));
}

/// The first message of a resumable session (`\0wskeep:session <token> <count>`): the token.
async fn session_token(ws: &mut H2Ws) -> String {
    match next_message(ws).await {
        Some(Message::Text(t)) => t.strip_prefix("\0wskeep:session ").unwrap().split(' ').next().unwrap().to_string(),
        other => panic!("expected a session message, got {other:?}"),
    }
}

/// A session resumed on another HTTP/2 connection belongs to that connection: its idle check
/// leaves it be, and a drain sends the 1001 on it before the GOAWAY.
#[tokio::test]
async fn a_resumed_http2_websocket_holds_its_connection_until_its_1001() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let extra = "[resume]\nenabled = true\ngrace = \"5s\"\n[shutdown]\ndrain_timeout = \"300ms\"\n";
    let mut config = common::test_config(upstream.addr, Some(&cert), extra);
    config.listen.idle_timeout = Duration::from_millis(200);
    let sidecar = common::start_sidecar(config).await;
    let first = h2_connect(sidecar.addr, &cert).await;
    let (mut ws, _) = first.websocket("/r?wskeep_resume=1", &[]).await.unwrap();
    let token = session_token(&mut ws).await;
    ws.get_mut().send.send_reset(h2::Reason::CANCEL);
    await_metric(sidecar.admin, "wskeep_resume_sessions_detached_total", 1.0).await;
    // The detached session keeps its slot, not its old connection: that one goes idle.
    let deadline = Instant::now() + LIMIT;
    while !first.frames().iter().any(|f| f.0 == GOAWAY) {
        assert!(Instant::now() < deadline, "no GOAWAY on the old connection: {:?}", first.frames());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = h2_connect(sidecar.addr, &cert).await;
    let (mut ws, _) = second
        .websocket(&format!("/r?wskeep_resume=1&wskeep_token={token}&wskeep_received=0"), &[])
        .await
        .expect("the resume is answered 200");
    session_token(&mut ws).await;
    await_metric(sidecar.admin, "wskeep_resume_sessions_resumed_total", 1.0).await;
    // Three idle periods: the connection carrying the resumed WebSocket stays open.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!second.frames().iter().any(|f| f.0 == GOAWAY), "{:?}", second.frames());
    ws.send(Message::text("still open")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::text("still open")));

    let stream = u32::from(ws.get_ref().send.stream_id());
    sidecar.drain.start();
    match next_message(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("no 1001: {other:?}"),
    }
    let _ = next_message(&mut ws).await;
    let deadline = Instant::now() + LIMIT;
    let frames = loop {
        let frames = second.frames();
        if frames.iter().any(|f| f.0 == GOAWAY) {
            break frames;
        }
        assert!(Instant::now() < deadline, "no GOAWAY after the WebSocket closed: {frames:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let goaway = frames.iter().position(|f| f.0 == GOAWAY).unwrap();
    let end = frames.iter().position(|f| f.2 == stream && (f.0 == DATA && f.1 & END_STREAM != 0 || f.0 == 3));
    assert!(end.is_some_and(|end| end < goaway), "stream {stream} not ended before GOAWAY: {frames:?}");
}

/// A resume that comes during a drain (here on an HTTP/2 connection kept open by another
/// WebSocket) is answered as every failed resume is: 200 (101 on HTTP/1.1), then close 4410, so
/// the shim starts afresh rather than retrying a bare error.
#[tokio::test]
async fn a_resume_during_a_drain_gets_4410_not_503() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let extra = "[resume]\nenabled = true\ngrace = \"5s\"\n[shutdown]\ndrain_timeout = \"5s\"\n";
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), extra)).await;
    let h2 = h2_connect(sidecar.addr, &cert).await;
    let (_kept, _) = h2.websocket("/kept", &[]).await.unwrap();
    let (mut ws, _) = h2.websocket("/r?wskeep_resume=1", &[]).await.unwrap();
    let token = session_token(&mut ws).await;
    ws.get_mut().send.send_reset(h2::Reason::CANCEL);
    await_metric(sidecar.admin, "wskeep_resume_sessions_detached_total", 1.0).await;

    sidecar.drain.start();
    let resume = format!("/r?wskeep_resume=1&wskeep_token={token}&wskeep_received=0");
    let (mut ws, _) = h2.websocket(&resume, &[]).await.expect("answered 200 while draining");
    match next_message(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 4410),
        other => panic!("no 4410: {other:?}"),
    }
    await_metric(sidecar.admin, r#"wskeep_resume_failures_total{reason="upstream_gone"}"#, 1.0).await;
}
