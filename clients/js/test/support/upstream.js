// A legacy upstream that knows nothing of resume: on each connection it sends `u0`, `u1`, ...
// (`?count=N&every=MS&burst=K&binary=1` in the request's query: K messages every MS ms, binary
// ones with `binary`; nothing when count is absent) and logs every
// message it receives, every connection and how each ended, for the tests to compare.
import { listen } from "./ws-server.js";

export async function startUpstream() {
  /** @type {{url: string, received: string[], sent: number, close: number | null | undefined, peer: any}[]} */
  const connections = [];
  const waiters = new Set();
  const changed = () => { for (const w of [...waiters]) w(); };
  const server = await listen((peer) => {
    const url = new URL(peer.request.url, "http://upstream");
    const entry = { url: peer.request.url, received: [], sent: 0, close: undefined, peer };
    connections.push(entry);
    const count = Number(url.searchParams.get("count") ?? 0);
    const every = Number(url.searchParams.get("every") ?? 10);
    const burst = Number(url.searchParams.get("burst") ?? 1);
    const binary = url.searchParams.get("binary") === "1";
    const timer = count > 0 ? setInterval(() => {
      for (let i = 0; i < burst; i++) {
        if (entry.sent >= count || peer.closed) return clearInterval(timer);
        peer.send(binary ? Buffer.from(`u${entry.sent}`) : `u${entry.sent}`);
        entry.sent += 1;
      }
      changed();
    }, every) : null;
    peer.onmessage = (data) => { entry.received.push(typeof data === "string" ? data : `binary:${data.toString()}`); changed(); };
    peer.onclose = (code) => { clearInterval(timer); entry.close = code; changed(); };
    changed();
  }, (request) => request.headers["sec-websocket-protocol"]?.split(",")[0].trim());
  return {
    port: server.port,
    connections,
    /** Resolves once `predicate()` holds (checked on every event), or rejects after `ms`. */
    until(predicate, ms = 10000, what = "condition") {
      if (predicate()) return Promise.resolve();
      return new Promise((resolve, reject) => {
        const check = () => { if (predicate()) { waiters.delete(check); clearTimeout(t); resolve(); } };
        const t = setTimeout(() => { waiters.delete(check); reject(new Error(`upstream: no ${what} within ${ms} ms`)); }, ms);
        waiters.add(check);
      });
    },
    close: () => server.close(),
  };
}
