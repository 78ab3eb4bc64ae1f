// The shim against wskeep's side of the protocol: the real binary ($WSKEEP_BIN, as the Rust
// suite's tests/js_client.rs runs it) and, for the shim's logic alone, the fake in support/.
// A TCP relay between the shim and the server is killed to drop the client's connection
// without a close frame; a numbered upstream logs what it received and how it ended.
import { test, describe, after } from "node:test";
import assert from "node:assert/strict";
import { WskeepSocket, backoffDelay } from "../wskeep-resume.js";
import { startUpstream } from "./support/upstream.js";
import { startRelay } from "./support/relay.js";
import { startWskeep, metric } from "./support/wskeep.js";
import { startFake } from "./support/fake-wskeep.js";
import { eventually, numbered } from "./support/util.js";

const servers = {
  wskeep: (upstreamPort, graceMs) => startWskeep(upstreamPort, `enabled = true\ngrace = "${graceMs}ms"\n`),
  fake: (upstreamPort, graceMs) => startFake(upstreamPort, { graceMs }),
};

/** The shim through a relay to `server`, recording what the page would see. */
function client(port, query, options = {}) {
  const ws = new WskeepSocket(`ws://127.0.0.1:${port}/session?${query}`, [], options);
  after(() => ws.close());
  const seen = { messages: [], opens: 0, closes: [], errors: 0, resumed: [], resets: [], notOpen: 0 };
  ws.onopen = () => { seen.opens += 1; };
  ws.onmessage = (e) => seen.messages.push(e.data);
  ws.onclose = (e) => seen.closes.push(e.code);
  ws.onerror = () => { seen.errors += 1; };
  ws.addEventListener("resumed", (e) => seen.resumed.push(e.detail));
  ws.addEventListener("reset", (e) => seen.resets.push(e.detail));
  return { ws, seen };
}

/** A numbered upstream, `start(itsPort)` in front of it, and a killable relay in front of that;
 * all stopped after the test. */
async function chain(start) {
  const upstream = await startUpstream();
  after(() => upstream.close());
  const server = await start(upstream.port);
  after(() => server.stop());
  const relay = await startRelay(server.port);
  after(() => relay.stop().catch(() => {}));
  return { upstream, server, relay };
}

for (const [kind, start] of Object.entries(servers)) {
  describe(`against ${kind}`, () => {
    test("three drops of the client's path: every message once and in order, both ways; the upstream saw one connection", async () => {
      const N = 300;
      const { upstream, server, relay } = await chain((port) => start(port, 30000));
      const { ws, seen } = client(relay.port, `count=${N}&every=5`);
      await eventually(() => seen.opens === 1, 5000, "open");
      let sent = 0;
      const sender = setInterval(() => {
        if (sent >= N) return clearInterval(sender);
        if (ws.readyState !== WskeepSocket.OPEN) seen.notOpen += 1;
        ws.send(`c${sent}`);
        sent += 1;
      }, 5);
      for (const at of [60, 140, 220]) {
        await eventually(() => seen.messages.length >= at, 10000, `${at} messages`);
        await relay.stop();
        // The gap: the upstream and the page both go on sending meanwhile.
        const [u, c] = [upstream.connections[0].sent, sent];
        await eventually(() => upstream.connections[0].sent >= u + 10 && sent >= c + 10, 5000, "sends during the gap");
        await relay.start();
      }
      await eventually(() => seen.messages.length >= N && upstream.connections[0].received.length >= N, 15000,
        "every message both ways");
      clearInterval(sender);
      assert.deepEqual(seen.messages, numbered("u", N), "the page got every upstream message once, in order");
      assert.deepEqual(upstream.connections[0].received, numbered("c", N), "the upstream got every page message once, in order");
      assert.equal(upstream.connections.length, 1, "one upstream connection for the whole session");
      assert.equal(upstream.connections[0].close, undefined, "the upstream saw no close");
      assert.ok(!upstream.connections[0].url.includes("wskeep_"), `wskeep's parameters stripped: ${upstream.connections[0].url}`);
      assert.equal(seen.resumed.length, 3, JSON.stringify(seen));
      assert.ok(seen.resumed.every((r) => r.gapMs >= 0), JSON.stringify(seen.resumed));
      assert.ok(relay.accepted >= 4, `the shim reconnected (${relay.accepted} connections)`);
      assert.deepEqual([seen.opens, seen.closes, seen.errors, seen.resets.length, seen.notOpen], [1, [], 0, 0, 0]);
      if (kind === "wskeep") {
        const text = await server.metrics();
        assert.equal(metric(text, "wskeep_resume_sessions_resumed_total"), 3, text);
        assert.equal(metric(text, "wskeep_resume_sessions_detached_total"), 3, text);
        assert.equal(server.log().split("\n").filter((l) => l.includes('"session resumed"')).length, 3, server.log());
      }
      ws.close(1000, "done");
      await upstream.until(() => upstream.connections[0].close !== undefined, 5000, "close");
      assert.equal(upstream.connections[0].close, 1000, "the page's close reaches the upstream");
      await eventually(() => seen.closes.length === 1, 5000, "the page's close event");
      assert.deepEqual(seen.closes, [1000]);
    });

    test("a gap longer than the grace: 4410, `reset` with the lost sends, a fresh session", async () => {
      const { upstream, server, relay } = await chain((port) => start(port, 300));
      const { ws, seen } = client(relay.port, "count=5&every=1");
      await eventually(() => seen.messages.length === 5, 5000, "the first messages");
      ws.send("before");
      await upstream.until(() => upstream.connections[0].received.length === 1, 5000, "first send");
      await relay.stop();
      for (let i = 0; i < 3; i++) ws.send(`lost${i}`);
      // wskeep gives the session up after the grace: the upstream hears of it.
      await upstream.until(() => upstream.connections[0].close !== undefined, 5000, "the upstream's close after the grace");
      assert.equal(upstream.connections[0].close, kind === "wskeep" ? 1001 : 1000);
      await relay.start();
      await eventually(() => seen.resets.length === 1, 10000, "reset");
      assert.ok(seen.resets[0].lost >= 3, `the sends made during the gap are reported lost: ${JSON.stringify(seen.resets)}`);
      await upstream.until(() => upstream.connections.length === 2, 5000, "a fresh upstream connection");
      ws.send("after");
      await upstream.until(() => upstream.connections[1].received.length === 1, 5000, "a send on the fresh session");
      assert.deepEqual(upstream.connections[1].received, ["after"], "nothing of the old session is resent to the new one");
      await eventually(() => seen.messages.length === 10, 5000, "the fresh session's messages");
      assert.deepEqual(seen.messages, [...numbered("u", 5), ...numbered("u", 5)]);
      assert.equal(ws.readyState, WskeepSocket.OPEN);
      assert.deepEqual([seen.opens, seen.closes, seen.resumed.length], [1, [], 0]);
      if (kind === "wskeep") {
        const text = await server.metrics();
        assert.ok(metric(text, 'wskeep_resume_failures_total{reason="expired"}') >= 1, text);
      }
      ws.close();
    });

    test("a server that does not know the session (restarted) answers 4410: reset, fresh session", async () => {
      const upstream = await startUpstream();
      after(() => upstream.close());
      let server = await start(upstream.port, 30000);
      after(() => server.stop());
      const relay = await startRelay(server.port);
      after(() => relay.stop().catch(() => {}));
      const { ws, seen } = client(relay.port, "count=3&every=1");
      await eventually(() => seen.messages.length === 3, 5000, "the first messages");
      await relay.stop();
      await server.stop();
      server = await start(upstream.port, 30000);
      relay.target = server.port;
      await relay.start();
      await eventually(() => seen.resets.length === 1, 10000, "reset");
      await eventually(() => seen.messages.length === 6, 5000, "the fresh session's messages");
      assert.equal(ws.readyState, WskeepSocket.OPEN);
      if (kind === "wskeep") {
        const text = await server.metrics();
        assert.equal(metric(text, 'wskeep_resume_failures_total{reason="bad_token"}'), 1, text);
      }
      assert.deepEqual([seen.opens, seen.closes, seen.resumed.length], [1, [], 0]);
      ws.close();
    });

    test("a path that dies silently (no FIN): missing acks make the shim resume on a new connection, nothing lost", async () => {
      const N = 100;
      const { upstream, server, relay } = await chain((port) => start(port, 30000));
      const { ws, seen } = client(relay.port, `count=${N}&every=5`, { ackTimeoutMs: 2500 });
      await eventually(() => seen.opens === 1, 5000, "open");
      let sent = 0;
      const sender = setInterval(() => {
        if (sent >= N) return clearInterval(sender);
        ws.send(`c${sent}`);
        sent += 1;
      }, 5);
      after(() => clearInterval(sender));
      await eventually(() => seen.messages.length >= 30, 5000, "30 messages");
      relay.freeze();
      // Once resumed, the old path comes back to life: what it held reaches the old socket
      // late, and the shim must not take it (the new connection replays it).
      await eventually(() => seen.resumed.length === 1, 5000, "the resume");
      relay.thaw();
      await eventually(() => seen.messages.length >= N && upstream.connections[0].received.length >= N, 15000,
        "every message both ways after the silent drop");
      assert.deepEqual(seen.messages, numbered("u", N));
      assert.deepEqual(upstream.connections[0].received, numbered("c", N));
      assert.equal(upstream.connections.length, 1);
      assert.equal(upstream.connections[0].close, undefined);
      assert.equal(seen.resumed.length, 1, JSON.stringify(seen));
      assert.equal(relay.accepted, 2);
      assert.deepEqual([seen.opens, seen.closes, seen.errors, seen.resets.length], [1, [], 0, 0]);
      if (kind === "wskeep") {
        // The old leg was still attached as far as wskeep knew: the new one replaced it.
        const line = server.log().split("\n").find((l) => l.includes('"session resumed"')) ?? "";
        assert.match(line, /"half_open":true/, server.log());
      }
    });
  });
}

test("the ack watchdog leaves a slow path without a close frame: what it held arrives before the resume, and the resume still works", async () => {
  const { upstream, server, relay } = await chain((port) => startWskeep(port));
  const { ws, seen } = client(relay.port, "", { ackTimeoutMs: 1500 });
  await eventually(() => ws.resumable, 5000, "session");
  relay.freeze();
  relay.hold();
  for (let i = 0; i < 3; i++) ws.send(`c${i}`);
  // No ack through the frozen path: the watchdog leaves it; the resume waits in the relay.
  await eventually(() => relay.accepted === 2, 5000, "the resume attempt");
  for (let i = 3; i < 5; i++) ws.send(`c${i}`);
  // The old path was slow, not dead: what the shim wrote on it reaches wskeep first.
  relay.thaw();
  await upstream.until(() => upstream.connections[0].received.length === 3, 5000, "the old path's sends");
  relay.release();
  await eventually(() => seen.resumed.length === 1 || seen.resets.length > 0, 5000, "the resume");
  const ended = () => upstream.connections[0].close !== undefined;
  await upstream.until(() => upstream.connections[0].received.length === 5 || ended(), 5000, "the sends made in the gap");
  assert.deepEqual(upstream.connections[0].received, numbered("c", 5));
  assert.deepEqual([seen.resets, seen.resumed.length, seen.closes, seen.errors], [[], 1, [], 0]);
  assert.deepEqual([upstream.connections.length, upstream.connections[0].close], [1, undefined], "the session went on");
  ws.send("c5");
  await upstream.until(() => upstream.connections[0].received.length === 6, 5000, "a send after the resume");
});

test("a connection lost before its session message, after sends went out on it: `reset`, not a silent resend (fake wskeep)", async () => {
  const { upstream, server, relay } = await chain((port) => startFake(port, { sessionDelayMs: 1000 }));
  const { ws, seen } = client(relay.port, "", { sessionWaitMs: 60000 });
  ws.onopen = () => { for (let i = 0; i < 3; i++) ws.send(`c${i}`); };
  // wskeep's session forwarded them; its session message is still on its way when the path dies.
  await upstream.until(() => upstream.connections[0]?.received.length === 3, 5000, "the first sends");
  relay.cut();
  await eventually(() => seen.resets.length === 1, 5000, "reset");
  assert.deepEqual(seen.resets, [{ lost: 3 }]);
  await upstream.until(() => upstream.connections.length === 2, 5000, "the fresh session's upstream connection");
  ws.send("after");
  await upstream.until(() => upstream.connections[1].received.length === 1, 5000, "a send on the fresh session");
  assert.deepEqual(upstream.connections[1].received, ["after"], "the first session's sends not sent again");
  assert.deepEqual(upstream.connections[0].received, numbered("c", 3));
  assert.deepEqual([seen.closes, seen.errors, ws.readyState], [[], 0, WskeepSocket.OPEN]);
});

test("after a reset, a fresh connection without a session message (wskeep with resume off) becomes plain: nothing kept", async () => {
  const upstream = await startUpstream();
  after(() => upstream.close());
  let server = await startWskeep(upstream.port);
  after(() => server.stop());
  const relay = await startRelay(server.port);
  after(() => relay.stop().catch(() => {}));
  const { ws, seen } = client(relay.port, "", { sessionWaitMs: 200 });
  await eventually(() => ws.resumable, 5000, "session");
  // wskeep restarts (the session is gone), and a wskeep with resume off takes its fresh sessions.
  await relay.stop();
  await server.stop();
  server = await startWskeep(upstream.port);
  const plain = await startWskeep(upstream.port, "enabled = false\n");
  after(() => plain.stop());
  relay.target = server.port;
  relay.hold();
  await relay.start();
  await eventually(() => relay.accepted === 2, 5000, "the resume attempt");
  relay.release();
  relay.target = plain.port;
  await eventually(() => seen.resets.length === 1, 5000, "reset (4410)");
  await upstream.until(() => upstream.connections.length === 2, 5000, "the fresh session's upstream connection");
  for (let i = 0; i < 3; i++) ws.send(`c${i}`);
  await upstream.until(() => upstream.connections[1].received.length === 3, 5000, "the sends");
  // The shim stops waiting for a session message: it keeps none of its sends (the bug: all, forever).
  await eventually(() => ws._kept.length === 0 && !ws.resumable, 3000, "sends no longer kept");
  // A plain socket: a drop closes it; nothing is resent on another connection.
  relay.cut();
  await eventually(() => seen.closes.length === 1, 5000, "close");
  assert.deepEqual([seen.closes, relay.accepted, upstream.connections.length], [[1006], 3, 2]);
  assert.deepEqual(upstream.connections[1].received, numbered("c", 3));
});

test("a resume that lands on a wskeep with resume off (no session message, no 4410): `reset`, then a plain socket", async () => {
  const { upstream, server, relay } = await chain((port) => startWskeep(port));
  const { ws, seen } = client(relay.port, "", { sessionWaitMs: 200 });
  await eventually(() => ws.resumable, 5000, "session");
  for (let i = 0; i < 3; i++) ws.send(`c${i}`);
  await upstream.until(() => upstream.connections[0]?.received.length === 3, 5000, "the first sends");
  // wskeep is replaced by one with resume off: the resume gets a plain WebSocket.
  await relay.stop();
  await server.stop();
  const plain = await startWskeep(upstream.port, "enabled = false\n");
  after(() => plain.stop());
  relay.target = plain.port;
  await relay.start();
  await eventually(() => seen.resets.length === 1, 5000, "reset (the bug: kept waiting for a session message)");
  await eventually(() => !ws.resumable && ws._kept.length === 0, 3000, "a plain socket, nothing kept");
  ws.send("after");
  await upstream.until(() => upstream.connections.some((c) => c.received.includes("after")), 5000, "the send after");
  // No upstream connection got the first sends twice, nor a control message.
  const all = upstream.connections.flatMap((c) => c.received);
  assert.deepEqual(all.filter((m) => m.startsWith("c")), numbered("c", 3));
  assert.equal(all.filter((m) => m.startsWith("\0wskeep:")).length, 0);
});

test("binary messages both ways through a drop: kept as sent (not as the page changed them after), resent, replayed", async () => {
  const N = 40;
  const { upstream, server, relay } = await chain((port) => startWskeep(port));
  const { ws, seen } = client(relay.port, `count=${N}&every=5&binary=1`);
  ws.binaryType = "arraybuffer";
  await eventually(() => seen.messages.length >= 10, 5000, "the first messages");
  await relay.stop();
  const scratch = new TextEncoder().encode("c0");
  for (let i = 0; i < 5; i++) {
    scratch.set(new TextEncoder().encode(`c${i}`));
    ws.send(scratch); // the page reuses its buffer: each send must keep what it was
  }
  await upstream.until(() => upstream.connections[0].sent === N, 5000, "the upstream's sends during the gap");
  await relay.start();
  await upstream.until(() => upstream.connections[0].received.length === 5, 5000, "the resent binary messages");
  await eventually(() => seen.messages.length === N, 5000, "every binary message");
  assert.deepEqual(upstream.connections[0].received, numbered("binary:c", 5));
  assert.ok(seen.messages.every((m) => m instanceof ArrayBuffer), "binaryType arraybuffer after the resume too");
  assert.deepEqual(seen.messages.map((m) => new TextDecoder().decode(m)), numbered("u", N));
  assert.deepEqual([seen.resumed.length, upstream.connections.length], [1, 1]);
});

test("a stream far larger than resume.buffer flows: the shim's acks free wskeep's buffer", async () => {
  const N = 3000; // about 20 KB of frames through a 4 KiB buffer
  const upstream = await startUpstream();
  after(() => upstream.close());
  const server = await startWskeep(upstream.port, 'enabled = true\nbuffer = "4KiB"\n', '[limits]\nmax_message_size = "1KiB"\n');
  after(() => server.stop());
  const { seen } = client(server.port, `count=${N}&every=1&burst=20`);
  await eventually(() => seen.messages.length >= N, 10000, `${N} messages`).catch((e) => {
    throw new Error(`${e.message}: got ${seen.messages.length}`);
  });
  assert.deepEqual(seen.messages, numbered("u", N));
  assert.equal(upstream.connections.length, 1);
});

test("with resume off in wskeep the shim is a plain WebSocket: sends go at once, a drop closes it", async () => {
  const { upstream, server, relay } = await chain((port) => startWskeep(port, "enabled = false\n"));
  const { ws, seen } = client(relay.port, "", { sessionWaitMs: 60000 });
  ws.onopen = () => ws.send("hello");
  // Long before the shim would stop waiting for a session message: nothing held back.
  await upstream.until(() => upstream.connections[0]?.received.length === 1, 5000, "the first send");
  assert.deepEqual(upstream.connections[0].received, ["hello"]);
  assert.ok(!upstream.connections[0].url.includes("wskeep_"), upstream.connections[0].url);
  upstream.connections[0].peer.send("\u0000wskeep:ack 1");
  upstream.connections[0].peer.send("x");
  await eventually(() => seen.messages.length === 2, 5000, "the upstream's messages");
  assert.deepEqual(seen.messages, ["\u0000wskeep:ack 1", "x"], "no control messages here: all delivered");
  assert.equal(ws.resumable, false);
  relay.cut();
  await eventually(() => seen.closes.length === 1, 5000, "close");
  assert.deepEqual([seen.closes, seen.errors, relay.accepted], [[1006], 1, 1], "no reconnect");
});

test("close() in a gap ends the socket at once and stops reconnecting; on a dead path it ends within its bound", async () => {
  const { upstream, server, relay } = await chain((port) => startWskeep(port));
  const first = client(relay.port, "");
  await eventually(() => first.ws.resumable, 5000, "session");
  await relay.stop();
  first.ws.close(1000);
  await eventually(() => first.seen.closes.length === 1, 1000, "close in the gap");
  assert.deepEqual(first.seen.closes, [1006]);
  await relay.start();
  const accepted = relay.accepted;
  // A second socket opens through the relay: the closed one would have reconnected by then too.
  const second = client(relay.port, "");
  await eventually(() => second.ws.resumable, 5000, "session");
  assert.equal(relay.accepted, accepted + 1, "the closed socket never reconnected");
  relay.freeze();
  const asked = Date.now();
  second.ws.close(1000);
  await eventually(() => second.seen.closes.length === 1, 5000, "close on a dead path");
  assert.ok(Date.now() - asked < 3000, `closed within the bound (${Date.now() - asked} ms)`);
  assert.equal(second.ws.readyState, WskeepSocket.CLOSED);
});

test("a session message slower than sessionWaitMs is still taken: the socket becomes resumable (fake wskeep)", async () => {
  const { upstream, server, relay } = await chain((port) => startFake(port, { sessionDelayMs: 400 }));
  const { ws, seen } = client(relay.port, "", { sessionWaitMs: 100 });
  ws.onopen = () => { for (let i = 0; i < 3; i++) ws.send(`c${i}`); };
  await upstream.until(() => upstream.connections[0]?.received.length === 3, 5000, "the first sends");
  await eventually(() => ws.resumable, 5000, "the late session message taken");
  for (let i = 3; i < 6; i++) ws.send(`c${i}`);
  await upstream.until(() => upstream.connections[0].received.length === 6, 5000, "sends after it");
  await relay.stop();
  for (let i = 6; i < 9; i++) ws.send(`c${i}`);
  await relay.start();
  await eventually(() => seen.resumed.length === 1, 5000, "resume");
  await upstream.until(() => upstream.connections[0].received.length === 9, 5000, "the sends of the gap");
  assert.deepEqual(upstream.connections[0].received, numbered("c", 9));
  assert.deepEqual([seen.messages, seen.resets, upstream.connections.length], [[], [], 1], "the session message never reached the page");
});

test("a close frame from the server ends the socket as it would a WebSocket (no reconnect)", async () => {
  const upstream = await startUpstream();
  after(() => upstream.close());
  const server = await startWskeep(upstream.port);
  after(() => server.stop());
  const { ws, seen } = client(server.port, "");
  await upstream.until(() => upstream.connections.length === 1, 5000, "connection");
  await eventually(() => ws.resumable, 5000, "session");
  upstream.connections[0].peer.close(4321, "bye");
  await eventually(() => seen.closes.length === 1, 5000, "close");
  assert.deepEqual(seen.closes, [4321]);
  assert.equal(ws.readyState, WskeepSocket.CLOSED);
  assert.equal(upstream.connections.length, 1, "no reconnect");
});

test("backoff: exponential from the minimum to the maximum, jittered between half and all of it", () => {
  assert.equal(backoffDelay(0, 100, 5000, () => 0), 50);
  assert.equal(backoffDelay(0, 100, 5000, () => 1), 100);
  assert.equal(backoffDelay(3, 100, 5000, () => 1), 800);
  assert.equal(backoffDelay(10, 100, 5000, () => 1), 5000);
  assert.equal(backoffDelay(1000, 100, 5000, () => 0.5), 3750);
});
