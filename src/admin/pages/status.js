// wskeep's status page: polls /status.json (bounded server-side: top rows by the chosen sort,
// filtered by path) and draws the tables and charts. Everything is built with DOM calls and
// textContent, so nothing from the server is ever parsed as HTML.
"use strict";

const REFRESH_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const state = { sort: "age", order: "desc", path: "", limit: "100" };
let timer = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function seconds(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function rtt(s) {
  if (s === null || s === undefined) return "—";
  return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
}

function code(c) {
  return c === null || c === undefined ? "—" : String(c);
}

async function refresh() {
  clearTimeout(timer);
  if (document.hidden) return; // a hidden tab costs wskeep nothing; "visibilitychange" resumes
  const q = new URLSearchParams({ sort: state.sort, order: state.order, limit: state.limit });
  if (state.path) q.set("path", state.path);
  try {
    const response = await fetch("/status.json?" + q.toString(), { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach wskeep's admin port: " + e.message;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function render(s) {
  const live = s.live;
  document.getElementById("summary").textContent =
    `version ${s.version} · ${live.open} open · ${s.ended_total} ended since start` +
    (s.draining ? " · DRAINING" : "") + ` · updated ${new Date(s.now * 1000).toLocaleTimeString()}`;
  document.getElementById("live-count").textContent =
    `(${live.connections.length} shown of ${live.matched} matching, ${live.open} open)`;
  renderLive(live.connections);
  renderEndings(s.endings, s.ended_total);
  drawOpen(s.charts.open_samples, live.open, s.now);
  drawEnds(s.charts.endings_by_end);
  drawLifetime(s.charts.lifetime);
  drawRtt(live.rtt);
}

// The path, marked when the WebSocket was a stream of an HTTP/2 connection.
function pathOf(c) {
  return c.http_version === "2" ? `${c.path} (HTTP/2)` : c.path;
}

// A resumable session's state (docs/resume.md) after its path: detached ones wait for their client.
const SESSION_MARKS = { attached: " (resumable)", detached: " (detached: waiting for its client)" };

function renderLive(rows) {
  const body = document.querySelector("#live tbody");
  const out = rows.map((c) => {
    const tr = el("tr");
    tr.dataset.id = c.id;
    tr.dataset.state = c.state;
    tr.dataset.path = c.path;
    tr.append(
      el("td", c.id, "num"), el("td", c.peer), el("td", pathOf(c) + (SESSION_MARKS[c.state] || "")),
      el("td", seconds(c.age_seconds), "num"),
      el("td", seconds(c.client.since_last_frame_seconds), "num"), el("td", rtt(c.client.last_rtt_seconds), "num"),
      el("td", seconds(c.upstream.since_last_frame_seconds), "num"), el("td", rtt(c.upstream.last_rtt_seconds), "num"),
      el("td", `${c.client.pings_answered} / ${c.upstream.pings_answered}`, "num"),
      el("td", `${c.client.messages} / ${c.upstream.messages}`, "num"));
    return tr;
  });
  if (out.length === 0) {
    const tr = el("tr");
    const td = el("td", state.path ? "no open connection matches" : "no open connection");
    td.colSpan = 10;
    tr.append(td);
    out.push(tr);
  }
  body.replaceChildren(...out);
}

function renderEndings(rows, total) {
  document.getElementById("ended-count").textContent = `(last ${rows.length} of ${total})`;
  const body = document.querySelector("#endings tbody");
  const out = rows.map((e) => {
    const tr = el("tr");
    tr.dataset.id = e.id;
    tr.dataset.end = e.end;
    tr.dataset.path = e.path;
    const end = el("td", e.end, e.end.endsWith("_close") ? "" : "bad");
    end.title = e.end_meaning;
    const meanings = el("td");
    for (const [c, words] of Object.entries(e.code_meanings)) meanings.append(el("div", `${c}: ${words}`));
    tr.append(
      el("td", new Date(e.ended_at * 1000).toLocaleTimeString()), el("td", e.id, "num"), el("td", pathOf(e)),
      el("td", seconds(e.duration_seconds), "num"), end,
      el("td", `${code(e.client.received)} / ${code(e.client.sent)}`),
      el("td", `${code(e.upstream.received)} / ${code(e.upstream.sent)}`), meanings);
    return tr;
  });
  body.replaceChildren(...out);
}

// === charts: small SVGs drawn from the JSON ===

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Vertical bars with a label under each (`titles`: the long names, shown on hover); `series`
// is [{ name, values: [n per label], cls }].
function bars(id, labels, series, titles = labels) {
  const svg = document.getElementById(id);
  const W = 320, H = 120, top = 12, bottom = 22, left = 4;
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  const slot = (W - left) / labels.length;
  const width = Math.max(2, (slot - 4) / series.length);
  const parts = [svgEl("line", { x1: 0, y1: H - bottom, x2: W, y2: H - bottom, class: "axis" })];
  labels.forEach((label, i) => {
    series.forEach((s, j) => {
      const v = s.values[i];
      const h = ((H - top - bottom) * v) / max;
      const x = left + i * slot + j * width;
      const bar = svgEl("rect", { x, y: H - bottom - h, width: width - 1, height: h, class: "bar " + (s.cls || "") });
      bar.append(svgEl("title", {}, `${s.name ? s.name + " " : ""}${titles[i]}: ${v}`));
      parts.push(bar);
      if (v > 0) parts.push(svgEl("text", { x: x + width / 2, y: H - bottom - h - 2, "text-anchor": "middle" }, String(v)));
    });
    parts.push(svgEl("text", { x: left + i * slot + slot / 2, y: H - bottom + 10, "text-anchor": "middle" }, label));
  });
  svg.replaceChildren(...parts);
}

function bound(le, unit) {
  if (le === null) return "more";
  return unit === "ms" ? "≤" + (le * 1000) + "ms" : "≤" + (le >= 3600 ? le / 3600 + "h" : le >= 60 ? le / 60 + "m" : le + "s");
}

function drawOpen(samples, open, now) {
  const svg = document.getElementById("chart-open");
  const W = 320, H = 120, top = 12, bottom = 22;
  const points = samples.concat([[now, open]]);
  const start = now - 3600;
  const max = Math.max(1, ...points.map((p) => p[1]));
  const x = (t) => ((Math.max(t, start) - start) / 3600) * (W - 8) + 4;
  const y = (n) => H - bottom - ((H - top - bottom) * n) / max;
  const d = points.map((p, i) => (i === 0 ? "M" : "L") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
  svg.replaceChildren(
    svgEl("line", { x1: 0, y1: H - bottom, x2: W, y2: H - bottom, class: "axis" }),
    svgEl("path", { d, class: "line" }),
    svgEl("text", { x: 4, y: 10 }, `max ${max}`),
    svgEl("text", { x: 4, y: H - bottom + 12 }, "−60 min"),
    svgEl("text", { x: W - 4, y: H - bottom + 12, "text-anchor": "end" }, `now: ${open}`));
}

function drawEnds(byEnd) {
  const names = Object.keys(byEnd);
  const short = names.map((n) => n.replace("upstream_", "up ").replace("client_", "cl ").replace("timeout", "t/o")
    .replace("error", "err"));
  bars("chart-ends", short, [{ values: names.map((n) => byEnd[n]) }], names);
}

function drawLifetime(buckets) {
  bars("chart-lifetime", buckets.map((b) => bound(b.le, "s")), [{ values: buckets.map((b) => b.count) }]);
}

function drawRtt(r) {
  // Drop the empty buckets at both ends so the populated ones stay readable.
  const n = r.client.length;
  let lo = 0, hi = n - 1;
  const empty = (i) => r.client[i].count === 0 && r.upstream[i].count === 0;
  while (lo < hi && empty(lo)) lo++;
  while (hi > lo && empty(hi)) hi--;
  const idx = [...Array(hi - lo + 1).keys()].map((i) => i + lo);
  bars("chart-rtt", idx.map((i) => bound(r.client[i].le, "ms")), [
    { name: "client", values: idx.map((i) => r.client[i].count) },
    { name: "upstream", values: idx.map((i) => r.upstream[i].count), cls: "upstream" },
  ]);
}

// === controls ===

function markSorted() {
  for (const th of document.querySelectorAll("#live th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("asc", th.dataset.sort === state.sort && state.order === "asc");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const th of document.querySelectorAll("#live th[data-sort]")) {
    th.addEventListener("click", () => {
      if (state.sort === th.dataset.sort) state.order = state.order === "desc" ? "asc" : "desc";
      else { state.sort = th.dataset.sort; state.order = "desc"; }
      markSorted();
      refresh();
    });
  }
  let typing = null;
  document.getElementById("filter").addEventListener("input", (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.path = e.target.value; refresh(); }, 250);
  });
  document.getElementById("limit").addEventListener("change", (e) => { state.limit = e.target.value; refresh(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  markSorted();
  refresh();
});
