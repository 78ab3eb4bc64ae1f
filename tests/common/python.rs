//! Python `websockets` peers (tests/compression/peers.py), from the venv tests/networks/install.sh
//! makes: a compressing upstream, and a client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const START_LIMIT: Duration = Duration::from_secs(20);

/// The Python that has `websockets`; the test fails (it does not skip) without it.
pub fn python() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_default();
    let venv = cache.join("wskeep/websockets-venv/bin/python");
    assert!(venv.exists(), "{} is missing: run tests/networks/install.sh", venv.display());
    venv
}

pub fn peers_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compression/peers.py")
}

/// `peers.py upstream` on a free port: echoes, reports its negotiation, streams, serves the
/// browser page, and prints the lines a page sends it. Stopped when dropped.
pub struct PythonUpstream {
    child: Child,
    pub port: u16,
    lines: mpsc::Receiver<String>,
}

impl PythonUpstream {
    pub async fn start() -> PythonUpstream {
        let mut child = Command::new(python())
            .arg(peers_script())
            .arg("upstream")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python with websockets");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut upstream = PythonUpstream { child, port: 0, lines };
        let ready = upstream.line_starting("ready ", START_LIMIT).await;
        upstream.port = ready.and_then(|l| l.parse().ok()).expect("the Python upstream did not start");
        upstream
    }

    /// The rest of the next line printed that starts with `prefix`, within `limit`.
    pub async fn line_starting(&self, prefix: &str, limit: Duration) -> Option<String> {
        let give_up = std::time::Instant::now() + limit;
        while std::time::Instant::now() < give_up {
            match self.lines.try_recv() {
                Ok(line) => match line.strip_prefix(prefix) {
                    Some(rest) => return Some(rest.to_string()),
                    None => continue,
                },
                Err(mpsc::TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
        }
        None
    }
}

impl Drop for PythonUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
