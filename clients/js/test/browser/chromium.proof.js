// The proof in a real browser: Debian's Chromium ($CHROMIUM, default /usr/bin/chromium) runs a
// page that uses the shim through a TCP relay to the real wskeep ($WSKEEP_BIN) in front of a
// legacy upstream that knows nothing of resume. Both sides send numbered messages at 50/s while
// the test kills the relay three times (the browser's connection dies without a close frame;
// each gap far shorter than the grace), then freezes it once (a path that dies silently, which
// only the shim's missing acks reveal): every message arrives once and in order on both sides,
// and the upstream saw one connection and no close. tests/js_client.rs runs it.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { startUpstream } from "../support/upstream.js";
import { startRelay } from "../support/relay.js";
import { startWskeep, metric } from "../support/wskeep.js";
import { eventually, numbered } from "../support/util.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SHIM = join(dirname(fileURLToPath(import.meta.url)), "../../wskeep-resume.js");
const N = 300; // 6 s at 50/s each way
const EVERY_MS = 20;
/** The shim's ackTimeoutMs: well above wskeep's 1 s ack cadence. */
const ACK_TIMEOUT_MS = 3000;

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>wskeep resume proof</title>
<script>
window.onerror = (message) => { fetch("/result", { method: "POST", body: JSON.stringify({ pageError: String(message) }) }); };
</script>
<script type="module">
import { WskeepSocket } from "/wskeep-resume.js";
const params = new URLSearchParams(location.search);
const n = Number(params.get("n")), every = Number(params.get("every"));
const r = { received: [], sent: 0, opens: 0, closes: [], errors: 0, resumed: [], resets: [], notOpen: 0 };
const ws = new WskeepSocket(params.get("ws"), [], { ackTimeoutMs: Number(params.get("ack_timeout")) });
ws.onopen = () => {
  r.opens += 1;
  const timer = setInterval(() => {
    if (r.sent >= n) return clearInterval(timer);
    if (ws.readyState !== WebSocket.OPEN) r.notOpen += 1;
    ws.send("c" + r.sent);
    r.sent += 1;
  }, every);
};
ws.onmessage = (e) => {
  r.received.push(e.data);
  if (r.received.length === n) fetch("/result", { method: "POST", body: JSON.stringify(r) });
};
ws.onclose = (e) => { r.closes.push(e.code); fetch("/result", { method: "POST", body: JSON.stringify(r) }); };
ws.onerror = () => { r.errors += 1; };
ws.addEventListener("resumed", (e) => r.resumed.push(e.detail));
ws.addEventListener("reset", (e) => r.resets.push(e.detail));
</script></head><body>wskeep resume proof</body></html>`;

/** Serves the page and the shim; hands every POSTed result to `onresult`. */
async function servePage(onresult) {
  const server = createServer((req, res) => {
    const path = req.url.split("?")[0];
    if (req.method === "GET" && path === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" }).end(PAGE);
    } else if (req.method === "GET" && path === "/wskeep-resume.js") {
      res.writeHead(200, { "content-type": "text/javascript", "cache-control": "no-store" }).end(readFileSync(SHIM));
    } else if (req.method === "POST" && path === "/result") {
      let body = "";
      req.setEncoding("utf8");
      req.on("data", (c) => { body += c; });
      req.on("end", () => { onresult(JSON.parse(body)); res.writeHead(200).end("ok"); });
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { port: server.address().port, close: () => new Promise((resolve) => server.close(resolve)) };
}

/** Headless Chromium in its own process group, ended (group, by id) by `stop()`. */
function launchChromium(url) {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium (.ci/install.sh)`);
  const profile = mkdtempSync(join(tmpdir(), "wskeep-chromium-"));
  let log = "";
  const child = spawn(CHROMIUM, [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    `--user-data-dir=${join(profile, "profile")}`, url,
  ], { detached: true, stdio: ["ignore", "ignore", "pipe"] });
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (c) => { log = (log + c).slice(-20000); });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  return {
    log: () => log,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        // The whole group (its renderers and helpers), by the id of the group this test made.
        try { process.kill(-child.pid, "SIGKILL"); } catch { /* gone */ }
        await exited;
      }
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

test("Chromium through three cuts of its path: every message once and in order both ways, one upstream connection, no close", async () => {
  const upstream = await startUpstream();
  after(() => upstream.close());
  const wskeep = await startWskeep(upstream.port);
  after(() => wskeep.stop());
  const relay = await startRelay(wskeep.port);
  after(() => relay.stop().catch(() => {}));
  let result = null;
  const page = await servePage((r) => { result = r; });
  after(() => page.close());
  const wsUrl = `ws://127.0.0.1:${relay.port}/agent?count=${N}&every=${EVERY_MS}`;
  const url = `http://127.0.0.1:${page.port}/?n=${N}&every=${EVERY_MS}&ack_timeout=${ACK_TIMEOUT_MS}`
    + `&ws=${encodeURIComponent(wsUrl)}`;
  const browser = launchChromium(url);
  after(() => browser.stop());
  const from = () => `\nchromium:\n${browser.log()}\nwskeep:\n${wskeep.log()}`;
  await upstream.until(() => upstream.connections.length === 1, 20000, "the page's connection").catch((e) => {
    throw new Error(e.message + from());
  });
  const session = upstream.connections[0];
  for (const at of [60, 120, 180]) {
    await upstream.until(() => session.received.length >= at, 10000, `${at} page messages`);
    assert.equal(result?.pageError, undefined, JSON.stringify(result));
    await relay.stop();
    // The gap: both sides go on sending (about 200 ms), then the path comes back.
    const [u, c] = [session.sent, session.received.length];
    await upstream.until(() => session.sent >= u + 10, 5000, "upstream sends during the gap");
    await relay.start();
    await upstream.until(() => session.received.length >= c + 10, 10000, "page sends after the gap");
  }
  // The silent drop: the path stops carrying anything but never closes. The shim notices that
  // wskeep stopped acknowledging, and resumes on a new connection; the old path then comes back
  // to life with what it held, which neither side may take twice.
  await upstream.until(() => session.received.length >= 200, 10000, "200 page messages");
  const accepted = relay.accepted;
  relay.freeze();
  await upstream.until(() => relay.accepted > accepted && session.received.length >= 220, 15000, "the resume after the silent drop")
    .catch((e) => { throw new Error(e.message + from()); });
  relay.thaw();
  await eventually(() => result !== null && session.received.length >= N, 15000, "every message both ways").catch((e) => {
    throw new Error(`${e.message}: page ${JSON.stringify(result)}, upstream got ${session.received.length}${from()}`);
  });
  assert.equal(result.pageError, undefined, JSON.stringify(result));
  assert.deepEqual(result.received, numbered("u", N), "the page got every upstream message once, in order");
  assert.deepEqual(session.received, numbered("c", N), "the upstream got every page message once, in order");
  assert.equal(upstream.connections.length, 1, "the upstream saw one connection");
  assert.equal(session.close, undefined, "the upstream saw no close");
  assert.equal(result.resumed.length, 4, `four resumes: ${JSON.stringify(result.resumed)}`);
  assert.ok(relay.accepted >= 5, `the browser reconnected through the relay (${relay.accepted})`);
  assert.deepEqual([result.opens, result.closes, result.errors, result.resets.length, result.notOpen], [1, [], 0, 0, 0],
    JSON.stringify(result));
  const text = await wskeep.metrics();
  assert.equal(metric(text, "wskeep_resume_sessions_resumed_total"), 4, text);
  assert.match(wskeep.log(), /"session resumed".*"half_open":true/, "the frozen leg was replaced");
});
