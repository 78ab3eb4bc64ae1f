// A minimal RFC 6455 server for the tests (Node has a WebSocket client, not a server): the
// handshake, masked client frames (fragmented or not), pings answered, closes answered. Enough
// for an upstream and for the fake wskeep; not a general server.
import { createServer } from "node:http";
import { createHash } from "node:crypto";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

function frame(opcode, payload) {
  const len = payload.length;
  const head = len < 126 ? Buffer.from([0x80 | opcode, len])
    : len < 65536 ? Buffer.from([0x80 | opcode, 126, len >> 8, len & 255])
    : (() => { const b = Buffer.alloc(10); b[0] = 0x80 | opcode; b[1] = 127; b.writeBigUInt64BE(BigInt(len), 2); return b; })();
  return Buffer.concat([head, payload]);
}

/** One accepted WebSocket: `onmessage(data: string | Buffer)`, `onclose(code | null)`. */
export class Peer {
  constructor(socket, request, protocol) {
    this.socket = socket;
    this.request = request;
    this.protocol = protocol;
    this.onmessage = () => {};
    this.onclose = () => {};
    this.closed = false;
    this._buf = Buffer.alloc(0);
    this._fragments = null;
    socket.setNoDelay(true);
    socket.on("data", (chunk) => this._data(chunk));
    socket.on("close", () => this._gone(null));
    socket.on("end", () => socket.destroy()); // http's sockets allow half-open: a FIN is the end here
    socket.on("error", () => {});
  }

  send(data) {
    if (this.closed) return;
    const text = typeof data === "string";
    this.socket.write(frame(text ? 1 : 2, text ? Buffer.from(data) : Buffer.from(data)));
  }

  close(code = 1000, reason = "") {
    if (this.closed) return;
    const body = Buffer.concat([Buffer.from([code >> 8, code & 255]), Buffer.from(reason)]);
    this.socket.write(frame(8, body));
    this._sentClose = true;
  }

  /** Drops the TCP connection without a close frame. */
  destroy() {
    this.socket.destroy();
  }

  _gone(code) {
    if (this.closed) return;
    this.closed = true;
    this.onclose(code);
  }

  _data(chunk) {
    this._buf = Buffer.concat([this._buf, chunk]);
    for (;;) {
      const b = this._buf;
      if (b.length < 2) return;
      const fin = (b[0] & 0x80) !== 0;
      const opcode = b[0] & 0x0f;
      let len = b[1] & 0x7f;
      let at = 2;
      if (len === 126) { if (b.length < 4) return; len = b.readUInt16BE(2); at = 4; }
      else if (len === 127) { if (b.length < 10) return; len = Number(b.readBigUInt64BE(2)); at = 10; }
      const masked = (b[1] & 0x80) !== 0;
      const maskAt = at;
      if (masked) at += 4;
      if (b.length < at + len) return;
      const payload = Buffer.from(b.subarray(at, at + len));
      if (masked) for (let i = 0; i < len; i++) payload[i] ^= b[maskAt + (i & 3)];
      this._buf = b.subarray(at + len);
      this._frame(fin, opcode, payload);
    }
  }

  _frame(fin, opcode, payload) {
    if (opcode === 9) return this.socket.write(frame(10, payload));
    if (opcode === 10) return;
    if (opcode === 8) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      if (!this._sentClose) this.socket.write(frame(8, payload.subarray(0, 2)));
      this.socket.end();
      this._gone(code);
      return;
    }
    if (opcode === 1 || opcode === 2) this._fragments = { opcode, parts: [payload] };
    else if (opcode === 0 && this._fragments) this._fragments.parts.push(payload);
    if (!fin || !this._fragments) return;
    const whole = Buffer.concat(this._fragments.parts);
    const text = this._fragments.opcode === 1;
    this._fragments = null;
    this.onmessage(text ? whole.toString("utf8") : whole);
  }
}

/**
 * Listens on 127.0.0.1 port 0; `onpeer(peer)` for every upgrade. `choose(request)` may refuse
 * (return a status number) or pick a subprotocol (return a string).
 */
export async function listen(onpeer, choose = () => undefined) {
  const server = createServer((req, res) => { res.writeHead(404).end(); });
  const sockets = new Set();
  server.on("connection", (s) => { sockets.add(s); s.on("close", () => sockets.delete(s)); });
  server.on("upgrade", (request, socket) => {
    const answer = choose(request);
    if (typeof answer === "number") {
      socket.end(`HTTP/1.1 ${answer} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      return;
    }
    const key = request.headers["sec-websocket-key"];
    const accept = createHash("sha1").update(key + GUID).digest("base64");
    const lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade", `Sec-WebSocket-Accept: ${accept}`];
    if (answer) lines.push(`Sec-WebSocket-Protocol: ${answer}`);
    socket.write(lines.join("\r\n") + "\r\n\r\n");
    onpeer(new Peer(socket, request, answer ?? ""));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
