//! A resumable session (docs/resume.md): one upstream leg and the client legs that come and go.
//!
//! `run` drives it: the same `Relay` as an ordinary connection, plus `Session` (the counts, the
//! replay buffer, wskeep's acks). When the client leg dies without a close frame the session
//! detaches: the client leg is parked (nothing to read, writes go nowhere: what mattered is in
//! the replay), the client's keepalive stops, and the upstream leg carries on as before, read
//! into the replay buffer, its pings answered and its deadline kept. A resuming handshake hands
//! the new client leg over through the registry; `run` splices it in: the token message, the
//! replay, then relaying again. Grace expiry, overflow, an upstream ending and the drain end the
//! session as the endings table says, the client having no one to tell.

use std::future::{pending, poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::ending::{finish, Ending, Outcome};
use super::outbox::Outbox;
use super::transcode::FrameInTransit;
use super::{keepalive_of, ConnEnv, Relay, RelaySettings, ShutdownWatch};
use crate::connections::{ConnInfo, Connections};
use crate::frame::{self, FrameReader};
use crate::legstream::LegStream;
use crate::metrics::Metrics;
use crate::resume::replay::{BadCount, Replay};
use crate::resume::token::Id;
use crate::resume::{control, Facts, Failure, Hold, Registry, Resumption, NOT_RESUMABLE, REPLACED};
use crate::vocab::Side;

/// wskeep tells the client its count at most this often, while it changes.
const ACK_EVERY: Duration = Duration::from_secs(1);

/// What a relay adds for a resumable session; `NoSession` adds nothing.
pub trait Hooks {
    fn session(&mut self) -> Option<&mut Session>;
    /// The upstream may be read: the replay buffer has room.
    fn upstream_room(&self) -> bool;
    /// Once per wake-up: wskeep's acks to the client, a detached session's overflow.
    fn poll(&mut self, client_out: &mut Outbox, cx: &mut Context<'_>) -> Poll<Ending>;
}

/// An ordinary connection.
pub struct NoSession;

impl Hooks for NoSession {
    #[inline(always)]
    fn session(&mut self) -> Option<&mut Session> {
        None
    }
    #[inline(always)]
    fn upstream_room(&self) -> bool {
        true
    }
    #[inline(always)]
    fn poll(&mut self, _: &mut Outbox, _: &mut Context<'_>) -> Poll<Ending> {
        Poll::Pending
    }
}

/// A resumable session's state that lives across client legs.
pub struct Session {
    replay: Replay,
    /// Data messages received from the client on this session.
    pub(super) from_client: u64,
    /// The count the client was last told (in an ack or the token message).
    told: u64,
    ack_timer: Option<Pin<Box<Sleep>>>,
    detached: bool,
    /// `resume.buffer`.
    limit: usize,
    /// How far past `limit` a message may take the buffer: one `limits.max_message_size`, as an
    /// upstream message let complete may.
    allowance: usize,
    overflowed: bool,
    /// JSON pongs wskeep queued behind a message still arriving from the upstream (the client's
    /// outbox holds them likewise): numbered when that message ends, as they reach the wire.
    held_own: Vec<Vec<u8>>,
    /// The place of the client connection the session came or last resumed on.
    hold: Option<Hold>,
}

impl Hooks for Session {
    fn session(&mut self) -> Option<&mut Session> {
        Some(self)
    }

    fn upstream_room(&self) -> bool {
        // Attached, a full buffer waits for the client's ack, as a full outbox waits for a
        // write; a message still arriving may always complete (it could not be acknowledged
        // before). Detached, reading goes on: `poll` ends the session past the bound.
        self.detached || self.replay.complete_len() == 0 || self.replay.len() < self.limit
    }

    fn poll(&mut self, client_out: &mut Outbox, cx: &mut Context<'_>) -> Poll<Ending> {
        if self.detached {
            if self.replay.len() > self.limit {
                self.overflowed = true;
                return Poll::Ready(Ending::Abandoned);
            }
            return Poll::Pending;
        }
        if self.from_client != self.told {
            let timer = self.ack_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(ACK_EVERY)));
            if timer.as_mut().poll(cx).is_ready() {
                if client_out.push_frame(frame::OP_TEXT, &control::ack(self.from_client)) {
                    self.told = self.from_client;
                }
                timer.as_mut().reset(Instant::now() + ACK_EVERY);
            }
        }
        Poll::Pending
    }
}

impl Session {
    fn new(limit: usize, allowance: usize) -> Session {
        Session {
            replay: Replay::default(),
            from_client: 0,
            told: 0,
            ack_timer: None,
            detached: false,
            limit,
            allowance,
            overflowed: false,
            held_own: Vec::new(),
            hold: None,
        }
    }

    /// The client's ack: it received `received` messages.
    pub(super) fn client_ack(&mut self, received: u64) -> Result<(), BadCount> {
        self.replay.ack(received)
    }

    /// A frame from the upstream became writable to the client (`frame`: as written).
    pub(super) fn wrote_to_client(&mut self, frame: &[u8], fin: bool) {
        self.replay.push_frame(frame, fin);
        if fin {
            for own in std::mem::take(&mut self.held_own) {
                self.replay.push_frame(&own, true);
            }
        }
    }

    /// A message of wskeep's own (a JSON pong, `payload_len` bytes) fits in the buffer: the
    /// client cannot stop its reading (its acks come the same way), so a client that keeps
    /// pinging without acknowledging would grow it without bound.
    pub(super) fn own_room(&self, payload_len: usize) -> bool {
        let held: usize = self.held_own.iter().map(Vec::len).sum();
        self.replay.len() + held + payload_len + 10 <= self.limit + self.allowance
    }

    /// wskeep queued a data message of its own (a JSON pong) for the client; `goes_now`: it
    /// was not held behind a message still arriving.
    pub(super) fn own_message(&mut self, payload: &[u8], goes_now: bool) {
        let mut frame = Vec::with_capacity(payload.len() + 4);
        frame::write_frame(&mut frame, true, frame::OP_TEXT, payload, None);
        if goes_now {
            self.replay.push_frame(&frame, true);
        } else {
            self.held_own.push(frame);
        }
    }
}

/// What a resumable session needs beyond a relay's.
pub struct SessionContext {
    pub registry: Arc<Registry>,
    pub facts: Arc<Facts>,
    pub connections: Arc<Connections>,
    /// `resume.grace`
    pub grace: Duration,
    /// `resume.buffer`
    pub buffer: usize,
    /// The first connection's place (`Hold`), set by the task that runs the session.
    pub hold: Option<Hold>,
}

/// The client leg of a detached session: nothing to read, and whatever is written goes nowhere
/// (the messages are in the replay buffer).
struct Parked;

impl AsyncRead for Parked {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Parked {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

enum Event {
    Ended(Ending),
    Resuming(Resumption),
    /// The token was claimed but its resume never arrived (the claim failed, or the upgrade):
    /// it will bring no one.
    TokenLost,
    Expired,
}

/// The token the client holds now, and where its resumption arrives.
struct Issued {
    id: Id,
    arrival: oneshot::Receiver<Resumption>,
}

/// Relays a resumable session until it ends; its client legs come and go.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: LegStream,
    upstream: LegStream,
    settings: &RelaySettings,
    metrics: &Metrics,
    conn: &ConnInfo,
    closing: CancellationToken,
    mut ctx: SessionContext,
) -> Outcome {
    let signal = std::pin::pin!(closing.clone().cancelled_owned());
    let env = ConnEnv { settings, metrics, conn };
    let mut relay = Relay::new(
        client,
        upstream,
        env,
        ShutdownWatch::new(&closing, signal),
        Session::new(ctx.buffer, settings.max_message_size as usize),
    );
    relay.hooks.hold = ctx.hold.take();
    ctx.connections.set_session_state(conn.id, Some("attached"));
    let mut preface = Vec::new();
    let mut issued = issue(&ctx, &mut preface, 0);
    relay.legs[0].out.restart(preface);
    // The id a late resume asks for: the last one issued, spent or not.
    let mut last_id = issued.as_ref().map(|i| i.id);
    let mut detached_since: Option<Instant> = None;

    let ending = loop {
        let event = {
            let grace = async {
                match detached_since {
                    Some(at) => tokio::time::sleep_until(at + ctx.grace).await,
                    None => pending().await,
                }
            };
            let arrival = async {
                match issued.as_mut().map(|i| &mut i.arrival) {
                    Some(arrival) => arrival.await.map_or(Event::TokenLost, Event::Resuming),
                    None => pending().await,
                }
            };
            tokio::select! {
                biased;
                ending = poll_fn(|cx| relay.poll_ending(cx)) => Event::Ended(ending),
                event = arrival => event,
                () = grace => Event::Expired,
            }
        };
        match event {
            // Without a live token no one can resume: the session ends as a connection would.
            Event::Ended(Ending::Lost(Side::Client) | Ending::TimedOut(Side::Client))
                if detached_since.is_none() && issued.is_some() && !relay.legs[1].out.message_open() =>
            {
                relay.detach();
                detached_since = Some(Instant::now());
                metrics.close_code(Side::Client, true, 1006);
                metrics.resume_detached.inc();
                metrics.resume_sessions_detached.inc();
                ctx.connections.set_session_state(conn.id, Some("detached"));
                tracing::info!(conn = conn.id, "session detached: waiting for the client to resume");
            }
            Event::Ended(ending) => break ending,
            Event::Expired => break Ending::Abandoned,
            Event::TokenLost => {
                issued = None;
                if detached_since.is_some() {
                    break Ending::Abandoned;
                }
            }
            Event::Resuming(resumption) => {
                // The token is spent: whatever happens next, it brings no one else.
                issued = None;
                let claimed = resumption.claimed;
                let received = resumption.received;
                match relay.splice(resumption, &ctx) {
                    Err(why) => {
                        metrics.resume_failed(why);
                        tracing::info!(conn = conn.id, reason = why.as_str(), "resume refused");
                        if detached_since.is_some() {
                            break Ending::Abandoned;
                        }
                    }
                    Ok((next, replayed)) => {
                        last_id = next.as_ref().map(|i| i.id).or(last_id);
                        issued = next;
                        let gap = detached_since.take().map(|at| claimed.saturating_duration_since(at.into_std()));
                        if gap.is_some() {
                            metrics.resume_sessions_detached.dec();
                        }
                        metrics.resume_resumed.inc();
                        ctx.connections.set_session_state(conn.id, Some("attached"));
                        let session = &relay.hooks;
                        tracing::info!(
                            conn = conn.id,
                            gap_ms = gap.map_or(0, |g| g.as_millis() as u64),
                            half_open = gap.is_none(),
                            replayed_to_client = replayed,
                            client_received = received,
                            received_from_client = session.from_client,
                            "session resumed"
                        );
                    }
                }
            }
        }
    };

    let attached = detached_since.is_none();
    // What a late resume of the last id learns.
    let why = match &ending {
        Ending::Abandoned if relay.hooks.overflowed => Failure::Overflow,
        Ending::Abandoned => Failure::Expired,
        // The client ended it (a close, a refused frame, a loss it could not come back from):
        // its token is as good as spent.
        Ending::Closed(Side::Client, _)
        | Ending::Refused { side: Side::Client, .. }
        | Ending::Lost(Side::Client)
        | Ending::TimedOut(Side::Client) => Failure::BadToken,
        _ => Failure::UpstreamGone,
    };
    if matches!(ending, Ending::Abandoned) {
        metrics.resume_failed(why);
        let held = relay.hooks.replay.len();
        tracing::info!(conn = conn.id, reason = why.as_str(), held_bytes = held, "detached session ended");
    }
    if let Some(id) = &last_id {
        ctx.registry.ended(id, why);
    }
    if !attached {
        metrics.resume_sessions_detached.dec();
    }
    ctx.connections.set_session_state(conn.id, None);
    tracing::debug!(conn = conn.id, ending = ?ending, "session ending");
    // The connection's place is kept until its closing handshake is over (an HTTP/2
    // connection's GOAWAY waits for it).
    let hold = relay.hooks.hold.take();
    let Relay { legs, keepalive, .. } = relay;
    drop(keepalive);
    let mut outcome = Box::pin(finish(legs, ending, metrics, attached)).await;
    drop(hold);
    if !attached {
        // The client leg ended without a close frame (recorded when it detached).
        outcome.codes[Side::Client as usize].0 = Some(1006);
    }
    outcome
}

/// A new token for the session: its message goes into `preface`; `None` if the OS gave no
/// randomness (the session then cannot be resumed, and the client is told nothing).
fn issue(ctx: &SessionContext, preface: &mut Vec<u8>, from_client: u64) -> Option<Issued> {
    let Some((token, arrival)) = ctx.registry.issue(ctx.facts.clone()) else {
        tracing::error!("no randomness for a session token: this session cannot be resumed");
        return None;
    };
    let message = control::session(&token.encode(), from_client);
    frame::write_frame(preface, true, frame::OP_TEXT, &message, None);
    Some(Issued { id: token.id, arrival })
}

impl Relay<'_, Session> {
    /// The client leg is gone: park it, and keep only the upstream's keepalive.
    fn detach(&mut self) {
        let client = &mut self.legs[0];
        client.io = LegStream::new(Parked);
        client.reader = FrameReader::new(true, self.env.settings.max_message_size).with_deflate(self.env.conn.deflate);
        client.in_transit = FrameInTransit::default();
        // A client frame that never fully arrived is not sent upstream.
        self.legs[1].out.drop_partial();
        self.keepalive = keepalive_of(self.env.settings, true);
        self.hooks.detached = true;
        // The slot stays taken while the session waits, but its HTTP/2 connection (likely dead)
        // may send its GOAWAY and go.
        if let Some(hold) = &mut self.hooks.hold {
            hold.stream = None;
        }
    }

    /// Splices a resuming client's leg in: the token message, then what it has not received.
    /// On success, the new token and how many messages were replayed; an attached (half-open)
    /// old leg is closed with 4001. On failure the new leg is closed with 4410 and the session
    /// carries on as it was.
    fn splice(&mut self, resumption: Resumption, ctx: &SessionContext) -> Result<(Option<Issued>, u64), Failure> {
        let Resumption { leg, received, hold, .. } = resumption;
        // A client message half forwarded by the old leg cannot be finished by the new one.
        if self.hooks.replay.ack(received).is_err() || self.legs[1].out.message_open() {
            refuse(leg, Failure::BadCount, self.env.metrics, Some(hold));
            return Err(Failure::BadCount);
        }
        let client = &mut self.legs[0];
        let old = std::mem::replace(&mut client.io, leg);
        let old_hold = self.hooks.hold.replace(hold);
        if !self.hooks.detached {
            tokio::spawn(async move {
                crate::proxy::lone_leg::close(old, Side::Client, REPLACED.0, REPLACED.1).await;
                drop(old_hold);
            });
        }
        client.reader = FrameReader::new(true, self.env.settings.max_message_size).with_deflate(self.env.conn.deflate);
        client.in_transit = FrameInTransit::default();
        self.legs[1].out.drop_partial();
        let session = &mut self.hooks;
        let mut preface = Vec::new();
        let next = issue(ctx, &mut preface, session.from_client);
        let replayed = session.replay.copy_kept(&mut preface);
        session.told = session.from_client;
        session.detached = false;
        self.legs[0].out.restart(preface);
        self.keepalive = keepalive_of(self.env.settings, false);
        self.env.conn.leg(Side::Client).last_frame_us.store(
            Instant::now().into_std().saturating_duration_since(self.env.conn.started).as_micros() as u64,
            Relaxed,
        );
        Ok((next, replayed))
    }
}

/// A resume that cannot go on: 101 was answered, so the client is told with a close frame
/// (browser code would see an HTTP error only as a bare 1006).
/// `hold` (the new connection's place) is let go once the close is done.
pub fn refuse(leg: LegStream, why: Failure, metrics: &Metrics, hold: Option<Hold>) {
    tokio::spawn(refusal(leg, why, metrics, hold));
}

/// `refuse`, for a task that waits for it.
pub fn refusal(
    leg: LegStream,
    why: Failure,
    metrics: &Metrics,
    hold: Option<Hold>,
) -> impl Future<Output = ()> + Send + 'static {
    tracing::debug!(reason = why.as_str(), "resume refused");
    metrics.close_code(Side::Client, false, NOT_RESUMABLE.0);
    async move {
        crate::proxy::lone_leg::close(leg, Side::Client, NOT_RESUMABLE.0, NOT_RESUMABLE.1).await;
        drop(hold);
    }
}
