//! The admin port against the real binary: who may drain (`/drain` only on GET and POST, the
//! optional token, every request logged with its caller), and what the build and process
//! metrics say (`wskeep_build_info{commit}`, `wskeep -V`, `process_cpu_seconds_total`).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::binary::Wskeep;
use common::TestUpstream;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(5);
const TOKEN: &str = "3f9a0c5e8b7d41f2a6c0e9b8d7f6a5c4";

async fn start(upstream: SocketAddr, admin_extra: &str) -> Wskeep {
    Wskeep::start_with(|port, admin_port| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n[admin]\naddr = \"127.0.0.1:{admin_port}\"\n{admin_extra}\n\
             [upstream]\nurl = \"ws://{upstream}\"\n\
             [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n\
             [log]\nlevel = \"info\"\nformat = \"json\"\n"
        )
    })
    .await
}

/// Sends `method path` with extra header lines; returns the status and the response head.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut raw)).await.expect("an answer").unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase())
}

async fn readyz(wskeep: &Wskeep) -> u16 {
    common::http_get(wskeep.admin, "/readyz").await.unwrap().0
}

/// The JSON log lines with this message.
fn log_lines(wskeep: &Wskeep, message: &str) -> Vec<serde_json::Value> {
    wskeep
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

// === who may drain ===

#[tokio::test]
async fn only_get_and_post_drain_and_every_attempt_is_logged() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(upstream.addr, "").await;

    for method in ["HEAD", "PUT", "DELETE", "OPTIONS"] {
        let (status, head) = request(wskeep.admin, method, "/drain?wait=true", &["User-Agent: sweep/1.0"]).await;
        assert_eq!(status, 405, "{method} /drain: {head}");
        assert!(head.contains("allow: get, post"), "{method} /drain: {head}");
        assert_eq!(readyz(&wskeep).await, 200, "{method} /drain drained wskeep");
    }
    let refused = log_lines(&wskeep, "drain refused");
    assert_eq!(refused.len(), 4, "{}", wskeep.log());
    assert_eq!(refused[0]["method"], "HEAD");
    assert_eq!(refused[0]["user_agent"], "\"sweep/1.0\"");
    assert!(refused[0]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{}", refused[0]);

    // The kubelet's preStop hook: a plain GET, no token configured.
    let (status, _) = request(wskeep.admin, "GET", "/drain", &["User-Agent: kube-lifecycle/1.31"]).await;
    assert_eq!(status, 202);
    assert_eq!(readyz(&wskeep).await, 503);
    let drained = wskeep.wait_log_line(&["drain requested"], LIMIT).await;
    let drained: serde_json::Value = serde_json::from_str(&drained).unwrap();
    assert_eq!(drained["user_agent"], "\"kube-lifecycle/1.31\"");
    assert!(drained["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{drained}");
}

#[tokio::test]
async fn with_a_token_file_only_its_token_drains() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("drain-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let admin = format!("drain_token_file = {:?}", token_file.display().to_string());
    let wskeep = start(upstream.addr, &admin).await;

    let wrong = "Authorization: Bearer 0000000000000000000000000000000";
    for (path, header) in [
        ("/drain", None),
        ("/drain", Some(wrong)),
        ("/drain?token=3f9a0c5e8b7d41f2", None),
        ("/drain?wait=true&token=", None),
        ("/drain", Some("Authorization: Basic M2Y5YTBjNWU4YjdkNDFmMmE2YzBlOWI4ZDdmNmE1YzQ=")),
    ] {
        let headers: Vec<&str> = header.into_iter().collect();
        let (status, head) = request(wskeep.admin, "GET", path, &headers).await;
        assert_eq!(status, 401, "GET {path} {header:?}: {head}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert_eq!(readyz(&wskeep).await, 200, "GET {path} {header:?} drained wskeep");
    }
    let reasons: Vec<_> = log_lines(&wskeep, "drain refused").iter().map(|l| l["reason"].clone()).collect();
    assert_eq!(reasons, ["no token", "wrong token", "wrong token", "wrong token", "no token"]);
    // HEAD stays refused even with the token.
    let bearer = format!("Authorization: Bearer {TOKEN}");
    assert_eq!(request(wskeep.admin, "HEAD", "/drain", &[&bearer]).await.0, 405);
    assert_eq!(readyz(&wskeep).await, 200);

    let (status, _) = request(wskeep.admin, "POST", "/drain", &[&bearer, "User-Agent: ops-script"]).await;
    assert_eq!(status, 202);
    assert_eq!(readyz(&wskeep).await, 503);
    assert_eq!(log_lines(&wskeep, "drain requested").len(), 1);
    assert!(!wskeep.log().contains(TOKEN), "the token was logged");
}

#[tokio::test]
async fn the_token_may_come_in_the_query_and_is_read_on_every_request() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("drain-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let admin = format!("drain_token_file = {:?}", token_file.display().to_string());
    let wskeep = start(upstream.addr, &admin).await;

    let rotated = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    std::fs::write(&token_file, rotated).unwrap();
    assert_eq!(request(wskeep.admin, "GET", &format!("/drain?token={TOKEN}"), &[]).await.0, 401);
    assert_eq!(readyz(&wskeep).await, 200);
    // A token file that cannot be read refuses everybody.
    std::fs::remove_file(&token_file).unwrap();
    assert_eq!(request(wskeep.admin, "GET", &format!("/drain?token={rotated}"), &[]).await.0, 503);
    assert_eq!(readyz(&wskeep).await, 200);
    std::fs::write(&token_file, rotated).unwrap();
    assert_eq!(request(wskeep.admin, "GET", &format!("/drain?token={rotated}&wait=true"), &[]).await.0, 200);
    assert_eq!(readyz(&wskeep).await, 503);
}

// === build and process metrics ===

/// `git rev-parse --short HEAD` of the checkout this was built from, or `None` outside one.
fn checkout_commit() -> Option<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    if !std::path::Path::new(root).join(".git").exists() {
        return None;
    }
    let out = Command::new("git").args(["-C", root, "rev-parse", "--short", "HEAD"]).output().ok()?;
    out.status.success().then(|| String::from_utf8(out.stdout).unwrap().trim().to_string())
}

#[tokio::test]
async fn version_and_build_info_carry_the_git_commit() {
    let commit = checkout_commit();
    let version = env!("CARGO_PKG_VERSION");
    let out = Command::new(env!("CARGO_BIN_EXE_wskeep")).arg("-V").output().unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    match &commit {
        Some(commit) => assert_eq!(printed.trim(), format!("wskeep {version} ({commit})")),
        None => assert_eq!(printed.trim(), format!("wskeep {version}")),
    }

    let upstream = TestUpstream::start().await;
    let wskeep = start(upstream.addr, "").await;
    let metrics = common::scrape(wskeep.admin).await;
    let series = format!("wskeep_build_info{{commit=\"{}\",version=\"{version}\"}}", commit.unwrap_or_default());
    assert_eq!(common::metric(&metrics, &series), 1.0, "{series} not in:\n{metrics}");
}

#[tokio::test]
async fn process_cpu_seconds_total_has_fractions_of_a_second() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(upstream.addr, "").await;
    let tcp = TcpStream::connect(wskeep.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/cpu", wskeep.addr), tcp).await.unwrap();

    // Relay until the kernel has counted some of wskeep's CPU time (a few ticks, well under a
    // second: an integer counter would still read 0).
    let payload = vec![b'x'; 16 * 1024];
    let start = Instant::now();
    let cpu = loop {
        for _ in 0..50 {
            ws.send(Message::binary(payload.clone())).await.unwrap();
            match tokio::time::timeout(LIMIT, ws.next()).await.expect("an echo") {
                Some(Ok(Message::Binary(b))) => assert_eq!(b.len(), payload.len()),
                other => panic!("expected the echo, got {other:?}"),
            }
        }
        let cpu = common::metric(&common::scrape(wskeep.admin).await, "process_cpu_seconds_total");
        if cpu > 0.0 || start.elapsed() > Duration::from_secs(10) {
            break cpu;
        }
    };
    assert!(cpu > 0.0 && cpu.fract() != 0.0, "process_cpu_seconds_total = {cpu}");
}
