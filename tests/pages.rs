//! The pages people look at, in a real browser against the real binary: Debian's Chromium,
//! driven by playwright-core (`tests/pages/driver.mjs`), through the status page `/` (a
//! connection a test client holds open, then its ending with the right reason and the close
//! codes in plain words) and the stability test page `/probe` (pointed through an idle-cutting
//! proxy at the legacy upstream: cut with 1006 when wskeep's client pings are off, alive for the
//! whole run when they are on). Screenshots land in `target/pages-screenshots/`.
//!
//! Needs /usr/bin/chromium and `npm ci` in tests/pages (both done by .ci/install.sh); the tests
//! fail, they do not skip, without them.

mod common;
mod idle_proxy;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::Wskeep;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wskeep::tools::legacy_upstream::{self, LegacyOptions};

const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT_MS: u64 = 10_000;
/// `listen.probe_path` of the kept run: the test page on the proxy port.
const PROBE_PATH: &str = "/wskeep/probe";

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("pages-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The driver's stdin and stdout; `None` once the test has closed it.
type Pipes = Arc<Mutex<Option<(ChildStdin, BufReader<ChildStdout>)>>>;

/// `node tests/pages/driver.mjs`: one JSON command per line in, one answer per line out.
struct Driver {
    child: Child,
    io: Pipes,
}

impl Driver {
    fn launch() -> Driver {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pages");
        assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: apt-get install -y chromium (.ci/install.sh)");
        assert!(
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core is missing: run `npm ci` in tests/pages (.ci/install.sh does)"
        );
        let mut child = Command::new("node")
            .arg("driver.mjs")
            .current_dir(&dir)
            .env("CHROMIUM", CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (apt-get install -y nodejs npm)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Driver { child, io: Arc::new(Mutex::new(Some((stdin, stdout)))) }
    }

    /// Runs one command; `Err` carries the driver's error (a selector that never appeared...).
    async fn try_cmd(&self, command: Value) -> Result<Value, String> {
        let io = self.io.clone();
        let line = command.to_string();
        tokio::task::spawn_blocking(move || {
            let mut io = io.lock().unwrap();
            let io = io.as_mut().ok_or("driver closed")?;
            writeln!(io.0, "{line}").map_err(|e| format!("driver gone: {e}"))?;
            let mut answer = String::new();
            io.1.read_line(&mut answer).map_err(|e| format!("driver gone: {e}"))?;
            let answer: Value = serde_json::from_str(&answer).map_err(|e| format!("driver said {answer:?}: {e}"))?;
            if answer["ok"] == true {
                Ok(answer["value"].clone())
            } else {
                Err(format!("{line}: {}", answer["error"]))
            }
        })
        .await
        .unwrap()
    }

    async fn cmd(&self, command: Value) -> Value {
        self.try_cmd(command).await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn goto(&self, url: String) {
        self.cmd(json!({ "cmd": "goto", "url": url })).await;
    }

    async fn until(&self, expr: &str, timeout_ms: u64) {
        if let Err(e) = self.try_cmd(json!({ "cmd": "until", "expr": expr, "timeout_ms": timeout_ms })).await {
            let body = self.eval("document.body.innerText").await;
            panic!("{e}\n--- the page shows ---\n{}", body.as_str().unwrap_or(""));
        }
    }

    async fn text(&self, selector: &str) -> String {
        self.cmd(json!({ "cmd": "text", "selector": selector })).await.as_str().unwrap_or("").to_string()
    }

    async fn eval(&self, expr: &str) -> Value {
        self.cmd(json!({ "cmd": "eval", "expr": expr })).await
    }

    async fn fill(&self, selector: &str, value: &str) {
        self.cmd(json!({ "cmd": "fill", "selector": selector, "value": value })).await;
    }

    async fn click(&self, selector: &str) {
        self.cmd(json!({ "cmd": "click", "selector": selector })).await;
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let path = screenshots().join(name);
        self.cmd(json!({ "cmd": "screenshot", "path": path })).await;
        path
    }

    /// Console errors so far (a Content-Security-Policy violation is one).
    async fn errors(&self) -> Vec<String> {
        let value = self.cmd(json!({ "cmd": "errors" })).await;
        value.as_array().unwrap().iter().map(|v| v.as_str().unwrap_or("").to_string()).collect()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Closing stdin ends the driver's loop: it closes Chromium and removes its profile.
        // Whatever is still running after a bounded wait is killed (its own id).
        drop(self.io.lock().unwrap_or_else(|e| e.into_inner()).take());
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(port: u16, admin: u16, upstream: SocketAddr, client_keepalive: &str, listen_extra: &str) -> String {
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n{listen_extra}\n[admin]\naddr = \"127.0.0.1:{admin}\"\n\
         [upstream]\nurl = \"ws://{upstream}\"\n[client_keepalive]\n{client_keepalive}\n\
         [log]\nlevel = \"info\"\nformat = \"json\"\n"
    )
}

/// A test client that holds its connection open (answering wskeep's pings) until told to close
/// it with a code, or to drop its TCP connection without a word.
struct Held {
    end: oneshot::Sender<Option<u16>>,
    done: tokio::task::JoinHandle<()>,
}

async fn hold(addr: SocketAddr, path: &str) -> Held {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, Duration::from_secs(5)).await, Some(Message::text("hello")));
    let (end, mut told) = oneshot::channel::<Option<u16>>();
    let done = tokio::spawn(async move {
        loop {
            tokio::select! {
                how = &mut told => {
                    if let Ok(Some(code)) = how {
                        let frame = CloseFrame { code: CloseCode::from(code), reason: "bye".into() };
                        ws.send(Message::Close(Some(frame))).await.unwrap();
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                    return; // dropped: the TCP connection goes without a close frame
                }
                message = ws.next() => if message.is_none() { return },
            }
        }
    });
    Held { end, done }
}

impl Held {
    async fn close(self, code: Option<u16>) {
        self.end.send(code).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.done).await.unwrap().unwrap();
    }
}

/// A `#endings` row's text, by the connection's path.
async fn ending_row(driver: &Driver, path: &str, end: &str) -> String {
    let selector = format!("#endings tbody tr[data-path=\"{path}\"][data-end=\"{end}\"]");
    driver.until(&format!("document.querySelector('{selector}')"), WAIT_MS).await;
    driver.text(&selector).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_connections_then_their_endings_in_plain_words() {
    let (upstream, _stats) =
        legacy_upstream::start(([127, 0, 0, 1], 0).into(), LegacyOptions::with_deadline(Duration::from_secs(30)))
            .await
            .unwrap();
    let keepalive = "ping_interval = \"200ms\"\ntimeout = \"5s\"";
    let wskeep = Wskeep::start_with(|port, admin| config(port, admin, upstream, keepalive, "")).await;
    let a = hold(wskeep.addr, "/voice/a?token=SECRET-A").await;
    let b = hold(wskeep.addr, "/voice/b?token=SECRET-B").await;

    let driver = Driver::launch();
    driver.goto(format!("http://{}/", wskeep.admin)).await;
    // Both rows, each with a client RTT measured from wskeep's pings.
    let rows = "document.querySelectorAll('#live tbody tr[data-id]')";
    driver
        .until(&format!("{rows}.length === 2 && [...{rows}].every(r => !r.cells[5].innerText.includes('—'))"), WAIT_MS)
        .await;
    let row_a = driver.text("#live tbody tr[data-path=\"/voice/a\"]").await;
    assert!(row_a.contains("127.0.0.1:") && row_a.contains("/voice/a") && row_a.contains("ms"), "{row_a}");
    let page = driver.text("body").await;
    assert!(!page.contains("SECRET") && !page.contains("?token"), "no query string on the page:\n{page}");
    assert!(page.contains("2 open"), "{page}");

    // Sorting goes to the server: a click on "id" sorts by it, newest first, a second click flips it.
    let ids = format!("[...{rows}].map(r => r.dataset.id).join()");
    driver.click("#live th[data-sort=id]").await;
    driver.until(&format!("{ids} === '2,1'"), WAIT_MS).await;
    driver.click("#live th[data-sort=id]").await;
    driver.until(&format!("{ids} === '1,2'"), WAIT_MS).await;

    // The filter goes to the server: only the matching connection comes back.
    driver.fill("#filter", "/voice/b").await;
    driver.until(&format!("{rows}.length === 1 && {rows}[0].dataset.path === '/voice/b'"), WAIT_MS).await;
    assert!(driver.text("#live-count").await.contains("1 shown of 1 matching, 2 open"));
    driver.fill("#filter", "").await;
    driver.until(&format!("{rows}.length === 2"), WAIT_MS).await;

    // A closes properly, B's TCP connection vanishes.
    a.close(Some(1000)).await;
    let ended_a = ending_row(&driver, "/voice/a", "client_close").await;
    assert!(ended_a.contains("1000 / 1000"), "client: received 1000 and answered it: {ended_a}");
    assert!(ended_a.contains("1000: normal closure"), "{ended_a}");
    driver.until(&format!("{rows}.length === 1"), WAIT_MS).await;
    // The charts are drawn from the same JSON: one ending so far, the line of open connections.
    driver.until("document.querySelectorAll('#chart-ends rect').length === 7", WAIT_MS).await;
    assert_eq!(driver.eval("document.querySelector('#chart-ends rect title').textContent").await, "client_close: 1");
    assert_eq!(driver.eval("document.querySelectorAll('#chart-open path').length").await, 1);
    let shot = driver.screenshot("status.png").await;

    b.close(None).await;
    let ended_b = ending_row(&driver, "/voice/b", "client_error").await;
    assert!(ended_b.contains("1006 / —"), "client: no close frame, nothing sent: {ended_b}");
    assert!(ended_b.contains("1001 / 1001"), "upstream was sent 1001 and answered it: {ended_b}");
    assert!(ended_b.contains("1006: no close frame; a hop dropped the TCP connection"), "{ended_b}");
    driver.until("document.querySelector('#live tbody').innerText.includes('no open connection')", WAIT_MS).await;

    // The same endings as JSON, newest first; the page's headers.
    let ended = driver.eval("fetch('/connections?ended=1').then(r => r.json())").await;
    let ends: Vec<&str> = ended.as_array().unwrap().iter().map(|e| e["end"].as_str().unwrap()).collect();
    assert_eq!(ends, ["client_error", "client_close"], "{ended}");
    assert_eq!(ended[0]["path"], "/voice/b");
    let csp = driver.eval("fetch('/').then(r => r.headers.get('content-security-policy'))").await;
    assert!(csp.as_str().unwrap().starts_with("default-src 'none'; script-src 'self'"), "{csp}");
    assert_eq!(driver.errors().await, Vec::<String>::new(), "no console error (CSP violations are)");
    assert!(shot.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_page_reports_an_idle_cut_as_1006_and_survives_with_client_pings() {
    // The legacy upstream's pong-only read deadline (wskeep answers its pings on both runs), an
    // intermediary that cuts 500 ms of silence, and JSON pings every 700 ms from the page.
    let (upstream, _stats) =
        legacy_upstream::start(([127, 0, 0, 1], 0).into(), LegacyOptions::with_deadline(Duration::from_secs(1)))
            .await
            .unwrap();
    let off = "ping_interval = \"0s\"\ntimeout = \"0s\"";
    let on = "ping_interval = \"200ms\"\ntimeout = \"2s\"";
    let cut = Wskeep::start_with(|port, admin| config(port, admin, upstream, off, "")).await;
    let probe_path = format!("probe_path = \"{PROBE_PATH}\"");
    let kept = Wskeep::start_with(|port, admin| config(port, admin, upstream, on, &probe_path)).await;
    let cut_proxy = idle_proxy::start(cut.addr, Duration::from_millis(500)).await;
    let kept_proxy = idle_proxy::start(kept.addr, Duration::from_millis(500)).await;

    let driver = Driver::launch();
    // The cut run loads the page from the admin port, the kept run from the proxy port.
    let run = |page: String, own: SocketAddr, proxy: SocketAddr| {
        let driver = &driver;
        async move {
            driver.goto(page).await;
            driver.until("document.getElementById('url').value !== ''", WAIT_MS).await;
            let default = driver.eval("document.getElementById('url').value").await;
            assert_eq!(default, format!("ws://{own}/"), "the default target is this wskeep's own proxy");
            driver.fill("#url", &format!("ws://{proxy}/probe?token=SECRET")).await;
            driver.fill("#interval", "0.7").await;
            driver.fill("#duration", "4").await;
            driver.click("#start").await;
            driver.until("document.getElementById('verdict').dataset.outcome", 15_000).await;
        }
    };

    run(format!("http://{}/probe", cut.admin), cut.addr, cut_proxy.addr).await;
    assert_eq!(driver.eval("document.getElementById('verdict').dataset.outcome").await, "closed");
    assert_eq!(driver.eval("document.getElementById('verdict').dataset.code").await, "1006");
    let verdict = driver.text("#verdict").await;
    assert!(verdict.contains("1006: no close frame; a hop dropped the TCP connection"), "{verdict}");
    let report = driver.eval("document.getElementById('report').value").await;
    let report = report.as_str().unwrap();
    assert!(report.contains("result: closed early") && report.contains("close code: 1006"), "{report}");
    assert!(!report.contains("SECRET"), "the report leaves the query string out: {report}");
    assert_eq!(cut_proxy.cuts(), 1, "the intermediary cut it");
    driver.screenshot("probe-cut.png").await;

    // listen.probe_path is off by default: the path is the upstream's; on, wskeep serves the page.
    let (_, upstream_answer) = common::http_get(cut.addr, PROBE_PATH).await.unwrap();
    assert!(!upstream_answer.contains("stability test"), "{upstream_answer}");
    run(format!("http://{}{PROBE_PATH}", kept.addr), kept.addr, kept_proxy.addr).await;
    assert_eq!(driver.eval("getComputedStyle(document.querySelector('nav')).display").await, "none");
    let verdict = driver.text("#verdict").await;
    assert_eq!(driver.eval("document.getElementById('verdict').dataset.outcome").await, "survived", "{verdict}");
    assert_eq!(driver.eval("document.getElementById('verdict').dataset.code").await, "1000");
    let pings: u64 = driver.text("#pings").await.parse().unwrap();
    let pongs: u64 = driver.text("#pongs").await.parse().unwrap();
    assert!(pings >= 5, "a JSON ping every 700 ms for 4 s: {pings}");
    assert_eq!(pongs, pings, "every JSON ping answered");
    let timeline = driver.eval("[...document.querySelectorAll('#timeline-list li')].map(li => li.innerText)").await;
    let timeline: Vec<&str> = timeline.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(timeline.len() as u64, pings);
    assert!(timeline.iter().all(|t| t.contains("→ pong after")), "{timeline:?}");
    assert_eq!(kept_proxy.cuts(), 0);
    driver.screenshot("probe-kept.png").await;
    assert_eq!(driver.errors().await, Vec::<String>::new(), "no console error (CSP violations are)");
}
