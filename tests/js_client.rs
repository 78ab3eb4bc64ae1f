//! The JavaScript resume shim (`clients/js/`) against this build's binary: its Node tests
//! (`node --test`, three forced drops through a killable TCP relay, the grace's 4410 and a
//! restarted wskeep's, against the real wskeep and a fake of its side) and the proof in a real
//! browser (Debian's Chromium runs a page using the shim through three cuts of its path and a
//! silent drop).
//!
//! Needs `node` (>= 22, or 20.10+ where `clients/js/run-tests.js` adds --experimental-websocket)
//! and /usr/bin/chromium, both installed by .ci/install.sh; the tests fail, they do not skip,
//! without them.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// `node run-tests.js ARGS` in clients/js (`node --test` on the shim's tests, with the flag Node
/// 20 needs for its WebSocket) with WSKEEP_BIN set to this build's binary; panics with node's
/// report when a test fails, or when the run outlasts `limit` (then node's process group, which
/// this test made, is killed).
fn node_test(args: &[&str], env: &[(&str, &str)], limit: Duration) {
    let out = tempfile::tempfile().unwrap();
    let mut child = Command::new("node")
        .arg("run-tests.js")
        .args(args)
        .current_dir(js_dir())
        .env("WSKEEP_BIN", env!("CARGO_BIN_EXE_wskeep"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out.try_clone().unwrap())
        .process_group(0)
        .spawn()
        .expect("node runs (apt-get install -y nodejs npm)");
    let give_up = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > give_up {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut report = String::new();
    let mut out = out;
    out.seek(SeekFrom::Start(0)).unwrap();
    out.read_to_string(&mut report).unwrap();
    let status = status.unwrap_or_else(|| panic!("node --test {args:?} still running after {limit:?}:\n{report}"));
    assert!(status.success(), "node --test {args:?} failed ({status}):\n{report}");
    // A runner that ran nothing passes too: make sure every test ran and none was skipped.
    let count = |key: &str| {
        report.lines().find_map(|l| l.strip_prefix(&format!("# {key} "))).and_then(|n| n.trim().parse::<u32>().ok())
    };
    assert!(count("pass").unwrap_or(0) > 0, "no test passed:\n{report}");
    assert_eq!(count("fail"), Some(0), "{report}");
    assert_eq!(count("skipped"), Some(0), "{report}");
}

#[test]
fn shim_node_tests_against_the_real_binary() {
    node_test(&[], &[], Duration::from_secs(120));
}

#[test]
fn chromium_resumes_through_three_cuts_and_a_silent_drop() {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: apt-get install -y chromium (.ci/install.sh)");
    node_test(&["browser"], &[("CHROMIUM", CHROMIUM)], Duration::from_secs(120));
}
