//! One read of one leg: the frames in it are parsed, checked and carried over. A data frame is
//! copied piece by piece into the other leg's outbox (unmasked and re-masked on the way) and made
//! writable once it is whole and checked (UTF-8, size, the JSON ping matcher); pings are answered
//! on the leg they came from; pongs measure the round-trip time; a close or a refused frame ends
//! the connection.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{ready, Context, Poll};

use tokio::time::Instant;

use super::ending::{received_close, CloseMsg, Ending};
use super::outbox::Outbox;
use super::session::Hooks;
use super::{ConnEnv, Leg, SCRATCH};
use crate::frame::{self, Control, DataFrame, FrameReader, Kind, Step, Utf8Check, Violation};
use crate::inflate;
use crate::keepalive::Keepalive;
use crate::resume::control;
use crate::vocab::Side;

/// A client's control message that is not one (docs/resume.md).
const BAD_CONTROL: Violation = Violation { code: 1008, reason: "bad wskeep control message" };
/// An upstream text message that starts with the prefix reserved for control messages.
pub const RESERVED_PREFIX: Violation = Violation { code: 1011, reason: "reserved prefix" };
/// A client that keeps asking for JSON pongs without acknowledging what it received.
const UNACKNOWLEDGED: Violation = Violation { code: 1008, reason: "too many unacknowledged messages" };

/// The data frame a leg is carrying into the other leg's outbox, where it starts at
/// `committed` (nothing else is ever appended behind it).
#[derive(Default)]
pub struct FrameInTransit {
    head_len: usize,
    /// The key it is re-masked with, towards a server.
    mask: Option<[u8; 4]>,
    /// The text message it belongs to, checked frame by frame.
    utf8: Utf8Check,
}

/// Reads what `from` has and handles every frame in it; `Err` is how the connection ends.
/// `now` is read once per wake-up, on the first read that brings bytes.
#[allow(clippy::too_many_arguments)]
pub fn poll_read<S: Hooks>(
    from: &mut Leg,
    to: &mut Leg,
    keepalive: &mut Keepalive,
    hooks: &mut S,
    env: ConnEnv<'_>,
    now: &mut Option<Instant>,
    scratch: &mut [MaybeUninit<u8>],
    cx: &mut Context<'_>,
) -> Poll<Result<(), Ending>> {
    let side = from.side;
    let Leg { io, reader, out: back, in_transit, .. } = from;
    let read = io.poll_read_with(cx, scratch, |bytes| {
        if bytes.is_empty() {
            return Err(Ending::Lost(side));
        }
        let now = *now.get_or_insert_with(Instant::now);
        keepalive.saw_frame(side, now);
        env.conn.saw_frame(side, now.into_std());
        let mut relayed = Relayed::default();
        let mut rest = bytes;
        let frames = Frames { side, reader, in_transit, back, out: &mut to.out };
        let result = read_frames(frames, &mut rest, keepalive, hooks, env, now, &mut relayed);
        relayed.record(side, env);
        match result {
            // A peer that breaks the rules often closes right after, in the same write: that
            // close is honoured (answered, not waited for). Frames between are passed over.
            Err(Ending::Refused { side, violation, peer_closed: None }) => {
                Err(Ending::Refused { side, violation, peer_closed: close_in(reader, &mut rest) })
            }
            result => result,
        }
    });
    match ready!(read) {
        Ok(result) => Poll::Ready(result),
        Err(e) => {
            tracing::debug!(conn = env.conn.id, side = side.as_str(), error = %e, "read failed");
            Poll::Ready(Err(Ending::Lost(side)))
        }
    }
}

/// The code of a close frame in the rest of a read, past frames that break the rules (an error
/// consumes at least a header, so this ends).
fn close_in(reader: &mut FrameReader, rest: &mut &[u8]) -> Option<u16> {
    loop {
        match reader.next(rest) {
            Ok(Some(Step::Control(Control::Close))) => return Some(received_close(reader)),
            Ok(None) => return None,
            Ok(Some(_)) | Err(_) => {}
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
    fn record(&self, from: Side, env: ConnEnv<'_>) {
        if self.bytes == 0 && self.messages == 0 {
            return;
        }
        let (metrics, stats) = (env.metrics, env.conn.leg(from));
        metrics.messages[from as usize].inc_by(self.messages);
        metrics.message_bytes[from as usize].inc_by(self.bytes);
        stats.messages.fetch_add(self.messages, Relaxed);
        stats.bytes.fetch_add(self.bytes, Relaxed);
    }
}

/// Where one leg's frames come from and go: read by `reader` from `side`, data to `out`,
/// answers to `back`.
struct Frames<'a> {
    side: Side,
    reader: &'a mut FrameReader,
    in_transit: &'a mut FrameInTransit,
    back: &'a mut Outbox,
    out: &'a mut Outbox,
}

/// Handles the frames (or parts of one) in `bytes` up to the first that ends the connection.
fn read_frames<S: Hooks>(
    frames: Frames<'_>,
    bytes: &mut &[u8],
    keepalive: &mut Keepalive,
    hooks: &mut S,
    env: ConnEnv<'_>,
    now: Instant,
    relayed: &mut Relayed,
) -> Result<(), Ending> {
    let Frames { side, reader, in_transit, back, out } = frames;
    let src = side as usize;
    let (metrics, stats) = (env.metrics, env.conn.leg(side));
    let refuse = |violation| Ending::Refused { side, violation, peer_closed: None };
    while let Some(step) = reader.next(bytes).map_err(refuse)? {
        match step {
            Step::Data { frame, bytes, offset } => {
                carry_piece(side, frame, bytes, offset, in_transit, out, back, hooks, env, relayed).map_err(refuse)?
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
                return Err(match frame::parse_close(reader.control_payload()) {
                    Ok(close) => {
                        Ending::Closed(side, close.map(|(code, reason)| CloseMsg { code, reason: reason.to_owned() }))
                    }
                    // A close that breaks the rules (a forbidden code, a bad reason) is still
                    // the peer's close: it is told why, and not waited for.
                    Err(violation) => Ending::Refused { side, violation, peer_closed: Some(received_close(reader)) },
                });
            }
        }
    }
    Ok(())
}

/// Whether a text message's first frame (`payload`, plain) claims the control messages' prefix;
/// a compressed one is inflated as far as the prefix (each message on a resumable session is
/// compressed on its own: docs/resume.md).
fn claims_prefix(frame: DataFrame, payload: &[u8]) -> bool {
    if !frame.compressed {
        return control::claims_prefix(payload, frame.fin);
    }
    let mut start = [0u8; control::PREFIX.len()];
    match inflate::start(payload, &mut start) {
        Some((n, all)) => control::claims_prefix(&start[..n], frame.fin && all),
        // Not DEFLATE the endpoint could read alone: never a control message.
        None => false,
    }
}

enum ControlMessage {
    /// Not in the reserved prefix.
    None,
    /// In the prefix, and an ack of this count.
    Some(u64),
    /// In the prefix, and not a control message wskeep knows (or fragmented).
    Bad,
}

/// What the first frame of a text message on a resumable session is.
fn control_message(frame: DataFrame, payload: &[u8]) -> ControlMessage {
    if !claims_prefix(frame, payload) {
        return ControlMessage::None;
    }
    let ack = match frame.compressed {
        // Compressed on its own (`client_no_context_takeover`), so a small one inflates alone.
        true => inflate::small_text(payload, |text| control::parse_client(text.as_bytes())),
        false => control::parse_client(payload),
    };
    match ack {
        Some(ack) if frame.fin => ControlMessage::Some(ack),
        _ => ControlMessage::Bad,
    }
}

/// Copies a piece of a data frame into `out`; once the frame is whole, checks it and makes it
/// writable (or, for a JSON ping that is not forwarded, drops it after answering on `back`).
#[allow(clippy::too_many_arguments)]
fn carry_piece<S: Hooks>(
    from: Side,
    frame: DataFrame,
    piece: &[u8],
    offset: u64,
    in_transit: &mut FrameInTransit,
    out: &mut Outbox,
    back: &mut Outbox,
    hooks: &mut S,
    env: ConnEnv<'_>,
    relayed: &mut Relayed,
) -> Result<(), Violation> {
    if offset == 0 {
        in_transit.mask = out.mask();
        frame::write_head(&mut out.buf, frame.fin, frame.opcode(), frame.len, in_transit.mask);
        in_transit.head_len = out.buf.len() - out.committed;
        // Room for the payload, up to one read's worth: a header alone must not reserve the
        // whole of a large frame's announced length.
        out.buf.reserve(frame.len.min(SCRATCH as u64) as usize);
    }
    let start = out.buf.len();
    out.buf.extend_from_slice(piece);
    // Binary payloads are unmasked and re-masked in one pass; text stays plain until checked.
    let key = match (frame.kind, frame.mask, in_transit.mask) {
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
    let payload_at = out.committed + in_transit.head_len;
    if let Some(session) = hooks.session() {
        // A resumable session's control messages, and its count of the client's messages.
        if frame.kind == Kind::Text && frame.first {
            let payload = &out.buf[payload_at..];
            match control_message(frame, payload) {
                ControlMessage::None => {}
                ControlMessage::Some(_) | ControlMessage::Bad if from == Side::Upstream => return Err(RESERVED_PREFIX),
                ControlMessage::Bad => return Err(BAD_CONTROL),
                ControlMessage::Some(ack) => {
                    session.client_ack(ack).map_err(|_| BAD_CONTROL)?;
                    out.drop_partial();
                    return Ok(());
                }
            }
        }
        if from == Side::Client && frame.fin {
            session.from_client += 1;
        }
    }
    if frame.kind == Kind::Text {
        let payload = &out.buf[payload_at..];
        if frame.first {
            in_transit.utf8 = Utf8Check::default();
        }
        // A JSON ping is a whole text message from the client (browsers never fragment one).
        let matcher = env.settings.json_ping.as_deref().filter(|_| from == Side::Client);
        let reply = if frame.compressed {
            // Its UTF-8 is the endpoints' to check; only a candidate ping is inflated.
            let whole = frame.first && frame.fin;
            matcher.filter(|_| whole).and_then(|m| inflate::small_text(payload, |text| m.answer(text)))
        } else if frame.first && frame.fin {
            let text = std::str::from_utf8(payload).map_err(|_| Violation::INVALID_UTF8)?;
            matcher.and_then(|m| m.answer(text))
        } else {
            in_transit.utf8.check(payload, frame.fin).map_err(|_| Violation::INVALID_UTF8)?;
            None
        };
        if let (Some(matcher), Some(reply)) = (matcher, reply) {
            if hooks.session().is_some_and(|session| !session.own_room(reply.len())) {
                return Err(UNACKNOWLEDGED);
            }
            let goes_now = back.data_goes_now();
            if back.push_frame(frame::OP_TEXT, reply.as_bytes()) {
                env.metrics.json_pings_answered.inc();
                if let Some(session) = hooks.session() {
                    session.own_message(reply.as_bytes(), goes_now);
                }
            }
            if !matcher.forward {
                out.drop_partial();
                return Ok(());
            }
        }
        if let Some(key) = in_transit.mask {
            frame::apply_mask(&mut out.buf[payload_at..], key);
        }
    }
    if from == Side::Upstream {
        if let Some(session) = hooks.session() {
            session.wrote_to_client(&out.buf[out.committed..], frame.fin);
        }
    }
    out.commit_forwarded(frame.fin);
    relayed.bytes += frame.len;
    relayed.messages += frame.fin as u64;
    Ok(())
}
