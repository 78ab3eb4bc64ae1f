//! What the real binary writes to its log: no colour codes unless a person is at a terminal
//! (and `NO_COLOR` is unset); failed TLS handshakes and plain-HTTP 502/504 logged with the peer
//! and the reason; certificate expiry as RFC 3339, not epoch seconds.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestCert;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `wskeep` with a clean WSKEEP_* and NO_COLOR environment.
fn wskeep() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wskeep"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WSKEEP_") || name == "NO_COLOR" {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("wskeep.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A configuration whose `run` logs an error at once and exits 1: the listen port is taken.
fn cannot_bind_config(dir: &Path, taken: &TcpListener) -> String {
    write_config(
        dir,
        &format!(
            "[listen]\naddr = \"{}\"\n[admin]\naddr = \"127.0.0.1:0\"\n[log]\nformat = \"text\"\nlevel = \"info\"\n",
            taken.local_addr().unwrap()
        ),
    )
}

// === colour ===

#[test]
fn text_logs_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = cannot_bind_config(dir.path(), &taken);
    let out = wskeep().args(["run", "--config", &config]).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot start"), "the start-up error is logged: {stderr}");
    assert!(!out.stderr.contains(&0x1b), "ESC in a log written to a pipe: {stderr:?}");
}

/// Runs `wskeep run` under `script` (util-linux), so that its stderr is a terminal; returns
/// what it wrote there.
fn run_on_a_terminal(config: &str, no_color: Option<&str>) -> Vec<u8> {
    let command = format!("'{}' run --config '{config}'", env!("CARGO_BIN_EXE_wskeep"));
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-c", &command, "/dev/null"]).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WSKEEP_") || name == "NO_COLOR" {
            script.env_remove(name);
        }
    }
    if let Some(value) = no_color {
        script.env("NO_COLOR", value);
    }
    let out = script.output().expect("`script` (util-linux) is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("cannot start"), "wskeep ran on the terminal: {text:?}");
    out.stdout
}

#[test]
fn colour_on_a_terminal_unless_no_color_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = cannot_bind_config(dir.path(), &taken);
    assert!(run_on_a_terminal(&config, None).contains(&0x1b), "a terminal gets colour");
    assert!(!run_on_a_terminal(&config, Some("1")).contains(&0x1b), "NO_COLOR=1 turns it off");
}

// === the running binary's JSON log ===

/// `wskeep run` with a JSON log read line by line; killed when dropped.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Indices in `seen` of the lines `wait_for` returned.
    used: Vec<usize>,
    addr: SocketAddr,
}

impl Running {
    fn start(config: &str) -> Running {
        let mut child = wskeep()
            .args(["run", "--config", config])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut running =
            Running { child, lines, seen: Vec::new(), used: Vec::new(), addr: SocketAddr::from(([127, 0, 0, 1], 0)) };
        let bound = running.wait_for("bound", |_| true);
        running.addr = bound["addr"].as_str().unwrap().parse().unwrap();
        running
    }

    /// A log line with this message that satisfies `check` and was not returned before, from
    /// what was read so far or what comes within 10 s.
    fn wait_for(&mut self, message: &str, check: impl Fn(&Value) -> bool) -> Value {
        self.try_wait_for(message, Duration::from_secs(10), check)
            .unwrap_or_else(|| panic!("no {message:?} line; the log:\n{}", self.seen.join("\n")))
    }

    fn try_wait_for(&mut self, message: &str, limit: Duration, check: impl Fn(&Value) -> bool) -> Option<Value> {
        let matches = |line: &str| {
            serde_json::from_str::<Value>(line).ok().filter(|json| json["message"] == message && check(json))
        };
        for (i, line) in self.seen.iter().enumerate() {
            if !self.used.contains(&i) {
                if let Some(json) = matches(line) {
                    self.used.push(i);
                    return Some(json);
                }
            }
        }
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else { break };
            self.seen.push(line);
            if let Some(json) = matches(self.seen.last().unwrap()) {
                self.used.push(self.seen.len() - 1);
                return Some(json);
            }
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate for localhost valid until `until` (y, m, d), in a fresh directory.
fn cert_until(until: (i32, u8, u8)) -> TestCert {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let (cert_pem, key_pem) = (params.self_signed(&key).unwrap().pem(), key.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    TestCert { dir, cert, key, cert_pem, key_pem }
}

fn tls_config(cert: &TestCert, upstream: SocketAddr, extra: &str) -> String {
    write_config(
        cert.dir.path(),
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n\
             [admin]\naddr = \"127.0.0.1:0\"\n[upstream]\nurl = \"ws://{upstream}\"\n{extra}\
             [log]\nformat = \"json\"\nlevel = \"info\"\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string(),
        ),
    )
}

#[test]
fn certificate_expiry_is_logged_as_rfc3339_at_start_and_on_reload() {
    let cert = cert_until((2031, 5, 17));
    let config = tls_config(&cert, "127.0.0.1:9".parse().unwrap(), "");
    let mut wskeep = Running::start(&config);
    let loaded = wskeep.wait_for("TLS certificate loaded", |_| true);
    assert_eq!(loaded["not_after"], "2031-05-17T00:00:00Z", "{loaded}");
    // A rotated certificate is logged the same way. The watcher notes the files' state when it
    // starts, just after `listening`: a rewrite before that is not a change, so it is repeated.
    wskeep.wait_for("listening", |_| true);
    let rotated = cert_until((2032, 2, 29));
    let mut reloaded = None;
    for _ in 0..3 {
        std::fs::write(&cert.key, &rotated.key_pem).unwrap();
        std::fs::write(&cert.cert, &rotated.cert_pem).unwrap();
        reloaded = wskeep.try_wait_for("TLS certificate reloaded", Duration::from_secs(3), |_| true);
        if reloaded.is_some() {
            break;
        }
    }
    let reloaded = reloaded.unwrap_or_else(|| panic!("no reload logged:\n{}", wskeep.seen.join("\n")));
    assert_eq!(reloaded["not_after"], "2032-02-29T00:00:00Z", "{reloaded}");
    assert!(reloaded["cert"].as_str().unwrap().ends_with("tls.crt"), "{reloaded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tls_handshake_is_logged_with_the_peer_and_the_reason() {
    let cert = cert_until((2031, 5, 17));
    let config = tls_config(&cert, "127.0.0.1:9".parse().unwrap(), "");
    let mut wskeep = Running::start(&config);
    // Plain HTTP to the TLS port: what a misconfigured client or a health check sends.
    let mut tcp = tokio::net::TcpStream::connect(wskeep.addr).await.unwrap();
    let me = tcp.local_addr().unwrap().to_string();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    let line = wskeep.wait_for("TLS handshake failed", |_| true);
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["peer"], me.as_str(), "{line}");
    assert!(line["reason"].as_str().unwrap().contains("corrupt message"), "{line}");
}

/// An upstream that resets its first connection and holds every later one without answering.
fn dead_then_silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (n, conn) in listener.incoming().enumerate().take(8) {
            let Ok(mut conn) = conn else { return };
            if n == 0 {
                // Read the request head, then close without an answer: 502.
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                drop(conn);
            } else {
                held.push(conn); // never answered: 504 after upstream.response_timeout
            }
        }
    });
    addr
}

async fn get(addr: SocketAddr, cert: &TestCert, path: &str) -> String {
    let mut tls = common::tls_connect(addr, cert).await;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_502_and_504_are_logged_like_upgrade_failures() {
    let cert = cert_until((2031, 5, 17));
    let upstream = dead_then_silent_upstream();
    let config = tls_config(&cert, upstream, "response_timeout = \"300ms\"\n");
    let mut wskeep = Running::start(&config);

    let response = get(wskeep.addr, &cert, "/offer?token=secret").await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    let line = wskeep.wait_for("upstream HTTP request failed", |l| l["status"] == 502);
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["reason"], "upstream_unreachable", "{line}");
    assert_eq!(line["path"], "/offer", "the query string stays out of the log: {line}");
    assert!(line["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    assert!(!line["detail"].as_str().unwrap().is_empty(), "{line}");

    let response = get(wskeep.addr, &cert, "/health").await;
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    let line = wskeep.wait_for("upstream HTTP request failed", |l| l["status"] == 504);
    assert_eq!(line["reason"], "upstream_timeout", "{line}");
    assert_eq!(line["path"], "/health", "{line}");
    assert!(line["detail"].as_str().unwrap().contains("upstream.response_timeout"), "{line}");
}
