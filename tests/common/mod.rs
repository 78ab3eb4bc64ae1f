//! Shared harness for the integration tests: test certificates, an in-process sidecar on port 0,
//! a scriptable WebSocket upstream, a TLS WebSocket client, and metric scraping.
#![allow(dead_code)]

pub mod binary;
pub mod chromium;
pub mod python;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use wskeep::config::Config;
use wskeep::metrics::Metrics;
use wskeep::Drain;

// === certificates ===

pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written to a fresh directory.
pub fn test_cert() -> TestCert {
    let (cert_pem, key_pem) = cert_pair(&[0x01]);
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    TestCert { dir, cert, key, cert_pem, key_pem }
}

/// A PEM certificate and key with the given serial number.
pub fn cert_pair(serial: &[u8]) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from(serial.to_vec()));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

// === the sidecar ===

pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub drain: Drain,
    pub metrics: Arc<Metrics>,
    pub task: tokio::task::JoinHandle<()>,
}

/// A configuration for tests: loopback port 0 everywhere, keepalive off unless a test sets it.
pub fn test_config(upstream: SocketAddr, tls: Option<&TestCert>, extra: &str) -> Config {
    let tls_lines = tls.map_or(String::new(), |c| {
        format!("tls_cert = {:?}\ntls_key = {:?}\n", c.cert.display().to_string(), c.key.display().to_string())
    });
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n{tls_lines}\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"ws://{upstream}\"\n{extra}"
    );
    Config::from_toml(&with_defaults(&text)).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Keepalive off by default in tests, so that no frame arrives that a test did not ask for.
fn with_defaults(text: &str) -> String {
    let mut out = text.to_string();
    if !text.contains("[client_keepalive]") {
        out.push_str("\n[client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n");
    }
    if !text.contains("[log]") {
        out.push_str("\n[log]\nlevel = \"warn\"\nformat = \"text\"\n");
    }
    out
}

pub async fn start_sidecar(config: Config) -> Sidecar {
    let server = wskeep::Server::bind(config).await.expect("sidecar binds");
    let sidecar = Sidecar {
        addr: server.local_addr(),
        admin: server.admin_addr(),
        drain: server.drain(),
        metrics: server.metrics(),
        task: tokio::spawn(server.run()),
    };
    wait_ready(sidecar.admin).await;
    sidecar
}

/// Polls `/readyz` until it answers 200 (bounded).
pub async fn wait_ready(admin: SocketAddr) {
    for _ in 0..500 {
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("sidecar at {admin} never became ready");
}

// === plain HTTP ===

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Writes `bytes` on a fresh TCP connection (then ends the stream if `eof`) and reads until
/// wskeep closes it; panics if it does not within `limit`. Returns what wskeep sent.
pub async fn send_junk(addr: SocketAddr, bytes: &[u8], eof: bool, limit: Duration) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    if eof {
        tcp.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("wskeep kept open the connection that sent {:?}", &bytes[..bytes.len().min(16)]));
    answer
}

pub async fn scrape(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.expect("metrics answer").1
}

/// The value of one sample, e.g. `metric(&text, "wskeep_connections_total")` or with labels
/// `metric(&text, r#"wskeep_close_codes_total{code="1000",direction="received",side="client"}"#)`.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

// === a scriptable upstream ===

/// What the upstream saw of one handshake.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub uri: String,
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A WebSocket upstream whose behaviour the path picks:
/// - `/refuse`: 403 with a body and an `X-Reason` header
/// - `/silent`: completes the handshake, then never reads or writes
/// - anything else: echoes; a text `close:CODE:REASON` makes it close with that code
///
/// It picks the subprotocol `v2` when offered. `kill()` drops every connection without a close frame.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
    /// Close frames received from wskeep: (code, reason); code 1005 for none.
    pub closes: Arc<Mutex<Vec<(u16, String)>>>,
    pub kill: CancellationToken,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let closes = Arc::new(Mutex::new(Vec::new()));
        let kill = CancellationToken::new();
        let (s, c, k) = (seen.clone(), closes.clone(), kill.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = k.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                let (s, c, k) = (s.clone(), c.clone(), k.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = k.cancelled() => {}
                        _ = serve_upstream(tcp, s, c) => {}
                    }
                });
            }
        });
        TestUpstream { addr, seen, closes, kill }
    }

    pub fn last_request(&self) -> SeenRequest {
        self.seen.lock().unwrap().last().cloned().expect("the upstream saw a request")
    }
}

// Collapsing the `if` into a match guard would move the message before the other arms.
#[allow(clippy::collapsible_match)]
async fn serve_upstream(tcp: TcpStream, seen: Arc<Mutex<Vec<SeenRequest>>>, closes: Arc<Mutex<Vec<(u16, String)>>>) {
    let mut path = String::new();
    // tungstenite's callback signature returns its (large) ErrorResponse by value.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_string();
        let headers =
            req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
        seen.lock().unwrap().push(SeenRequest { uri: req.uri().to_string(), headers });
        if path == "/refuse" {
            let mut refusal = ErrorResponse::new(Some("forbidden by upstream".into()));
            *refusal.status_mut() = http::StatusCode::FORBIDDEN;
            refusal.headers_mut().insert("x-reason", "test".parse().unwrap());
            return Err(refusal);
        }
        let offered = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
        if offered.split(',').any(|p| p.trim() == "v2") {
            resp.headers_mut().insert("sec-websocket-protocol", "v2".parse().unwrap());
        }
        Ok(resp)
    };
    let config = wskeep::tools::bench::echo::websocket_config(64 << 20);
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await else { return };
    if path == "/silent" {
        std::future::pending::<()>().await;
    }
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(t) if t.starts_with("close:") => {
                let mut parts = t.splitn(3, ':').skip(1);
                let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                let reason = parts.next().unwrap_or("").to_string();
                let _ = ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() })).await;
                // Wait for the answer so the closing handshake completes.
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
                return;
            }
            Message::Text(t) if t.as_str() == "fragments:" => {
                // A message whose first fragment leaves now and whose last waits for "continue".
                let first = Frame::message(&b"first "[..], OpCode::Data(Data::Text), false);
                if ws.send(Message::Frame(first)).await.is_err() {
                    return;
                }
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(&m, Message::Text(t) if t.as_str() == "continue") {
                        break;
                    }
                }
                let last = Frame::message(&b"last"[..], OpCode::Data(Data::Continue), true);
                if ws.send(Message::Frame(last)).await.is_err() {
                    return;
                }
            }
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            Message::Close(frame) => {
                let entry = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                closes.lock().unwrap().push(entry);
                let _ = ws.flush().await;
                return;
            }
            _ => {}
        }
    }
}

// === a raw upstream ===

/// An upstream on a raw socket, for answers no WebSocket library would give: each connection is
/// handed to the test with the request head it brought (read up to the blank line).
pub async fn raw_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(String, TcpStream)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                // One byte at a time: nothing after the head is taken from the test.
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match tcp.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = tx.send((String::from_utf8_lossy(&head).into_owned(), tcp));
            });
        }
    });
    (addr, rx)
}

/// The `Sec-WebSocket-Accept` value for the key in a request head.
pub fn accept_for(head: &str) -> String {
    let key = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-key"))
        .map(|(_, value)| value.trim())
        .expect("the request has a Sec-WebSocket-Key");
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

// === a TLS WebSocket client ===

pub type TlsWs = WebSocketStream<TlsStream<TcpStream>>;

/// A rustls client config that trusts exactly the test certificate.
pub fn client_tls(cert: &TestCert) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(addr: SocketAddr, cert: &TestCert) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    client_tls(cert).connect(name, tcp).await.unwrap()
}

/// Opens `wss://localhost:PORT{path}` through the sidecar, with extra request headers.
pub async fn wss(addr: SocketAddr, cert: &TestCert, path: &str, headers: &[(&str, &str)]) -> TlsWs {
    let tls = tls_connect(addr, cert).await;
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "wss://localhost:{}{path}",
        addr.port()
    ))
    .unwrap();
    for (k, v) in headers {
        request.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let config = wskeep::tools::bench::echo::websocket_config(64 << 20);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tls, Some(config)).await.unwrap();
    ws
}

/// The next data or close message, skipping pings and pongs; panics after `limit`.
pub async fn next_message<S>(ws: &mut S, limit: Duration) -> Option<Message>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                _ => return None,
            }
        }
    })
    .await
    .expect("a message within the limit")
}
