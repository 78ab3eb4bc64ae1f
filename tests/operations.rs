//! Operations: shutdown (signals and `/drain`) against the real binary, certificate reload (file
//! rewrite, Kubernetes `..data` symlink swap, a broken pair refused), the connection limit and
//! drain refusals, floods of silent connections, descriptors running out (the real binary under
//! a low `RLIMIT_NOFILE`), slow clients cut at the first-byte and handshake timeouts, and
//! oversized request heads.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::Wskeep;
use common::{TestCert, TestUpstream, TlsWs};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

// === the real binary ===

impl Wskeep {
    /// Starts the binary with TLS in front of `upstream` and waits until `/readyz` answers 200.
    async fn start(upstream: SocketAddr, cert: &TestCert, drain_timeout: &str) -> Wskeep {
        Wskeep::start_with(|port, admin_port| {
            tls_config(port, admin_port, upstream, &cert.cert, &cert.key, drain_timeout)
        })
        .await
    }

    /// `start`, with more `[listen]` keys, and under a descriptor limit (soft and hard) if given.
    async fn start_with_limits(
        upstream: SocketAddr,
        cert: &TestCert,
        drain_timeout: &str,
        listen: &str,
        nofile: Option<u64>,
    ) -> Wskeep {
        let config = |port, admin_port| {
            let text = tls_config(port, admin_port, upstream, &cert.cert, &cert.key, drain_timeout);
            text.replacen("[admin]", &format!("{listen}[admin]"), 1)
        };
        Wskeep::start_limited(std::net::Ipv4Addr::LOCALHOST.into(), config, nofile).await
    }
}

fn tls_config(
    port: u16,
    admin_port: u16,
    upstream: SocketAddr,
    cert: &Path,
    key: &Path,
    drain_timeout: &str,
) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\ntls_cert = {:?}\ntls_key = {:?}\n\
         [admin]\naddr = \"127.0.0.1:{admin_port}\"\n\
         [upstream]\nurl = \"ws://{upstream}\"\n\
         [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n\
         [shutdown]\ndrain_timeout = \"{drain_timeout}\"\n\
         [log]\nlevel = \"info\"\nformat = \"text\"\n",
        cert.display().to_string(),
        key.display().to_string(),
    )
}

// === clients ===

/// Opens a WebSocket through wskeep; `Err` describes how it was refused (`"HTTP 503"`, ...).
async fn try_wss(addr: SocketAddr, cert: &TestCert) -> Result<TlsWs, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").unwrap();
        let tls = common::client_tls(cert).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        match tokio_tungstenite::client_async(format!("wss://localhost:{}/ops", addr.port()), tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(response)) => Err(format!("HTTP {}", response.status().as_u16())),
            Err(e) => Err(format!("handshake: {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.unwrap_or_else(|_| Err("timed out".into()))
}

async fn echo(ws: &mut TlsWs, text: &str) {
    ws.send(Message::text(text.to_owned())).await.unwrap();
    assert_eq!(common::next_message(ws, Duration::from_secs(3)).await, Some(Message::text(text.to_owned())));
}

/// Waits (up to `limit`) for wskeep's close frame, which must be 1001 "going away", answers it
/// and reads to the end of the stream. Returns when the close frame arrived.
async fn expect_going_away(ws: &mut TlsWs, limit: Duration) -> Instant {
    let message = common::next_message(ws, limit).await;
    let at = Instant::now();
    match message {
        Some(Message::Close(Some(frame))) => {
            assert_eq!((u16::from(frame.code), frame.reason.as_str()), (1001, "going away"));
        }
        other => panic!("expected close 1001 \"going away\", got {other:?}"),
    }
    // tungstenite queued the answer to the close; reading on sends it and sees the end.
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while ws.next().await.is_some() {} }).await;
    at
}

/// Waits until the upstream has received `n` close frames, and returns them.
async fn upstream_closes(upstream: &TestUpstream, n: usize, limit: Duration) -> Vec<(u16, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let closes = upstream.closes.lock().unwrap().clone();
        if closes.len() >= n || Instant::now() >= deadline {
            return closes;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn readyz(admin: SocketAddr) -> u16 {
    common::http_get(admin, "/readyz").await.map_or(0, |(status, _)| status)
}

/// Polls `/readyz` until it answers 503; how long that took.
async fn wait_not_ready(admin: SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    while readyz(admin).await != 503 {
        assert!(start.elapsed() < limit, "/readyz still not 503 after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// The serial number of the certificate a new TLS client is served.
async fn served_serial(addr: SocketAddr) -> Vec<u8> {
    let options = wskeep::tools::client::ClientOptions { insecure: true, ..Default::default() };
    let connector = wskeep::tools::client::tls_connector(&options).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake failed ({e}): is a certificate in service with the wrong key?"));
    let certs = tls.get_ref().1.peer_certificates().expect("the server sent a certificate");
    wskeep::tls::cert_serial(&certs[0]).expect("the certificate has a serial")
}

/// Polls new TLS clients until they are served `serial` (bounded by `limit`).
async fn wait_for_serial(addr: SocketAddr, serial: &[u8], limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let seen = served_serial(addr).await;
        if seen == serial {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "still served serial {seen:02x?} after {limit:?}, want {serial:02x?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces a file the way an atomic writer does: a temporary file renamed over it.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_file_name(format!("{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reloads(metrics: &str) -> f64 {
    common::metric(metrics, "wskeep_tls_cert_reloads_total")
}

// === shutdown, against the real binary ===

#[tokio::test]
async fn sigterm_drains_then_closes_with_going_away_and_exits_0() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let mut wskeep = Wskeep::start(upstream.addr, &cert, "1s").await;
    let mut a = try_wss(wskeep.addr, &cert).await.unwrap();
    let mut b = try_wss(wskeep.addr, &cert).await.unwrap();
    echo(&mut a, "a before").await;
    echo(&mut b, "b before").await;

    let signalled = Instant::now();
    wskeep.signal("TERM");
    let not_ready = wait_not_ready(wskeep.admin, Duration::from_millis(500)).await;
    assert!(not_ready < Duration::from_millis(300), "/readyz took {not_ready:?} to turn 503");

    // No new connections: refused at connect, or at least never upgraded.
    match try_wss(wskeep.addr, &cert).await {
        Ok(_) => panic!("a new WebSocket was accepted while draining"),
        Err(how) => assert!(
            how.starts_with("connect") || how.starts_with("TLS") || how == "HTTP 503" || how.starts_with("handshake"),
            "unexpected refusal: {how}"
        ),
    }
    // The live ones carry on during the drain.
    echo(&mut a, "a during drain").await;
    echo(&mut b, "b during drain").await;
    assert!(signalled.elapsed() < Duration::from_millis(900), "the drain checks took too long to prove anything");

    let (a_closed, b_closed) = tokio::join!(
        expect_going_away(&mut a, Duration::from_secs(3)),
        expect_going_away(&mut b, Duration::from_secs(3))
    );
    for closed in [a_closed, b_closed] {
        let after = closed - signalled;
        assert!(after >= Duration::from_millis(900), "closed {after:?} after SIGTERM, before the 1 s drain timeout");
        assert!(after < Duration::from_millis(2000), "closed {after:?} after SIGTERM");
    }
    let closes = upstream_closes(&upstream, 2, Duration::from_secs(2)).await;
    assert_eq!(closes, vec![(1001, "going away".to_string()); 2]);

    let limit = Duration::from_secs(2).saturating_sub(signalled.elapsed());
    let status = wskeep.wait_exit(limit).await.expect("wskeep exits within the drain timeout plus 1 s");
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test]
async fn second_sigterm_closes_at_once_and_exits_0() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let mut wskeep = Wskeep::start(upstream.addr, &cert, "30s").await;
    let mut a = try_wss(wskeep.addr, &cert).await.unwrap();
    let mut b = try_wss(wskeep.addr, &cert).await.unwrap();

    wskeep.signal("TERM");
    wait_not_ready(wskeep.admin, Duration::from_millis(500)).await;
    echo(&mut a, "still draining").await;
    echo(&mut b, "still draining").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let second = Instant::now();
    wskeep.signal("TERM");
    let (a_closed, b_closed) = tokio::join!(
        expect_going_away(&mut a, Duration::from_secs(3)),
        expect_going_away(&mut b, Duration::from_secs(3))
    );
    for closed in [a_closed, b_closed] {
        assert!(closed - second < Duration::from_secs(1), "closed {:?} after the second signal", closed - second);
    }
    assert_eq!(upstream_closes(&upstream, 2, Duration::from_secs(2)).await, vec![(1001, "going away".to_string()); 2]);
    let status = wskeep.wait_exit(Duration::from_secs(3)).await.expect("wskeep exits within 3 s of the second signal");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(second.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn drain_wait_answers_once_the_connections_are_closed() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let mut wskeep = Wskeep::start(upstream.addr, &cert, "1s").await;
    let mut ws = try_wss(wskeep.addr, &cert).await.unwrap();
    echo(&mut ws, "before").await;

    let client_closed: Arc<Mutex<Option<Instant>>> = Arc::default();
    let record = client_closed.clone();
    let client = tokio::spawn(async move {
        let message = common::next_message(&mut ws, Duration::from_secs(5)).await;
        *record.lock().unwrap() = Some(Instant::now());
        let _ = tokio::time::timeout(Duration::from_secs(3), async { while ws.next().await.is_some() {} }).await;
        message
    });

    let asked = Instant::now();
    let (status, body) = common::http_get(wskeep.admin, "/drain?wait=true").await.unwrap();
    let answered = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(
        answered >= Duration::from_millis(900),
        "/drain?wait=true answered after {answered:?}, before the drain timeout"
    );
    assert!(answered < Duration::from_millis(3500), "/drain?wait=true answered after {answered:?}");
    let closed_at = client_closed.lock().unwrap().expect("the client had its close frame before /drain answered");
    assert!(closed_at - asked >= Duration::from_millis(900));
    match client.await.unwrap() {
        Some(Message::Close(Some(frame))) => {
            assert_eq!((u16::from(frame.code), frame.reason.as_str()), (1001, "going away"))
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(upstream.closes.lock().unwrap().clone(), vec![(1001, "going away".to_string())]);

    // /drain does not stop the process (the signal that follows does), and it stays not ready.
    assert!(wskeep.child.try_wait().unwrap().is_none(), "/drain must not end the process");
    assert_eq!(readyz(wskeep.admin).await, 503);
    let signalled = Instant::now();
    wskeep.signal("TERM");
    let status = wskeep.wait_exit(Duration::from_secs(1)).await.expect("wskeep exits at once after the drain");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn sigterm_without_connections_exits_at_once() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    // A long drain timeout: with nothing to drain it must not be waited for.
    let mut wskeep = Wskeep::start(upstream.addr, &cert, "30s").await;
    let signalled = Instant::now();
    wskeep.signal("TERM");
    let status = wskeep.wait_exit(Duration::from_secs(1)).await.expect("wskeep exits within 1 s");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(1));
}

// === certificate reload ===

#[tokio::test]
async fn rewritten_certificate_is_served_to_new_clients_and_old_connections_carry_on() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    assert_eq!(served_serial(sidecar.addr).await, [0x01]);
    let mut a = common::wss(sidecar.addr, &cert, "/a", &[]).await;
    echo(&mut a, "before").await;

    let (cert_pem, key_pem) = common::cert_pair(&[0x02]);
    replace_file(&cert.key, &key_pem);
    replace_file(&cert.cert, &cert_pem);
    let took = wait_for_serial(sidecar.addr, &[0x02], Duration::from_secs(5)).await;
    eprintln!("rewritten pair served after {took:?}");

    echo(&mut a, "after").await;
    assert_eq!(reloads(&common::scrape(sidecar.admin).await), 1.0);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_even_from_other_files() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let wskeep = Wskeep::start(upstream.addr, &cert, "1s").await;
    let mut a = try_wss(wskeep.addr, &cert).await.unwrap();
    let success = r#"wskeep_config_reloads_total{result="success"}"#;

    // The same files are read again.
    wskeep.signal("HUP");
    let metrics = wskeep.wait_metric(success, 1.0, Duration::from_secs(5)).await;
    assert_eq!(reloads(&metrics), 1.0);

    // Other files: served to the next handshake, once the reload is counted.
    let (cert_pem, key_pem) = common::cert_pair(&[0x02]);
    let (new_cert, new_key) = (cert.dir.path().join("new.crt"), cert.dir.path().join("new.key"));
    std::fs::write(&new_cert, cert_pem).unwrap();
    std::fs::write(&new_key, key_pem).unwrap();
    let text = tls_config(wskeep.addr.port(), wskeep.admin.port(), upstream.addr, &new_cert, &new_key, "1s");
    std::fs::write(&wskeep.config, text).unwrap();
    wskeep.signal("HUP");
    let metrics = wskeep.wait_metric(success, 2.0, Duration::from_secs(5)).await;
    assert_eq!(reloads(&metrics), 2.0);
    assert_eq!(served_serial(wskeep.addr).await, [0x02]);
    echo(&mut a, "the live connection carries on").await;
}

#[tokio::test]
async fn kubernetes_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let (cert_pem, key_pem) = common::cert_pair(&[0x01]);
    let write_version = |name: &str, cert_pem: &str, key_pem: &str| {
        let version = secret.join(name);
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(version.join("tls.key"), key_pem).unwrap();
    };
    write_version("..2026_v1", &cert_pem, &key_pem);
    std::os::unix::fs::symlink("..2026_v1", secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    let cert = TestCert { cert: secret.join("tls.crt"), key: secret.join("tls.key"), cert_pem, key_pem, dir };

    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    assert_eq!(served_serial(sidecar.addr).await, [0x01]);
    let mut a = common::wss(sidecar.addr, &cert, "/a", &[]).await;
    echo(&mut a, "before").await;

    // What the kubelet does: a new timestamped directory, `..data_tmp` pointing at it, renamed
    // over `..data`, then the old directory removed.
    let (cert_pem, key_pem) = common::cert_pair(&[0x02]);
    write_version("..2026_v2", &cert_pem, &key_pem);
    std::os::unix::fs::symlink("..2026_v2", secret.join("..data_tmp")).unwrap();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    std::fs::remove_dir_all(secret.join("..2026_v1")).unwrap();
    let took = wait_for_serial(sidecar.addr, &[0x02], Duration::from_secs(5)).await;
    eprintln!("swapped pair served after {took:?}");

    echo(&mut a, "after").await;
    assert_eq!(reloads(&common::scrape(sidecar.admin).await), 1.0);
}

#[tokio::test]
async fn broken_new_pair_keeps_the_old_one() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let mut a = common::wss(sidecar.addr, &cert, "/a", &[]).await;
    let settle = 2 * wskeep::tls::RELOAD_POLL + Duration::from_millis(500);

    // A certificate with somebody else's key.
    let (other_cert, _) = common::cert_pair(&[0x02]);
    let (_, other_key) = common::cert_pair(&[0x03]);
    replace_file(&cert.key, &other_key);
    replace_file(&cert.cert, &other_cert);
    tokio::time::sleep(settle).await;
    assert_eq!(served_serial(sidecar.addr).await, [0x01], "a mismatched pair was put in service");
    assert_eq!(reloads(&common::scrape(sidecar.admin).await), 0.0);

    // Garbage.
    replace_file(&cert.key, "not a key\n");
    replace_file(&cert.cert, "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n");
    tokio::time::sleep(settle).await;
    assert_eq!(served_serial(sidecar.addr).await, [0x01], "garbage was put in service");
    assert_eq!(reloads(&common::scrape(sidecar.admin).await), 0.0);
    echo(&mut a, "still relaying").await;

    // The watcher is still alive: a good pair afterwards is taken.
    let (good_cert, good_key) = common::cert_pair(&[0x04]);
    replace_file(&cert.key, &good_key);
    replace_file(&cert.cert, &good_cert);
    wait_for_serial(sidecar.addr, &[0x04], Duration::from_secs(5)).await;
    assert_eq!(reloads(&common::scrape(sidecar.admin).await), 1.0);
}

// === limits ===

#[tokio::test]
async fn past_max_connections_new_clients_get_503() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.max_connections = 2;
    let sidecar = common::start_sidecar(config).await;
    let mut a = try_wss(sidecar.addr, &cert).await.unwrap();
    let mut b = try_wss(sidecar.addr, &cert).await.unwrap();

    match try_wss(sidecar.addr, &cert).await {
        Ok(_) => panic!("a third connection was accepted with max_connections = 2"),
        Err(how) => assert_eq!(how, "HTTP 503"),
    }
    echo(&mut a, "a").await;
    echo(&mut b, "b").await;
    let metrics = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="limit"}"#), 1.0);

    // One closes: its slot frees up for a new client.
    a.close(None).await.unwrap();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(3), a.next()).await {}
    let start = Instant::now();
    let mut c = loop {
        match try_wss(sidecar.addr, &cert).await {
            Ok(ws) => break ws,
            Err(how) => {
                assert!(start.elapsed() < Duration::from_secs(3), "no slot after a close: {how}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    echo(&mut c, "c").await;
    echo(&mut b, "b again").await;
}

/// Bytes the kernel holds unread on the socket bound to `local` and connected to `peer` (IPv4),
/// from /proc/net/tcp: 0 once its owner has read them.
fn unread_bytes(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port()),
        std::net::IpAddr::V6(_) => unreachable!("IPv4 only"),
    };
    let (local, peer) = (hex(local), hex(peer));
    std::fs::read_to_string("/proc/net/tcp").ok()?.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 4 && f[1] == local && f[2] == peer).then(|| u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok())?
    })
}

/// A drain refuses new upgrades with 503 counted as `draining`, which no alert watches, not as
/// `limit`, which would fire the connection-limit alert on every rollout.
#[tokio::test]
async fn upgrades_refused_while_draining_are_counted_as_draining() {
    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    // Half of an upgrade request is read by wskeep before the drain starts; the rest comes after.
    let mut tcp = TcpStream::connect(sidecar.addr).await.unwrap();
    let head = "GET /late HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (first, rest) = head.split_at(40);
    tcp.write_all(first.as_bytes()).await.unwrap();
    let (local, peer) = (tcp.local_addr().unwrap(), tcp.peer_addr().unwrap());
    let started = Instant::now();
    while unread_bytes(peer, local) != Some(0) {
        assert!(started.elapsed() < Duration::from_secs(5), "wskeep never read the first half");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sidecar.drain.start();
    tcp.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let metrics = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="draining"}"#), 1.0, "{metrics}");
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="limit"}"#), 0.0, "{metrics}");
}

/// Issue 12, item 10: connections that send nothing must not hold the listener. They wait in
/// their own `max_handshakes` places, and each new arrival past them takes the place of the
/// oldest, which is dropped and counted (`handshake_limit`): a client arriving during the flood
/// is served, or told 503 once `max_connections` real clients are connected, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_neither_locks_out_nor_hides_from_a_real_client() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.max_connections = 2;
    config.listen.max_handshakes = 16;
    config.listen.first_byte_timeout = Duration::from_secs(10);
    config.listen.handshake_timeout = Duration::from_secs(10);
    let sidecar = common::start_sidecar(config).await;

    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(sidecar.addr).await.unwrap());
    }
    let mut a = try_wss(sidecar.addr, &cert).await.expect("a client arriving during the flood is served");
    echo(&mut a, "served during the flood").await;
    // 301 arrivals, 16 places: the 285 oldest silent connections were dropped, and counted.
    let metrics = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="handshake_limit"}"#), 285.0);
    for (i, tcp) in silent.iter_mut().take(285).enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "silent connection {i} was not dropped: {read:?}");
    }

    // The second slot goes to a second client; past it, a client during another flood gets 503.
    let mut b = try_wss(sidecar.addr, &cert).await.expect("the second slot");
    for _ in 0..100 {
        silent.push(TcpStream::connect(sidecar.addr).await.unwrap());
    }
    assert_eq!(try_wss(sidecar.addr, &cert).await.err().as_deref(), Some("HTTP 503"));
    echo(&mut a, "a").await;
    echo(&mut b, "b").await;
    let metrics = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="limit"}"#), 1.0);
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="handshake_limit"}"#), 385.0);
}

/// A connection gets `first_byte_timeout` to send anything at all, and the whole
/// `handshake_timeout` once it has: a silent socket is let go early.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_first_byte_timeout() {
    let cert = Arc::new(common::test_cert());
    let upstream = TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.first_byte_timeout = Duration::from_millis(300);
    config.listen.handshake_timeout = Duration::from_millis(1500);
    let sidecar = common::start_sidecar(config).await;
    let hello = Arc::new(half_client_hello(&cert));
    let (silent, half) = tokio::join!(
        slow_client(sidecar.addr, Slow::Silent, cert.clone(), hello.clone()),
        slow_client(sidecar.addr, Slow::HalfHello, cert.clone(), hello.clone()),
    );
    assert!(silent >= Duration::from_millis(250) && silent < Duration::from_millis(1000), "silent: {silent:?}");
    assert!(half >= Duration::from_millis(1400) && half < Duration::from_secs(3), "half a hello: {half:?}");
}

/// Issue 12, item 9, against the real binary under 160 descriptors, with `max_connections = 96`
/// set: more than two descriptors each can serve. When they run out, clients get 503 counted as
/// `local_limit` (wskeep's own limit), never 502 and `upstream_unreachable`, which would page
/// the upstream's owners: the last descriptor's client when connecting upstream fails, the
/// clients queued behind it through the descriptor wskeep keeps in reserve, one at a time.
/// The accept errors are logged once per window, not once per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_clients_get_503_local_limit_not_502() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let wskeep = Wskeep::start_with_limits(upstream.addr, &cert, "25s", "max_connections = 96\n", Some(160)).await;
    assert!(wskeep.log().contains("listen.max_connections = 96 and listen.max_handshakes = 12 need about"));

    let mut open = Vec::new();
    let refusal = loop {
        match try_wss(wskeep.addr, &cert).await {
            Ok(ws) => open.push(ws),
            Err(how) => break how,
        }
        assert!(open.len() < 96, "never ran out of descriptors:\n{}", wskeep.log());
    };
    assert_eq!(refusal, "HTTP 503", "{} connections open\n{}", open.len(), wskeep.log());
    // Several at once: each is answered 503 in turn, none is left hanging or dropped (or served,
    // when two refused clients closing have freed the two descriptors it needs).
    let mut refused = 1;
    for how in futures_util::future::join_all((0..4).map(|_| try_wss(wskeep.addr, &cert))).await {
        match how {
            Ok(ws) => open.push(ws),
            Err(how) => {
                assert_eq!(how, "HTTP 503", "\n{}", wskeep.log());
                refused += 1;
            }
        }
    }
    assert!(refused >= 3, "only {refused} refused");
    echo(&mut open[0], "the open connections carry on").await;

    // Free some descriptors (closing handshakes complete), then read the counts.
    for mut ws in open.drain(..4) {
        ws.close(None).await.unwrap();
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {}
    }
    let started = Instant::now();
    let metrics = loop {
        if let Ok((200, text)) = common::http_get(wskeep.admin, "/metrics").await {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no /metrics:\n{}", wskeep.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let local_limit = common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="local_limit"}"#);
    assert_eq!(local_limit, refused as f64, "{metrics}");
    for reason in ["upstream_unreachable", "upstream_timeout", "limit"] {
        let series = format!(r#"wskeep_upgrade_failures_total{{reason="{reason}"}}"#);
        assert_eq!(common::metric(&metrics, &series), 0.0, "{reason}");
    }
    // A freed descriptor serves a new client again.
    let mut again = try_wss(wskeep.addr, &cert).await.expect("served once descriptors are free");
    echo(&mut again, "again").await;
    let log = wskeep.log();
    assert!(log.matches("accept failed").count() <= 1, "accept errors must be rate-limited:\n{log}");
    assert!(log.matches("upgrade failed").count() <= 1, "upgrade failures must be rate-limited:\n{log}");
}

/// Unset, `max_connections` is derived from the descriptor limit the process has (160 here:
/// (160 - 64 - 12) / 2 = 42), so the limit refuses clients before descriptors run out: 503
/// counted as `limit`, and no `local_limit` at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_max_connections_fits_the_descriptor_limit() {
    let cert = common::test_cert();
    let upstream = TestUpstream::start().await;
    let wskeep = Wskeep::start_with_limits(upstream.addr, &cert, "25s", "", Some(160)).await;
    let log = wskeep.log();
    assert!(log.contains("listen.max_connections = 42: not set"), "{log}");
    assert!(!log.contains("need about"), "no descriptor warning for derived limits:\n{log}");
    let mut open = Vec::new();
    for i in 0..42 {
        open.push(try_wss(wskeep.addr, &cert).await.unwrap_or_else(|e| panic!("client {i}: {e}\n{}", wskeep.log())));
    }
    assert_eq!(try_wss(wskeep.addr, &cert).await.err().as_deref(), Some("HTTP 503"));
    echo(&mut open[41], "the last one").await;
    let metrics = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="limit"}"#), 1.0, "{metrics}");
    assert_eq!(common::metric(&metrics, r#"wskeep_upgrade_failures_total{reason="local_limit"}"#), 0.0);
}

#[derive(Clone, Copy, Debug)]
enum Slow {
    /// Connects and sends nothing.
    Silent,
    /// Sends half a ClientHello and stalls mid-TLS.
    HalfHello,
    /// Completes TLS, then trickles a request head one byte at a time, never finishing it.
    Trickle,
}

/// The first half of a real TLS ClientHello.
fn half_client_hello(cert: &TestCert) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello.truncate(hello.len() / 2);
    hello
}

/// Reads until the peer closes (end of stream or an error).
async fn until_closed<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// One slow client; how long after it started connecting wskeep closed it.
async fn slow_client(addr: SocketAddr, kind: Slow, cert: Arc<TestCert>, hello: Arc<Vec<u8>>) -> Duration {
    let start = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    match kind {
        Slow::Silent => until_closed(&mut tcp).await,
        Slow::HalfHello => {
            tcp.write_all(&hello).await.unwrap();
            until_closed(&mut tcp).await;
        }
        Slow::Trickle => {
            let name = ServerName::try_from("localhost").unwrap();
            let Ok(mut tls) = common::client_tls(&cert).connect(name, tcp).await else { return start.elapsed() };
            let head = b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
            let mut sent = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = tls.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = tick.tick() => {
                        let byte = head.get(sent).copied().unwrap_or(b'x');
                        sent += 1;
                        if tls.write_all(&[byte]).await.is_err() || tls.flush().await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_at_the_handshake_timeout_without_holding_up_others() {
    let cert = Arc::new(common::test_cert());
    let upstream = TestUpstream::start().await;
    let mut config = common::test_config(upstream.addr, Some(&cert), "");
    config.listen.handshake_timeout = Duration::from_millis(500);
    let sidecar = common::start_sidecar(config).await;
    let hello = Arc::new(half_client_hello(&cert));

    let closed = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for i in 0..200 {
        let kind = [Slow::Silent, Slow::HalfHello, Slow::Trickle][i % 3];
        let (cert, hello, closed) = (cert.clone(), hello.clone(), closed.clone());
        slow.push(tokio::spawn(async move {
            let limit = Duration::from_secs(5);
            let took = tokio::time::timeout(limit, slow_client(sidecar.addr, kind, cert, hello)).await.unwrap_or(limit);
            closed.fetch_add(1, Ordering::SeqCst);
            (kind, took)
        }));
    }

    // A normal client meanwhile is served at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let mut ws = common::wss(sidecar.addr, &cert, "/normal", &[]).await;
    echo(&mut ws, "not held up").await;
    let served = start.elapsed();
    let closed_meanwhile = closed.load(Ordering::SeqCst);
    eprintln!("normal client served in {served:?}; slow clients closed meanwhile: {closed_meanwhile}");
    assert_eq!(closed_meanwhile, 0, "the normal client waited for slow clients to be cut (served after {served:?})");

    let mut worst = Duration::ZERO;
    for task in slow {
        let (kind, took) = task.await.unwrap();
        assert!(
            took >= Duration::from_millis(450),
            "{kind:?} client closed after {took:?}, before the handshake timeout"
        );
        assert!(took <= Duration::from_millis(1500), "{kind:?} client closed after {took:?}");
        worst = worst.max(took);
    }
    eprintln!("slowest slow client closed after {worst:?}");
    echo(&mut ws, "still fine").await;
}

#[tokio::test]
async fn request_head_over_32_kib_gets_431() {
    let upstream = TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let status = |head_size: usize| async move {
        let mut tcp = TcpStream::connect(sidecar.addr).await.unwrap();
        let request = format!(
            "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(head_size)
        );
        // wskeep may answer and close before reading everything: a failed write is fine.
        let _ = tcp.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw)).await;
        String::from_utf8_lossy(&raw).get(9..12).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0)
    };
    assert_eq!(status(40 * 1024).await, 431);
    assert_eq!(status(33 * 1024).await, 431);
    // Below the limit the request goes through (the echo upstream refuses a plain GET: not 431).
    let below = status(20 * 1024).await;
    assert!(below != 431 && below != 0, "a 20 KiB head got {below}");
}
