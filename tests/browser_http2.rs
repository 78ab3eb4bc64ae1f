//! A real browser over HTTP/2: headless Chromium loads a page through wskeep (TLS, ALPN `h2`)
//! from the upstream, then opens `wss://` to the same origin, which Chromium does as an extended
//! CONNECT stream of the HTTP/2 connection it already has (RFC 8441). The page sends JSON pings;
//! the upstream sends protocol pings and counts the pongs; wskeep's metrics must show the
//! WebSocket went over HTTP/2, its JSON pings answered, and the upstream's pings answered.
//!
//! Needs Debian's `chromium` at /usr/bin/chromium; the test fails (it does not skip) without it.

mod common;

use common::chromium::Browser;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// How long the page keeps its WebSocket, sending a JSON ping every `EVERY`.
const RUN_FOR: Duration = Duration::from_millis(2500);
const EVERY: Duration = Duration::from_millis(200);
/// The upstream's protocol ping period.
const UPSTREAM_PING: Duration = Duration::from_millis(200);

/// The page: a WebSocket to its own origin, a JSON ping every `every` ms for `run_for` ms, then
/// a POST of what it saw to /result (through wskeep too).
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wskeep over HTTP/2</title></head><body><script>
"use strict";
const params = new URLSearchParams(location.search);
const RUN_FOR = Number(params.get("run_for"));
const EVERY = Number(params.get("every"));
const r = { opened: false, pings: 0, pongs: 0, bad_pongs: 0, code: null, alive_at_end: false,
            protocol: performance.getEntriesByType("navigation")[0].nextHopProtocol };
const report = () => fetch("/result", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(r) });
window.onerror = (message) => { r.error = String(message); report(); };
const ws = new WebSocket("wss://" + location.host + "/voice");
let timer = null;
ws.onopen = () => {
  r.opened = true;
  timer = setInterval(() => { r.pings += 1; ws.send(JSON.stringify({ type: "ping", id: r.pings })); }, EVERY);
  setTimeout(() => {
    clearInterval(timer);
    setTimeout(() => { r.alive_at_end = ws.readyState === WebSocket.OPEN; report().then(() => setTimeout(() => ws.close(1000, "done"), 3000)); }, 300);
  }, RUN_FOR);
};
ws.onmessage = (event) => {
  let m = null;
  try { m = JSON.parse(event.data); } catch (_) {}
  if (m && m.type === "pong" && m.id === r.pongs + 1) r.pongs += 1; else r.bad_pongs += 1;
};
ws.onclose = (event) => { r.code = event.code; if (!r.alive_at_end) report(); clearInterval(timer); };
</script></body></html>
"#;

/// The upstream: plain HTTP/1.1 for the page and the result, WebSocket for `/voice`, where it
/// pings every `UPSTREAM_PING` and counts the pongs.
struct Upstream {
    addr: std::net::SocketAddr,
    pongs: Arc<AtomicU64>,
    results: mpsc::UnboundedReceiver<Value>,
}

async fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pongs = Arc::new(AtomicU64::new(0));
    let (tx, results) = mpsc::unbounded_channel();
    let counted = pongs.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp, tx.clone(), counted.clone()));
        }
    });
    Upstream { addr, pongs, results }
}

/// Looks at the request head without taking it, then serves a WebSocket or plain requests.
async fn serve(tcp: TcpStream, results: mpsc::UnboundedSender<Value>, pongs: Arc<AtomicU64>) {
    let mut peeked = vec![0u8; 8192];
    for _ in 0..200 {
        let Ok(n) = tcp.peek(&mut peeked).await else { return };
        let head = String::from_utf8_lossy(&peeked[..n]).to_ascii_lowercase();
        if head.contains("\r\n\r\n") {
            if head.contains("upgrade: websocket") {
                return websocket(tcp, pongs).await;
            }
            return common::chromium::serve_page(tcp, PAGE, results).await;
        }
        // The head is still arriving (peek returns what is there).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn websocket(tcp: TcpStream, pongs: Arc<AtomicU64>) {
    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else { return };
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(UPSTREAM_PING);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if sink.send(Message::Ping(b"upstream".to_vec().into())).await.is_err() {
                    return;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Pong(_))) => { pongs.fetch_add(1, Relaxed); }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_its_websocket_over_http2() {
    let cert = common::test_cert();
    let mut upstream = upstream().await;
    let keepalive = "[client_keepalive]\nping_interval = \"200ms\"\ntimeout = \"5s\"\n";
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), keepalive)).await;
    let url = format!(
        "https://127.0.0.1:{}/page?run_for={}&every={}",
        sidecar.addr.port(),
        RUN_FOR.as_millis(),
        EVERY.as_millis()
    );
    let browser = Browser::launch(&url);
    let limit = RUN_FOR + Duration::from_secs(20);
    let result = tokio::time::timeout(limit, upstream.results.recv()).await;
    let Ok(Some(result)) = result else {
        panic!("no result from the page within {limit:?}\nchromium's log:\n{}", browser.log());
    };
    assert_eq!(result["protocol"], "h2", "the page itself came over HTTP/2: {result}");
    assert_eq!(result["opened"], true, "{result}");
    assert_eq!(result["alive_at_end"], true, "{result}");
    let pings = result["pings"].as_u64().unwrap();
    assert!(pings >= 8, "JSON pings every 200 ms for 2.5 s: {result}");
    assert_eq!(result["pongs"].as_u64(), Some(pings), "every JSON pong received: {result}");
    assert_eq!(result["bad_pongs"], 0, "{result}");

    // The page keeps its WebSocket 3 s after its report: it is still listed.
    let (_, list) = common::http_get(sidecar.admin, "/connections").await.unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["http_version"], "2", "{list}");
    let text = common::scrape(sidecar.admin).await;
    let series = |name: &str| common::metric(&text, name);
    assert_eq!(series(r#"wskeep_websocket_upgrades_total{http_version="2"}"#), 1.0, "over HTTP/2:\n{text}");
    assert_eq!(series(r#"wskeep_websocket_upgrades_total{http_version="1.1"}"#), 0.0, "{text}");
    assert_eq!(series("wskeep_json_pings_answered_total"), pings as f64, "{text}");
    // wskeep answered the upstream's pings (the browser never sees them) and the upstream got
    // the pongs; the browser answered wskeep's own pings.
    let answered = series(r#"wskeep_pings_answered_total{side="upstream"}"#);
    assert!(answered >= 8.0, "upstream pings answered by wskeep: {answered}\n{text}");
    assert!(upstream.pongs.load(Relaxed) >= 8, "the upstream got {} pongs", upstream.pongs.load(Relaxed));
    let browser_pongs = series(r#"wskeep_pongs_received_total{side="client"}"#);
    assert!(browser_pongs >= 8.0, "the browser answered wskeep's pings ({browser_pongs})\n{text}");
    drop(browser);
}
