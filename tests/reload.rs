//! Signals other than the stop signals, against the real binary: SIGHUP reloads the configuration
//! for new connections while live ones keep theirs, an invalid file changes nothing, keys that
//! need a restart are reported, SIGUSR1/SIGUSR2 are ignored, and SIGQUIT drains like SIGTERM.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::binary::Wskeep;
use common::TestUpstream;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

const LIMIT: Duration = Duration::from_secs(5);
const SUCCESS: &str = r#"wskeep_config_reloads_total{result="success"}"#;
const INVALID: &str = r#"wskeep_config_reloads_total{result="invalid"}"#;

/// A plain ws:// configuration in front of `upstream`; `extra` is appended (whole sections).
fn config(port: u16, admin_port: u16, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n[admin]\naddr = \"127.0.0.1:{admin_port}\"\n\
         [upstream]\nurl = \"ws://{upstream}\"\n[shutdown]\ndrain_timeout = \"300ms\"\n{extra}"
    )
}

const QUIET: &str = "[client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n\
                     [log]\nlevel = \"info\"\nformat = \"json\"\n";

/// A field of a JSON log line, as text.
fn field(line: &str, name: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    match &value[name] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn start(upstream: &TestUpstream, extra: &'static str) -> Wskeep {
    let upstream = upstream.addr;
    Wskeep::start_with(move |port, admin| config(port, admin, upstream, extra)).await
}

/// Rewrites the file wskeep was started with (same ports) and sends SIGHUP.
fn rewrite_and_hup(wskeep: &Wskeep, upstream: &TestUpstream, extra: &str) {
    let text = config(wskeep.addr.port(), wskeep.admin.port(), upstream.addr, extra);
    std::fs::write(&wskeep.config, text).unwrap();
    wskeep.signal("HUP");
}

async fn connect(addr: SocketAddr) -> Ws {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_tungstenite::client_async(format!("ws://{addr}/reload"), tcp).await.expect("handshake")
    };
    tokio::time::timeout(LIMIT, handshake).await.expect("handshake within the limit").0
}

/// What arrived within `window`: data messages, and how many protocol pings.
async fn collect(ws: &mut Ws, window: Duration) -> (Vec<String>, usize) {
    let mut texts = Vec::new();
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(next) = tokio::time::timeout_at(deadline, ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(_)) => {}
            other => panic!("the connection ended: {other:?}"),
        }
    }
    (texts, pings)
}

/// Sends a JSON ping and returns wskeep's answer.
async fn json_ping(ws: &mut Ws) -> serde_json::Value {
    ws.send(Message::text(r#"{"type":"ping","id":7}"#)).await.unwrap();
    loop {
        match tokio::time::timeout(LIMIT, ws.next()).await.expect("a JSON pong within the limit") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let (texts, _) = collect_until(ws, text).await;
    assert_eq!(texts.last().map(String::as_str), Some(text));
}

async fn collect_until(ws: &mut Ws, want: &str) -> (Vec<String>, usize) {
    let mut texts = Vec::new();
    let mut pings = 0;
    while texts.last().map(String::as_str) != Some(want) {
        match tokio::time::timeout(LIMIT, ws.next()).await.expect("the echo within the limit") {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(_)) => {}
            other => panic!("the connection ended: {other:?}"),
        }
    }
    (texts, pings)
}

#[tokio::test]
async fn sighup_applies_keepalive_and_json_ping_to_new_connections_only() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(&upstream, QUIET).await;
    let mut old = connect(wskeep.addr).await;
    assert_eq!(json_ping(&mut old).await, serde_json::json!({"type": "pong", "id": 7}));

    rewrite_and_hup(
        &wskeep,
        &upstream,
        "[client_keepalive]\nping_interval = \"100ms\"\ntimeout = \"5s\"\n\
         [json_ping]\nreply = { type = \"pong\", from = \"reloaded\" }\n\
         [log]\nlevel = \"info\"\nformat = \"json\"\n",
    );
    wskeep.wait_metric(SUCCESS, 1.0, LIMIT).await;
    let line = wskeep.wait_log_line(&["configuration reloaded"], LIMIT).await;
    assert_eq!(field(&line, "changed"), "client_keepalive.ping_interval,client_keepalive.timeout,json_ping.reply");
    assert_eq!(field(&line, "restart_needed"), "none");

    // A new connection gets the new settings: protocol pings, and the new JSON reply.
    let mut new = connect(wskeep.addr).await;
    let (_, pings) = collect(&mut new, Duration::from_millis(600)).await;
    assert!(pings >= 2, "the new connection got {pings} pings in 600 ms at a 100 ms interval");
    assert_eq!(json_ping(&mut new).await, serde_json::json!({"type": "pong", "from": "reloaded", "id": 7}));

    // The live one keeps what it started with (no pings, the old reply) and carries on.
    let (texts, pings) = collect(&mut old, Duration::from_millis(300)).await;
    assert_eq!((texts.len(), pings), (0, 0), "the live connection's keepalive changed: {texts:?}, {pings} pings");
    assert_eq!(json_ping(&mut old).await, serde_json::json!({"type": "pong", "id": 7}));
    echo(&mut old, "still relayed").await;
    assert_eq!(common::metric(&common::scrape(wskeep.admin).await, INVALID), 0.0);
}

#[tokio::test]
async fn sighup_with_an_invalid_file_keeps_the_running_configuration() {
    let upstream = TestUpstream::start().await;
    let mut wskeep = start(&upstream, QUIET).await;
    let mut live = connect(wskeep.addr).await;

    rewrite_and_hup(
        &wskeep,
        &upstream,
        "[client_keepalive]\nping_interval = \"soon\"\n[json_ping]\nreply = { type = \"other\" }\nrepl = 1\n",
    );
    let metrics = wskeep.wait_metric(INVALID, 1.0, LIMIT).await;
    assert_eq!(common::metric(&metrics, SUCCESS), 0.0);
    // Every problem, each with its key, as `wskeep check` lists them.
    wskeep.wait_log_line(&["client_keepalive.ping_interval", "invalid configuration"], LIMIT).await;
    wskeep.wait_log_line(&["json_ping.repl", "unknown key"], LIMIT).await;
    wskeep.wait_log_line(&["reload refused"], LIMIT).await;

    assert!(wskeep.is_running(), "an invalid file ended wskeep:\n{}", wskeep.log());
    echo(&mut live, "still relayed").await;
    // New connections still get the running configuration.
    let mut new = connect(wskeep.addr).await;
    assert_eq!(json_ping(&mut new).await, serde_json::json!({"type": "pong", "id": 7}));
    assert_eq!(common::http_get(wskeep.admin, "/readyz").await.unwrap().0, 200);
}

#[tokio::test]
async fn sighup_reports_keys_that_need_a_restart_and_applies_the_rest() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(&upstream, QUIET).await;
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();

    let text = config(elsewhere.port(), wskeep.admin.port(), upstream.addr, QUIET)
        + "[json_ping]\nreply = { type = \"pong\", from = \"reloaded\" }\n";
    std::fs::write(&wskeep.config, text).unwrap();
    wskeep.signal("HUP");
    wskeep.wait_metric(SUCCESS, 1.0, LIMIT).await;
    let warning = wskeep.wait_log_line(&["listen.addr", "needs a restart"], LIMIT).await;
    assert_eq!((field(&warning, "level").as_str(), field(&warning, "key").as_str()), ("WARN", "listen.addr"));
    let line = wskeep.wait_log_line(&["configuration reloaded"], LIMIT).await;
    assert_eq!(field(&line, "restart_needed"), "listen.addr");
    assert_eq!(field(&line, "changed"), "json_ping.reply");

    // Still on the old address, with the new JSON reply; nothing listens on the new one.
    let mut ws = connect(wskeep.addr).await;
    assert_eq!(json_ping(&mut ws).await, serde_json::json!({"type": "pong", "from": "reloaded", "id": 7}));
    assert!(TcpStream::connect(elsewhere).await.is_err(), "wskeep moved to {elsewhere} without a restart");
}

#[tokio::test]
async fn sighup_applies_a_new_log_level() {
    let upstream = TestUpstream::start().await;
    let wskeep = start(&upstream, "[log]\nlevel = \"warn\"\nformat = \"json\"\n").await;
    rewrite_and_hup(&wskeep, &upstream, "[log]\nlevel = \"info\"\nformat = \"json\"\n");
    wskeep.wait_metric(SUCCESS, 1.0, LIMIT).await;
    // The line before the reload was at `info` under `warn`; the one after it is logged.
    let line = wskeep.wait_log_line(&["configuration reloaded"], LIMIT).await;
    assert_eq!(field(&line, "changed"), "log.level");
    assert!(!wskeep.log().contains("reloading the configuration"), "logged at info under warn:\n{}", wskeep.log());
    wskeep.signal("USR2");
    wskeep.wait_log_line(&["signal ignored", "SIGUSR2"], LIMIT).await;
}

#[tokio::test]
async fn sigusr1_and_sigusr2_are_logged_and_ignored() {
    let upstream = TestUpstream::start().await;
    let mut wskeep = start(&upstream, QUIET).await;
    let mut live = connect(wskeep.addr).await;
    for name in ["USR1", "USR2", "USR1"] {
        wskeep.signal(name);
    }
    wskeep.wait_log_line(&["signal ignored", "SIGUSR1"], LIMIT).await;
    wskeep.wait_log_line(&["signal ignored", "SIGUSR2"], LIMIT).await;
    assert!(wskeep.is_running(), "a user signal ended wskeep:\n{}", wskeep.log());
    echo(&mut live, "still relayed").await;
    assert_eq!(common::http_get(wskeep.admin, "/readyz").await.unwrap().0, 200);
}

#[tokio::test]
async fn sigquit_drains_like_sigterm_and_exits_0() {
    let upstream = TestUpstream::start().await;
    let mut wskeep = start(&upstream, QUIET).await;
    let mut live = connect(wskeep.addr).await;
    echo(&mut live, "before").await;

    let signalled = Instant::now();
    wskeep.signal("QUIT");
    // The drain (300 ms) passes, then the close frame comes: 1001, not a dropped connection.
    let closed = loop {
        match tokio::time::timeout(LIMIT, live.next()).await.expect("a close frame within the limit") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let frame = closed.expect("a close frame with a code");
    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (1001, "going away"));
    assert!(signalled.elapsed() >= Duration::from_millis(250), "closed before the drain timeout");
    let status = wskeep.wait_exit(LIMIT).await.expect("wskeep exits after the drain");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(wskeep.log().contains("SIGQUIT"));
}
