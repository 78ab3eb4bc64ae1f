//! The life of one proxied WebSocket connection: relay, keepalive and ending, in one task.
//!
//! One `poll_fn` drives both legs: it writes what is queued, reads the next message from a leg
//! only when the other leg has room for it (so a slow reader backpressures the sender instead of
//! growing a buffer), fires the keepalive timers, and flushes data once nothing more is ready to
//! read (control frames are flushed at once). The first ending it sees (a close frame, a lost
//! leg, a timeout, an oversized or malformed frame, shutdown) decides what each leg is sent; the
//! closing handshakes then run on both legs together, bounded by `CLOSE_BOUND`.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connections::ConnInfo;
use crate::jsonping::JsonPingMatcher;
use crate::keepalive::{self, Due, Keepalive, LegTimers};
use crate::metrics::{End, Metrics, Side};
use crate::shutdown::CLOSE_BOUND;

/// wskeep's own frames waiting for one leg (pings, pongs, JSON pongs). Reading from the client
/// stops while its queue is full, so a client that floods JSON pings and reads nothing is
/// backpressured like any other.
const CONTROL_QUEUE: usize = 8;
/// Flush after this many events even if reads stay ready, so a busy leg cannot delay the other.
const FLUSH_EVERY: u32 = 64;

/// What the relay needs to know beyond the two streams.
pub struct RelaySettings {
    /// Keepalive of the client leg, then of the upstream leg.
    pub timers: [LegTimers; 2],
    pub json_ping: Option<Arc<JsonPingMatcher>>,
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

/// What happened first.
#[derive(Debug)]
enum Ending {
    /// A close frame from this side (already answered by tungstenite).
    Closed(Side, Option<CloseFrame>),
    /// The leg's connection failed without a close frame.
    Lost(Side),
    TimedOut(Side),
    /// The side sent something wskeep must refuse: the code it is sent (1002, 1007, 1009).
    Refused(Side, CloseCode, &'static str),
    Shutdown,
}

/// What one leg gets in the closing phase.
enum CloseAction {
    /// It sent a close with this code: flush tungstenite's answer, which echoes it.
    Answer(u16),
    /// Send this close frame (after any message still queued for it), then await its answer.
    Send(Option<CloseFrame>),
    /// The connection is gone: nothing can be written.
    Nothing,
}

fn frame(code: CloseCode, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame { code, reason: reason.into() })
}

/// 1014 (Bad Gateway), which DESIGN.md sends the client when the upstream fails. tungstenite has
/// no variant for it (`CloseCode::Again` is 1013), so it is built from the number.
fn bad_gateway() -> CloseCode {
    CloseCode::from(1014)
}

fn wire_code(frame: &Option<CloseFrame>) -> u16 {
    frame.as_ref().map_or(1005, |f| u16::from(f.code))
}

impl Ending {
    /// The endings table of DESIGN.md: the `end` label and what the client and upstream get.
    fn plan(self) -> (End, CloseAction, CloseAction) {
        use CloseAction::*;
        match self {
            Ending::Closed(Side::Client, f) => (End::ClientClose, Answer(wire_code(&f)), Send(f)),
            Ending::Closed(Side::Upstream, f) => {
                let code = wire_code(&f);
                (End::UpstreamClose, Send(f), Answer(code))
            }
            Ending::TimedOut(Side::Client) => (
                End::ClientTimeout,
                Send(frame(CloseCode::Away, "client timed out")),
                Send(frame(CloseCode::Away, "client timed out")),
            ),
            Ending::TimedOut(Side::Upstream) => (
                End::UpstreamTimeout,
                Send(frame(bad_gateway(), "upstream timed out")),
                Send(frame(CloseCode::Away, "upstream timed out")),
            ),
            Ending::Lost(Side::Client) => (End::ClientError, Nothing, Send(frame(CloseCode::Away, "client gone"))),
            Ending::Lost(Side::Upstream) => {
                (End::UpstreamError, Send(frame(bad_gateway(), "upstream connection lost")), Nothing)
            }
            Ending::Refused(Side::Client, code, reason) => {
                (End::ClientError, Send(frame(code, reason)), Send(frame(CloseCode::Away, "client gone")))
            }
            Ending::Refused(Side::Upstream, code, reason) => {
                (End::UpstreamError, Send(frame(CloseCode::Away, "upstream error")), Send(frame(code, reason)))
            }
            Ending::Shutdown => {
                (End::Shutdown, Send(frame(CloseCode::Away, "going away")), Send(frame(CloseCode::Away, "going away")))
            }
        }
    }
}

/// Classifies a read error: a lost connection, or input the peer must be told off for.
fn read_failure(side: Side, e: &WsError) -> Ending {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Ending::Refused(side, CloseCode::Size, "message too big")
        }
        WsError::Utf8(_) => Ending::Refused(side, CloseCode::Invalid, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Ending::Lost(side),
        WsError::Protocol(_) | WsError::Capacity(_) => Ending::Refused(side, CloseCode::Protocol, "protocol error"),
        _ => Ending::Lost(side),
    }
}

struct Leg<S> {
    side: Side,
    ws: S,
    /// A message from the other leg waiting for this sink: at most one, which is the backpressure.
    outbox: Option<Message>,
    control: VecDeque<Message>,
    /// Something was written and not yet flushed.
    dirty: bool,
    /// A control frame is among it: flush without waiting for reads to settle.
    urgent: bool,
}

impl<S> Leg<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    /// Queues wskeep's own frame; pings and pongs are dropped while the peer reads nothing (its
    /// idle timer decides its fate), so the queue never grows past `CONTROL_QUEUE`.
    fn push_control(&mut self, msg: Message) -> bool {
        if self.control.len() >= CONTROL_QUEUE {
            return false;
        }
        self.control.push_back(msg);
        true
    }

    /// Hands queued frames to the sink while it accepts them; flushes control frames at once.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), WsError> {
        while !self.control.is_empty() || self.outbox.is_some() {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => return Ok(()),
            }
            if let Some(msg) = self.control.pop_front() {
                self.urgent = true;
                self.ws.start_send_unpin(msg)?;
            } else if let Some(msg) = self.outbox.take() {
                self.ws.start_send_unpin(msg)?;
            }
            self.dirty = true;
        }
        if self.urgent {
            self.poll_flush(cx)?;
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Result<(), WsError> {
        if self.dirty {
            if let Poll::Ready(r) = self.ws.poll_flush_unpin(cx) {
                r?;
                self.dirty = false;
                self.urgent = false;
            }
        }
        Ok(())
    }
}

enum Event {
    Read(Side, Option<Result<Message, WsError>>),
    Timer(Side, Due),
    WriteFailed(Side),
    Shutdown,
}

/// Relays between `client` and `upstream` until the connection ends; returns how it ended.
pub async fn run<S>(
    client: S,
    upstream: S,
    settings: &RelaySettings,
    metrics: &Metrics,
    conn: &ConnInfo,
    closing: CancellationToken,
) -> Outcome
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + EndTransport + Unpin,
{
    let leg = |side, ws| Leg { side, ws, outbox: None, control: VecDeque::new(), dirty: false, urgent: false };
    let mut legs = [leg(Side::Client, client), leg(Side::Upstream, upstream)];
    let [client_timers, upstream_timers] = settings.timers;
    let mut keepalive = Keepalive::new(client_timers, upstream_timers, keepalive::coalescing(&settings.timers));
    // Every relay shares one token, and polling its future takes the token's lock each time; so
    // the future is polled once, to register this task's waker, and afterwards only the flag is
    // read (a task's waker stays the same for its whole life).
    let mut close_signal = std::pin::pin!(closing.clone().cancelled_owned());
    let mut close_registered = false;
    let mut client_first = true;
    let mut since_flush = 0u32;
    // One clock read per batch of reads, not per message: a frame's arrival time only needs to
    // be as fine as the batch it came in.
    let mut batch_clock: Option<Instant> = None;

    let ending = loop {
        let event = poll_fn(|cx| {
            if !close_registered {
                close_registered = true;
                if close_signal.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
            } else if closing.is_cancelled() {
                return Poll::Ready(Event::Shutdown);
            }
            if let Poll::Ready((side, due)) = keepalive.poll_due(cx) {
                return Poll::Ready(Event::Timer(side, due));
            }
            for leg in &mut legs {
                if leg.poll_write(cx).is_err() {
                    return Poll::Ready(Event::WriteFailed(leg.side));
                }
            }
            // Alternate which leg reads first so that a busy leg cannot starve the other.
            client_first = !client_first;
            let order = if client_first { [0, 1] } else { [1, 0] };
            let may_read = since_flush < FLUSH_EVERY;
            if may_read {
                if let Some(event) = poll_reads(&mut legs, order, cx) {
                    since_flush += 1;
                    return Poll::Ready(event);
                }
            }
            // Nothing more to read right now (or a long run of reads): write out what they made.
            since_flush = 0;
            batch_clock = None;
            for leg in &mut legs {
                if leg.poll_flush(cx).is_err() {
                    return Poll::Ready(Event::WriteFailed(leg.side));
                }
            }
            if !may_read {
                if let Some(event) = poll_reads(&mut legs, order, cx) {
                    return Poll::Ready(event);
                }
            }
            Poll::Pending
        })
        .await;

        match event {
            Event::Shutdown => break Ending::Shutdown,
            Event::WriteFailed(side) => break Ending::Lost(side),
            Event::Timer(side, Due::Dead) => break Ending::TimedOut(side),
            Event::Timer(side, Due::Ping(payload)) => {
                if legs[side as usize].push_control(Message::Ping(payload)) {
                    metrics.pings_sent[side as usize].inc();
                    conn.leg(side).pings_sent.fetch_add(1, Relaxed);
                }
            }
            Event::Timer(side, Due::Pong) => {
                legs[side as usize].push_control(Message::Pong(Default::default()));
            }
            Event::Read(side, None) => break Ending::Lost(side),
            Event::Read(side, Some(Err(e))) => {
                tracing::debug!(conn = conn.id, side = side.as_str(), error = %e, "read failed");
                break read_failure(side, &e);
            }
            Event::Read(side, Some(Ok(msg))) => {
                let now = *batch_clock.get_or_insert_with(Instant::now);
                let src = side as usize;
                keepalive.saw_frame(side, now);
                conn.saw_frame(side, now.into_std());
                let stats = conn.leg(side);
                match msg {
                    Message::Text(ref text) => {
                        if side == Side::Client {
                            if let Some(matcher) = &settings.json_ping {
                                if let Some(reply) = matcher.answer(text.as_str()) {
                                    legs[src].push_control(Message::text(reply));
                                    metrics.json_pings_answered.inc();
                                    if !matcher.forward {
                                        continue;
                                    }
                                }
                            }
                        }
                        relay_message(&mut legs[1 - src], msg, side, metrics, stats);
                    }
                    Message::Binary(_) => relay_message(&mut legs[1 - src], msg, side, metrics, stats),
                    Message::Ping(_) => {
                        // tungstenite has queued the pong; make sure it goes out now.
                        metrics.pings_answered[src].inc();
                        stats.pings_answered.fetch_add(1, Relaxed);
                        legs[src].dirty = true;
                        legs[src].urgent = true;
                    }
                    Message::Pong(payload) => {
                        metrics.pongs_received[src].inc();
                        stats.pongs_received.fetch_add(1, Relaxed);
                        if let Some(rtt) = keepalive.pong_received(side, &payload, now) {
                            metrics.ping_rtt[src].observe(rtt.as_secs_f64());
                            stats.last_rtt_us.store((rtt.as_micros() as u64).max(1), Relaxed);
                        }
                    }
                    Message::Close(frame) => break Ending::Closed(side, frame),
                    // Raw frames only exist on the write side.
                    Message::Frame(_) => {}
                }
            }
        }
    };
    tracing::debug!(conn = conn.id, ending = ?ending, "connection ending");
    // Boxed: the closing phase is large and short-lived; keeping it out of the relay future keeps
    // every idle connection small.
    Box::pin(finish(legs, ending, metrics)).await
}

/// Reads the next message from a leg whose destination has room for it.
fn poll_reads<S>(legs: &mut [Leg<S>; 2], order: [usize; 2], cx: &mut Context<'_>) -> Option<Event>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    for src in order {
        if legs[1 - src].outbox.is_none() && legs[src].control.len() < CONTROL_QUEUE {
            if let Poll::Ready(item) = legs[src].ws.poll_next_unpin(cx) {
                return Some(Event::Read(legs[src].side, item));
            }
        }
    }
    None
}

fn relay_message<S>(
    dst: &mut Leg<S>,
    msg: Message,
    from: Side,
    metrics: &Metrics,
    stats: &crate::connections::LegStats,
) {
    let len = msg.len() as u64;
    metrics.messages[from as usize].inc();
    metrics.message_bytes[from as usize].inc_by(len);
    stats.messages.fetch_add(1, Relaxed);
    stats.bytes.fetch_add(len, Relaxed);
    dst.outbox = Some(msg);
}

/// Runs the closing handshakes of both legs together and records the codes.
async fn finish<S>(legs: [Leg<S>; 2], ending: Ending, metrics: &Metrics) -> Outcome
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + EndTransport + Unpin,
{
    let mut codes = [(None, None); 2];
    if let Ending::Closed(side, f) = &ending {
        codes[*side as usize].0 = Some(wire_code(f));
    }
    if let Ending::Lost(side) = &ending {
        codes[*side as usize].0 = Some(1006);
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
async fn close_leg<S>(mut leg: Leg<S>, action: CloseAction) -> (Option<u16>, Option<u16>)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + EndTransport + Unpin,
{
    match action {
        CloseAction::Nothing => (None, None),
        CloseAction::Answer(code) => {
            let answered = tokio::time::timeout(CLOSE_BOUND, async {
                // tungstenite echoes the peer's close frame; flushing writes it.
                let flushed = leg.ws.flush().await.is_ok();
                let _ = poll_fn(|cx| leg.ws.poll_end(cx)).await;
                flushed
            })
            .await;
            (None, matches!(answered, Ok(true)).then_some(code))
        }
        CloseAction::Send(frame) => {
            let code = wire_code(&frame);
            let mut written = false;
            let handshake = async {
                let answer = async {
                    // Messages accepted before the ending are delivered before the close.
                    if let Some(msg) = leg.outbox.take() {
                        leg.ws.feed(msg).await.ok()?;
                    }
                    leg.ws.send(Message::Close(frame)).await.ok()?;
                    written = true;
                    while let Some(item) = leg.ws.next().await {
                        if let Message::Close(answer) = item.ok()? {
                            return Some(wire_code(&answer));
                        }
                    }
                    None
                }
                .await;
                let _ = poll_fn(|cx| leg.ws.poll_end(cx)).await;
                answer
            };
            let answer = tokio::time::timeout(CLOSE_BOUND, handshake).await.ok().flatten();
            // No answer (or the leg failed under us): it ended without a close frame.
            (Some(answer.unwrap_or(1006)), written.then_some(code))
        }
    }
}

/// A leg whose transport can be ended once the closing handshake is over.
pub trait EndTransport {
    /// Flushes what the transport still buffers and shuts its write side (TLS: `close_notify`).
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl<T: AsyncRead + AsyncWrite + Unpin> EndTransport for WebSocketStream<T> {
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut()).poll_shutdown(cx)
    }
}
