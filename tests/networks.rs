//! The networks wskeep fits, through the real binary: in front, the real client address behind
//! an L4 balancer, a real HAProxy (`send-proxy-v2`) and a real nginx stream proxy
//! (`proxy_protocol on`, v1), both from Debian (`.ci/install.sh`); the refusals (untrusted peer,
//! malformed header, none in time) counted under their reasons; which `X-Forwarded-For` is
//! believed (`listen.trusted_proxies`); and IPv6 on the listener, the admin port and the upstream.
//!
//! The client connects from its own loopback address (127.0.0.5 and the like) while the balancer
//! connects from 127.0.0.1, so an address seen upstream or in `/connections` tells which one
//! wskeep believed.

mod common;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::binary::Wskeep;
use common::TestUpstream;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(5);

async fn start(upstream: SocketAddr, listen_extra: &str) -> Wskeep {
    Wskeep::start_with(|port, admin_port| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n{listen_extra}\n[admin]\naddr = \"127.0.0.1:{admin_port}\"\n\
             [upstream]\nurl = \"ws://{upstream}\"\n\
             [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n\
             [log]\nlevel = \"info\"\nformat = \"json\"\n"
        )
    })
    .await
}

/// A free loopback port: bound, then released (HAProxy and nginx cannot be told port 0).
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// A WebSocket handshake over `tcp` with extra request headers; echoes one message to prove the
/// relay works, and returns the open stream.
async fn websocket(tcp: TcpStream, headers: &[(&'static str, &str)]) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let mut request = "ws://wskeep.test/chat?token=secret".into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (mut ws, response) =
        tokio::time::timeout(LIMIT, tokio_tungstenite::client_async(request, tcp)).await.unwrap().unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    let echo = common::next_message(&mut ws, LIMIT).await;
    assert_eq!(echo, Some(Message::text("hello")));
    ws
}

/// A balancer started from its own configuration file, killed by its PID when dropped.
struct Balancer {
    child: Child,
    addr: SocketAddr,
    name: &'static str,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Balancer {
    /// HAProxy in TCP mode, sending PROXY v2 to wskeep.
    async fn haproxy(to: SocketAddr) -> Balancer {
        Balancer::start("haproxy", |dir, port| {
            let config = dir.join("haproxy.cfg");
            std::fs::write(
                &config,
                format!(
                    "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend in\n  bind 127.0.0.1:{port}\n  default_backend wskeep\n\
                     backend wskeep\n  server wskeep {to} send-proxy-v2\n"
                ),
            )
            .unwrap();
            let mut command = Command::new("haproxy");
            command.arg("-db").arg("-f").arg(&config);
            command
        })
        .await
    }

    /// nginx's stream module, sending PROXY v1 to wskeep.
    async fn nginx(to: SocketAddr) -> Balancer {
        Balancer::start("nginx", |dir, port| {
            let config = dir.join("nginx.conf");
            std::fs::write(
                &config,
                format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                     daemon off;\nmaster_process off;\npid {pid};\nerror_log stderr info;\n\
                     events {{}}\n\
                     stream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {to}; proxy_protocol on; }} }}\n",
                    pid = dir.join("nginx.pid").display()
                ),
            )
            .unwrap();
            let mut command = Command::new("nginx");
            command.arg("-p").arg(dir).arg("-e").arg("stderr").arg("-c").arg(&config);
            command
        })
        .await
    }

    async fn start(name: &'static str, command: impl Fn(&Path, u16) -> Command) -> Balancer {
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let log = dir.path().join("stderr.log");
            let child = command(dir.path(), port)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|e| panic!("{name} must be installed (.ci/install.sh): {e}"));
            let mut balancer = Balancer { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), name, log, _dir: dir };
            let deadline = Instant::now() + LIMIT;
            loop {
                if balancer.child.try_wait().unwrap().is_some() {
                    // The port may have been taken between picking and binding it: pick again.
                    break;
                }
                if TcpStream::connect(balancer.addr).await.is_ok() {
                    return balancer;
                }
                assert!(Instant::now() < deadline, "{name} never listened:\n{}", balancer.log());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            eprintln!("{name} exited at start:\n{}", balancer.log());
        }
        panic!("{name} did not start");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// Through `balancer`, from 127.0.0.5: the upstream, `/connections`, the closing log line and
/// a plain HTTP request all name the client, not the balancer.
async fn client_address_survives(wskeep: &Wskeep, upstream: &TestUpstream, balancer: &Balancer) {
    let tcp = connect_from([127, 0, 0, 5], balancer.addr).await;
    // A client's own claim is not believed: 127.0.0.5 is not a trusted proxy.
    let mut ws = websocket(tcp, &[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")]).await;
    let seen = upstream.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.5"), "{seen:?}");
    if let Some(forwarded) = seen.header("forwarded") {
        assert!(!forwarded.contains("6.6.6.6") && forwarded.contains("for=127.0.0.5"), "{forwarded}");
    }
    let (status, listing) = common::http_get(wskeep.admin, "/connections").await.unwrap();
    assert_eq!(status, 200);
    assert!(listing.contains("127.0.0.5:"), "{listing}");
    ws.close(None).await.unwrap();
    let line = wskeep.wait_log_line(&["connection closed", "127.0.0.5:"], LIMIT).await;
    assert!(!line.contains("secret"), "{line}");

    // A plain HTTP request on the same path: the upstream (a WebSocket server) refuses it, but
    // it was forwarded with the client's address.
    let mut tcp = connect_from([127, 0, 0, 6], balancer.addr).await;
    tcp.write_all(b"GET /plain HTTP/1.1\r\nHost: wskeep.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn behind_haproxy_send_proxy_v2() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(upstream.addr, "proxy_protocol = \"v2\"\ntrusted_proxies = [\"127.0.0.1\"]").await;
    let haproxy = Balancer::haproxy(wskeep.addr).await;
    client_address_survives(&wskeep, &upstream, &haproxy).await;
    let text = common::scrape(wskeep.admin).await;
    for reason in ["untrusted", "malformed", "timeout"] {
        let series = format!("wskeep_proxy_protocol_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(common::metric(&text, &series), 0.0, "{series}:\n{text}");
    }
}

#[tokio::test]
async fn the_header_comes_before_tls() {
    let upstream = TestUpstream::start().await;
    let cert = common::test_cert();
    let tls = format!(
        "tls_cert = {:?}\ntls_key = {:?}\nproxy_protocol = \"v2\"\ntrusted_proxies = [\"127.0.0.1\"]",
        cert.cert.display().to_string(),
        cert.key.display().to_string()
    );
    let wskeep = start(upstream.addr, &tls).await;
    let haproxy = Balancer::haproxy(wskeep.addr).await;
    // HAProxy in TCP mode passes the TLS bytes through, after its header: wskeep reads the header
    // and only then the ClientHello (read as part of TLS, the header would fail the handshake).
    let mut ws = common::wss(haproxy.addr, &cert, "/chat", &[]).await;
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, LIMIT).await, Some(Message::text("over tls")));
    assert_eq!(upstream.last_request().header("x-forwarded-proto"), Some("https"));
    assert_eq!(upstream.last_request().header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn behind_nginx_stream_proxy_protocol_v1() {
    let upstream = TestUpstream::start().await;
    // "any" takes v1 as well as v2.
    let wskeep = start(upstream.addr, "proxy_protocol = \"any\"\ntrusted_proxies = [\"127.0.0.0/30\"]").await;
    let nginx = Balancer::nginx(wskeep.addr).await;
    client_address_survives(&wskeep, &upstream, &nginx).await;
}

/// Sends `bytes` from `from`, then waits for wskeep to close; returns what it answered.
async fn refused(wskeep: &Wskeep, from: [u8; 4], bytes: &[u8]) -> Vec<u8> {
    let mut tcp = connect_from(from, wskeep.addr).await;
    let _ = tcp.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut answer)).await.expect("wskeep closes the connection");
    answer
}

#[tokio::test]
async fn bad_headers_close_the_connection_under_their_reason() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(
        upstream.addr,
        "proxy_protocol = \"v1\"\ntrusted_proxies = [\"127.0.0.1/32\"]\nhandshake_timeout = \"300ms\"",
    )
    .await;
    let request = b"GET / HTTP/1.1\r\nHost: wskeep.test\r\n\r\n";
    let reason = |r: &str| format!("wskeep_proxy_protocol_failures_total{{reason=\"{r}\"}}");

    // An untrusted peer, even with a well-formed header.
    let mut bytes = b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 80\r\n".to_vec();
    bytes.extend_from_slice(request);
    assert_eq!(refused(&wskeep, [127, 0, 0, 9], &bytes).await, b"");
    wskeep.wait_metric(&reason("untrusted"), 1.0, LIMIT).await;

    // No header, a v2 header on a v1 listener, a broken v1 line.
    for bad in [&request[..], &[&b"\r\n\r\n\0\r\nQUIT\n"[..], &[0x21, 0x11, 0, 0]].concat(), b"PROXY TCP4 1.2.3.4\r\n"]
    {
        assert_eq!(refused(&wskeep, [127, 0, 0, 1], bad).await, b"", "{}", String::from_utf8_lossy(bad));
    }
    wskeep.wait_metric(&reason("malformed"), 3.0, LIMIT).await;

    // Half a header, then nothing: closed at the handshake timeout.
    let started = Instant::now();
    assert_eq!(refused(&wskeep, [127, 0, 0, 1], b"PROXY TCP4 192.0.2.1").await, b"");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before the timeout");
    let text = wskeep.wait_metric(&reason("timeout"), 1.0, LIMIT).await;
    assert_eq!(common::metric(&text, &reason("malformed")), 3.0);
    wskeep.wait_log_line(&["PROXY protocol header refused", "untrusted", "127.0.0.9"], LIMIT).await;

    // And a good one, sent by hand in two pieces, carries the client across.
    let mut tcp = connect_from([127, 0, 0, 1], wskeep.addr).await;
    tcp.write_all(b"PROXY TCP4 192.0.2.44 127.0.0.1 4").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    tcp.write_all(b"4321 80\r\n").await.unwrap();
    let _ws = websocket(tcp, &[]).await;
    assert_eq!(upstream.last_request().header("x-forwarded-for"), Some("192.0.2.44"));
}

#[tokio::test]
async fn forwarded_for_is_believed_from_trusted_proxies_only() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(upstream.addr, "trusted_proxies = [\"127.0.0.2\"]").await;
    let claim = [("x-forwarded-for", "203.0.113.7"), ("forwarded", "for=203.0.113.7")];

    let _trusted = websocket(connect_from([127, 0, 0, 2], wskeep.addr).await, &claim).await;
    let seen = upstream.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7, 127.0.0.2"), "{seen:?}");

    let _untrusted = websocket(connect_from([127, 0, 0, 3], wskeep.addr).await, &claim).await;
    let seen = upstream.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.3"), "{seen:?}");
    if let Some(forwarded) = seen.header("forwarded") {
        assert!(!forwarded.contains("203.0.113.7"), "{forwarded}");
    }
}

/// A WebSocket echo upstream on `[::1]`; returns its address and the `X-Forwarded-For` of each
/// handshake.
async fn ipv6_upstream() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                // tungstenite's callback signature returns its (large) ErrorResponse by value.
                #[allow(clippy::result_large_err)]
                let callback = |req: &Request, resp: Response| {
                    let xff = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("");
                    record.lock().unwrap().push(xff.to_string());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else { return };
                while let Some(Ok(message)) = futures_util::StreamExt::next(&mut ws).await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn ipv6_listener_admin_and_upstream() {
    let (upstream, seen) = ipv6_upstream().await;
    let wskeep = Wskeep::start_on("::1".parse().unwrap(), |port, admin_port| {
        format!(
            "[listen]\naddr = \"[::1]:{port}\"\n[admin]\naddr = \"[::1]:{admin_port}\"\n\
             [upstream]\nurl = \"ws://{upstream}\"\n\
             [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n[log]\nformat = \"json\"\n"
        )
    })
    .await;
    assert!(wskeep.addr.is_ipv6() && wskeep.admin.is_ipv6() && upstream.is_ipv6());
    let mut ws = websocket(TcpStream::connect(wskeep.addr).await.unwrap(), &[]).await;
    assert_eq!(seen.lock().unwrap().as_slice(), ["::1"]);
    let (status, listing) = common::http_get(wskeep.admin, "/connections").await.unwrap();
    assert_eq!(status, 200);
    assert!(listing.contains("[::1]:"), "{listing}");
    ws.close(None).await.unwrap();
    wskeep.wait_log_line(&["connection closed", "[::1]:"], LIMIT).await;
}

/// A Python `websockets` server (tests/networks/upstream.py), on a Unix socket or over TLS.
struct PythonUpstream {
    child: Child,
    socket: std::path::PathBuf,
    /// The TLS server's port on 127.0.0.1.
    port: u16,
}

impl PythonUpstream {
    async fn unix(dir: &Path) -> PythonUpstream {
        let socket = dir.join("orchestrator.sock");
        let mut upstream = PythonUpstream::start(&["unix".as_ref(), socket.as_os_str()]).await;
        upstream.socket = socket;
        upstream
    }

    /// A TLS server with `cert` and `key`; with `client_ca` it requires a client certificate.
    async fn tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> PythonUpstream {
        let mut args = vec!["tls".as_ref(), cert.as_os_str(), key.as_os_str()];
        args.extend(client_ca.map(Path::as_os_str));
        PythonUpstream::start(&args).await
    }

    async fn start(args: &[&std::ffi::OsStr]) -> PythonUpstream {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/networks/upstream.py");
        let mut child = Command::new(common::python::python())
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with websockets (tests/networks/install.sh)");
        let stdout = child.stdout.take().unwrap();
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
        });
        let line = tokio::time::timeout(LIMIT, first_line).await.expect("the Python upstream starts in time");
        let port = line.ok().and_then(Result::ok).and_then(|l| l.trim().strip_prefix("ready ")?.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            panic!("the Python upstream did not start (is websockets installed? tests/networks/install.sh)");
        };
        PythonUpstream { child, socket: Default::default(), port }
    }
}

impl Drop for PythonUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn unix_socket_upstream_with_its_host_header() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = PythonUpstream::unix(dir.path()).await;
    let socket = upstream.socket.display().to_string();
    let wskeep = Wskeep::start_with(|port, admin_port| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n[admin]\naddr = \"127.0.0.1:{admin_port}\"\n\
             [upstream]\nurl = \"unix:{socket}\"\nhost_header = \"orchestrator.internal\"\n\
             [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n[log]\nformat = \"json\"\n"
        )
    })
    .await;

    let mut ws = websocket(connect_from([127, 0, 0, 4], wskeep.addr).await, &[]).await;
    ws.send(Message::text("whoami")).await.unwrap();
    let answer = common::next_message(&mut ws, LIMIT).await;
    assert_eq!(answer, Some(Message::text("host=orchestrator.internal xff=127.0.0.4")));
    ws.close(None).await.unwrap();

    let (status, body) = common::http_get(wskeep.addr, "/plain?x=1").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "plain host=orchestrator.internal xff=127.0.0.1\n"));

    // The socket gone: 502 with the path in the log.
    drop(upstream);
    let (status, _) = common::http_get(wskeep.addr, "/plain").await.unwrap();
    assert_eq!(status, 502);
    wskeep.wait_log_line(&["orchestrator.sock"], LIMIT).await;
}

// === a wss:// upstream ===

/// A CA and the PEM files it issued, in one directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let pki = Pki { dir: tempfile::tempdir().unwrap(), ca };
        std::fs::write(pki.path("ca.crt"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// Issues a leaf for `names` (expired if `expired`) as `NAME.crt` and `NAME.key`.
    fn issue(&self, file: &str, names: &[&str], expired: bool) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (self.path(&format!("{file}.crt")), self.path(&format!("{file}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

async fn start_tls(upstream_keys: &str) -> Wskeep {
    Wskeep::start_with(|port, admin_port| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n[admin]\naddr = \"127.0.0.1:{admin_port}\"\n\
             [upstream]\n{upstream_keys}\nconnect_timeout = \"2s\"\n\
             [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n[log]\nformat = \"json\"\n"
        )
    })
    .await
}

/// The status of a WebSocket upgrade through `wskeep`.
async fn upgrade_status(wskeep: &Wskeep) -> u16 {
    let tcp = TcpStream::connect(wskeep.addr).await.unwrap();
    match tokio_tungstenite::client_async("ws://wskeep.test/chat", tcp).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn wss_upstream_verified_resumed_and_each_failure_named() {
    let pki = Pki::new("wskeep test CA");
    let (cert, key) = pki.issue("server", &["localhost", "127.0.0.1"], false);
    let upstream = PythonUpstream::tls(&cert, &key, None).await;
    let ca = pki.path("ca.crt").display().to_string();
    let url = format!("url = \"wss://localhost:{}\"", upstream.port);
    let wskeep = start_tls(&format!("{url}\nca_file = \"{ca}\"")).await;

    // Verified against ca_file; the second connection resumes the first one's TLS session.
    for resumed in [false, true] {
        let mut ws = websocket(TcpStream::connect(wskeep.addr).await.unwrap(), &[]).await;
        ws.send(Message::text("whoami")).await.unwrap();
        let answer = common::next_message(&mut ws, LIMIT).await;
        let want = format!(
            "host=localhost:{} xff=127.0.0.1 resumed={}",
            upstream.port,
            if resumed { "True" } else { "False" }
        );
        assert_eq!(answer, Some(Message::text(want)));
        ws.close(None).await.unwrap();
    }
    let (status, body) = common::http_get(wskeep.addr, "/plain").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(&format!("plain host=localhost:{}", upstream.port)), "{body}");

    // The system roots do not know the test CA; another name; an expired certificate.
    let other_ca = Pki::new("another CA");
    let expired_pki_cert = pki.issue("expired", &["localhost"], true);
    let expired = PythonUpstream::tls(&expired_pki_cert.0, &expired_pki_cert.1, None).await;
    let failures = [
        (url.clone(), "UnknownIssuer"),
        (format!("{url}\nca_file = \"{}\"", other_ca.path("ca.crt").display()), "UnknownIssuer"),
        (format!("{url}\nca_file = \"{ca}\"\nserver_name = \"orchestrator.example\""), "not valid for name"),
        (format!("url = \"wss://localhost:{}\"\nca_file = \"{ca}\"", expired.port), "xpired"),
    ];
    for (keys, detail) in failures {
        let wskeep = start_tls(&keys).await;
        assert_eq!(upgrade_status(&wskeep).await, 502, "{keys}");
        wskeep.wait_metric("wskeep_upgrade_failures_total{reason=\"upstream_tls\"}", 1.0, LIMIT).await;
        wskeep.wait_log_line(&["upstream_tls", detail], LIMIT).await;
    }
}

#[tokio::test]
async fn wss_upstream_with_a_client_certificate() {
    let pki = Pki::new("wskeep test CA");
    let (cert, key) = pki.issue("server", &["localhost"], false);
    let (client_cert, client_key) = pki.issue("client", &["wskeep.client"], false);
    let upstream = PythonUpstream::tls(&cert, &key, Some(&pki.path("ca.crt"))).await;
    let keys = format!("url = \"wss://localhost:{}\"\nca_file = \"{}\"", upstream.port, pki.path("ca.crt").display());

    let without = start_tls(&keys).await;
    assert_eq!(upgrade_status(&without).await, 502, "the upstream requires a client certificate");

    let with = start_tls(&format!(
        "{keys}\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        client_cert.display(),
        client_key.display()
    ))
    .await;
    let mut ws = websocket(TcpStream::connect(with.addr).await.unwrap(), &[]).await;
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn upstream_ca_file_is_reloaded_when_it_changes() {
    let pki = Pki::new("wskeep test CA");
    let (cert, key) = pki.issue("server", &["localhost"], false);
    let upstream = PythonUpstream::tls(&cert, &key, None).await;
    // ca_file starts with another CA's certificate: the upstream does not verify.
    let other_ca = Pki::new("another CA");
    let ca_file = pki.path("rotated-ca.crt");
    std::fs::copy(other_ca.path("ca.crt"), &ca_file).unwrap();
    let wskeep = start_tls(&format!(
        "url = \"wss://localhost:{}\"\nca_file = {:?}",
        upstream.port,
        ca_file.display().to_string()
    ))
    .await;
    assert_eq!(upgrade_status(&wskeep).await, 502);

    // The right CA written in its place is taken up by a later connection, without a restart.
    std::fs::write(&ca_file, std::fs::read(pki.path("ca.crt")).unwrap()).unwrap();
    let deadline = Instant::now() + LIMIT;
    while upgrade_status(&wskeep).await != 101 {
        assert!(Instant::now() < deadline, "the new ca_file was never used:\n{}", wskeep.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wskeep.wait_log_line(&["upstream TLS files reloaded"], LIMIT).await;
}
