//! The life of one proxied WebSocket connection: relay, keepalive and ending, in one task.
//!
//! One `poll_fn` drives both legs. It forwards frames, not messages: each data frame goes from
//! the bytes the transport has (rustls's buffer, or the stack) into the other leg's write buffer,
//! unmasked and re-masked on the way, and becomes writable once it has fully arrived and passed
//! its checks (UTF-8, size, the JSON ping matcher). Pings are answered on the leg they came from.
//! A leg is read only while both legs' write buffers have room, so a slow reader backpressures
//! the sender instead of growing a buffer; writes go out once nothing more is ready to read. The
//! first ending it sees (a close frame, a lost leg, a timeout, a frame that breaks the protocol
//! or the limits, shutdown) decides what each leg is sent; the closing handshakes then run on
//! both legs together, bounded by `CLOSE_BOUND`.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connections::ConnInfo;
use crate::frame::{self, Control, ControlFrame, DataFrame, FrameReader, Kind, Step, Utf8Check, Violation};
use crate::jsonping::JsonPingMatcher;
use crate::keepalive::{self, Due, Keepalive, LegTimers, TimerSlots};
use crate::legstream::LegStream;
use crate::metrics::Metrics;
use crate::shutdown::CLOSE_BOUND;
use crate::vocab::{End, Side};

/// A leg is read only while neither leg has this much waiting to be written: a peer that
/// cannot keep up slows down the one that sends.
const HIGH_WATER: usize = 64 * 1024;
/// A write buffer larger than this is released whenever it has been written out: a connection
/// that carried a large message does not keep that memory while idle, and a busy one pays an
/// allocation per batch of large messages (small batches reuse their buffer).
const KEEP_CAPACITY: usize = 4 * 1024;
/// A peer is not read while this much of wskeep's answers to it (pongs, JSON pongs) waits to be
/// written: a peer that sends pings and reads nothing stops being read, while one that only
/// reads slowly still gets its messages forwarded.
const OWN_BUDGET: usize = 16 * 1024;
/// A leg's turn ends after this many reads even if more are ready; writes follow every turn, so
/// a busy leg cannot delay the other.
const READS_PER_TURN: u32 = 16;
/// The most one read takes from a plain socket, into a buffer on the stack (a TLS leg lends
/// rustls's plaintext buffer instead).
const SCRATCH: usize = 64 * 1024;

/// What the relay needs to know beyond the two streams.
pub struct RelaySettings {
    /// Keepalive of the client leg, then of the upstream leg.
    pub timers: [LegTimers; 2],
    pub json_ping: Option<Arc<JsonPingMatcher>>,
    /// The largest message (and frame) either side may send.
    pub max_message_size: u64,
    /// Where every connection's keepalive timers wait.
    pub timer_slots: TimerSlots,
}

impl RelaySettings {
    pub fn from_config(config: &Config) -> RelaySettings {
        let (client, upstream) = (&config.client_keepalive, &config.upstream_keepalive);
        RelaySettings {
            timers: [
                LegTimers {
                    ping_interval: client.ping_interval,
                    pong_interval: Duration::ZERO,
                    timeout: client.timeout,
                },
                LegTimers {
                    ping_interval: upstream.ping_interval,
                    pong_interval: upstream.pong_interval,
                    timeout: upstream.timeout,
                },
            ],
            json_ping: JsonPingMatcher::new(&config.json_ping).map(Arc::new),
            max_message_size: config.limits.max_message_size.0,
            timer_slots: TimerSlots::default(),
        }
    }
}

/// How the connection ended, as the closing log line reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub end: End,
    /// Close codes per leg: (received, sent). 1005: a close frame without a code; 1006: none came.
    pub codes: [(Option<u16>, Option<u16>); 2],
}

/// A close frame's code and reason; `None` where a close frame carries no code.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CloseMsg {
    code: u16,
    reason: String,
}

const GOING_AWAY: u16 = 1001;
/// DESIGN.md's code for the client when the upstream fails (IANA: Bad Gateway).
const BAD_GATEWAY: u16 = 1014;

fn close(code: u16, reason: &str) -> Option<CloseMsg> {
    Some(CloseMsg { code, reason: reason.to_owned() })
}

fn wire_code(close: &Option<CloseMsg>) -> u16 {
    close.as_ref().map_or(1005, |c| c.code)
}

/// What happened first.
#[derive(Debug)]
enum Ending {
    /// A close frame from this side.
    Closed(Side, Option<CloseMsg>),
    /// The leg's connection failed without a close frame.
    Lost(Side),
    TimedOut(Side),
    /// The side sent something wskeep must refuse: what it is told (1002, 1007, 1009).
    Refused(Side, Violation),
    Shutdown,
}

/// What one leg gets in the closing phase.
enum CloseAction {
    /// It sent this close: echo it back.
    Answer(Option<CloseMsg>),
    /// Send this close frame (after every message already complete for it), then await its answer.
    Send(Option<CloseMsg>),
    /// The connection is gone: nothing can be written.
    Nothing,
}

impl Ending {
    /// The endings table of DESIGN.md: the `end` label and what the client and upstream get.
    fn plan(self) -> (End, CloseAction, CloseAction) {
        use CloseAction::*;
        match self {
            Ending::Closed(Side::Client, c) => (End::ClientClose, Answer(c.clone()), Send(c)),
            Ending::Closed(Side::Upstream, c) => (End::UpstreamClose, Send(c.clone()), Answer(c)),
            Ending::TimedOut(Side::Client) => (
                End::ClientTimeout,
                Send(close(GOING_AWAY, "client timed out")),
                Send(close(GOING_AWAY, "client timed out")),
            ),
            Ending::TimedOut(Side::Upstream) => (
                End::UpstreamTimeout,
                Send(close(BAD_GATEWAY, "upstream timed out")),
                Send(close(GOING_AWAY, "upstream timed out")),
            ),
            Ending::Lost(Side::Client) => (End::ClientError, Nothing, Send(close(GOING_AWAY, "client gone"))),
            Ending::Lost(Side::Upstream) => {
                (End::UpstreamError, Send(close(BAD_GATEWAY, "upstream connection lost")), Nothing)
            }
            Ending::Refused(Side::Client, v) => {
                (End::ClientError, Send(close(v.code, v.reason)), Send(close(GOING_AWAY, "client gone")))
            }
            Ending::Refused(Side::Upstream, v) => {
                (End::UpstreamError, Send(close(GOING_AWAY, "upstream error")), Send(close(v.code, v.reason)))
            }
            Ending::Shutdown => {
                (End::Shutdown, Send(close(GOING_AWAY, "going away")), Send(close(GOING_AWAY, "going away")))
            }
        }
    }
}

/// One leg's outgoing bytes: complete frames (`..committed`, of which `..written` are written),
/// then the start of a data frame still arriving from the other leg, which is never written
/// before it is whole and checked.
struct Outbox {
    buf: Vec<u8>,
    committed: usize,
    written: usize,
    /// Bytes went to the transport since its last flush.
    unflushed: bool,
    /// Frames to this peer are masked: it is a server.
    masked: bool,
    /// The last frame forwarded did not end its message: a data frame of wskeep's own (a JSON
    /// pong) must wait for the message's end (RFC 6455 §5.4).
    open_message: bool,
    /// wskeep's own control frames waiting for the frame still arriving: at most one ping (a
    /// timer's) and one pong (for the latest ping only, as RFC 6455 §5.5.3 allows). Empty, and
    /// unallocated, nearly always.
    held_ping: Vec<u8>,
    held_pong: Vec<u8>,
    /// JSON pongs waiting for the open message to end, up to `OWN_BUDGET` (more are dropped).
    held_data: Vec<u8>,
    /// wskeep's own bytes among the complete frames not yet written: past `OWN_BUDGET`, the
    /// peer they answer is not read.
    own: usize,
}

impl Outbox {
    fn new(masked: bool) -> Outbox {
        Outbox {
            buf: Vec::new(),
            committed: 0,
            written: 0,
            unflushed: false,
            masked,
            open_message: false,
            held_ping: Vec::new(),
            held_pong: Vec::new(),
            held_data: Vec::new(),
            own: 0,
        }
    }

    /// Frames waiting to be written are under the high-water mark.
    fn has_room(&self) -> bool {
        self.committed - self.written < HIGH_WATER
    }

    fn mask(&self) -> Option<[u8; 4]> {
        // RFC 6455 §5.3: a fresh, unpredictable key per frame.
        self.masked.then(rand::random)
    }

    /// Queues a whole frame of wskeep's own: at once if it may go next, else held until it may.
    /// `false`: dropped (a ping while one is held already, a JSON pong past the budget).
    fn push_frame(&mut self, opcode: u8, payload: &[u8]) -> bool {
        let mask = self.mask();
        let control = opcode & 0x8 != 0;
        let at_boundary = self.committed == self.buf.len();
        let out = match opcode {
            _ if at_boundary && (control || !self.open_message) => &mut self.buf,
            frame::OP_PONG => {
                self.held_pong.clear();
                &mut self.held_pong
            }
            frame::OP_PING if !self.held_ping.is_empty() => return false,
            // A ping; a close is only ever pushed at a boundary (after `drop_partial`).
            _ if control => &mut self.held_ping,
            _ if self.held_data.len() >= OWN_BUDGET => return false,
            _ => &mut self.held_data,
        };
        frame::write_frame(out, true, opcode, payload, mask);
        if at_boundary {
            self.commit_own(self.committed);
        }
        true
    }

    /// Everything in the buffer may be written; what is past `start` is wskeep's own.
    fn commit_own(&mut self, start: usize) {
        self.own += self.buf.len() - start;
        self.committed = self.buf.len();
    }

    /// Sends a control frame of wskeep's own. With nothing waiting before it, it is written
    /// straight from the stack, so an idle connection's pings never need a buffer; otherwise,
    /// or for what the transport did not take, it is queued as `push_frame` does.
    fn send_control(&mut self, io: &mut LegStream, cx: &mut Context<'_>, opcode: u8, payload: &[u8]) -> bool {
        if !self.buf.is_empty() {
            return self.push_frame(opcode, payload);
        }
        let frame = ControlFrame::new(opcode, payload, self.mask());
        let frame = frame.as_bytes();
        // An error is not handled here: the queued frame meets it again in `poll_write`.
        let n = match io.poll_write(cx, frame) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(_)) | Poll::Pending => 0,
        };
        self.unflushed |= n > 0;
        if n < frame.len() {
            self.buf.extend_from_slice(&frame[n..]);
            self.commit_own(0);
        }
        true
    }

    /// The frame that was arriving is whole and checked: it may be written, and so may the
    /// frames held behind it.
    fn commit_forwarded(&mut self, fin: bool) {
        self.open_message = !fin;
        self.release_held();
    }

    /// Drops the frame still arriving (it will never be written), releasing what waited for it.
    fn drop_partial(&mut self) {
        self.buf.truncate(self.committed);
        self.release_held();
    }

    fn release_held(&mut self) {
        let before = self.buf.len();
        // `take`, not `append`: a held buffer's allocation goes too.
        for held in [&mut self.held_ping, &mut self.held_pong] {
            if !held.is_empty() {
                self.buf.extend_from_slice(&std::mem::take(held));
            }
        }
        if !self.open_message && !self.held_data.is_empty() {
            self.buf.extend_from_slice(&std::mem::take(&mut self.held_data));
        }
        self.commit_own(before);
    }

    /// Writes the complete frames and flushes the transport.
    fn poll_write(&mut self, io: &mut LegStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.committed {
            let n = ready!(io.poll_write(cx, &self.buf[self.written..self.committed]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.unflushed = true;
        }
        // Every complete frame is written, wskeep's own among them.
        self.own = 0;
        if self.written > 0 {
            if self.committed == self.buf.len() {
                if self.buf.capacity() > KEEP_CAPACITY {
                    self.buf = Vec::new();
                } else {
                    self.buf.clear();
                }
            } else {
                self.buf.drain(..self.written);
            }
            self.committed -= self.written;
            self.written = 0;
        }
        if self.unflushed {
            ready!(io.poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// The data frame a leg is forwarding into the other leg's outbox, where it starts at
/// `committed` (nothing else is ever appended behind it).
#[derive(Default)]
struct Forward {
    head_len: usize,
    /// The key it is re-masked with, towards a server.
    mask: Option<[u8; 4]>,
    /// The text message it belongs to, checked frame by frame.
    utf8: Utf8Check,
}

struct Leg {
    side: Side,
    io: LegStream,
    reader: FrameReader,
    out: Outbox,
    forward: Forward,
}

/// What reads record against, besides the legs and the timers.
#[derive(Clone, Copy)]
struct Meters<'a> {
    settings: &'a RelaySettings,
    metrics: &'a Metrics,
    conn: &'a ConnInfo,
}

/// Relays between `client` and `upstream` until the connection ends; returns how it ended.
pub async fn run(
    client: LegStream,
    upstream: LegStream,
    settings: &RelaySettings,
    metrics: &Metrics,
    conn: &ConnInfo,
    closing: CancellationToken,
) -> Outcome {
    let leg = |side, io, from_client| Leg {
        side,
        io,
        reader: FrameReader::new(from_client, settings.max_message_size),
        out: Outbox::new(!from_client),
        forward: Forward::default(),
    };
    let mut legs = [leg(Side::Client, client, true), leg(Side::Upstream, upstream, false)];
    let [client_timers, upstream_timers] = settings.timers;
    let slack = keepalive::coalescing(&settings.timers);
    let mut keepalive = Keepalive::new(client_timers, upstream_timers, slack, settings.timer_slots.clone());
    let meters = Meters { settings, metrics, conn };
    // Every relay shares one token, and polling its future takes the token's lock each time; so
    // the future is polled once, to register this task's waker, and afterwards only the flag is
    // read (a task's waker stays the same for its whole life).
    let mut close_signal = std::pin::pin!(closing.clone().cancelled_owned());
    let mut close_registered = false;
    let mut client_first = true;

    let ending = poll_fn(|cx| {
        if !close_registered {
            close_registered = true;
            if close_signal.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ending::Shutdown);
            }
        } else if closing.is_cancelled() {
            return Poll::Ready(Ending::Shutdown);
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
        // One clock read per wake-up, not per read: a frame's arrival time needs no finer grain.
        let mut clock = None;
        loop {
            while let Poll::Ready((side, due)) = keepalive.poll_due(cx) {
                let leg = &mut legs[side as usize];
                match due {
                    Due::Dead => return Poll::Ready(Ending::TimedOut(side)),
                    // Pings and pongs are dropped while the peer reads nothing: its idle timer
                    // decides its fate, and the buffer stays bounded.
                    Due::Ping(payload) if leg.out.has_room() => {
                        if leg.out.send_control(&mut leg.io, cx, frame::OP_PING, &payload) {
                            metrics.pings_sent[side as usize].inc();
                            conn.leg(side).pings_sent.fetch_add(1, Relaxed);
                        }
                    }
                    // A held pong (answering the peer's ping) already serves, and must not be
                    // replaced by this one.
                    Due::Pong if leg.out.has_room() && leg.out.held_pong.is_empty() => {
                        leg.out.send_control(&mut leg.io, cx, frame::OP_PONG, &[]);
                    }
                    Due::Ping(_) | Due::Pong => {}
                }
            }
            // Alternate which leg reads first so that a busy leg cannot starve the other. A leg
            // reads until it has nothing more (rustls lends one record per read) or its turn ends.
            client_first = !client_first;
            let mut blocked = [false; 2];
            let mut more = false;
            for src in if client_first { [0, 1] } else { [1, 0] } {
                let [client, upstream] = &mut legs;
                let (from, to) = if src == 0 { (client, upstream) } else { (upstream, client) };
                let mut reads = 0;
                loop {
                    if !may_read(from, to) {
                        blocked[src] = true;
                        break;
                    }
                    if reads == READS_PER_TURN {
                        more = true;
                        break;
                    }
                    match poll_read(from, to, &mut keepalive, meters, &mut clock, &mut scratch, cx) {
                        Poll::Ready(Ok(())) => reads += 1,
                        Poll::Ready(Err(ending)) => return Poll::Ready(ending),
                        Poll::Pending => break,
                    }
                }
            }
            // Nothing more to read right now (or a long run of reads): write out what they made.
            for leg in &mut legs {
                if let Poll::Ready(Err(e)) = leg.out.poll_write(&mut leg.io, cx) {
                    tracing::debug!(conn = conn.id, side = leg.side.as_str(), error = %e, "write failed");
                    return Poll::Ready(Ending::Lost(leg.side));
                }
            }
            // Go round again after a long run of reads, or when writing made room to read.
            let [client, upstream] = &legs;
            let unblocked = blocked[0] && may_read(client, upstream) || blocked[1] && may_read(upstream, client);
            if !(more || unblocked) {
                return Poll::Pending;
            }
        }
    })
    .await;
    tracing::debug!(conn = conn.id, ending = ?ending, "connection ending");
    // Its place in a timer slot goes now, not after the closing handshake.
    drop(keepalive);
    // Boxed: the closing phase is large and short-lived; keeping it out of the relay future keeps
    // every idle connection small.
    Box::pin(finish(legs, ending, metrics)).await
}

/// `from` may be read: what it sends has room on the other leg, and wskeep's answers to it
/// are within their budget.
fn may_read(from: &Leg, to: &Leg) -> bool {
    to.out.has_room() && from.out.own < OWN_BUDGET
}

/// Reads what `from` has and handles every frame in it; `Err` is how the connection ends.
fn poll_read(
    from: &mut Leg,
    to: &mut Leg,
    keepalive: &mut Keepalive,
    meters: Meters<'_>,
    clock: &mut Option<Instant>,
    scratch: &mut [MaybeUninit<u8>],
    cx: &mut Context<'_>,
) -> Poll<Result<(), Ending>> {
    let side = from.side;
    let Leg { io, reader, out: back, forward, .. } = from;
    let read = io.poll_read_with(cx, scratch, |bytes| {
        if bytes.is_empty() {
            return Err(Ending::Lost(side));
        }
        let now = *clock.get_or_insert_with(Instant::now);
        keepalive.saw_frame(side, now);
        meters.conn.saw_frame(side, now.into_std());
        let mut relayed = Relayed::default();
        let mut rest = bytes;
        let result =
            read_frames(side, &mut rest, reader, forward, back, &mut to.out, keepalive, meters, now, &mut relayed);
        relayed.record(side, meters);
        if let Err(Ending::Refused(..)) = result {
            // The rest of this read is parsed and dropped, so the closing handshake reads this
            // leg from a frame boundary (an error consumes a header, so this ends).
            while !matches!(reader.next(&mut rest), Ok(None)) {}
        }
        result
    });
    match ready!(read) {
        Ok(result) => Poll::Ready(result),
        Err(e) => {
            tracing::debug!(conn = meters.conn.id, side = side.as_str(), error = %e, "read failed");
            Poll::Ready(Err(Ending::Lost(side)))
        }
    }
}

/// Messages and payload bytes relayed by one read, recorded together.
#[derive(Default)]
struct Relayed {
    messages: u64,
    bytes: u64,
}

impl Relayed {
    fn record(&self, from: Side, meters: Meters<'_>) {
        if self.bytes == 0 && self.messages == 0 {
            return;
        }
        let (metrics, stats) = (meters.metrics, meters.conn.leg(from));
        metrics.messages[from as usize].inc_by(self.messages);
        metrics.message_bytes[from as usize].inc_by(self.bytes);
        stats.messages.fetch_add(self.messages, Relaxed);
        stats.bytes.fetch_add(self.bytes, Relaxed);
    }
}

/// Handles the frames (or parts of one) in `bytes` up to the first that ends the connection:
/// data goes to `out`, answers to `back`.
#[allow(clippy::too_many_arguments)]
fn read_frames(
    side: Side,
    bytes: &mut &[u8],
    reader: &mut FrameReader,
    forward: &mut Forward,
    back: &mut Outbox,
    out: &mut Outbox,
    keepalive: &mut Keepalive,
    meters: Meters<'_>,
    now: Instant,
    relayed: &mut Relayed,
) -> Result<(), Ending> {
    let src = side as usize;
    let (metrics, stats) = (meters.metrics, meters.conn.leg(side));
    let refuse = |v: Violation| Ending::Refused(side, v);
    while let Some(step) = reader.next(bytes).map_err(refuse)? {
        match step {
            Step::Data { frame, bytes, offset } => {
                forward_piece(side, frame, bytes, offset, forward, out, back, meters, relayed).map_err(refuse)?
            }
            Step::Control(Control::Ping) => {
                back.push_frame(frame::OP_PONG, reader.control_payload());
                metrics.pings_answered[src].inc();
                stats.pings_answered.fetch_add(1, Relaxed);
            }
            Step::Control(Control::Pong) => {
                metrics.pongs_received[src].inc();
                stats.pongs_received.fetch_add(1, Relaxed);
                if let Some(rtt) = keepalive.pong_received(side, reader.control_payload(), now) {
                    metrics.ping_rtt[src].observe(rtt.as_secs_f64());
                    stats.last_rtt_us.store((rtt.as_micros() as u64).max(1), Relaxed);
                }
            }
            Step::Control(Control::Close) => {
                let close = frame::parse_close(reader.control_payload()).map_err(refuse)?;
                let close = close.map(|(code, reason)| CloseMsg { code, reason: reason.to_owned() });
                return Err(Ending::Closed(side, close));
            }
        }
    }
    Ok(())
}

/// Copies a piece of a data frame into `out`; once the frame is whole, checks it and makes it
/// writable (or, for a JSON ping that is not forwarded, drops it after answering on `back`).
#[allow(clippy::too_many_arguments)]
fn forward_piece(
    from: Side,
    frame: DataFrame,
    piece: &[u8],
    offset: u64,
    forward: &mut Forward,
    out: &mut Outbox,
    back: &mut Outbox,
    meters: Meters<'_>,
    relayed: &mut Relayed,
) -> Result<(), Violation> {
    if offset == 0 {
        forward.mask = out.mask();
        frame::write_head(&mut out.buf, frame.fin, frame.opcode(), frame.len, forward.mask);
        forward.head_len = out.buf.len() - out.committed;
        // Room for the payload, up to one read's worth: a header alone must not reserve the
        // whole of a large frame's announced length.
        out.buf.reserve(frame.len.min(SCRATCH as u64) as usize);
    }
    let start = out.buf.len();
    out.buf.extend_from_slice(piece);
    // Binary payloads are unmasked and re-masked in one pass; text stays plain until checked.
    let key = match (frame.kind, frame.mask, forward.mask) {
        (Kind::Binary, Some(a), Some(b)) => Some(std::array::from_fn(|i| a[i] ^ b[i])),
        (Kind::Binary, a, b) => a.or(b),
        (Kind::Text, a, _) => a,
    };
    if let Some(key) = key {
        frame::apply_mask(&mut out.buf[start..], frame::rotate(key, offset));
    }
    if offset + (piece.len() as u64) < frame.len {
        return Ok(());
    }
    let payload_at = out.committed + forward.head_len;
    if frame.kind == Kind::Text {
        let payload = &out.buf[payload_at..];
        if frame.first {
            forward.utf8 = Utf8Check::default();
        }
        let text = if frame.first && frame.fin {
            Some(std::str::from_utf8(payload).map_err(|_| Violation::INVALID_UTF8)?)
        } else {
            forward.utf8.check(payload, frame.fin).map_err(|_| Violation::INVALID_UTF8)?;
            None
        };
        // A JSON ping is a whole text message from the client (browsers never fragment one).
        let matcher = meters.settings.json_ping.as_deref().filter(|_| from == Side::Client);
        if let Some((matcher, reply)) = matcher.and_then(|m| Some((m, m.answer(text?)?))) {
            if back.push_frame(frame::OP_TEXT, reply.as_bytes()) {
                meters.metrics.json_pings_answered.inc();
            }
            if !matcher.forward {
                out.drop_partial();
                return Ok(());
            }
        }
        if let Some(key) = forward.mask {
            frame::apply_mask(&mut out.buf[payload_at..], key);
        }
    }
    out.commit_forwarded(frame.fin);
    relayed.bytes += frame.len;
    relayed.messages += frame.fin as u64;
    Ok(())
}

/// Runs the closing handshakes of both legs together and records the codes.
async fn finish(legs: [Leg; 2], ending: Ending, metrics: &Metrics) -> Outcome {
    let mut codes = [(None, None); 2];
    if let Ending::Closed(side, c) = &ending {
        codes[*side as usize].0 = Some(wire_code(c));
    }
    if let Ending::Lost(side) = &ending {
        codes[*side as usize].0 = Some(1006);
    }
    if let Ending::Refused(side, v) = &ending {
        tracing::debug!(side = side.as_str(), code = v.code, reason = v.reason, "refused a frame");
    }
    let (end, client_action, upstream_action) = ending.plan();
    let [client, upstream] = legs;
    let (c, u) = tokio::join!(close_leg(client, client_action), close_leg(upstream, upstream_action));
    for (side, (received, sent)) in [(Side::Client, c), (Side::Upstream, u)] {
        let slot = &mut codes[side as usize];
        slot.0 = slot.0.or(received);
        slot.1 = sent;
        if let Some(code) = slot.0 {
            metrics.close_code(side, true, code);
        }
        if let Some(code) = slot.1 {
            metrics.close_code(side, false, code);
        }
    }
    Outcome { end, codes }
}

/// Closes one leg as planned; returns the close code it answered with (if it was waited for)
/// and the code wskeep sent it. The transport is ended too (TLS `close_notify`, then FIN), so
/// nothing wskeep wrote stays behind in a TLS buffer when the socket is dropped.
async fn close_leg(mut leg: Leg, action: CloseAction) -> (Option<u16>, Option<u16>) {
    let (close, awaits_answer) = match action {
        CloseAction::Nothing => return (None, None),
        CloseAction::Answer(close) => (close, false),
        CloseAction::Send(close) => (close, true),
    };
    let code = wire_code(&close);
    // Complete frames go first; a frame that never fully arrived is not sent.
    leg.out.drop_partial();
    let payload = match &close {
        Some(c) => frame::close_payload(Some(c.code), &c.reason),
        None => frame::close_payload(None, ""),
    };
    // At a boundary now (`drop_partial`), so it is queued, never held or dropped.
    leg.out.push_frame(frame::OP_CLOSE, &payload);
    let mut written = false;
    let handshake = async {
        written = poll_fn(|cx| leg.out.poll_write(&mut leg.io, cx)).await.is_ok();
        let answer = if written && awaits_answer { await_close(&mut leg).await } else { None };
        let _ = poll_fn(|cx| leg.io.poll_shutdown(cx)).await;
        answer
    };
    let answer = tokio::time::timeout(CLOSE_BOUND, handshake).await.ok().flatten();
    // No answer (or the leg failed under us): it ended without a close frame.
    (awaits_answer.then(|| answer.unwrap_or(1006)), written.then_some(code))
}

/// Reads until the peer's close frame arrives; its code, or `None` if the leg ended first.
async fn await_close(leg: &mut Leg) -> Option<u16> {
    let mut scratch = vec![MaybeUninit::<u8>::uninit(); 4096];
    let Leg { io, reader, .. } = leg;
    poll_fn(|cx| loop {
        let found = ready!(io.poll_read_with(cx, &mut scratch, |mut bytes| {
            if bytes.is_empty() {
                return Some(None);
            }
            loop {
                match reader.next(&mut bytes) {
                    Ok(Some(Step::Control(Control::Close))) => {
                        let close = frame::parse_close(reader.control_payload());
                        return Some(close.ok().map(|c| c.map_or(1005, |(code, _)| code)));
                    }
                    // Frames that break the rules still pass: the close may come after them.
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => return None,
                }
            }
        }));
        match found {
            Ok(Some(code)) => return Poll::Ready(code),
            Ok(None) => {}
            Err(_) => return Poll::Ready(None),
        }
    })
    .await
}

#[cfg(test)]
mod tests;
