//! The read, transcode and outbox path driven by a script instead of sockets, for the fuzz
//! target `relay` and the unit tests: arbitrary bytes arrive from either peer in arbitrary
//! pieces, timers push their pings and pongs, the transports take arbitrary amounts, and what
//! wskeep wrote to each peer is parsed again and checked against what a peer must see.

use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

use super::session::NoSession;
use super::{ending::Ending, transcode, ConnEnv, Leg, RelaySettings, SCRATCH};
use crate::config::Config;
use crate::connections::{ConnGuard, Connections};
use crate::frame::{self, apply_mask, rotate, Control, FrameReader, Kind, Step};
use crate::jsonping::JsonPingMatcher;
use crate::keepalive::{Keepalive, LegTimers, TimerSlots};
use crate::legstream::LegStream;
use crate::metrics::Metrics;
use crate::vocab::{HttpVersion, Side};

/// The largest message either peer may send in the harness.
pub const MAX_MESSAGE: u64 = 4096;

/// One leg's transport: (how many bytes it takes now, what it took, what it has to read).
type WireState = (usize, Vec<u8>, Vec<u8>);

#[derive(Clone, Default)]
pub(super) struct Wire(Arc<Mutex<WireState>>);

impl Wire {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, WireState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl tokio::io::AsyncRead for Wire {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut wire = self.state();
        if wire.2.is_empty() {
            return Poll::Pending;
        }
        let n = wire.2.len().min(buf.remaining());
        buf.put_slice(&wire.2[..n]);
        wire.2.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Wire {
    fn poll_write(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut wire = self.state();
        let n = wire.0.min(data.len());
        if n == 0 {
            return Poll::Pending;
        }
        wire.0 -= n;
        wire.1.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What stays the same from run to run: the settings (JSON pings forwarded or not) and where
/// the connection reports.
struct Fixture {
    settings: [RelaySettings; 2],
    metrics: Metrics,
    /// Without and with permessage-deflate negotiated.
    conns: [ConnGuard; 2],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let settings = |forward: bool| {
            let mut config = Config::default();
            config.json_ping.forward = forward;
            let off = LegTimers {
                ping_interval: Default::default(),
                pong_interval: Default::default(),
                timeout: Default::default(),
            };
            RelaySettings {
                timers: [off, off],
                json_ping: JsonPingMatcher::new(&config.json_ping).map(Arc::new),
                max_message_size: MAX_MESSAGE,
                timer_slots: TimerSlots::default(),
            }
        };
        let connections = Arc::new(Connections::default());
        let conns = [false, true]
            .map(|deflate| connections.open_over(([127, 0, 0, 1], 1).into(), "/".into(), HttpVersion::Http1, deflate));
        Fixture { settings: [settings(false), settings(true)], metrics: Metrics::new(), conns }
    })
}

/// Runs the script in `input` and checks what each peer was sent. Panics on a finding.
///
/// The first byte picks the settings (bit 0: JSON pings forwarded, bit 1: compression
/// negotiated); then each step is an opcode byte and its argument:
/// bytes arriving from a peer (a length byte, then that many bytes), a timer's ping or pong,
/// or a transport that takes some bytes.
pub fn run(input: &[u8]) {
    let Some((&setup, mut script)) = input.split_first() else { return };
    let fixture = fixture();
    let settings = &fixture.settings[(setup & 1) as usize];
    let conn = &fixture.conns[(setup >> 1 & 1) as usize].info;
    let env = ConnEnv { settings, metrics: &fixture.metrics, conn };
    let wires = [Wire::default(), Wire::default()];
    let mut legs = [Side::Client, Side::Upstream].map(|side| {
        Leg::new(side, LegStream::new(wires[side as usize].clone()), settings.max_message_size, conn.deflate)
    });
    let [client_timers, upstream_timers] = settings.timers;
    let mut keepalive =
        Keepalive::new(client_timers, upstream_timers, Default::default(), settings.timer_slots.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut scratch = vec![std::mem::MaybeUninit::uninit(); SCRATCH];
    // What each peer sent, up to where the connection ended, for the oracle.
    let mut sent: [Vec<u8>; 2] = Default::default();
    let mut ended: Option<Ending> = None;
    let mut ping_seq = 0u8;
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        let side = Side::BOTH[(op & 1) as usize];
        let src = side as usize;
        match op >> 1 & 3 {
            0 if ended.is_none() => {
                let Some((&len, rest)) = script.split_first() else { break };
                let take = (len as usize).min(rest.len());
                let (bytes, rest) = rest.split_at(take);
                script = rest;
                sent[src].extend_from_slice(bytes);
                let [client, upstream] = &mut legs;
                let (from, to) = if src == 0 { (client, upstream) } else { (upstream, client) };
                wires[src].state().2.extend_from_slice(bytes);
                let mut now = Some(Instant::now());
                if let Poll::Ready(Err(ending)) =
                    transcode::poll_read(from, to, &mut keepalive, &mut NoSession, env, &mut now, &mut scratch, &mut cx)
                {
                    ended = Some(ending);
                }
            }
            1 => {
                ping_seq = ping_seq.wrapping_add(1);
                legs[src].out.send_control(&mut legs[src].io, &mut cx, frame::OP_PING, &[ping_seq]);
            }
            2 if legs[src].out.held_pong.is_empty() => {
                legs[src].out.send_control(&mut legs[src].io, &mut cx, frame::OP_PONG, &[]);
            }
            3 => {
                let budget = script.first().map_or(0, |&b| b as usize * 8);
                script = script.get(1..).unwrap_or_default();
                wires[src].state().0 = budget;
                let _ = legs[src].out.poll_write(&mut legs[src].io, &mut cx);
            }
            _ => {}
        }
    }
    // Everything complete goes out; a frame still arriving never does.
    for (leg, wire) in legs.iter_mut().zip(&wires) {
        wire.state().0 = usize::MAX;
        let _ = leg.out.poll_write(&mut leg.io, &mut cx);
    }
    let out = wires.map(|w| std::mem::take(&mut w.state().1));
    for side in Side::BOTH {
        let to = side.other();
        let received = messages(&out[to as usize], to, u64::MAX >> 1, conn.deflate, true);
        let sent = messages(&sent[side as usize], side, settings.max_message_size, conn.deflate, false);
        check_forwarded(side, &received, &sent, settings);
    }
}

/// Every message `to` received is the next one its peer sent (the JSON pings wskeep answered
/// and did not forward left out), or a JSON pong of wskeep's own; a message still arriving is
/// the start of the next one sent.
fn check_forwarded(from: Side, received: &Messages, sent: &Messages, settings: &RelaySettings) {
    let dropped = |m: &Message| {
        from == Side::Client
            && settings.json_ping.as_deref().is_some_and(|matcher| {
                let answered = match m.compressed {
                    // Only a message in one frame is inflated.
                    true => m.frames == 1 && crate::inflate::small_text(&m.bytes, |t| matcher.answer(t)).is_some(),
                    false => std::str::from_utf8(&m.bytes).ok().and_then(|t| matcher.answer(t)).is_some(),
                };
                !matcher.forward && m.text && answered
            })
    };
    let mut expected = sent.whole.iter().filter(|m| !dropped(m)).chain(sent.partial.iter());
    let mut next = expected.next();
    for message in &received.whole {
        if next.is_some_and(|n| n.same_as(message)) {
            next = expected.next();
        } else {
            // wskeep's own pongs are never compressed.
            assert!(
                from == Side::Upstream && !message.compressed && is_json_pong(&message.bytes),
                "{from:?} sent {next:?} next, its peer got {message:?}"
            );
        }
    }
    if let Some(partial) = &received.partial {
        assert!(
            next.is_some_and(|n| n.compressed == partial.compressed && n.bytes.starts_with(&partial.bytes)),
            "{partial:?} is not the start of {next:?}"
        );
    }
}

/// The data messages of a stream of frames: the whole ones, and the start of one still open.
#[derive(Debug, Default)]
struct Messages {
    whole: Vec<Message>,
    partial: Option<Message>,
}

#[derive(Debug, Default)]
struct Message {
    bytes: Vec<u8>,
    text: bool,
    /// Sent with RSV1 (permessage-deflate).
    compressed: bool,
    frames: u32,
}

impl Message {
    /// The same message, however it was fragmented.
    fn same_as(&self, other: &Message) -> bool {
        (&self.bytes, self.text, self.compressed) == (&other.bytes, other.text, other.compressed)
    }
}

/// The messages in what was written to (`output`) or by the peer on `side`, parsed as that
/// peer's counterpart does. wskeep's output must parse whole: every frame well formed and masked
/// as its direction requires (only towards a server), no frame inside another, no data frame of
/// wskeep's own inside a fragmented message, no close on this path. A peer's input is taken up
/// to where the relay stops: a frame that breaks the rules (frames forwarded before it stay
/// forwarded), or a close.
fn messages(wire: &[u8], side: Side, max: u64, deflate: bool, output: bool) -> Messages {
    // Frames from a client, and towards the upstream, are masked.
    let masked = if output { side == Side::Upstream } else { side == Side::Client };
    let mut reader = FrameReader::new(masked, max).with_deflate(deflate);
    let mut bytes = wire;
    let mut found = Messages::default();
    let mut frame_payload = Vec::new();
    loop {
        let step = match reader.next(&mut bytes) {
            Ok(Some(step)) => step,
            Ok(None) => break,
            Err(v) if output => panic!("wskeep wrote a frame its {side:?} peer refuses: {} in {wire:?}", v.reason),
            Err(_) => break,
        };
        match step {
            Step::Data { frame, bytes: piece, offset } => {
                let start = frame_payload.len();
                frame_payload.extend_from_slice(piece);
                if let Some(key) = frame.mask {
                    apply_mask(&mut frame_payload[start..], rotate(key, offset));
                }
                if offset + piece.len() as u64 != frame.len {
                    continue;
                }
                let mut message = found.partial.take().unwrap_or_default();
                message.text = frame.kind == Kind::Text;
                message.compressed = frame.compressed;
                message.frames += 1;
                let before = message.bytes.len();
                message.bytes.append(&mut frame_payload);
                // The relay forwards a text frame once the message so far is valid UTF-8 (an
                // incomplete last character may still be finished by the next frame); a
                // compressed one is not text yet.
                let text = frame.kind == Kind::Text && !frame.compressed;
                if !output && text && !utf8_prefix_ok(&message.bytes, frame.fin) {
                    // Its earlier frames (if it had any) were forwarded.
                    message.bytes.truncate(before);
                    message.frames -= 1;
                    found.partial = (!frame.first).then_some(message);
                    break;
                }
                if frame.fin {
                    found.whole.push(message);
                } else {
                    found.partial = Some(message);
                }
            }
            Step::Control(Control::Close) if output => panic!("the relay path never writes a close"),
            Step::Control(Control::Close) => break,
            Step::Control(_) => {}
        }
    }
    if output {
        assert!(bytes.is_empty() && frame_payload.is_empty(), "wskeep's output ends on a frame boundary");
    }
    found
}

fn is_json_pong(text: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(text)
        .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("pong"))
}

/// `text` is valid UTF-8, or (for a message not yet finished) valid but for an incomplete
/// character at its end.
fn utf8_prefix_ok(text: &[u8], fin: bool) -> bool {
    match std::str::from_utf8(text) {
        Ok(_) => true,
        Err(e) => !fin && e.error_len().is_none(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scripts_from_both_peers_with_timers_and_partial_writes() {
        let mut client_ping = Vec::new();
        crate::frame::write_frame(&mut client_ping, true, crate::frame::OP_TEXT, br#"{"type":"ping"}"#, Some([9; 4]));
        let mut fragment = Vec::new();
        crate::frame::write_frame(&mut fragment, false, crate::frame::OP_TEXT, b"part one ", None);
        let mut last = Vec::new();
        crate::frame::write_frame(&mut last, true, crate::frame::OP_CONTINUATION, b"and two", None);
        for setup in [0u8, 1] {
            let mut script = vec![setup];
            // The upstream's first fragment, the client's JSON ping (its pong must wait for the
            // message's end), a timer ping to the client, a trickle of writes, the last fragment.
            // Op 1: bytes from the upstream (op 0: from the client), then their length.
            script.extend([1, fragment.len() as u8]);
            script.extend(&fragment);
            script.extend([0, client_ping.len() as u8]);
            script.extend(&client_ping);
            script.extend([2, 6, 1, 6, 1]);
            script.extend([1, last.len() as u8]);
            script.extend(&last);
            script.extend([6, 0, 7, 255]);
            super::run(&script);
        }
    }

    #[test]
    fn compressed_messages_cross_unchanged_and_a_compressed_ping_is_answered() {
        use crate::frame::{write_frame, OP_CONTINUATION, OP_TEXT, RSV1};
        // `{"type":"ping"}` compressed on its own, as a stored block (RFC 7692 §7.2.3.3).
        let deflated = crate::inflate::stored(br#"{"type":"ping"}"#);
        let mut client_ping = Vec::new();
        write_frame(&mut client_ping, true, OP_TEXT | RSV1, &deflated, Some([3; 4]));
        let mut first = Vec::new();
        write_frame(&mut first, false, OP_TEXT | RSV1, &[0xf2, 0x48], None);
        let mut last = Vec::new();
        write_frame(&mut last, true, OP_CONTINUATION, &[0xcd, 0xc9, 0xc9, 0x07, 0x00], None);
        // Bit 1: compression negotiated; bit 0: JSON pings forwarded or not.
        for setup in [2u8, 3] {
            let mut script = vec![setup];
            for (op, frame) in [(1u8, &first), (0, &client_ping), (1, &last)] {
                script.extend([op, frame.len() as u8]);
                script.extend(frame);
            }
            script.extend([6, 0, 7, 255]);
            super::run(&script);
        }
    }
}
