// A TCP relay between the client and wskeep that the test kills and restarts: `stop()` closes
// the listener and every relayed connection (the client leg dies without a close frame, as when
// a phone changes networks), `start()` listens again on the same port.
import { createServer, connect } from "node:net";

export async function startRelay(targetPort) {
  const pairs = new Set();
  const frozen = new Set();
  let server = null;
  let port = 0;
  let held = null; // connections accepted while held: not yet connected to the target
  const join = (inbound) => {
    const outbound = connect(relay.target, "127.0.0.1");
    const pair = [inbound, outbound];
    pairs.add(pair);
    for (const s of pair) {
      s.setNoDelay(true);
      s.on("error", () => {});
      s.on("close", () => { pairs.delete(pair); frozen.delete(pair); inbound.destroy(); outbound.destroy(); });
    }
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  };
  const relay = {
    target: targetPort,
    accepted: 0,
    get port() { return port; },
    async start() {
      server = createServer((inbound) => {
        relay.accepted += 1;
        if (held === null) join(inbound);
        else {
          inbound.on("error", () => {});
          held.push(inbound);
        }
      });
      await new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, "127.0.0.1", resolve);
      });
      port = server.address().port;
    },
    /**
     * Stops relaying on every current connection without closing it (a path that died
     * silently: no FIN, no RST, as when a phone leaves a Wi-Fi); new connections get through.
     */
    freeze() {
      for (const pair of pairs) {
        const [inbound, outbound] = pair;
        frozen.add(pair);
        inbound.unpipe(outbound);
        outbound.unpipe(inbound);
        inbound.pause();
        outbound.pause();
      }
    },
    /**
     * Accepts new connections but connects them to the target only on `release()` (a slow
     * path for a new connection: its handshake waits, unanswered).
     */
    hold() {
      held ??= [];
    },
    /** Connects the held connections to the current target, in order; new ones go through. */
    release() {
      const waiting = held ?? [];
      held = null;
      for (const inbound of waiting) if (!inbound.destroyed) join(inbound);
    },
    /** Relays again on the frozen connections still open (what they held arrives late). */
    thaw() {
      for (const pair of frozen) {
        const [inbound, outbound] = pair;
        inbound.pipe(outbound);
        outbound.pipe(inbound);
      }
      frozen.clear();
    },
    /** Drops every relayed connection; new ones still get through. */
    cut() {
      for (const pair of [...pairs]) for (const s of pair) s.destroy();
      pairs.clear();
      for (const inbound of held ?? []) inbound.destroy();
      if (held !== null) held = [];
    },
    /** Stops listening and drops every relayed connection. */
    async stop() {
      const closed = new Promise((resolve) => server.close(resolve));
      relay.cut();
      await closed;
    },
  };
  await relay.start();
  return relay;
}
