//! Real network faults between wskeep and a peer in a network namespace of the test's own,
//! joined to the root namespace by a veth pair on a private /30 (traffic never leaves the
//! machine): the cable pulled on the client leg and on the upstream leg (the peer's end of the
//! link set down mid-connection: no FIN, no RST, just silence), and a link with 150 ms of delay
//! and 5 % loss each way.
//!
//! Everything runs as it would in production: the real `wskeep` binary, `wskeep probe` as the
//! client and `wskeep bench echo` as the upstream inside the namespace (`ip netns exec`). Needs
//! root, iproute2, iptables, python3 and util-linux's setpriv (`.ci/install.sh`); a missing tool
//! fails the test.
//!
//! The delay and loss would be `tc qdisc add ... netem delay 150ms loss 5%`, but kernels built
//! without `sch_netem` (this project's machines among them) refuse it. So iptables queues the
//! namespace's packets on the link (NFQUEUE) and `network_faults/netem.py` holds each one in the
//! kernel for the delay before letting it go, and drops the lost ones: real packets, real TCP
//! retransmits.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wskeep::tools::client::{self, ClientOptions, Incoming};

const WSKEEP: &str = env!("CARGO_BIN_EXE_wskeep");
/// The prefix that makes a child process die with the test even when the test is killed
/// outright (Drop kills it otherwise): util-linux's setpriv sets its parent-death signal.
const DIE_WITH_TEST: [&str; 4] = ["setpriv", "--pdeathsig", "KILL", "--"];

// === the namespace and its link ===

/// Runs a command to completion; panics with its output if it fails or cannot start.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{program}` ({e}): this test needs root, iproute2, iptables, python3 and setpriv (.ci/install.sh)")
    });
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A network namespace with one veth pair to the root namespace, each end with an address on
/// a /30 of 10.0.0.0/8 derived from the test process's PID and the test's own index, so tests
/// running at once never collide. Deleted (with the link) when dropped, panicking or not.
struct Netns {
    name: String,
    /// The root namespace's end of the link, and its address.
    root_if: String,
    root_ip: Ipv4Addr,
    /// The namespace's end, and its address.
    ns_if: String,
    ns_ip: Ipv4Addr,
}

impl Netns {
    fn new(index: u32) -> Netns {
        assert!(index < 4);
        remove_stale_namespaces();
        let pid = std::process::id();
        let name = format!("wskeep-{pid}-{index}");
        // Interface names are at most 15 bytes: "wsk" + 7 digits + index + end.
        let (root_if, ns_if) = (format!("wsk{pid}{index}r"), format!("wsk{pid}{index}n"));
        let block = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + ((pid & 0xF_FFFF) << 4) + (index << 2);
        let (root_ip, ns_ip) = (Ipv4Addr::from(block + 1), Ipv4Addr::from(block + 2));
        run("ip", &["netns", "add", &name]);
        // From here on, Drop cleans up whatever the next steps made.
        let ns = Netns { name, root_if, root_ip, ns_if, ns_ip };
        run("ip", &["link", "add", &ns.root_if, "type", "veth", "peer", "name", &ns.ns_if, "netns", &ns.name]);
        run("ip", &["addr", "add", &format!("{root_ip}/30"), "dev", &ns.root_if]);
        run("ip", &["link", "set", &ns.root_if, "up"]);
        ns.exec("ip", &["addr", "add", &format!("{ns_ip}/30"), "dev", &ns.ns_if]);
        ns.exec("ip", &["link", "set", &ns.ns_if, "up"]);
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, to completion.
    fn exec(&self, program: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Starts a long-running command inside the namespace, its output going to `log`.
    fn spawn(&self, program: &str, args: &[&str], log: &Path) -> Proc {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(DIE_WITH_TEST)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `ip netns exec` ({e}): .ci/install.sh installs iproute2"));
        Proc { child, log: log.to_path_buf() }
    }

    /// Pulls the cable: the namespace's end of the link goes down, so nothing crosses it any
    /// more and neither side is told (no FIN, no RST).
    fn pull_cable(&self) {
        self.exec("ip", &["link", "set", &self.ns_if, "down"]);
    }

    /// Plugs it back in (the link's addresses and routes come back with it).
    fn plug_cable(&self) {
        self.exec("ip", &["link", "set", &self.ns_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair; the link is deleted too in case the
        // setup stopped before moving one end into the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["link", "del", &self.root_if]).stderr(Stdio::null()).status();
    }
}

/// Namespaces of this test file left behind by a test process that was killed (SIGKILL skips
/// Drop): those whose PID no longer runs, with the processes that test started in them.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let pid = name.strip_prefix("wskeep-").and_then(|rest| rest.split('-').next());
        let Some(pid) = pid.filter(|p| p.parse::<u32>().is_ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for orphan in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", orphan]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
    // A namespace outlives its name while its sockets linger (a connection that was cut keeps
    // retransmitting into the dead link); deleting the root namespace's end of the veth pair
    // ends the link at once. Its name is "wsk" + PID + index + "r".
    let Ok(output) = Command::new("ip").args(["-o", "link", "show", "type", "veth"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split(": ").nth(1).unwrap_or("").split('@').next().unwrap_or("");
        let digits = name.strip_prefix("wsk").and_then(|rest| rest.strip_suffix('r')).unwrap_or("");
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let pid = &digits[..digits.len() - 1];
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["link", "del", name]).status();
        }
    }
}

/// A child process (inside a namespace or not), killed when dropped; its output is printed if
/// the test failed.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until its output has a line for which `find` returns something.
    async fn wait_for<T>(&mut self, what: &str, limit: Duration, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.output().lines().find_map(&find) {
                return found;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the process exited ({status}) before {what}:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "no {what} within {limit:?}:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- output of {:?} ---\n{}--- end ---", self.log.file_name().unwrap_or_default(), self.output());
        }
    }
}

// === wskeep ===

/// `wskeep run` with `config` (plus a JSON info log and an admin port on loopback), started
/// on port 0: its addresses come from its `bound` log line.
struct Wskeep {
    proc: Proc,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Wskeep {
    async fn start(listen: Ipv4Addr, upstream: &str, extra: &str) -> Wskeep {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[listen]\naddr = \"{listen}:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[upstream]\nurl = \"{upstream}\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n{extra}"
        );
        let path = dir.path().join("wskeep.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("wskeep.log");
        let mut command = Command::new(DIE_WITH_TEST[0]);
        command.args(&DIE_WITH_TEST[1..]).arg(WSKEEP).arg("run").arg("--config").arg(&path).stdin(Stdio::null());
        command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WSKEEP_") {
                command.env_remove(name);
            }
        }
        let mut proc =
            Proc { child: command.spawn().expect("setpriv starts wskeep (.ci/install.sh installs util-linux)"), log };
        let (addr, admin) = proc
            .wait_for("`bound` log line", Duration::from_secs(15), |line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                if v["message"] != "bound" {
                    return None;
                }
                Some((v["addr"].as_str()?.parse().ok()?, v["admin"].as_str()?.parse().ok()?))
            })
            .await;
        let wskeep = Wskeep { proc, addr, admin, _dir: dir };
        common::wait_ready(wskeep.admin).await;
        wskeep
    }

    async fn metric(&self, series: &str) -> f64 {
        common::metric(&common::scrape(self.admin).await, series)
    }

    /// Waits (bounded) until `series` reaches `value`.
    async fn wait_metric(&self, series: &str, value: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.metric(series).await < value {
            assert!(Instant::now() < deadline, "{series} did not reach {value} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `connection closed` log lines, parsed.
    fn closed_lines(&self) -> Vec<serde_json::Value> {
        let log = self.proc.output();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "connection closed")
            .collect()
    }
}

// === an upstream in the root namespace ===

#[derive(Debug)]
enum UpstreamEvent {
    Connected,
    /// A close frame arrived (its code and reason), and when.
    Closed(Instant, Option<(u16, String)>),
    /// The connection ended without a close frame.
    Lost,
}

/// An echo upstream on 127.0.0.1 for one connection at a time: reports what happens to it, and
/// closes it with the frame sent on `close`.
struct Upstream {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<UpstreamEvent>,
    close: mpsc::UnboundedSender<CloseFrame>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (close, mut close_rx) = mpsc::unbounded_channel::<CloseFrame>();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { continue };
                let _ = events_tx.send(UpstreamEvent::Connected);
                loop {
                    tokio::select! {
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Close(frame))) => {
                                let frame = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                                let _ = events_tx.send(UpstreamEvent::Closed(Instant::now(), frame));
                                let _ = ws.flush().await;
                                break;
                            }
                            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                                if ws.send(m).await.is_err() {
                                    let _ = events_tx.send(UpstreamEvent::Lost);
                                    break;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => {
                                let _ = events_tx.send(UpstreamEvent::Lost);
                                break;
                            }
                        },
                        Some(frame) = close_rx.recv() => {
                            // The answer comes back as a Close message on the next read.
                            let _ = ws.close(Some(frame)).await;
                        }
                    }
                }
            }
        });
        Upstream { addr, events, close }
    }

    async fn next_event(&mut self, limit: Duration) -> UpstreamEvent {
        tokio::time::timeout(limit, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing happened to the upstream's connection within {limit:?}"))
            .expect("the upstream runs")
    }
}

/// The seed of the test's random choices: `WSKEEP_TEST_SEED`, else a fresh one; printed.
fn seed() -> u64 {
    let seed = std::env::var("WSKEEP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed} (replay: WSKEEP_TEST_SEED={seed})");
    seed
}

/// Each test's own index, for its namespace's name and addresses.
static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

fn netns() -> Netns {
    Netns::new(NEXT_INDEX.fetch_add(1, Ordering::Relaxed))
}

// === the tests ===

const PING: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(600);
/// How late a timeout may be noticed: the timer grid (1/16 of the shortest timer) plus
/// scheduling on a busy machine.
const LATE: Duration = Duration::from_millis(400);
/// DESIGN.md: every close wskeep writes, and every closing handshake it waits for, is bounded
/// by 2 s; the ending is recorded after that.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// The time from pulling the cable to the close frame that names the dead leg: at most the
/// timeout after the last frame that crossed, which came at most a ping interval (and a
/// round trip) before the pull.
fn assert_within_timeout(pulled: Instant, closed: Instant) {
    let took = closed.duration_since(pulled);
    assert!(
        took + PING + Duration::from_millis(20) >= TIMEOUT && took <= TIMEOUT + LATE,
        "the dead leg was named {took:?} after the cable was pulled; the timeout is {TIMEOUT:?} \
         with pings every {PING:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_cable_is_pulled_is_named_dead_within_its_timeout() {
    let ns = netns();
    let mut upstream = Upstream::start().await;
    let keepalive = format!(
        "[client_keepalive]\nping_interval = \"{}ms\"\ntimeout = \"{}ms\"\n",
        PING.as_millis(),
        TIMEOUT.as_millis()
    );
    let wskeep = Wskeep::start(ns.root_ip, &format!("ws://{}", upstream.addr), &keepalive).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("ws://{}/through-the-veth", wskeep.addr);
    let _probe = ns.spawn(WSKEEP, &["probe", &url, "--duration", "60s"], &dir.path().join("probe.log"));

    // The client leg works: the probe, inside the namespace, answers wskeep's pings.
    assert!(matches!(upstream.next_event(Duration::from_secs(10)).await, UpstreamEvent::Connected));
    wskeep.wait_metric(r#"wskeep_pongs_received_total{side="client"}"#, 3.0, Duration::from_secs(10)).await;

    let pulled = Instant::now();
    ns.pull_cable();
    let UpstreamEvent::Closed(closed, frame) = upstream.next_event(TIMEOUT + CLOSE_BOUND).await else {
        panic!("the upstream lost its connection instead of getting a close frame")
    };
    assert_eq!(frame, Some((1001, "client timed out".to_string())), "DESIGN.md's close for a silent client");
    assert_within_timeout(pulled, closed);

    // The ending is recorded once the client leg's close (which cannot cross) has had its 2 s.
    let series = r#"wskeep_connection_duration_seconds_count{end="client_timeout"}"#;
    wskeep.wait_metric(series, 1.0, CLOSE_BOUND + LATE + Duration::from_secs(1)).await;
    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_close_codes_total{code="1001",direction="sent",side="upstream"}"#), 1.0);
    assert_eq!(
        common::metric(&text, r#"wskeep_close_codes_total{code="1006",direction="received",side="client"}"#),
        1.0
    );
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 0.0);
    let lines = wskeep.closed_lines();
    assert_eq!(lines.len(), 1, "one `connection closed` line");
    assert_eq!(lines[0]["end"], "client_timeout");
    assert_eq!(lines[0]["path"], "/through-the-veth");
    assert_eq!(lines[0]["upstream_close_sent"], 1001);
    assert_eq!(
        lines[0]["peer"].as_str().and_then(|p| p.parse::<SocketAddr>().ok()).map(|p| p.ip()),
        Some(ns.ns_ip.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_whose_cable_is_pulled_is_named_dead_within_its_timeout() {
    let ns = netns();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("{}:0", ns.ns_ip);
    let mut echo = ns.spawn(WSKEEP, &["bench", "echo", "--listen", &listen], &dir.path().join("echo.log"));
    let echo_addr: SocketAddr = echo
        .wait_for("echo upstream address", Duration::from_secs(10), |l| {
            l.strip_prefix("echo upstream listening on ")?.trim().parse().ok()
        })
        .await;
    let keepalive = format!(
        "[upstream_keepalive]\nping_interval = \"{}ms\"\ntimeout = \"{}ms\"\n\
         [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n",
        PING.as_millis(),
        TIMEOUT.as_millis()
    );
    let wskeep = Wskeep::start(Ipv4Addr::LOCALHOST, &format!("ws://{echo_addr}"), &keepalive).await;
    // wskeep's own frame client: tungstenite reads 1014, which it has no variant for, as 1002.
    let url = format!("ws://{}/", wskeep.addr);
    let mut client = client::connect(&url, &ClientOptions::default()).await.unwrap();

    // The upstream leg works: a message goes through the veth and back, pings are answered.
    client.writer.send(client::OP_TEXT, b"across the link").await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), client.reader.read_message()).await;
    assert!(
        matches!(&echoed, Ok(Ok(Some(Incoming::Text(t)))) if t.as_ref() == b"across the link"),
        "the echo: {echoed:?}"
    );
    wskeep.wait_metric(r#"wskeep_pongs_received_total{side="upstream"}"#, 3.0, Duration::from_secs(10)).await;

    let pulled = Instant::now();
    ns.pull_cable();
    let close = tokio::time::timeout(TIMEOUT + CLOSE_BOUND, client.reader.read_message()).await;
    let closed = Instant::now();
    let Ok(Ok(Some(Incoming::Close(code, reason)))) = close else {
        panic!("the client got {close:?}, not a close frame")
    };
    assert_eq!((code, reason.as_str()), (Some(1014), "upstream timed out"), "DESIGN.md's close for a silent upstream");
    assert_within_timeout(pulled, closed);
    client.writer.queue_close(code, &reason);
    client.writer.flush().await.unwrap();

    let series = r#"wskeep_connection_duration_seconds_count{end="upstream_timeout"}"#;
    wskeep.wait_metric(series, 1.0, CLOSE_BOUND + LATE + Duration::from_secs(1)).await;
    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, r#"wskeep_close_codes_total{code="1014",direction="sent",side="client"}"#), 1.0);
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 0.0);
    let lines = wskeep.closed_lines();
    assert_eq!(lines.len(), 1, "one `connection closed` line");
    assert_eq!(lines[0]["end"], "upstream_timeout");
    assert_eq!(lines[0]["client_close_sent"], 1014);
}

/// Histogram buckets of `wskeep_ping_rtt_seconds{side="client"}`: (upper bound, cumulative count).
fn rtt_buckets(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(r#"wskeep_ping_rtt_seconds_bucket{side="client",le=""#))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_a_slow_lossy_link_stays_connected_and_its_rtt_is_measured() {
    const DELAY: Duration = Duration::from_millis(150);
    const LOSS: f64 = 0.05;
    const PINGS: f64 = 10.0;
    let seed = seed();
    let ns = netns();
    let dir = tempfile::tempdir().unwrap();

    // Every packet crossing the namespace's end of the link, either way, waits 150 ms in the
    // kernel's queue 0 (RTT 300 ms), and 5 % of them are dropped.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/network_faults/netem.py");
    let args = [
        script.to_str().unwrap(),
        "--delay",
        &DELAY.as_secs_f64().to_string(),
        "--loss",
        &LOSS.to_string(),
        "--seed",
        &seed.to_string(),
    ];
    let mut netem = ns.spawn("python3", &args, &dir.path().join("netem.log"));
    netem.wait_for("netem.py ready", Duration::from_secs(10), |l| (l == "ready").then_some(())).await;
    ns.exec("iptables", &["-A", "INPUT", "-i", &ns.ns_if, "-j", "NFQUEUE", "--queue-num", "0"]);
    ns.exec("iptables", &["-A", "OUTPUT", "-o", &ns.ns_if, "-j", "NFQUEUE", "--queue-num", "0"]);

    // Pings far enough apart that each one's pong is back before the next is sent: wskeep times
    // its latest ping only.
    let mut upstream = Upstream::start().await;
    let keepalive = "[client_keepalive]\nping_interval = \"400ms\"\ntimeout = \"6s\"\n";
    let wskeep = Wskeep::start(ns.root_ip, &format!("ws://{}", upstream.addr), keepalive).await;
    let url = format!("ws://{}/", wskeep.addr);
    let mut probe = ns.spawn(WSKEEP, &["probe", &url, "--duration", "60s"], &dir.path().join("probe.log"));
    assert!(matches!(upstream.next_event(Duration::from_secs(15)).await, UpstreamEvent::Connected));

    let count = r#"wskeep_ping_rtt_seconds_count{side="client"}"#;
    wskeep.wait_metric(count, PINGS, Duration::from_secs(25)).await;
    // The connection is still up: the upstream ends it, and the close crosses the link.
    upstream.close.send(CloseFrame { code: CloseCode::Normal, reason: "enough pings".into() }).unwrap();
    assert!(matches!(upstream.next_event(Duration::from_secs(10)).await, UpstreamEvent::Closed(..)));
    wskeep
        .wait_metric(r#"wskeep_connection_duration_seconds_count{end="upstream_close"}"#, 1.0, Duration::from_secs(5))
        .await;
    probe.wait_for("probe summary", Duration::from_secs(5), |l| l.starts_with("close ").then(|| l.to_string())).await;
    assert!(probe.output().contains(r#"1000 "enough pings""#), "the probe got the upstream's close");

    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, "wskeep_connections_total"), 1.0, "one connection, never cut");
    let n = common::metric(&text, count);
    let mean = common::metric(&text, r#"wskeep_ping_rtt_seconds_sum{side="client"}"#) / n;
    let buckets = rtt_buckets(&text);
    let upto = |bound: f64| buckets.iter().find(|(le, _)| *le == bound).map(|(_, c)| *c).unwrap();
    eprintln!("{n} RTT observations, mean {mean:.3} s, buckets {buckets:?}");
    // No pong can come back sooner than two delays, and most come back in about that (0.25-0.5
    // s). A lost packet's retransmit takes a few hundred ms more, which usually pushes its pong
    // past the next ping (so it is not timed); the mean leaves room for those that are.
    assert_eq!(upto(0.25), 0.0, "an RTT below 250 ms on a 300 ms link: {buckets:?}");
    assert!(upto(0.5) >= n / 2.0, "most RTTs should be 0.25-0.5 s: {buckets:?}");
    assert!((0.3..1.0).contains(&mean), "mean RTT {mean:.3} s on a 300 ms link with 5 % loss");
    // The delay came from real packets held in the kernel: netem.py saw and passed them.
    drop(netem.child.stdin.take());
    let (passed, dropped) = netem
        .wait_for("netem.py's count", Duration::from_secs(5), |l| {
            let rest = l.strip_prefix("passed ")?;
            let (passed, dropped) = rest.split_once(" dropped ")?;
            Some((passed.parse::<u64>().ok()?, dropped.trim().parse::<u64>().ok()?))
        })
        .await;
    eprintln!("netem.py passed {passed} packets and dropped {dropped}");
    assert!(passed >= 2 * PINGS as u64, "netem.py passed only {passed} packets");
}

/// Issue 16: the client's cable is pulled for longer than its keepalive timeout; wskeep keeps the
/// upstream session (detached), the client (`wskeep probe --resume` inside the namespace) comes
/// back once the cable is plugged in, and every message crosses exactly once: those the probe
/// sent into the dead link are resent, those the upstream echoed meanwhile are replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_cable_is_pulled_resumes_its_session_when_it_is_back() {
    let ns = netns();
    let mut upstream = Upstream::start().await;
    let extra = format!(
        "[client_keepalive]\nping_interval = \"{}ms\"\ntimeout = \"{}ms\"\n[resume]\nenabled = true\ngrace = \"20s\"\n",
        PING.as_millis(),
        TIMEOUT.as_millis()
    );
    let wskeep = Wskeep::start(ns.root_ip, &format!("ws://{}", upstream.addr), &extra).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("ws://{}/session", wskeep.addr);
    let args = ["probe", &url, "--resume", "--send-every", "20ms", "--dead-after", "800ms", "--duration", "8s"];
    let mut probe = ns.spawn(WSKEEP, &args, &dir.path().join("probe.log"));
    assert!(matches!(upstream.next_event(Duration::from_secs(10)).await, UpstreamEvent::Connected));
    let echoed = r#"wskeep_messages_total{direction="upstream_to_client"}"#;
    wskeep.wait_metric(echoed, 10.0, Duration::from_secs(10)).await;

    ns.pull_cable();
    // wskeep finds the client dead by its keepalive, and keeps the session.
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, TIMEOUT + LATE + Duration::from_secs(1)).await;
    let before = wskeep.metric(echoed).await;
    assert_eq!(wskeep.metric("wskeep_connections_active").await, 1.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    ns.plug_cable();

    wskeep.wait_metric("wskeep_resume_sessions_resumed_total", 1.0, Duration::from_secs(10)).await;
    wskeep.wait_metric(echoed, before + 10.0, Duration::from_secs(10)).await;
    let status = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(status) = probe.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the probe finishes its 8 s");
    let report = probe.output();
    assert!(status.success() && report.contains("result          lossless"), "{report}");
    assert!(report.contains("resumes         1 "), "{report}");
    assert!(report.contains("0 lost, 0 duplicated"), "{report}");
    assert!(!report.contains("(0 resent"), "what the probe sent into the dead link was resent: {report}");
    // The upstream saw one connection, and its only close is the probe's own at the end.
    match upstream.next_event(CLOSE_BOUND).await {
        UpstreamEvent::Closed(_, frame) => assert_eq!(frame, Some((1000, "probe finished".to_string()))),
        other => panic!("the upstream's connection ended otherwise: {other:?}"),
    }
    assert!(upstream.events.try_recv().is_err(), "no second connection upstream");
    let lines = wskeep.proc.output();
    assert!(lines.contains("session resumed"), "{lines}");
}
