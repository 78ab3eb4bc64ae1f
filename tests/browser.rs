//! A real browser: headless Chromium runs a page whose JavaScript behaves like the voice-agent
//! client of DESIGN.md (JSON pings only, less often than the intermediary's idle cut) over
//! `wss://` through an idle-cutting TCP proxy to wskeep, in front of the legacy upstream.
//! Browsers answer protocol pings by themselves: with wskeep's client pings on, the connection
//! survives the idle cut and the upstream's pong-only deadline; with them off it is cut (1006).
//!
//! Needs Debian's `chromium` at /usr/bin/chromium; the test fails (it does not skip) without it.

mod common;
mod idle_proxy;

use common::chromium::Browser;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use wskeep::tools::legacy_upstream::{self, LegacyOptions};

/// The legacy upstream's read deadline (the orchestrator's 60 s, scaled).
const DEADLINE: Duration = Duration::from_secs(1);
/// The intermediary's idle cut.
const IDLE_CUT: Duration = Duration::from_millis(500);
/// The page's JSON ping period: less often than the idle cut.
const JSON_PING: Duration = Duration::from_millis(700);

/// The page: opens one connection per `conn` parameter (`label:port`), sends a JSON ping every
/// `every` ms, and after `run_for` ms (or when the connection ends) POSTs what it saw to /result.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wskeep browser test</title></head><body><script>
"use strict";
const params = new URLSearchParams(location.search);
const RUN_FOR = Number(params.get("run_for"));
const EVERY = Number(params.get("every"));
function report(result) {
  return fetch("/result", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(result) });
}
window.onerror = (message) => { report({ label: "page-error", message: String(message) }); };
function connect(label, port) {
  const r = { label, opened: false, pings: 0, pongs: 0, bad_pongs: 0, code: null, reason: "",
              was_clean: null, lifetime_ms: null, alive_at_end: false, errors: 0 };
  let openedAt = null, timer = null, done = false;
  const finish = () => {
    if (done) return;
    done = true;
    clearInterval(timer);
    r.lifetime_ms = openedAt === null ? null : Math.round(performance.now() - openedAt);
    report(r);
  };
  const ws = new WebSocket("wss://127.0.0.1:" + port + "/");
  ws.onopen = () => {
    r.opened = true;
    openedAt = performance.now();
    timer = setInterval(() => {
      r.pings += 1;
      ws.send(JSON.stringify({ type: "ping", id: r.pings }));
    }, EVERY);
    setTimeout(() => {
      clearInterval(timer);
      // Give the last pong time to arrive, then report a connection that is still open.
      setTimeout(() => {
        if (done) return;
        r.alive_at_end = ws.readyState === WebSocket.OPEN;
        finish();
        ws.close(1000, "done");
      }, 300);
    }, RUN_FOR);
  };
  ws.onmessage = (event) => {
    let m = null;
    try { m = JSON.parse(event.data); } catch (_) {}
    if (m && m.type === "pong" && m.id === r.pongs + 1) r.pongs += 1; else r.bad_pongs += 1;
  };
  ws.onerror = () => { r.errors += 1; };
  ws.onclose = (event) => {
    r.code = event.code;
    r.reason = event.reason;
    r.was_clean = event.wasClean;
    finish();
  };
}
for (const spec of params.getAll("conn")) {
  const [label, port] = spec.split(":");
  connect(label, port);
}
</script></body></html>
"#;

/// Serves the page and forwards every POSTed result.
async fn serve_page(results: mpsc::UnboundedSender<Value>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(common::chromium::serve_page(tcp, PAGE, results.clone()));
        }
    });
    addr
}

/// The legacy upstream, wskeep (TLS) in front of it with this client keepalive, and the
/// idle-cutting proxy in front of wskeep.
struct Chain {
    stats: std::sync::Arc<wskeep::tools::legacy_upstream::LegacyStats>,
    sidecar: common::Sidecar,
    proxy: idle_proxy::IdleProxy,
}

async fn chain(cert: &common::TestCert, client_keepalive: &str) -> Chain {
    let (upstream, stats) =
        legacy_upstream::start(([127, 0, 0, 1], 0).into(), LegacyOptions::with_deadline(DEADLINE)).await.unwrap();
    let sidecar = common::start_sidecar(common::test_config(upstream, Some(cert), client_keepalive)).await;
    let proxy = idle_proxy::start(sidecar.addr, IDLE_CUT).await;
    Chain { stats, sidecar, proxy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_json_pings_survive_the_idle_cut_only_with_client_pings() {
    let cert = common::test_cert();
    let cut = chain(&cert, "[client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n").await;
    let kept = chain(&cert, "[client_keepalive]\nping_interval = \"200ms\"\ntimeout = \"2s\"\n").await;
    let (results_tx, mut results) = mpsc::unbounded_channel();
    let page = serve_page(results_tx).await;
    let run_for = DEADLINE * 10;
    let url = format!(
        "http://127.0.0.1:{}/page?run_for={}&every={}&conn=cut:{}&conn=kept:{}",
        page.port(),
        run_for.as_millis(),
        JSON_PING.as_millis(),
        cut.proxy.addr.port(),
        kept.proxy.addr.port(),
    );
    let browser = Browser::launch(&url);

    let mut by_label = std::collections::HashMap::new();
    let limit = run_for + Duration::from_secs(20);
    let collected = tokio::time::timeout(limit, async {
        while by_label.len() < 2 {
            let Some(result) = results.recv().await else { break };
            let label = result["label"].as_str().unwrap_or("?").to_string();
            assert_ne!(label, "page-error", "the page failed: {result}");
            by_label.insert(label, result);
        }
    })
    .await;
    assert!(collected.is_ok(), "the page reported {by_label:?} within {limit:?}\nchromium's log:\n{}", browser.log());
    let (cut_result, kept_result) = (&by_label["cut"], &by_label["kept"]);

    // Without wskeep's pings, JSON pings every 700 ms leave 500 ms idle gaps: the proxy cuts it.
    assert_eq!(cut_result["opened"], true, "{cut_result}");
    assert_eq!(cut_result["code"], 1006, "the browser sees the cut as 1006: {cut_result}");
    assert_eq!(cut_result["alive_at_end"], false, "{cut_result}");
    let lifetime = cut_result["lifetime_ms"].as_u64().unwrap_or(0);
    assert!(lifetime < 3000, "cut at the first idle period, not after {lifetime} ms: {cut_result}");
    assert_eq!(cut.proxy.cuts(), 1, "the intermediary cut the connection");
    // wskeep saw the client vanish and told the upstream (1001), no bare drop.
    let told = tokio::time::timeout(Duration::from_secs(3), async {
        while !cut.stats.closes_received.lock().unwrap().contains(&1001) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(told.await.is_ok(), "upstream closes: {:?}", cut.stats.closes_received.lock().unwrap());

    // With them, the browser answers every ping, the proxy never sees an idle period, and
    // wskeep's answers to the upstream's pings keep the legacy deadline from firing.
    assert_eq!(kept_result["opened"], true, "{kept_result}");
    assert_eq!(kept_result["alive_at_end"], true, "open after 10 deadlines: {kept_result}");
    assert_eq!(kept_result["code"], Value::Null, "{kept_result}");
    let pings = kept_result["pings"].as_u64().unwrap();
    assert!(pings >= 12, "JSON pings every 700 ms for 10 s: {kept_result}");
    assert_eq!(kept_result["pongs"].as_u64(), Some(pings), "every JSON pong received: {kept_result}");
    assert_eq!(kept_result["bad_pongs"], 0, "{kept_result}");
    assert_eq!(kept.proxy.cuts(), 0);
    assert_eq!(kept.stats.deadlines_fired.load(Relaxed), 0, "the upstream's read deadline fired");
    assert_eq!(kept.stats.json_pings_answered.load(Relaxed), 0, "wskeep answers the JSON pings");
    let text = common::scrape(kept.sidecar.admin).await;
    let browser_pongs = common::metric(&text, r#"wskeep_pongs_received_total{side="client"}"#);
    assert!(browser_pongs >= 30.0, "the browser answered wskeep's pings ({browser_pongs})\n{text}");
    assert_eq!(common::metric(&text, "wskeep_json_pings_answered_total"), pings as f64);
    drop(browser);
}

/// Chromium loads a page from a compressing upstream (Python `websockets`) through wskeep over
/// HTTP/2, then opens its WebSocket as a stream of that connection (RFC 8441); its
/// permessage-deflate offer reaches the upstream and compression is agreed end to end, its JSON
/// ping is still answered by wskeep, and a repetitive stream crosses wskeep compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_compression_is_negotiated_end_to_end() {
    let cert = common::test_cert();
    let upstream = common::python::PythonUpstream::start().await;
    let sidecar =
        common::start_sidecar(common::test_config(([127, 0, 0, 1], upstream.port).into(), Some(&cert), "")).await;
    let browser = Browser::launch(&format!("https://127.0.0.1:{}/page", sidecar.addr.port()));
    let result = upstream.line_starting("result ", Duration::from_secs(30)).await;
    let result: Value = serde_json::from_str(&result.unwrap_or_else(|| {
        panic!("the page reported nothing\nchromium's log:\n{}", browser.log());
    }))
    .unwrap();

    let extensions = result["extensions"].as_str().unwrap_or_default();
    assert!(extensions.starts_with("permessage-deflate"), "the browser agreed to {extensions:?}: {result}");
    assert!(extensions.contains("client_no_context_takeover"), "{result}");
    let upstream_agreed = result["report"]["agreed"].as_str().unwrap_or_default();
    assert!(upstream_agreed.starts_with("permessage-deflate"), "the upstream agreed to {upstream_agreed:?}");
    assert_eq!(result["protocol_pong"], serde_json::json!({"type": "pong", "id": 9}), "{result}");
    assert_eq!(result["streamed"], 100, "{result}");

    let text = common::scrape(sidecar.admin).await;
    assert_eq!(common::metric(&text, "wskeep_compressed_connections_total"), 1.0, "{text}");
    assert_eq!(common::metric(&text, "wskeep_json_pings_answered_total"), 1.0, "{text}");
    let streamed = result["streamed_bytes"].as_f64().unwrap();
    let wire = common::metric(&text, "wskeep_message_bytes_total{direction=\"upstream_to_client\"}");
    assert!(streamed >= 100.0 * 1000.0 && wire < streamed / 5.0, "{wire} bytes written to the browser for {streamed}");
    // Chromium loaded the page over HTTP/2 and opened the WebSocket as a stream of that connection.
    let (_, live) = common::http_get(sidecar.admin, "/connections").await.unwrap();
    let live: Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live[0]["http_version"], "2", "{live}");
    assert_eq!(live[0]["compression"], "permessage-deflate", "{live}");
    drop(browser);
}
