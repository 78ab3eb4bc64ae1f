//! Headless Chromium (Debian's, at /usr/bin/chromium) for the browser tests; a test that needs it
//! fails (it does not skip) when it is missing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
