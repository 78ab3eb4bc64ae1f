//! The keepalive timers of one connection: for each leg, pings to send, unsolicited pongs to send,
//! and the idle deadline after which the peer is taken for dead.
//!
//! Any frame is a sign of life (an idle timer, not a count of unanswered pings). The deadline is
//! lazy: a frame only stores its arrival time, and the deadline is pushed back when it comes due
//! early, so a busy connection costs one timer check per timeout period instead of one per frame.
//!
//! Both legs wait together, for the earliest of their deadlines, and periodic timers stay on their
//! grid (start + k × period). With equal intervals both legs' pings therefore fall due together
//! and go out in one wake-up.
//!
//! That wait ends on a coarse grid shared by every connection (`coalescing`): a timer fires up
//! to 1/16 of its period late (at most 250 ms), so the pings of thousands of connections leave in
//! bursts, and the connections of one grid instant wait in one shared slot (`TimerSlots`), not
//! in a timer each. At scale the wake-ups, not the pings, are what keepalive costs.

use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::vocab::Side;

mod slots;
use slots::Ticket;
pub use slots::TimerSlots;

/// What a leg's timers ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Send this protocol ping (its payload identifies it for the round-trip time).
    Ping(Bytes),
    /// Send an unsolicited pong.
    Pong,
    /// Nothing arrived for the whole timeout.
    Dead,
}

/// A leg's timer settings; zero durations switch the corresponding timer off.
#[derive(Debug, Clone, Copy)]
pub struct LegTimers {
    pub ping_interval: Duration,
    pub pong_interval: Duration,
    pub timeout: Duration,
}

/// A periodic timer on a fixed grid.
struct Every {
    period: Duration,
    next: Instant,
}

impl Every {
    fn new(period: Duration, start: Instant) -> Option<Every> {
        (!period.is_zero()).then(|| Every { period, next: start + period })
    }

    /// True (and moved to its next slot) when due. After a stall it carries on at the period
    /// rather than bursting the missed ticks.
    fn fire(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next += self.period;
        if self.next <= now {
            self.next = now + self.period;
        }
        true
    }
}

struct LegState {
    ping: Option<Every>,
    pong: Option<Every>,
    timeout: Duration,
    /// When to look at `last_seen` again: never earlier than `last_seen + timeout`.
    idle_check: Option<Instant>,
    last_seen: Instant,
    /// wskeep is not reading this side (what it sends has nowhere to go): its silence does not
    /// count against it meanwhile.
    paused: bool,
    /// Since when frames queued for this side have waited without the transport taking any:
    /// a peer that stops reading is dead after `timeout` of this, however much it sends.
    stalled_since: Option<Instant>,
    /// The last ping sent and when; a pong carrying another payload is not ours.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
}

impl LegState {
    fn new(timers: LegTimers, start: Instant) -> LegState {
        LegState {
            ping: Every::new(timers.ping_interval, start),
            pong: Every::new(timers.pong_interval, start),
            timeout: timers.timeout,
            idle_check: (!timers.timeout.is_zero()).then(|| start + timers.timeout),
            last_seen: start,
            paused: false,
            stalled_since: None,
            outstanding: None,
            seq: 0,
        }
    }

    fn due(&mut self, now: Instant) -> Option<Due> {
        if let Some(check) = self.idle_check {
            if now >= check {
                let deadline = if self.paused { now + self.timeout } else { self.last_seen + self.timeout };
                if now >= deadline {
                    return Some(Due::Dead);
                }
                self.idle_check = Some(deadline);
            }
        }
        if self.stall_deadline().is_some_and(|deadline| now >= deadline) {
            return Some(Due::Dead);
        }
        if self.ping.as_mut().is_some_and(|p| p.fire(now)) {
            self.seq += 1;
            self.outstanding = Some((self.seq, now));
            return Some(Due::Ping(Bytes::copy_from_slice(&self.seq.to_be_bytes())));
        }
        if self.pong.as_mut().is_some_and(|p| p.fire(now)) {
            return Some(Due::Pong);
        }
        None
    }

    fn stall_deadline(&self) -> Option<Instant> {
        self.stalled_since.filter(|_| !self.timeout.is_zero()).map(|since| since + self.timeout)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let periodic = [self.ping.as_ref().map(|p| p.next), self.pong.as_ref().map(|p| p.next)];
        [self.idle_check, self.stall_deadline(), periodic[0], periodic[1]].into_iter().flatten().min()
    }
}

/// How late a connection's timers may fire so that they share slots with other connections':
/// 1/16 of the shortest period or timeout, from 1 ms (the timer wheel's own resolution) to 250 ms.
pub fn coalescing(legs: &[LegTimers]) -> Duration {
    legs.iter()
        .flat_map(|t| [t.ping_interval, t.pong_interval, t.timeout])
        .filter(|d| !d.is_zero())
        .min()
        .map_or(Duration::ZERO, |d| (d / 16).clamp(Duration::from_millis(1), Duration::from_millis(250)))
}

/// `at` rounded up to the next multiple of `step` counted from a process-wide origin, so that
/// connections with the same settings land in the same slots.
fn on_grid(at: Instant, step: Duration) -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let step = step.as_nanos();
    if step == 0 {
        return at;
    }
    // An instant from before the origin (a test clock) is left as it is: never earlier than asked.
    let since = at.saturating_duration_since(*ORIGIN.get_or_init(Instant::now)).as_nanos();
    match since % step {
        0 => at,
        // Below `step`, which is at most 250 ms: the cast cannot truncate.
        rem => at + Duration::from_nanos((step - rem) as u64),
    }
}

pub struct Keepalive {
    legs: [LegState; 2],
    slots: TimerSlots,
    slack: Duration,
    wait: Wait,
}

/// Where the timers stand between two looks at the legs.
enum Wait {
    /// Look at the legs on the next poll: new, or a due timer was just returned (more may be).
    Look,
    /// Waiting in the slot of the earliest deadline of both legs (the place goes with the ticket).
    Slot(Ticket),
    /// Every timer is off, or a leg was found dead.
    Stopped,
}

impl Keepalive {
    /// `slack`: how late a timer may fire to share a slot (see `coalescing`; zero: exact).
    pub fn new(client: LegTimers, upstream: LegTimers, slack: Duration, slots: TimerSlots) -> Keepalive {
        let now = Instant::now();
        Keepalive { legs: [LegState::new(client, now), LegState::new(upstream, now)], slots, slack, wait: Wait::Look }
    }

    /// A frame arrived from the peer on this side.
    pub fn saw_frame(&mut self, side: Side, now: Instant) {
        self.legs[side as usize].last_seen = now;
    }

    /// wskeep stops or resumes reading this side. A side it chose not to read is not judged by
    /// its silence: on resuming, its idle time starts again from `now`.
    pub fn set_paused(&mut self, side: Side, paused: bool, now: impl FnOnce() -> Instant) {
        let leg = &mut self.legs[side as usize];
        if leg.paused && !paused {
            leg.last_seen = leg.last_seen.max(now());
        }
        leg.paused = paused;
    }

    /// After a write to this side: `waiting` is whether queued frames are still not taken by
    /// the transport, `progressed` whether it took any this time. Frames that wait without
    /// progress for the side's timeout make it dead (its peer stopped reading).
    pub fn writes(&mut self, side: Side, waiting: bool, progressed: bool, now: impl FnOnce() -> Instant) {
        let leg = &mut self.legs[side as usize];
        leg.stalled_since = match (waiting, progressed, leg.stalled_since) {
            (false, _, _) => None,
            (true, true, _) | (true, false, None) => Some(now()),
            (true, false, Some(since)) => Some(since),
        };
    }

    /// A pong arrived on this side: the round-trip time if it answers our last ping.
    pub fn pong_received(&mut self, side: Side, payload: &[u8], now: Instant) -> Option<Duration> {
        let leg = &mut self.legs[side as usize];
        let (seq, sent) = leg.outstanding?;
        if payload == seq.to_be_bytes() {
            leg.outstanding = None;
            Some(now.saturating_duration_since(sent))
        } else {
            None
        }
    }

    /// The next timer that is due, one at a time; a leg found dead fires once and the timers stop
    /// (the connection ends there). Between deadlines a call costs one flag load: no clock read.
    /// A waker that changes between polls replaces the one in the slot.
    pub fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<(Side, Due)> {
        match &mut self.wait {
            Wait::Stopped => return Poll::Pending,
            Wait::Slot(ticket) if !ticket.has_fired() => {
                ticket.update_waker(cx.waker());
                return Poll::Pending;
            }
            Wait::Slot(_) | Wait::Look => {}
        }
        let now = Instant::now();
        for (leg, side) in self.legs.iter_mut().zip([Side::Client, Side::Upstream]) {
            if let Some(due) = leg.due(now) {
                // More may be due at the same instant: look again on the next call.
                self.wait = if due == Due::Dead { Wait::Stopped } else { Wait::Look };
                return Poll::Ready((side, due));
            }
        }
        // Every deadline left is in the future (`due` moved each one past `now`).
        self.wait = match self.legs.iter().filter_map(LegState::next_deadline).min() {
            Some(next) => Wait::Slot(self.slots.join(on_grid(next, self.slack), cx.waker())),
            None => Wait::Stopped,
        };
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    const OFF: LegTimers =
        LegTimers { ping_interval: Duration::ZERO, pong_interval: Duration::ZERO, timeout: Duration::ZERO };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Timers with no slack, each connection in slots of its own.
    fn exact(client: LegTimers, upstream: LegTimers) -> Keepalive {
        Keepalive::new(client, upstream, Duration::ZERO, TimerSlots::default())
    }

    async fn next(k: &mut Keepalive) -> (Side, Due) {
        poll_fn(|cx| k.poll_due(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn pings_at_the_interval_and_measures_the_answer() {
        let start = Instant::now();
        let mut k = exact(LegTimers { ping_interval: ms(200), ..OFF }, OFF);
        let (Side::Client, Due::Ping(first)) = next(&mut k).await else { panic!("expected a client ping") };
        assert_eq!(Instant::now() - start, ms(200));
        tokio::time::advance(ms(7)).await;
        assert_eq!(k.pong_received(Side::Upstream, &first, Instant::now()), None, "the other leg's pong");
        assert_eq!(k.pong_received(Side::Client, b"not ours", Instant::now()), None);
        assert_eq!(k.pong_received(Side::Client, &first, Instant::now()), Some(ms(7)));
        // Answered once: a duplicate pong is not measured again.
        assert_eq!(k.pong_received(Side::Client, &first, Instant::now()), None);
        let (_, Due::Ping(second)) = next(&mut k).await else { panic!("expected a ping") };
        assert_ne!(first, second);
        assert_eq!(Instant::now() - start, ms(400), "pings stay on their grid");
    }

    #[tokio::test(start_paused = true)]
    async fn any_frame_defers_the_deadline() {
        let start = Instant::now();
        let mut k = exact(OFF, LegTimers { timeout: ms(300), ..OFF });
        tokio::time::advance(ms(250)).await;
        k.saw_frame(Side::Upstream, Instant::now());
        assert_eq!(next(&mut k).await, (Side::Upstream, Due::Dead));
        assert_eq!(Instant::now() - start, ms(550));
        let stopped = tokio::time::timeout(Duration::from_secs(3600), next(&mut k)).await;
        assert!(stopped.is_err(), "a dead connection's timers stop");
    }

    #[tokio::test(start_paused = true)]
    async fn both_legs_fall_due_together_on_one_timer() {
        let start = Instant::now();
        let every = LegTimers { ping_interval: ms(100), ..OFF };
        let mut k = exact(every, LegTimers { pong_interval: ms(100), ..every });
        for round in 1..=3 {
            let mut got = Vec::new();
            for _ in 0..3 {
                let (side, due) = next(&mut k).await;
                got.push((side, matches!(due, Due::Ping(_))));
            }
            assert_eq!(got, [(Side::Client, true), (Side::Upstream, true), (Side::Upstream, false)]);
            assert_eq!(Instant::now() - start, ms(100 * round), "all three at the same instant");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_stall_ticks_carry_on_at_the_period() {
        let start = Instant::now();
        let mut k = exact(OFF, LegTimers { pong_interval: ms(100), ..OFF });
        tokio::time::advance(ms(350)).await;
        assert_eq!(next(&mut k).await, (Side::Upstream, Due::Pong));
        assert_eq!(Instant::now() - start, ms(350));
        assert_eq!(next(&mut k).await, (Side::Upstream, Due::Pong));
        assert_eq!(Instant::now() - start, ms(450), "one tick, not a burst of the missed ones");
    }

    #[test]
    fn slack_is_a_sixteenth_of_the_shortest_timer_within_bounds() {
        let t = |p, q, o| LegTimers { ping_interval: ms(p), pong_interval: ms(q), timeout: ms(o) };
        assert_eq!(coalescing(&[t(1000, 0, 5000), t(0, 0, 30_000)]), ms(1000) / 16);
        assert_eq!(coalescing(&[t(20_000, 0, 60_000), t(0, 0, 0)]), ms(250));
        assert_eq!(coalescing(&[t(8, 0, 0), OFF]), ms(1));
        assert_eq!(coalescing(&[OFF, OFF]), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_opened_apart_ping_in_a_few_shared_slots() {
        let every = LegTimers { ping_interval: ms(1000), ..OFF };
        let slack = coalescing(&[every]);
        let slots = TimerSlots::default();
        // 100 connections opened 1 ms apart.
        let mut conns = Vec::new();
        for _ in 0..100 {
            conns.push((Keepalive::new(every, OFF, slack, slots.clone()), Instant::now() + ms(1000), None));
            tokio::time::advance(ms(1)).await;
        }
        while conns.iter().any(|(_, _, fired)| fired.is_none()) {
            tokio::time::advance(ms(1)).await;
            // A slot fires from a task of its own: let it run.
            tokio::task::yield_now().await;
            for (k, _, fired) in conns.iter_mut().filter(|c| c.2.is_none()) {
                if tokio::time::timeout(Duration::ZERO, next(k)).await.is_ok() {
                    *fired = Some(Instant::now());
                }
            }
        }
        let mut instants: Vec<Instant> = conns.iter().filter_map(|c| c.2).collect();
        for (_, due, fired) in &conns {
            let fired = fired.unwrap_or(*due);
            assert!(fired >= *due && fired <= *due + slack + ms(1), "fired {:?} after due", fired - *due);
        }
        instants.dedup();
        assert!(instants.len() <= 3, "100 pings over 100 ms fall in 62.5 ms slots, got {} instants", instants.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_gives_up_its_place() {
        let slots = TimerSlots::default();
        let every = LegTimers { ping_interval: ms(1000), ..OFF };
        let join = || Keepalive::new(every, OFF, coalescing(&[every]), slots.clone());
        let (mut ended, mut staying) = (join(), join());
        for k in [&mut ended, &mut staying] {
            assert!(tokio::time::timeout(Duration::ZERO, next(k)).await.is_err());
        }
        assert_eq!((slots.slots(), slots.waiting()), (1, 2), "both wait, in one slot");
        drop(ended);
        assert_eq!(slots.waiting(), 1, "the waker of an ended connection is not kept");
        assert!(matches!(next(&mut staying).await, (Side::Client, Due::Ping(_))));
        assert!(tokio::time::timeout(Duration::ZERO, next(&mut staying)).await.is_err());
        assert_eq!(slots.waiting(), 1, "waiting for the next ping");
        drop(staying);
        assert_eq!(slots.slots(), 0, "the last to leave takes the slot with it");
    }

    #[tokio::test(start_paused = true)]
    async fn connections_coming_and_going_reuse_places() {
        let slots = TimerSlots::default();
        // An hour's idle timeout: the slot is far ahead while connections come and go.
        let idle = LegTimers { timeout: Duration::from_secs(3600), ..OFF };
        let join = || Keepalive::new(idle, OFF, coalescing(&[idle]), slots.clone());
        let mut staying = join();
        assert!(tokio::time::timeout(Duration::ZERO, next(&mut staying)).await.is_err());
        for _ in 0..1000 {
            let mut passing = join();
            assert!(tokio::time::timeout(Duration::ZERO, next(&mut passing)).await.is_err());
        }
        assert_eq!((slots.slots(), slots.waiting()), (1, 1));
        let places = slots.places();
        assert!(places <= 2, "1,000 connections one after another took {places} places");
    }

    /// A waker that counts its wakes.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_waker_of_the_latest_poll_is_the_one_woken() {
        let mut k = exact(LegTimers { ping_interval: ms(100), ..OFF }, OFF);
        let [first, second] = [(); 2].map(|_| std::sync::Arc::new(Counting(Default::default())));
        let waker = |c: &std::sync::Arc<Counting>| std::task::Waker::from(c.clone());
        assert!(k.poll_due(&mut Context::from_waker(&waker(&first))).is_pending());
        // The task is polled with another waker before the slot fires (a task moved between
        // executors, or a combinator's own waker): that one must be woken.
        assert!(k.poll_due(&mut Context::from_waker(&waker(&second))).is_pending());
        tokio::time::sleep(ms(150)).await;
        let wakes = |c: &std::sync::Arc<Counting>| c.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!((wakes(&first), wakes(&second)), (0, 1));
        assert!(matches!(
            k.poll_due(&mut Context::from_waker(&waker(&second))),
            Poll::Ready((Side::Client, Due::Ping(_)))
        ));
    }

    /// A leg wskeep stopped reading is not judged by its silence; writes that wait without
    /// progress for the timeout are.
    #[tokio::test(start_paused = true)]
    async fn a_paused_leg_is_not_judged_by_silence_but_a_stalled_one_is() {
        let mut k = exact(LegTimers { timeout: ms(100), ..OFF }, LegTimers { timeout: ms(100), ..OFF });
        k.set_paused(Side::Upstream, true, Instant::now);
        k.saw_frame(Side::Client, Instant::now());
        k.writes(Side::Client, true, false, Instant::now);
        tokio::time::sleep(ms(60)).await;
        // The client's queued bytes move a little: its stall starts again, at 60 ms.
        k.writes(Side::Client, true, true, Instant::now);
        tokio::time::sleep(ms(60)).await;
        // Frames from the client keep its idle timer fed; its writes do not move.
        k.saw_frame(Side::Client, Instant::now());
        let started = Instant::now();
        assert_eq!(next(&mut k).await, (Side::Client, Due::Dead), "the client stalled, the upstream was paused");
        assert_eq!(Instant::now() - started, ms(40), "100 ms after the last progress of its writes");
        // Resuming a paused leg restarts its idle time.
        let mut k = exact(OFF, LegTimers { timeout: ms(100), ..OFF });
        k.set_paused(Side::Upstream, true, Instant::now);
        tokio::time::sleep(ms(500)).await;
        assert!(tokio::time::timeout(Duration::ZERO, next(&mut k)).await.is_err(), "not judged while paused");
        k.set_paused(Side::Upstream, false, Instant::now);
        let resumed = Instant::now();
        assert_eq!(next(&mut k).await, (Side::Upstream, Due::Dead));
        assert_eq!(Instant::now() - resumed, ms(100));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_timers_never_fire() {
        let mut off = exact(OFF, OFF);
        let waited = tokio::time::timeout(Duration::from_secs(3600), next(&mut off)).await;
        assert!(waited.is_err(), "no timer may fire when all are off");
    }
}
