//! The real binary: `wskeep run --config FILE` as a child process, for what only a process shows
//! (signals, exit codes, its log).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `wskeep run`; killed (if still running) when dropped, and its log printed when the
/// test failed.
pub struct Wskeep {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The configuration file it was started with (tests rewrite it before a SIGHUP).
    pub config: PathBuf,
    log: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Two distinct free ports on `ip` (both held while picked, then released).
fn free_ports(ip: IpAddr) -> (u16, u16) {
    let a = StdListener::bind((ip, 0)).unwrap();
    let b = StdListener::bind((ip, 0)).unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

impl Wskeep {
    /// Starts the binary with the configuration `config(port, admin_port)` returns (it must
    /// listen on 127.0.0.1 at those ports) and waits until `/readyz` answers 200.
    pub async fn start_with(config: impl Fn(u16, u16) -> String) -> Wskeep {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), config).await
    }

    /// As `start_with`, listening on `ip` (`::1` for IPv6) instead of 127.0.0.1.
    pub async fn start_on(ip: IpAddr, config: impl Fn(u16, u16) -> String) -> Wskeep {
        Self::start_limited(ip, config, None).await
    }

    /// As `start_on`, under a descriptor limit (soft and hard) if given.
    pub async fn start_limited(ip: IpAddr, config: impl Fn(u16, u16) -> String, nofile: Option<u64>) -> Wskeep {
        for attempt in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let (port, admin_port) = free_ports(ip);
            let config_path = dir.path().join("wskeep.toml");
            std::fs::write(&config_path, config(port, admin_port)).unwrap();
            let log = dir.path().join("wskeep.log");
            let mut command = match nofile {
                None => Command::new(env!("CARGO_BIN_EXE_wskeep")),
                Some(n) => {
                    // The shell sets the limit, then becomes wskeep (its pid is the child's).
                    let mut sh = Command::new("sh");
                    sh.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(env!("CARGO_BIN_EXE_wskeep"));
                    sh
                }
            };
            command
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap());
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("WSKEEP_") {
                    command.env_remove(name);
                }
            }
            let child = command.spawn().expect("the wskeep binary starts");
            let mut wskeep = Wskeep {
                child,
                addr: SocketAddr::new(ip, port),
                admin: SocketAddr::new(ip, admin_port),
                config: config_path,
                log,
                dir,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = wskeep.child.try_wait().unwrap() {
                    // Another process may have taken a port between picking and binding it.
                    if attempt < 3 && wskeep.log().contains("cannot listen") {
                        break;
                    }
                    panic!("wskeep exited at start with {status}:\n{}", wskeep.log());
                }
                if let Ok((200, _)) = super::http_get(wskeep.admin, "/readyz").await {
                    return wskeep;
                }
                assert!(Instant::now() < deadline, "wskeep never became ready:\n{}", wskeep.log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!()
    }

    /// Sends a real signal (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status if the process ends within `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the log until a line contains every one of `words`; returns that line.
    pub async fn wait_log_line(&self, words: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.log().lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no log line with {words:?} after {limit:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `/metrics` until `series` reaches `want`; returns the scrape.
    pub async fn wait_metric(&self, series: &str, want: f64, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = super::scrape(self.admin).await;
            if super::metric(&text, series) >= want {
                return text;
            }
            assert!(Instant::now() < deadline, "{series} never reached {want}:\n{text}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Wskeep {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- wskeep log ---\n{}--- end of wskeep log ---", self.log());
        }
    }
}
