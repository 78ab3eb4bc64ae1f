//! How a connection ends: the endings table of DESIGN.md (what happened first decides the `end`
//! label and what each leg is sent), then the closing handshakes of both legs, together and
//! bounded by `CLOSE_BOUND`.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::task::Poll;

use super::Leg;
use crate::frame::{self, Control, Step, Violation};
use crate::metrics::Metrics;
use crate::shutdown::CLOSE_BOUND;
use crate::vocab::{End, Side};

/// How the connection ended, as the closing log line reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub end: End,
    /// Close codes per leg: (received, sent). 1005: a close frame without a code; 1006: none came.
    pub codes: [(Option<u16>, Option<u16>); 2],
}

/// A close frame's code and reason; `None` where a close frame carries no code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseMsg {
    pub code: u16,
    pub reason: String,
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
pub enum Ending {
    /// A close frame from this side.
    Closed(Side, Option<CloseMsg>),
    /// The leg's connection failed without a close frame.
    Lost(Side),
    /// Nothing arrived from this side for its timeout, or what wskeep queued for it made no
    /// progress for as long.
    TimedOut(Side),
    /// The side sent something wskeep must refuse: what it is told (1002, 1007, 1009).
    Refused {
        side: Side,
        violation: Violation,
        /// The side's own close frame already came (it was the refused frame, or it followed
        /// that frame in the same read), with this code: it is answered, not waited for.
        peer_closed: Option<u16>,
    },
    Shutdown,
    /// A detached session's client did not come back in time, or what it had not received
    /// outgrew the session's buffer: the upstream is told the client is gone.
    Abandoned,
}

/// What one leg gets in the closing phase.
pub enum CloseAction {
    /// It sent its close already: send this one and do not wait for another.
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
            Ending::Refused { side, violation: v, peer_closed } => {
                let told = close(v.code, v.reason);
                let refused = if peer_closed.is_some() { Answer(told) } else { Send(told) };
                match side {
                    Side::Client => (End::ClientError, refused, Send(close(GOING_AWAY, "client gone"))),
                    // A resumable session cannot deliver a message in its control prefix: both
                    // sides learn why.
                    Side::Upstream if v == super::transcode::RESERVED_PREFIX => {
                        (End::UpstreamError, Send(close(v.code, v.reason)), refused)
                    }
                    Side::Upstream => (End::UpstreamError, Send(close(GOING_AWAY, "upstream error")), refused),
                }
            }
            Ending::Shutdown => {
                (End::Shutdown, Send(close(GOING_AWAY, "going away")), Send(close(GOING_AWAY, "going away")))
            }
            Ending::Abandoned => (End::ClientError, Nothing, Send(close(GOING_AWAY, "client gone"))),
        }
    }

    /// The close code that came from each side before the closing phase, if any.
    fn received(&self) -> [Option<u16>; 2] {
        let mut codes = [None; 2];
        match self {
            Ending::Closed(side, c) => codes[*side as usize] = Some(wire_code(c)),
            Ending::Lost(side) => codes[*side as usize] = Some(1006),
            Ending::Abandoned => codes[Side::Client as usize] = Some(1006),
            Ending::Refused { side, peer_closed, .. } => codes[*side as usize] = *peer_closed,
            Ending::TimedOut(_) | Ending::Shutdown => {}
        }
        codes
    }
}

/// Runs the closing handshakes of both legs together and records the codes. Without
/// `client_attached` (a detached session) the client leg has no one to close.
pub async fn finish(legs: [Leg; 2], ending: Ending, metrics: &Metrics, client_attached: bool) -> Outcome {
    let mut received = ending.received();
    if !client_attached {
        // A detached session's client leg ended without a close frame, recorded when it detached.
        received[Side::Client as usize] = None;
    }
    if let Ending::Refused { side, violation, .. } = &ending {
        tracing::debug!(side = side.as_str(), code = violation.code, reason = violation.reason, "refused a frame");
    }
    let (end, mut client_action, upstream_action) = ending.plan();
    if !client_attached {
        client_action = CloseAction::Nothing;
    }
    let [client, upstream] = legs;
    let (c, u) = tokio::join!(close_leg(client, client_action), close_leg(upstream, upstream_action));
    let mut codes = [(None, None); 2];
    for (side, (answered, sent)) in [(Side::Client, c), (Side::Upstream, u)] {
        let slot = &mut codes[side as usize];
        *slot = (received[side as usize].or(answered), sent);
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
/// nothing wskeep wrote stays behind in a TLS buffer when the socket is dropped. Towards the
/// upstream wskeep is the client, which lets the server close TCP first (RFC 6455 §7.1.1).
pub async fn close_leg(mut leg: Leg, action: CloseAction) -> (Option<u16>, Option<u16>) {
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
        if written && leg.side == Side::Upstream {
            await_eof(&mut leg).await;
        }
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
        let found = io.poll_read_with(cx, &mut scratch, |mut bytes| {
            if bytes.is_empty() {
                return Some(None);
            }
            loop {
                match reader.next(&mut bytes) {
                    Ok(Some(Step::Control(Control::Close))) => return Some(Some(received_close(reader))),
                    // Frames that break the rules still pass: the close may come after them.
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => return None,
                }
            }
        });
        match found {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Some(code))) => return Poll::Ready(code),
            Poll::Ready(Ok(None)) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(None),
        }
    })
    .await
}

/// Reads and discards until the peer closes its side (or the leg fails).
async fn await_eof(leg: &mut Leg) {
    let mut scratch = [MaybeUninit::<u8>::uninit(); 512];
    poll_fn(|cx| loop {
        match leg.io.poll_read_with(cx, &mut scratch, |bytes| bytes.is_empty()) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(false)) => {}
            Poll::Ready(Ok(true) | Err(_)) => return Poll::Ready(()),
        }
    })
    .await
}

/// The code of the close frame `reader` just read, as the metrics and the log record it: the
/// code it carries, 1005 for none; a payload that breaks the rules is recorded by its code too.
pub fn received_close(reader: &frame::FrameReader) -> u16 {
    match reader.control_payload() {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 1005,
    }
}
