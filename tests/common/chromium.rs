//! Headless Chromium (Debian's, at /usr/bin/chromium) for the browser tests; a test that needs it
//! fails (it does not skip) when it is missing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless Chromium in its own process group; killed (group and process, by id) when dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Browser {
    pub fn launch(url: &str) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: this test needs a real browser (apt-get install -y chromium)"
        );
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let user_data = profile.path().join("profile");
        use std::os::unix::process::CommandExt;
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--ignore-certificate-errors",
            ])
            .arg(format!("--user-data-dir={}", user_data.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        Browser { child, _profile: profile, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SIGTERM first: Chromium then ends and reaps its helper processes itself. Whatever is
        // left after a bounded wait is killed with the whole process group (its id).
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).stderr(Stdio::null()).status();
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
        }
        let group = format!("-{pid}");
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page's HTTP/1.1 connection (keep-alive): GET /page answers `page`, POST /result sends the
/// JSON it carries to `results`, anything else is 404.
pub async fn serve_page(mut tcp: TcpStream, page: &'static str, results: mpsc::UnboundedSender<Value>) {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let mut line = head.lines().next().unwrap_or("").split_whitespace();
        let (method, target) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        let length: usize = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while raw.len() < head_end + length {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = raw.drain(..head_end + length).skip(head_end).collect();
        let (status, content_type, content) = match (method, target.split('?').next().unwrap_or("")) {
            ("GET", "/page") => ("200 OK", "text/html; charset=utf-8", page),
            ("POST", "/result") => {
                let value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| Value::String(format!("unparsable ({e}): {}", String::from_utf8_lossy(&body))));
                let _ = results.send(value);
                ("200 OK", "text/plain", "ok")
            }
            _ => ("404 Not Found", "text/plain", "not found"),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\r\n{content}",
            content.len()
        );
        if tcp.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}
