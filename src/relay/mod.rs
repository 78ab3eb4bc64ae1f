//! The life of one proxied WebSocket connection: relay, keepalive and ending, in one task.
//!
//! `Relay::poll_ending` drives both legs in one task. It forwards frames, not messages
//! (`transcode`): each data frame goes from the bytes the transport has (rustls's buffer, or the
//! stack) into the other leg's `outbox`, and becomes writable once it has fully arrived and passed
//! its checks. A leg is read only while both legs' outboxes have room, so a slow reader
//! backpressures the sender instead of growing a buffer; a leg wskeep does not read is not judged
//! by its silence, while the peer that stopped reading is judged by its writes that make no
//! progress. Each wake-up reads what is ready first, then looks at the timers, then writes. The
//! first ending it sees decides what each leg is sent (`ending`); the closing handshakes then run
//! on both legs together, bounded by `CLOSE_BOUND`.

mod ending;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
mod outbox;
pub mod session;
mod transcode;

#[cfg(test)]
mod tests;

use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use ending::Outcome;
use ending::{finish, Ending};
use outbox::Outbox;
use session::{Hooks, NoSession};
use transcode::FrameInTransit;

use crate::config::Config;
use crate::connections::ConnInfo;
use crate::frame::{self, FrameReader};
use crate::jsonping::JsonPingMatcher;
use crate::keepalive::{self, Due, Keepalive, LegTimers, TimerSlots};
use crate::legstream::LegStream;
use crate::metrics::Metrics;
use crate::vocab::Side;

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

/// The connection's settings and where it reports: what a read records against, besides the
/// legs and the timers.
#[derive(Clone, Copy)]
struct ConnEnv<'a> {
    settings: &'a RelaySettings,
    metrics: &'a Metrics,
    conn: &'a ConnInfo,
}

struct Leg {
    side: Side,
    io: LegStream,
    reader: FrameReader,
    out: Outbox,
    in_transit: FrameInTransit,
}

impl Leg {
    fn new(side: Side, io: LegStream, max_message_size: u64, deflate: bool) -> Leg {
        let from_client = side == Side::Client;
        Leg {
            side,
            io,
            reader: FrameReader::new(from_client, max_message_size).with_deflate(deflate),
            out: Outbox::new(!from_client),
            in_transit: FrameInTransit::default(),
        }
    }
}

/// `from` may be read: what it sends has room on the other leg, and wskeep's answers to it
/// are within their budget.
fn may_read(from: &Leg, to: &Leg) -> bool {
    to.out.has_room() && !from.out.own_over_budget()
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
    let signal = std::pin::pin!(closing.clone().cancelled_owned());
    let env = ConnEnv { settings, metrics, conn };
    let mut relay = Relay::new(client, upstream, env, ShutdownWatch::new(&closing, signal), NoSession);
    let ending = poll_fn(|cx| relay.poll_ending(cx)).await;
    tracing::debug!(conn = conn.id, ending = ?ending, "connection ending");
    let Relay { legs, keepalive, .. } = relay;
    // Its place in a timer slot goes now, not after the closing handshake.
    drop(keepalive);
    // Boxed: the closing phase is large and short-lived; keeping it out of the relay future keeps
    // every idle connection small.
    Box::pin(finish(legs, ending, metrics, true)).await
}

/// The keepalive of both legs as configured; `client_off`: none on the client leg (a detached
/// session's, which has no client).
fn keepalive_of(settings: &RelaySettings, client_off: bool) -> Keepalive {
    let [mut client_timers, upstream_timers] = settings.timers;
    if client_off {
        client_timers =
            LegTimers { ping_interval: Duration::ZERO, pong_interval: Duration::ZERO, timeout: Duration::ZERO };
    }
    let slack = keepalive::coalescing(&settings.timers);
    Keepalive::new(client_timers, upstream_timers, slack, settings.timer_slots.clone())
}

/// One connection while it relays. `S` is what a resumable session adds (`session::Session`);
/// an ordinary connection's `NoSession` is empty and its checks compile away, so it costs
/// neither memory nor a branch.
struct Relay<'a, S> {
    legs: [Leg; 2],
    keepalive: Keepalive,
    env: ConnEnv<'a>,
    shutdown: ShutdownWatch<'a>,
    /// Which leg reads first in the next pass: they alternate, so a busy leg cannot starve the
    /// other.
    client_first: bool,
    hooks: S,
}

impl<'a, S: Hooks> Relay<'a, S> {
    fn new(client: LegStream, upstream: LegStream, env: ConnEnv<'a>, shutdown: ShutdownWatch<'a>, hooks: S) -> Self {
        let (max, deflate) = (env.settings.max_message_size, env.conn.deflate);
        Relay {
            legs: [Leg::new(Side::Client, client, max, deflate), Leg::new(Side::Upstream, upstream, max, deflate)],
            keepalive: keepalive_of(env.settings, false),
            env,
            shutdown,
            client_first: true,
            hooks,
        }
    }

    /// Relays until something ends the connection.
    fn poll_ending(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        if self.shutdown.poll(cx).is_ready() {
            return Poll::Ready(Ending::Shutdown);
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
        // One clock read per wake-up, and only if something needs it: a frame's arrival time
        // needs no finer grain.
        let mut now = None;
        loop {
            // What is ready is read before any timer is judged: a frame that arrived is a sign
            // of life even if the wake-up came late.
            let (blocked, more) = match self.read_turns(&mut scratch, &mut now, cx) {
                Ok(turns) => turns,
                Err(ending) => return Poll::Ready(ending),
            };
            for (side, blocked) in Side::BOTH.into_iter().zip(blocked) {
                self.keepalive.set_paused(side, blocked, || *now.get_or_insert_with(Instant::now));
            }
            if let Poll::Ready(ending) = self.run_timers(cx) {
                return Poll::Ready(ending);
            }
            if let Poll::Ready(ending) = self.hooks.poll(&mut self.legs[0].out, cx) {
                return Poll::Ready(ending);
            }
            // Nothing more to read right now (or a long run of reads): write out what they made.
            for leg in &mut self.legs {
                let before = leg.out.unwritten();
                if let Poll::Ready(Err(e)) = leg.out.poll_write(&mut leg.io, cx) {
                    tracing::debug!(conn = self.env.conn.id, side = leg.side.as_str(), error = %e, "write failed");
                    return Poll::Ready(Ending::Lost(leg.side));
                }
                let after = leg.out.unwritten();
                if before > 0 || after > 0 {
                    self.keepalive
                        .writes(leg.side, after > 0, after < before, || *now.get_or_insert_with(Instant::now));
                }
            }
            // Go round again after a long run of reads, or when writing made room to read.
            let [client, upstream] = &self.legs;
            let unblocked = blocked[0] && may_read(client, upstream)
                || blocked[1] && may_read(upstream, client) && self.hooks.upstream_room();
            if !(more || unblocked) {
                return Poll::Pending;
            }
        }
    }

    /// A turn of reads on each leg, alternating which goes first. A leg reads until it has
    /// nothing more (rustls lends one record per read), its turn ends, or the other leg has no
    /// room. Returns which legs were left unread for want of room, and whether more is ready.
    fn read_turns(
        &mut self,
        scratch: &mut [MaybeUninit<u8>],
        now: &mut Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Result<([bool; 2], bool), Ending> {
        self.client_first = !self.client_first;
        let mut blocked = [false; 2];
        let mut more = false;
        for src in if self.client_first { [0, 1] } else { [1, 0] } {
            let [client, upstream] = &mut self.legs;
            let (from, to) = if src == 0 { (client, upstream) } else { (upstream, client) };
            let mut reads = 0;
            loop {
                if !may_read(from, to) || src == 1 && !self.hooks.upstream_room() {
                    blocked[src] = true;
                    break;
                }
                if reads == READS_PER_TURN {
                    more = true;
                    break;
                }
                match transcode::poll_read(from, to, &mut self.keepalive, &mut self.hooks, self.env, now, scratch, cx) {
                    Poll::Ready(Ok(())) => reads += 1,
                    Poll::Ready(Err(ending)) => return Err(ending),
                    Poll::Pending => break,
                }
            }
        }
        Ok((blocked, more))
    }

    /// Sends what the keepalive timers ask for; `Ready` if a leg is found dead.
    fn run_timers(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        let (metrics, conn) = (self.env.metrics, self.env.conn);
        while let Poll::Ready((side, due)) = self.keepalive.poll_due(cx) {
            let leg = &mut self.legs[side as usize];
            match due {
                Due::Dead => return Poll::Ready(Ending::TimedOut(side)),
                // Pings and pongs are dropped while the peer reads nothing: its timeout decides
                // its fate, and the buffer stays bounded.
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
        Poll::Pending
    }
}

/// The drain's order to close every connection. Every relay shares one token, and polling its
/// future takes the token's lock; so the future is polled only to register a waker (at first,
/// and again when the task's waker changes), and otherwise only the flag is read.
struct ShutdownWatch<'a> {
    token: &'a CancellationToken,
    signal: Pin<&'a mut WaitForCancellationFutureOwned>,
    registered: Option<Waker>,
}

impl<'a> ShutdownWatch<'a> {
    fn new(token: &'a CancellationToken, signal: Pin<&'a mut WaitForCancellationFutureOwned>) -> Self {
        ShutdownWatch { token, signal, registered: None }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return if self.token.is_cancelled() { Poll::Ready(()) } else { Poll::Pending };
        }
        self.registered = Some(cx.waker().clone());
        self.signal.as_mut().poll(cx)
    }
}
