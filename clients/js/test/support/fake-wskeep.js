// A fake of wskeep's side of docs/resume.md, in front of the test upstream, for the shim's own
// logic (reconnect, resend, replay, reset) before and beside the real binary. It implements
// only the protocol: the proof tests run the same scenarios against the real wskeep.
import { randomBytes, timingSafeEqual } from "node:crypto";
import { listen } from "./ws-server.js";

const PREFIX = "\u0000wskeep:";

/**
 * `graceMs` as `resume.grace`; `sessionDelayMs` holds a new session's first message back that
 * long, as a slow path would (an upstream that sends nothing meanwhile keeps the order right).
 */
export async function startFake(upstreamPort, { graceMs = 30000, sessionDelayMs = 0 } = {}) {
  const sessions = new Map();
  const token = (s) => {
    s.secret = randomBytes(32).toString("base64url");
    return `${s.id}.${s.secret}`;
  };
  const attach = (s, peer, replayAbove) => {
    clearTimeout(s.expiry);
    if (s.peer) {
      // As wskeep: a close frame to the half-open leg, and its TCP dropped after a 2 s bound.
      const old = s.peer;
      s.peer = null;
      old.close(4001, "replaced by a resumed connection");
      setTimeout(() => old.destroy(), 2000).unref();
    }
    s.peer = peer;
    const hello = `${PREFIX}session ${token(s)} ${s.received}`;
    if (s.received === 0 && s.sent === 0 && sessionDelayMs > 0) setTimeout(() => peer.send(hello), sessionDelayMs);
    else peer.send(hello);
    s.kept = s.kept.filter((k) => k.n > replayAbove);
    for (const k of s.kept) peer.send(k.data);
    peer.onmessage = (data) => {
      if (s.peer !== peer) return; // a replaced leg's late data: the new leg has (or resends) it
      if (typeof data === "string" && data.startsWith(PREFIX)) {
        const [verb, n] = data.slice(PREFIX.length).split(" ");
        if (verb !== "ack" || Number(n) < s.clientAck || Number(n) > s.sent) return peer.close(1008, "bad wskeep control message");
        s.clientAck = Number(n);
        s.kept = s.kept.filter((k) => k.n > s.clientAck);
        return;
      }
      s.received += 1;
      if (s.upstream.readyState === 1) s.upstream.send(data); else s.pending.push(data);
    };
    peer.onclose = (code) => {
      if (s.peer !== peer) return;
      s.peer = null;
      if (code === null) {
        s.expiry = setTimeout(() => { sessions.delete(s.id); s.upstream.close(1000, "client gone"); }, graceMs);
        s.expiry.unref(); // a fake in a finished test keeps nothing alive
      } else {
        sessions.delete(s.id);
        s.upstream.close(code === 1005 ? 1000 : code);
      }
    };
  };
  const server = await listen((peer) => {
    const url = new URL(peer.request.url, "ws://fake");
    if (!url.searchParams.has("wskeep_resume")) throw new Error("the shim always asks for resume");
    const presented = url.searchParams.get("wskeep_token");
    if (presented === null) {
      for (const k of [...url.searchParams.keys()]) if (k.startsWith("wskeep_")) url.searchParams.delete(k);
      const upstream = new WebSocket(`ws://127.0.0.1:${upstreamPort}${url.pathname}${url.search}`);
      const s = { id: randomBytes(12).toString("base64url"), secret: "", upstream, peer: null, pending: [], kept: [],
                  sent: 0, received: 0, clientAck: 0, expiry: null };
      sessions.set(s.id, s);
      upstream.onopen = () => { for (const d of s.pending.splice(0)) upstream.send(d); };
      upstream.onmessage = (e) => {
        s.sent += 1;
        s.kept.push({ n: s.sent, data: e.data });
        s.peer?.send(e.data);
      };
      upstream.onclose = (e) => { sessions.delete(s.id); s.peer?.close(e.code, e.reason); };
      setInterval(() => {
        if (s.peer && s.ackSent !== s.received) { s.ackSent = s.received; s.peer.send(`${PREFIX}ack ${s.received}`); }
      }, 1000).unref();
      attach(s, peer, 0);
      return;
    }
    const [id, secret] = presented.split(".");
    const s = sessions.get(id);
    const received = Number(url.searchParams.get("wskeep_received"));
    const ok = s && secret && secret.length === s.secret.length
      && timingSafeEqual(Buffer.from(secret), Buffer.from(s.secret)) && received >= s.clientAck && received <= s.sent;
    if (!ok) {
      peer.onclose = () => {};
      peer.close(4410, "session not resumable");
      return;
    }
    s.clientAck = received;
    attach(s, peer, received);
  }, (request) => request.headers["sec-websocket-protocol"]?.split(",")[0].trim());
  const stop = async () => {
    for (const s of sessions.values()) { clearTimeout(s.expiry); s.upstream.onclose = null; s.upstream.close(); }
    sessions.clear();
    await server.close();
  };
  return { port: server.port, sessions, close: stop, stop };
}
