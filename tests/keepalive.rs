//! Keepalive, end to end over real sockets: the legacy orchestrator's pong-only read deadline,
//! an intermediary that cuts idle connections, silent peers on either leg, a client that stops
//! reading while the upstream streams, and the `demo` and `probe` commands of the real binary.
//!
//! Timings are scaled down to hundreds of milliseconds; waits for readiness poll, and the only
//! fixed sleeps are the keepalive durations under test.

mod common;
mod idle_proxy;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;
use wskeep::tools::client::{ClientOptions, Incoming};
use wskeep::tools::legacy_upstream::{self, LegacyOptions, LegacyStats};
use wskeep::tools::probe::{self, ProbeOptions, ProbeReport};

/// The legacy upstream's read deadline in the deadline tests.
const DEADLINE: Duration = Duration::from_millis(400);
/// The intermediary's idle cut.
const IDLE_CUT: Duration = Duration::from_millis(500);

fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// The problem client of DESIGN.md: JSON pings only, protocol pings never answered.
fn json_ping_client(url: String, every: Duration, run_for: Duration) -> ProbeOptions {
    ProbeOptions {
        url,
        client: ClientOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() },
        json_ping: Some(every),
        auto_pong: false,
        duration: Some(run_for),
        progress: false,
    }
}

/// A browser-like client that sends nothing and answers protocol pings.
fn quiet_browser(url: String, run_for: Duration) -> ProbeOptions {
    ProbeOptions {
        url,
        client: ClientOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() },
        json_ping: None,
        auto_pong: true,
        duration: Some(run_for),
        progress: false,
    }
}

/// Polls `check` every 10 ms until it holds; panics with `what` after `limit`.
async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let give_up = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < give_up, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Scrapes the admin port until `series` has `value`; panics after `limit`.
async fn wait_for_metric(admin: SocketAddr, series: &str, value: f64, limit: Duration) {
    let give_up = Instant::now() + limit;
    loop {
        let text = common::scrape(admin).await;
        let now = common::metric(&text, series);
        if now == value {
            return;
        }
        assert!(Instant::now() < give_up, "{series} is {now}, expected {value} within {limit:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn closes_received(stats: &LegacyStats) -> Vec<u16> {
    stats.closes_received.lock().unwrap().clone()
}

/// This process's resident set size in KiB, from /proc/self/status.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}

// === the legacy orchestrator's read deadline ===

#[tokio::test]
async fn legacy_deadline_kills_a_json_ping_client_directly_but_not_through_wskeep() {
    let options = LegacyOptions::with_deadline(DEADLINE);
    let (direct_upstream, direct_stats) = legacy_upstream::start(loopback(), options.clone()).await.unwrap();
    let (relayed_upstream, relayed_stats) = legacy_upstream::start(loopback(), options).await.unwrap();
    let cert = common::test_cert();
    let sidecar = common::start_sidecar(common::test_config(
        relayed_upstream,
        Some(&cert),
        "[client_keepalive]\nping_interval = \"200ms\"\ntimeout = \"2s\"\n",
    ))
    .await;

    let every = DEADLINE * 4 / 5;
    let run_for = DEADLINE * 20;
    let direct = json_ping_client(format!("ws://{direct_upstream}/"), every, run_for);
    let mut relayed = json_ping_client(format!("wss://localhost:{}/", sidecar.addr.port()), every, run_for);
    relayed.client.ca_file = Some(cert.cert.clone());
    let (direct, relayed) = tokio::join!(probe::run(&direct), probe::run(&relayed));
    let (direct, relayed): (ProbeReport, ProbeReport) = (direct.unwrap(), relayed.unwrap());

    // Directly: the JSON pings do not reset the deadline, which drops the TCP connection.
    assert!(!direct.completed, "the direct connection must die at the deadline:\n{direct}");
    assert_eq!(direct.close_code(), 1006, "no close frame on the direct connection:\n{direct}");
    assert!(
        direct.lifetime >= DEADLINE * 3 / 4 && direct.lifetime <= DEADLINE * 5 / 2,
        "the direct connection lives about one deadline ({DEADLINE:?}):\n{direct}"
    );
    assert_eq!(direct_stats.deadlines_fired.load(Relaxed), 1);

    // Through wskeep: alive for 20 deadlines, every JSON ping answered, and the deadline never fires.
    assert!(relayed.completed, "the relayed connection must outlive 20 deadlines:\n{relayed}");
    assert_eq!(relayed.close_code(), 1000, "{relayed}");
    assert!(relayed.json_pings_sent >= 20, "{relayed}");
    // The probe stops reading at the end, so the pong of a ping sent just then may go unread.
    assert!(
        relayed.json_pongs_received + 1 >= relayed.json_pings_sent
            && relayed.json_pongs_received <= relayed.json_pings_sent,
        "one JSON pong per JSON ping:\n{relayed}"
    );
    assert_eq!(relayed.messages, 0, "nothing but JSON pongs came back:\n{relayed}");
    assert_eq!(relayed.pongs_sent, 0, "the client never answered a protocol ping");
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, "wskeep_json_pings_answered_total"), relayed.json_pings_sent as f64);
    assert!(common::metric(&text, r#"wskeep_pings_answered_total{side="upstream"}"#) >= 10.0, "{text}");
    assert_eq!(relayed_stats.deadlines_fired.load(Relaxed), 0, "the upstream's read deadline fired through wskeep");
    assert_eq!(relayed_stats.json_pings_answered.load(Relaxed), 0, "wskeep answers the JSON pings itself");
    assert!(relayed_stats.pongs_received.load(Relaxed) >= 10, "wskeep answered the upstream's pings");
    wait_until(Duration::from_secs(3), "the upstream to receive the client's close", || {
        closes_received(&relayed_stats) == [1000]
    })
    .await;
}

// === an intermediary that cuts idle connections ===

async fn through_idle_cut(client_keepalive: &str) -> (ProbeReport, idle_proxy::IdleProxy, common::Sidecar) {
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, None, client_keepalive)).await;
    let proxy = idle_proxy::start(sidecar.addr, IDLE_CUT).await;
    let report = probe::run(&quiet_browser(format!("ws://{}/", proxy.addr), IDLE_CUT * 20)).await.unwrap();
    (report, proxy, sidecar)
}

#[tokio::test]
async fn idle_cut_kills_a_quiet_connection_without_client_pings() {
    let (report, proxy, sidecar) =
        through_idle_cut("[client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n").await;
    assert!(!report.completed, "the intermediary must cut the idle connection:\n{report}");
    assert_eq!(report.close_code(), 1006, "{report}");
    assert!(report.lifetime >= IDLE_CUT * 3 / 4 && report.lifetime <= IDLE_CUT * 4, "{report}");
    assert_eq!(report.pings_received, 0, "{report}");
    assert_eq!(proxy.cuts(), 1);
    // wskeep saw the client vanish and ends it as a client error (the upstream gets 1001).
    wait_for_metric(
        sidecar.admin,
        r#"wskeep_connection_duration_seconds_count{end="client_error"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test]
async fn client_pings_keep_a_quiet_connection_through_the_idle_cut() {
    let (report, proxy, sidecar) =
        through_idle_cut("[client_keepalive]\nping_interval = \"200ms\"\ntimeout = \"2s\"\n").await;
    assert!(report.completed, "20 idle periods through the intermediary:\n{report}");
    assert_eq!(report.close_code(), 1000, "{report}");
    assert_eq!(report.json_pings_sent + report.messages, 0, "the client sent nothing but pongs");
    assert!(report.pings_received >= 30, "wskeep pings every 200ms:\n{report}");
    assert_eq!(report.pongs_sent, report.pings_received);
    assert_eq!(proxy.cuts(), 0);
    assert_eq!(proxy.connections(), 1);
    let text = common::scrape(sidecar.admin).await;
    assert!(common::metric(&text, r#"wskeep_pongs_received_total{side="client"}"#) >= 30.0, "{text}");
    assert!(common::metric(&text, r#"wskeep_ping_rtt_seconds_count{side="client"}"#) >= 30.0, "{text}");
}

// === silent peers ===

#[tokio::test]
async fn silent_client_is_timed_out_and_the_upstream_gets_1001() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(
        upstream.addr,
        Some(&cert),
        "[client_keepalive]\nping_interval = \"200ms\"\ntimeout = \"600ms\"\n",
    ))
    .await;
    // Handshake, then never read or write again (not even pongs: the stream is never polled).
    let silent = common::wss(sidecar.addr, &cert, "/", &[]).await;
    let start = Instant::now();
    wait_until(Duration::from_secs(3), "the upstream to receive a close", || {
        !upstream.closes.lock().unwrap().is_empty()
    })
    .await;
    let elapsed = start.elapsed();
    assert_eq!(upstream.closes.lock().unwrap().clone(), [(1001, "client timed out".to_string())]);
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed <= Duration::from_millis(800),
        "the upstream got 1001 after {elapsed:?}, expected the 600ms timeout (+ one 200ms interval)"
    );
    // The client never answers wskeep's close: the connection is recorded once that wait (2 s) ends.
    wait_for_metric(
        sidecar.admin,
        r#"wskeep_connection_duration_seconds_count{end="client_timeout"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    drop(silent);
}

#[tokio::test]
async fn silent_upstream_is_timed_out_and_the_client_gets_1014() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(
        upstream.addr,
        Some(&cert),
        "[upstream_keepalive]\nping_interval = \"200ms\"\ntimeout = \"600ms\"\n",
    ))
    .await;
    // The frame client reports the code as sent: tungstenite reads 1014, which it has no variant
    // for, as a protocol violation (1002).
    let options = ClientOptions { ca_file: Some(cert.cert.clone()), ..Default::default() };
    let url = format!("wss://localhost:{}/silent", sidecar.addr.port());
    let mut client = wskeep::tools::client::connect(&url, &options).await.unwrap();
    let start = Instant::now();
    let close = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match client.reader.read_message().await {
                Ok(Some(Incoming::Close(code, reason))) => return Some((code, reason)),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("a close frame within 3s");
    let elapsed = start.elapsed();
    assert_eq!(close, Some((Some(1014), "upstream timed out".to_string())));
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed <= Duration::from_millis(800),
        "the client got 1014 after {elapsed:?}, expected the 600ms timeout (+ one 200ms interval)"
    );
    // Answer the close and see wskeep end the connection.
    client.writer.queue_close(Some(1014), "upstream timed out");
    client.writer.flush().await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(3), client.reader.read_message()).await;
    assert!(
        matches!(rest, Ok(Ok(None)) | Ok(Err(_))),
        "wskeep ends the connection after the closing handshake: {rest:?}"
    );
    let text = common::scrape(sidecar.admin).await;
    assert!(common::metric(&text, r#"wskeep_pings_sent_total{side="upstream"}"#) >= 2.0, "{text}");
    wait_for_metric(
        sidecar.admin,
        r#"wskeep_connection_duration_seconds_count{end="upstream_timeout"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
}

// === a client that stops reading while the upstream streams ===

#[tokio::test]
async fn slow_client_backpressures_the_upstream_and_times_out() {
    const MESSAGE: usize = 16 << 10;
    let client_timeout = Duration::from_secs(2);
    let options = LegacyOptions {
        deadline: Duration::from_secs(1),
        ping_interval: Duration::from_millis(500),
        stream_size: Some(MESSAGE),
    };
    let (upstream, stats) = legacy_upstream::start(loopback(), options).await.unwrap();
    let sidecar = common::start_sidecar(common::test_config(
        upstream,
        None,
        "[client_keepalive]\nping_interval = \"500ms\"\ntimeout = \"2s\"\n\
         [upstream_keepalive]\npong_interval = \"300ms\"\n",
    ))
    .await;
    let rss_before = vm_rss_kib();
    // Handshake, then neither read nor write: the client is a connection that is never polled.
    let client =
        wskeep::tools::client::connect(&format!("ws://{}/", sidecar.addr), &ClientOptions::default()).await.unwrap();
    let start = Instant::now();

    // The socket buffers on loopback fill within milliseconds; from then on nothing moves.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let early = stats.messages_streamed.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let late = stats.messages_streamed.load(Relaxed);
    let rss_after = vm_rss_kib();
    eprintln!("streamed {early} messages at 0.6s, {late} at 1.5s; VmRSS {rss_before} -> {rss_after} KiB");
    assert!(start.elapsed() < client_timeout, "the samples must be taken before the client times out");
    assert!(early > 0, "the upstream streamed");
    assert!(late <= early + 1, "the upstream is backpressured: {early} messages at 0.6s, {late} at 1.5s");
    assert!((late as usize) * MESSAGE < 64 << 20, "bounded: {late} messages of {MESSAGE} bytes streamed");
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(growth_mib < 64, "memory grew by {growth_mib} MiB while the client read nothing");

    // Meanwhile the unsolicited pongs keep the upstream's deadline (1 s) fed, until the client's
    // timeout ends the connection: the upstream is sent 1001.
    wait_until(Duration::from_secs(5), "the upstream to receive 1001 (or its deadline to fire)", || {
        closes_received(&stats).contains(&1001) || stats.deadlines_fired.load(Relaxed) > 0
    })
    .await;
    let ended = start.elapsed();
    assert_eq!(stats.deadlines_fired.load(Relaxed), 0, "the upstream's read deadline fired after {ended:?}");
    assert_eq!(closes_received(&stats), [1001]);
    assert!(
        ended >= client_timeout - Duration::from_millis(200) && ended <= client_timeout + Duration::from_millis(800),
        "the connection ended after {ended:?}, expected the client timeout ({client_timeout:?})"
    );
    assert!(stats.pongs_received.load(Relaxed) >= 4, "wskeep's unsolicited pongs reached the upstream");
    wait_for_metric(
        sidecar.admin,
        r#"wskeep_connection_duration_seconds_count{end="client_timeout"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 0.0, "{text}");
    drop(client);
}

// === the real binary ===

/// Runs the command to its end (killed and failed after `limit`): status, stdout, stderr, time.
fn run_with_limit(command: &mut Command, limit: Duration) -> (ExitStatus, String, String, Duration) {
    let start = std::time::Instant::now();
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}; stdout so far:\n{}", stdout.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, stdout.join().unwrap(), stderr.join().unwrap(), start.elapsed())
}

#[test]
fn demo_shows_the_direct_1006_and_the_relayed_connection_surviving() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_wskeep"));
    demo.arg("demo");
    let (status, out, err, took) = run_with_limit(&mut demo, Duration::from_secs(30));
    assert!(status.success(), "demo failed ({status}):\n{out}\n{err}");
    assert!(took < Duration::from_secs(30));
    let row = |name: &str| {
        out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name:?} row in:\n{out}")).to_string()
    };
    let close = row("close code");
    assert!(close.contains("1006 (no close frame)"), "the direct connection ends with 1006:\n{out}");
    assert!(close.contains("1000 (client closed at the end)"), "the relayed connection survives:\n{out}");
    let lifetimes: Vec<f64> =
        row("lifetime").split_whitespace().skip(1).map(|s| s.trim_end_matches('s').parse().unwrap()).collect();
    assert!(lifetimes[0] < 5.0 && lifetimes[1] >= 9.5, "lifetimes direct/relayed: {lifetimes:?}\n{out}");
    assert!(out.contains("read deadline fired 1 time(s)"), "{out}");
}

async fn probe_binary(url: String) -> (ExitStatus, String, String, Duration) {
    tokio::task::spawn_blocking(move || {
        let mut probe = Command::new(env!("CARGO_BIN_EXE_wskeep"));
        probe.args(["probe", &url, "--no-auto-pong", "--json-ping", "300ms", "--duration", "3s"]);
        run_with_limit(&mut probe, Duration::from_secs(20))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn probe_binary_dies_at_the_deadline_directly_and_lasts_through_wskeep() {
    let options = LegacyOptions::with_deadline(Duration::from_secs(1));
    let (upstream, stats) = legacy_upstream::start(loopback(), options).await.unwrap();
    let sidecar = common::start_sidecar(common::test_config(
        upstream,
        None,
        "[client_keepalive]\nping_interval = \"200ms\"\ntimeout = \"2s\"\n",
    ))
    .await;
    let (direct, relayed) =
        tokio::join!(probe_binary(format!("ws://{upstream}/")), probe_binary(format!("ws://{}/", sidecar.addr)));

    let (status, out, err, took) = direct;
    assert!(!status.success(), "the direct probe must fail at the deadline:\n{out}\n{err}");
    assert!(out.contains("1006 (no close frame)"), "{out}\n{err}");
    assert!(took < Duration::from_secs(3), "the direct probe ended early: {took:?}");

    let (status, out, err, took) = relayed;
    assert!(status.success(), "the probe through wskeep must last its duration ({status}):\n{out}\n{err}");
    assert!(out.contains("(probe finished)"), "{out}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert_eq!(stats.deadlines_fired.load(Relaxed), 1, "only the direct connection hit the deadline");
}
