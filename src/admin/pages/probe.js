// wskeep's connection stability test: one WebSocket from this browser, a JSON ping every
// interval, a timeline of each ping and its pong, and the close code in plain words at the end.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let meanings = {};
let run = null;

const $ = (id) => document.getElementById(id);

function meaning(code) {
  if (meanings[code]) return meanings[code];
  if (code >= 3000 && code <= 3999) return meanings["3000"] || "";
  if (code >= 4000 && code <= 4999) return meanings["4000"] || "";
  return "not a valid close code";
}

function fmt(ms) {
  return ms < 1000 ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(1) + " s";
}

function defaultUrl() {
  const b = document.body.dataset;
  // Served on the proxy port itself (listen.probe_path): that port is the default target.
  if (!b.port) return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
  const host = b.host || location.hostname;
  return `${b.scheme}://${host.includes(":") && !host.startsWith("[") ? "[" + host + "]" : host}:${b.port}/`;
}

function start(event) {
  event.preventDefault();
  if (run) return;
  const url = $("url").value.trim();
  const every = Number($("interval").value) * 1000;
  const duration = Number($("duration").value) * 1000;
  const error = $("error");
  error.classList.add("hidden");
  if (!/^wss?:\/\//i.test(url) || !(every > 0) || !(duration > 0)) {
    error.textContent = "Enter a ws:// or wss:// URL, a ping interval and a duration above zero.";
    error.classList.remove("hidden");
    return;
  }
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (e) {
    error.textContent = "Cannot open that URL: " + e.message;
    error.classList.remove("hidden");
    return;
  }
  run = { ws, url, every, duration, opened: null, startedAt: new Date(), sent: 0, received: 0, pings: [],
          pongs: 0, lastRtt: null, timers: [], finished: false, survived: false };
  $("start").disabled = true;
  $("stop").disabled = false;
  $("copy").disabled = true;
  $("report").value = "";
  $("verdict").className = "verdict hidden";
  $("timeline-list").replaceChildren();
  setText("state", "connecting");
  ws.onopen = () => {
    run.opened = performance.now();
    setText("state", "open");
    ping(); // at once too: the first RTT, and the timeline starts at 0
    run.timers.push(setInterval(ping, every));
    run.timers.push(setInterval(tick, 250));
    run.timers.push(setTimeout(() => {
      run.survived = true;
      ws.close(1000, "stability test finished");
    }, duration));
  };
  ws.onmessage = (m) => {
    run.received++;
    let data = null;
    try { data = JSON.parse(m.data); } catch (_) {}
    if (data && data.type === "pong" && typeof data.id === "number") {
      const p = run.pings[data.id - 1];
      if (p && p.rtt === null) {
        p.rtt = performance.now() - p.at;
        run.pongs++;
        run.lastRtt = p.rtt;
        p.item.textContent = `${fmt(p.at - run.opened)}: ping ${data.id} → pong after ${fmt(p.rtt)}`;
        p.item.dataset.rtt = p.rtt.toFixed(1);
      }
    }
    tick();
  };
  ws.onclose = (e) => finish(e.code, e.reason, e.wasClean);
}

function ping() {
  const id = run.pings.length + 1;
  const at = performance.now();
  run.ws.send(JSON.stringify({ type: "ping", id, ts: Date.now() }));
  run.sent++;
  const item = document.createElement("li");
  item.textContent = `${fmt(at - run.opened)}: ping ${id} → waiting for its pong`;
  $("timeline-list").append(item);
  run.pings.push({ id, at, rtt: null, item });
  tick();
}

function setText(id, text) {
  $(id).textContent = String(text);
}

function lifetime() {
  return run.opened === null ? 0 : (run.closedAt || performance.now()) - run.opened;
}

function tick() {
  setText("lifetime", run.opened === null ? "—" : fmt(lifetime()));
  setText("sent", run.sent);
  setText("received", run.received);
  setText("pings", run.pings.length);
  setText("pongs", run.pongs);
  setText("last-rtt", run.lastRtt === null ? "—" : fmt(run.lastRtt));
  drawTimeline();
}

function drawTimeline() {
  const svg = $("timeline");
  const W = 640, H = 60, span = Math.max(run.duration, lifetime());
  const x = (t) => 4 + ((W - 8) * t) / span;
  const parts = [svgEl("line", { x1: 4, y1: 40, x2: W - 4, y2: 40, class: "axis" })];
  if (run.opened !== null) parts.push(svgEl("line", { x1: 4, y1: 40, x2: x(lifetime()), y2: 40, class: "line" }));
  for (const p of run.pings) {
    const t = p.at - run.opened;
    const mark = svgEl("rect", { x: x(t) - 1.5, y: p.rtt === null ? 30 : 18, width: 3, height: p.rtt === null ? 10 : 22,
                                 class: p.rtt === null ? "bar" : "bar upstream" });
    mark.append(svgEl("title", {}, p.rtt === null ? `ping ${p.id}: no pong` : `ping ${p.id}: ${fmt(p.rtt)}`));
    parts.push(mark);
  }
  parts.push(svgEl("text", { x: 4, y: 56 }, "0"), svgEl("text", { x: W - 4, y: 56, "text-anchor": "end" }, fmt(span)));
  svg.replaceChildren(...parts);
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function finish(code, reason, wasClean) {
  if (!run || run.finished) return;
  run.finished = true;
  run.closedAt = performance.now();
  run.timers.forEach((t) => { clearInterval(t); clearTimeout(t); });
  tick();
  const opened = run.opened !== null;
  const survived = run.survived && opened;
  setText("state", survived ? "finished" : opened ? "closed" : "failed to connect");
  const verdict = $("verdict");
  const explained = `${code}${reason ? ` "${reason}"` : ""}: ${meaning(code)}`;
  verdict.dataset.outcome = survived ? "survived" : run.stopped ? "stopped" : "closed";
  verdict.dataset.code = code;
  verdict.className = "verdict " + (survived ? "survived" : "closed");
  verdict.textContent = survived
    ? `Survived the whole test (${fmt(run.duration)}); closed by this page with ${explained}.`
    : run.stopped
      ? `Stopped by you after ${fmt(lifetime())}.`
      : opened
      ? `Closed after ${fmt(lifetime())}, before the test's end, with close code ${explained}.`
      : `Could not connect (close code ${explained}). Check the URL, and for wss:// whether this browser trusts the certificate.`;
  const unanswered = run.pings.filter((p) => p.rtt === null).length;
  const rtts = run.pings.filter((p) => p.rtt !== null).map((p) => p.rtt);
  const report = [
    "wskeep stability test",
    `url: ${run.url.replace(/\?.*$/, "?…")}`,
    `started: ${run.startedAt.toISOString()}`,
    `json ping every: ${fmt(run.every)}; planned duration: ${fmt(run.duration)}`,
    `result: ${survived ? "survived" : run.stopped ? "stopped" : opened ? "closed early" : "no connection"}`,
    `lifetime: ${fmt(lifetime())}`,
    `close code: ${code}; reason: ${reason || "(none)"}; clean: ${wasClean}`,
    `meaning: ${meaning(code)}`,
    `messages sent: ${run.sent}; received: ${run.received}`,
    `json pings: ${run.pings.length}; pongs: ${run.pongs}; unanswered: ${unanswered}`,
    `rtt ms: ${rtts.length ? `min ${Math.min(...rtts).toFixed(1)}, max ${Math.max(...rtts).toFixed(1)}, last ${rtts[rtts.length - 1].toFixed(1)}` : "none"}`,
    `user agent: ${navigator.userAgent}`,
  ].join("\n");
  $("report").value = report;
  $("copy").disabled = false;
  $("start").disabled = false;
  $("stop").disabled = true;
  run = null;
}

async function copyReport() {
  const text = $("report").value;
  try {
    await navigator.clipboard.writeText(text);
    setText("copied", "copied");
  } catch (_) {
    $("report").select();
    setText("copied", document.execCommand("copy") ? "copied" : "select the text and copy it");
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("url").value = defaultUrl();
  $("form").addEventListener("submit", start);
  $("stop").addEventListener("click", () => {
    if (!run) return;
    run.stopped = true;
    run.ws.close(1000, "stopped by the user");
  });
  $("copy").addEventListener("click", copyReport);
  try {
    meanings = await (await fetch(document.body.dataset.codes, { cache: "no-store" })).json();
  } catch (_) {
    meanings = {};
  }
});
