// wskeep-resume: a WebSocket that survives a dropped connection, for pages behind wskeep with
// `[resume] enabled = true`. Construct it instead of `WebSocket`; nothing else changes for the
// page. While the connection is away, readyState stays OPEN, sends are kept and resent, and
// wskeep holds the upstream session and replays what the page missed, exactly once, in order.
// The wire protocol is docs/resume.md. No dependencies; browsers and Node >= 22 (global
// WebSocket; Node 20 with --experimental-websocket, or pass `options.WebSocket`).

/** wskeep's control messages: a text message starting with NUL and `wskeep:`. */
const PREFIX = "\u0000wskeep:";
/** The client acks at once after this many messages or bytes, else at most every second. */
const ACK_MESSAGES = 64;
const ACK_BYTES = 64 * 1024;
const ACK_INTERVAL_MS = 1000;
/** wskeep's close code for a token it cannot resume: start a fresh session. */
const NOT_RESUMABLE = 4410;
/** How long close() waits for the closing handshake (wskeep bounds its own by 2 s too). */
const CLOSE_BOUND_MS = 2000;

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential from `minMs` to `maxMs`,
 * jittered to between half and all of it so that clients cut together do not return together.
 * @param {number} attempt
 * @param {number} minMs
 * @param {number} maxMs
 * @param {() => number} [random]
 * @returns {number}
 */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

/** A control message's fields, or null for a data message. */
function parseControl(data) {
  if (typeof data !== "string" || !data.startsWith(PREFIX)) return null;
  return data.slice(PREFIX.length).split(" ");
}

/** A non-negative integer field, or NaN. */
function count(field) {
  return /^[0-9]{1,15}$/.test(field ?? "") ? Number(field) : NaN;
}

/** Bytes a message occupies (an estimate for strings: what the ack thresholds need). */
function sizeOf(data) {
  if (typeof data === "string") return data.length;
  if (data == null) return 0;
  return data.byteLength ?? data.size ?? 0;
}

/** A copy the page cannot change after send() (WebSocket copies too). */
function stable(data) {
  if (data instanceof ArrayBuffer) return data.slice(0);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice();
  return data;
}

/** The page's URL, absolute, with ws(s) scheme, as WebSocket resolves it. */
function resolveUrl(url) {
  const base = globalThis.location?.href;
  const parsed = base === undefined ? new URL(String(url)) : new URL(String(url), base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new SyntaxError(`wskeep-resume: ${parsed.protocol} is not a WebSocket URL`);
  }
  parsed.hash = "";
  return parsed.href;
}

/** The URL with wskeep's parameters appended, the page's own query left byte for byte. */
function withParams(url, params) {
  const parsed = new URL(url);
  const extra = Object.entries(params)
    .map(([k, v]) => `${k}=${encodeURIComponent(String(v))}`)
    .join("&");
  parsed.search = parsed.search ? `${parsed.search}&${extra}` : `?${extra}`;
  return parsed.href;
}

function event(type, props) {
  const e = new Event(type);
  for (const [k, v] of Object.entries(props)) Object.defineProperty(e, k, { value: v, enumerable: true });
  return e;
}

function messageEvent(data, origin) {
  if (typeof MessageEvent === "function") return new MessageEvent("message", { data, origin });
  return event("message", { data, origin });
}

/**
 * A WebSocket that resumes its wskeep session after a dropped connection. See
 * wskeep-resume.d.ts for the interface.
 */
export class WskeepSocket extends EventTarget {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  /**
   * @param {string | URL} url
   * @param {string | string[]} [protocols]
   * @param {import("./wskeep-resume").WskeepSocketOptions} [options]
   */
  constructor(url, protocols = [], options = {}) {
    super();
    this._Impl = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._Impl !== "function") {
      throw new TypeError("wskeep-resume: no WebSocket here (Node >= 22, or pass options.WebSocket)");
    }
    this._url = resolveUrl(url);
    this._origin = new URL(this._url).origin;
    this._protocols = typeof protocols === "string" ? [protocols] : [...protocols];
    this._minDelayMs = options.minDelayMs ?? 100;
    this._maxDelayMs = options.maxDelayMs ?? 5000;
    this._maxGapMs = options.maxGapMs ?? 30000;
    this._sessionWaitMs = options.sessionWaitMs ?? 2000;
    this._ackTimeoutMs = options.ackTimeoutMs ?? 10000;
    this._random = options.random ?? Math.random;
    /** @type {BinaryType} */
    this._binaryType = "blob";
    this._readyState = CONNECTING;
    this._protocol = "";
    this._extensions = "";
    this._ws = null; // the connection in use, or null during a gap
    this._stale = null; // a connection left without a close frame, closed once wskeep replaced it
    this._attached = false; // _ws has its session message: sends go out
    this._mode = "pending"; // "pending" until the first message: "resumable" or "plain"
    this._lapsed = false; // plain only because the session message was slow to come
    this._newSession();
    this._gapStart = 0;
    this._attempt = 0;
    this._resets = 0; // fresh sessions started since the last one worked
    this._retryTimer = null;
    this._closeTimer = null;
    this._ackTimer = null;
    this._sessionTimer = null;
    for (const type of ["open", "message", "close", "error", "resumed", "reset"]) {
      this.addEventListener(type, (e) => {
        const handler = this[`on${type}`];
        if (typeof handler === "function") handler.call(this, e);
      });
    }
    this.onopen = this.onmessage = this.onclose = this.onerror = this.onresumed = this.onreset = null;
    this._connect();
  }

  get CONNECTING() { return CONNECTING; }
  get OPEN() { return OPEN; }
  get CLOSING() { return CLOSING; }
  get CLOSED() { return CLOSED; }
  get url() { return this._url; }
  get readyState() { return this._readyState; }
  get protocol() { return this._protocol; }
  get extensions() { return this._extensions; }
  get binaryType() { return this._binaryType; }
  set binaryType(value) {
    if (value !== "blob" && value !== "arraybuffer") return;
    this._binaryType = value;
    if (this._ws) this._ws.binaryType = value;
  }
  /** Bytes queued by the connection plus sends waiting for one. */
  get bufferedAmount() {
    return (this._ws?.bufferedAmount ?? 0) + this._unwrittenBytes;
  }
  /** Whether wskeep offered a resumable session on this socket (false until it does). */
  get resumable() { return this._mode === "resumable"; }

  send(data) {
    if (this._readyState === CONNECTING) {
      throw new DOMException("send() before the connection is open", "InvalidStateError");
    }
    if (this._readyState !== OPEN) return;
    if (this._mode === "plain") {
      this._ws.send(data);
      if (this._lapsed) this._written = this._sent += 1; // counted, in case the session comes late
      return;
    }
    const copy = stable(data);
    this._sent += 1;
    this._kept.push({ n: this._sent, data: copy, at: 0 });
    this._unwrittenBytes += sizeOf(copy);
    if (this._writable()) this._writeAbove(this._ws, this._written);
  }

  close(code, reason) {
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new DOMException(`close code ${code} is not 1000 or 3000-4999`, "InvalidAccessError");
    }
    if (this._readyState === CLOSING || this._readyState === CLOSED) return;
    this._readyState = CLOSING;
    clearTimeout(this._retryTimer);
    this._stopTimers();
    const ws = this._ws;
    if (ws && ws.readyState === OPEN) {
      ws.close(code, reason); // its close event finishes ours, within the bound wskeep keeps too
      this._closeTimer = setTimeout(() => this._ws === ws && (this._drop(ws), this._finish(1006, "", false)), CLOSE_BOUND_MS);
    } else {
      // In a gap, or while a reconnect is still connecting: nobody to tell.
      this._drop(ws);
      try { ws?.close(); } catch { /* already closing */ }
      queueMicrotask(() => this._finish(1006, "", false));
    }
  }

  // ---- sessions and connections ----

  /** Forgets the session: counts from zero, nothing kept, no token. */
  _newSession() {
    this._token = null;
    this._sent = 0; // data messages the page sent on this session
    this._kept = []; // sent and not yet acknowledged by wskeep: {n, data}
    this._unwrittenBytes = 0;
    this._written = 0; // the last send written on the current connection
    this._received = 0; // data messages received on this session
    this._ackedReceived = 0; // the last count we acked
    this._unackedBytes = 0;
  }

  _connect() {
    const url =
      this._token === null
        ? withParams(this._url, { wskeep_resume: 1 })
        : withParams(this._url, { wskeep_resume: 1, wskeep_token: this._token, wskeep_received: this._received });
    let ws;
    try {
      ws = new this._Impl(url, this._protocols);
    } catch (e) {
      if (this._readyState === CONNECTING) throw e; // a bad URL or protocol, as WebSocket throws
      this._lost();
      return;
    }
    ws.binaryType = this._binaryType;
    this._ws = ws;
    this._attached = false;
    this._written = 0;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._opened(ws);
      if (this._ws === ws && this._writable()) this._writeAbove(ws, this._written);
    };
    ws.onmessage = (e) => this._ws === ws && this._message(ws, e.data);
    ws.onclose = (e) => this._ws === ws && this._closed(ws, e);
    // An error is a connection failed without a close frame (1006, as its close event will
    // say). Some runtimes never send that close for a refused connection (Node 20's undici
    // leaves it CONNECTING), so the error itself ends it; the page hears only of a final failure.
    ws.onerror = () => {
      if (this._ws !== ws) return;
      this._closed(ws, { code: 1006, reason: "", wasClean: false });
      try { ws.close(); } catch { /* already closing */ }
    };
  }

  _opened(ws) {
    if (this._token === null) {
      // A new session (the first, or after a reset) may get another answer; a resume gets the
      // original one.
      this._protocol = ws.protocol;
      this._extensions = ws.extensions;
    }
    if (this._readyState === CONNECTING) {
      this._readyState = OPEN;
      this.dispatchEvent(new Event("open"));
      if (this._ws !== ws || this._readyState !== OPEN) return;
    }
    if (this._mode === "pending") {
      // A wskeep without resume sends no session message: after a while, be a plain socket (on
      // the first connection, and on a fresh session's after a reset: else sends pile up kept).
      clearTimeout(this._sessionTimer);
      this._sessionTimer = setTimeout(() => this._ws === ws && this._mode === "pending" && this._plain(true), this._sessionWaitMs);
    } else if (this._mode === "resumable" && !this._attached) {
      // A resume is answered with a session message or 4410; neither within the wait (a wskeep
      // that restarted with resume off, or an older build): the session is gone.
      clearTimeout(this._sessionTimer);
      this._sessionTimer = setTimeout(() => this._ws === ws && !this._attached && this._notResumed(ws), this._sessionWaitMs);
    }
  }

  /** A resume that was answered with no session (see _opened, _message): a fresh one. */
  _notResumed(ws) {
    this._drop(ws);
    try { ws.close(); } catch { /* already closing */ }
    this._reset();
  }

  _message(ws, data) {
    let control = this._mode === "plain" && !this._lapsed ? null : parseControl(data);
    // wskeep with resume speaks first, with its session message: anything else first is the
    // upstream's own message through a wskeep without resume (or none at all).
    if (control !== null && this._mode !== "resumable" && control[0] !== "session") control = null;
    if (this._mode === "plain") this._lapsed = false; // whatever it was, it came first
    if (control !== null) {
      this._control(ws, control);
      return;
    }
    if (this._mode === "pending") this._plain(false);
    // Data before the session message on a resume: the upstream of a wskeep without resume.
    if (this._mode === "resumable" && !this._attached) return this._notResumed(ws);
    if (this._mode === "resumable") {
      this._received += 1;
      this._unackedBytes += sizeOf(data);
      if (this._received - this._ackedReceived >= ACK_MESSAGES || this._unackedBytes >= ACK_BYTES) this._ack();
    }
    if (this._readyState === OPEN) this.dispatchEvent(messageEvent(data, this._origin));
  }

  /** @param {WebSocket} ws @param {string[]} control the verb and its fields */
  _control(ws, control) {
    const [verb, ...fields] = control;
    if (verb === "session") {
      const [token, field] = fields;
      const theirs = count(field);
      if (!token || Number.isNaN(theirs)) return this._violation(ws, "bad session message");
      // Also when it came after the shim stopped waiting for it: a slow path, not a wskeep
      // without resume. The sends written meanwhile were not kept (see _session's check).
      this._session(ws, token, theirs);
    } else if (verb === "ack") {
      const theirs = count(fields[0]);
      if (Number.isNaN(theirs) || theirs > this._sent) return this._violation(ws, "bad ack");
      this._release(theirs);
    }
    // Other verbs are for later protocol versions: ignored.
  }

  /** The session message: a new session, or wskeep's answer to our resume. */
  _session(ws, token, theirs) {
    const resuming = this._token !== null;
    // A new session starts at 0 (what this connection carried already is on its way). A resumed
    // one cannot have more than was sent, nor lack a send that is no longer kept.
    const bad = resuming ? theirs > this._sent || theirs < this._sent - this._kept.length : theirs !== 0;
    if (bad) {
      return this._violation(ws, "session count out of range");
    }
    clearTimeout(this._sessionTimer);
    this._closeStale(); // wskeep has replaced it by now (or its session is gone)
    this._token = token;
    this._mode = "resumable";
    this._attached = true;
    this._attempt = 0;
    this._resets = 0;
    this._release(theirs);
    // Everything wskeep has not received goes out again, in order, before any new send (on a
    // new session, what was written before this message is on its way already).
    const resent = this._writeAbove(ws, Math.max(theirs, this._written));
    this._ackedReceived = this._received;
    this._unackedBytes = 0;
    clearInterval(this._ackTimer);
    let lastAck = now();
    this._ackTimer = setInterval(() => {
      if (this._ws !== ws) return;
      if (this._received !== this._ackedReceived && now() - lastAck >= ACK_INTERVAL_MS - 1) {
        lastAck = now();
        this._ack();
      }
      // wskeep acks what it received within about a second: a send unacknowledged for much
      // longer means a path that died silently (no FIN: a phone that changed networks), which
      // the browser would notice only after minutes. Leave it and resume on a new connection.
      // No close frame on it: one that still reached wskeep (a slow path, not a dead one) would
      // end the session. The resume replaces it in wskeep, then it is closed (_closeStale).
      if (this._kept.length > 0 && now() - this._kept[0].at > this._ackTimeoutMs) {
        this._drop(ws);
        this._stale = ws;
        this._lost();
      }
    }, Math.min(ACK_INTERVAL_MS, this._ackTimeoutMs / 2));
    if (resuming && this._gapStart !== 0) {
      const gapMs = Math.round(now() - this._gapStart);
      this._gapStart = 0;
      this.dispatchEvent(event("resumed", { detail: { gapMs, resent, received: this._received } }));
    }
    this._gapStart = 0;
  }

  /**
   * Whether sends go out now: once the session message came, or at once on a new session's
   * open connection (wskeep counts a new session's messages from zero whenever they come; a
   * resume must wait for wskeep's count to know what to resend).
   */
  _writable() {
    return this._attached || (this._token === null && this._mode === "pending" && this._ws?.readyState === OPEN);
  }

  /** Writes the kept sends numbered above `above`, in order; returns how many. */
  _writeAbove(ws, above) {
    const at = now();
    let written = 0;
    // Kept sends are numbered consecutively: start at `above + 1` rather than scan them all.
    const first = this._kept.length > 0 ? Math.max(0, above + 1 - this._kept[0].n) : 0;
    for (let i = first; i < this._kept.length; i++) {
      const kept = this._kept[i];
      kept.at = at;
      ws.send(kept.data);
      written += 1;
    }
    this._written = this._sent;
    this._unwrittenBytes = 0;
    return written;
  }

  /** wskeep has every send up to `theirs`: stop keeping them. */
  _release(theirs) {
    let drop = 0;
    while (drop < this._kept.length && this._kept[drop].n <= theirs) drop += 1;
    if (drop > 0) this._kept.splice(0, drop);
  }

  _ack() {
    this._ackedReceived = this._received;
    this._unackedBytes = 0;
    this._ws.send(`${PREFIX}ack ${this._received}`);
  }

  /** wskeep said something the protocol does not allow: this session cannot be trusted. */
  _violation(ws, why) {
    this._drop(ws);
    ws.close(4000, why.slice(0, 100));
    this._reset();
  }

  /** A wskeep without resume: the socket passes everything through and does not reconnect. */
  _plain(lapsed) {
    clearTimeout(this._sessionTimer);
    this._mode = "plain";
    this._lapsed = lapsed; // no message yet: a session message may still come, late
    this._writeAbove(this._ws, this._written);
    this._kept = [];
    this._unwrittenBytes = 0;
  }

  _closed(ws, e) {
    this._drop(ws);
    if (this._readyState === CLOSING) return this._finish(e.code, e.reason, e.wasClean);
    if (e.code === NOT_RESUMABLE && this._mode === "resumable") return this._reset();
    // A close frame from wskeep (or the upstream through it) ends the session, as without the
    // shim; 1006 is a connection that died without one: resume it.
    const died = e.code === 1006 || e.code === 1005 || e.code === 1015;
    if (died && this._mode === "resumable" && this._token !== null) return this._lost();
    // Before its session message: sends written on it may have reached wskeep's session and the
    // upstream, which a fresh session would resend, so they are lost, not resent.
    if (died && this._mode === "pending" && this._readyState === OPEN) return this._written > 0 ? this._reset() : this._lost();
    if (died && this._readyState === CONNECTING) this.dispatchEvent(new Event("error"));
    if (died && this._mode === "plain") this.dispatchEvent(new Event("error"));
    this._finish(e.code, e.reason, e.wasClean);
  }

  /** The connection went without a close frame: reconnect after a jittered backoff. */
  _lost() {
    this._attached = false;
    this._stopTimers();
    if (this._gapStart === 0) this._gapStart = now();
    this._unwrittenBytes = this._kept.reduce((sum, k) => sum + sizeOf(k.data), 0);
    const delay = backoffDelay(this._attempt, this._minDelayMs, this._maxDelayMs, this._random);
    this._attempt += 1;
    if (now() + delay - this._gapStart > this._maxGapMs) {
      this.dispatchEvent(new Event("error"));
      this._finish(1006, "", false);
      return;
    }
    this._retryTimer = setTimeout(() => {
      if (this._readyState === OPEN) this._connect();
    }, delay);
  }

  /** wskeep cannot resume the session: tell the page, start a fresh one. */
  _reset() {
    const lost = this._mode === "resumable" || this._mode === "pending" ? this._kept.length : 0;
    this._stopTimers();
    this._newSession();
    this._mode = "pending";
    if (this._gapStart === 0) this._gapStart = now();
    this.dispatchEvent(event("reset", { detail: { lost } }));
    if (this._readyState !== OPEN) return;
    // The first fresh attempt goes at once (wskeep answered: it is there); a loop of them backs off.
    this._resets += 1;
    const delay = this._resets === 1 ? 0 : backoffDelay(this._resets - 2, this._minDelayMs, this._maxDelayMs, this._random);
    if (now() + delay - this._gapStart > this._maxGapMs) {
      this.dispatchEvent(new Event("error"));
      this._finish(1006, "", false);
      return;
    }
    if (delay === 0) this._connect();
    else this._retryTimer = setTimeout(() => this._readyState === OPEN && this._connect(), delay);
  }

  /** Closes a connection left by the ack watchdog (see _session). */
  _closeStale() {
    const stale = this._stale;
    this._stale = null;
    try { stale?.close(); } catch { /* already closing */ }
  }

  /** Stops listening to a connection that is no longer ours. */
  _drop(ws) {
    if (ws && this._ws === ws) {
      this._ws = null;
      this._attached = false;
    }
  }

  _stopTimers() {
    clearInterval(this._ackTimer);
    clearTimeout(this._sessionTimer);
    this._ackTimer = this._sessionTimer = null;
  }

  _finish(code, reason, wasClean) {
    if (this._readyState === CLOSED) return;
    clearTimeout(this._retryTimer);
    clearTimeout(this._closeTimer);
    this._stopTimers();
    this._closeStale();
    this._readyState = CLOSED;
    this._kept = [];
    this._unwrittenBytes = 0;
    this.dispatchEvent(event("close", { code, reason, wasClean }));
  }
}

function now() {
  return globalThis.performance?.now() ?? Date.now();
}

export default WskeepSocket;
