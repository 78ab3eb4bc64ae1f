// Types for wskeep-resume.js: a WebSocket that resumes its wskeep session after a dropped
// connection (docs/resume.md). It has the WebSocket interface, plus `resumed` and `reset`.

export interface WskeepSocketOptions {
  /** The WebSocket implementation (default: the global WebSocket). */
  WebSocket?: { new (url: string, protocols?: string | string[]): WebSocket };
  /** First reconnect delay, before jitter (default 100 ms). */
  minDelayMs?: number;
  /** Largest reconnect delay, before jitter (default 5000 ms). */
  maxDelayMs?: number;
  /** Give up (close 1006) when a gap lasts longer than this (default 30000 ms, wskeep's default grace). */
  maxGapMs?: number;
  /**
   * After `open` (and on a fresh session's connection after a `reset`), how long to wait for
   * wskeep's session message before treating the server as one without resume: a plain
   * WebSocket that keeps no sends and does not reconnect. Sends are not held back meanwhile. The server's first message, if it is not the session message, ends
   * the wait at once. Default 2000 ms.
   */
  sessionWaitMs?: number;
  /**
   * A send that wskeep has not acknowledged for this long (it acks within about a second) means
   * a path that died without a FIN: the socket leaves it, without a close frame (which would
   * end the session if the path was only slow), and resumes on a new connection.
   * Default 10000 ms.
   */
  ackTimeoutMs?: number;
  /** The jitter's random source in [0, 1) (default Math.random). */
  random?: () => number;
}

export interface ResumedDetail {
  /** How long the page was without a connection, in ms. */
  gapMs: number;
  /** Page messages wskeep had not received (above its count), sent again on the new connection. */
  resent: number;
  /**
   * Data messages the page had received on the session, in total, when it came back (the count
   * it gave wskeep): not how many were replayed; wskeep replays what it sent above this count.
   */
  received: number;
}

export interface ResetDetail {
  /**
   * Page messages that wskeep had not acknowledged when the session was lost, which the socket
   * drops (never sends again). Not all undelivered: wskeep acks about once a second, so some of
   * them may have reached wskeep, and the upstream, before the session ended.
   */
  lost: number;
}

export interface WskeepSocketEventMap {
  open: Event;
  message: MessageEvent;
  close: CloseEvent;
  error: Event;
  /** The connection came back and the session went on: nothing lost, nothing twice. */
  resumed: Event & { readonly detail: ResumedDetail };
  /**
   * wskeep could not resume the session (gap longer than its grace, a restarted or different
   * wskeep: close 4410; or no session message within `sessionWaitMs`, from a wskeep with resume
   * off), or a new session's connection died before wskeep's session message
   * with sends already written on it (they may have reached the upstream: not sent again): the
   * socket starts a fresh session, so the upstream sees a new connection. The page should set
   * up its application state again, as after a reload.
   */
  reset: Event & { readonly detail: ResetDetail };
}

export declare class WskeepSocket extends EventTarget {
  static readonly CONNECTING: 0;
  static readonly OPEN: 1;
  static readonly CLOSING: 2;
  static readonly CLOSED: 3;
  readonly CONNECTING: 0;
  readonly OPEN: 1;
  readonly CLOSING: 2;
  readonly CLOSED: 3;

  constructor(url: string | URL, protocols?: string | string[], options?: WskeepSocketOptions);

  /** The URL as given, resolved, without wskeep's own query parameters. */
  readonly url: string;
  /** CONNECTING until the first connection opens; stays OPEN during a reconnect. */
  readonly readyState: 0 | 1 | 2 | 3;
  readonly protocol: string;
  readonly extensions: string;
  /** Bytes queued on the connection plus sends waiting for the next one. */
  readonly bufferedAmount: number;
  binaryType: BinaryType;
  /** Whether wskeep offered a resumable session (false until its session message, or without resume). */
  readonly resumable: boolean;

  onopen: ((this: WskeepSocket, ev: Event) => any) | null;
  onmessage: ((this: WskeepSocket, ev: MessageEvent) => any) | null;
  onclose: ((this: WskeepSocket, ev: CloseEvent) => any) | null;
  onerror: ((this: WskeepSocket, ev: Event) => any) | null;
  onresumed: ((this: WskeepSocket, ev: WskeepSocketEventMap["resumed"]) => any) | null;
  onreset: ((this: WskeepSocket, ev: WskeepSocketEventMap["reset"]) => any) | null;

  /** Sends now, or keeps the message for the next connection during a gap. Throws while CONNECTING. */
  send(data: string | ArrayBufferLike | Blob | ArrayBufferView): void;
  /** Closes for good: the session ends, wskeep relays the close to the upstream. */
  close(code?: number, reason?: string): void;

  addEventListener<K extends keyof WskeepSocketEventMap>(
    type: K,
    listener: (this: WskeepSocket, ev: WskeepSocketEventMap[K]) => any,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof WskeepSocketEventMap>(
    type: K,
    listener: (this: WskeepSocket, ev: WskeepSocketEventMap[K]) => any,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | EventListenerOptions): void;
}

/** The delay before reconnect attempt `attempt` (0-based), jittered between half and all of min(max, min * 2^attempt). */
export declare function backoffDelay(attempt: number, minMs: number, maxMs: number, random?: () => number): number;

export default WskeepSocket;
