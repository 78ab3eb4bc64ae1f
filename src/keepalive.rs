//! The keepalive timers of one leg: pings to send, unsolicited pongs to send, and the idle
//! deadline after which the peer is taken for dead.
//!
//! Any frame is a sign of life (an idle timer, not a count of unanswered pings). The deadline is
//! lazy: a frame only stores its arrival time, and the timer is re-armed when it fires early, so
//! a busy connection costs one timer reset per timeout period instead of one per frame.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

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

pub struct Keepalive {
    ping: Option<Interval>,
    pong: Option<Interval>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    last_seen: Instant,
    /// The last ping sent and when; a pong carrying another payload is not ours.
    outstanding: Option<(u64, Instant)>,
    seq: u64,
}

fn every(period: Duration) -> Option<Interval> {
    (!period.is_zero()).then(|| {
        let mut i = tokio::time::interval_at(Instant::now() + period, period);
        // After a stall, carry on at the period rather than bursting the missed pings.
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    })
}

impl Keepalive {
    /// Zero durations switch the corresponding timer off.
    pub fn new(ping_interval: Duration, pong_interval: Duration, timeout: Duration) -> Keepalive {
        let now = Instant::now();
        Keepalive {
            ping: every(ping_interval),
            pong: every(pong_interval),
            idle: (!timeout.is_zero()).then(|| (timeout, Box::pin(tokio::time::sleep_until(now + timeout)))),
            last_seen: now,
            outstanding: None,
            seq: 0,
        }
    }

    /// A frame arrived from the peer.
    pub fn saw_frame(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// A pong arrived: the round-trip time if it answers our last ping.
    pub fn pong_received(&mut self, payload: &[u8], now: Instant) -> Option<Duration> {
        let (seq, sent) = self.outstanding?;
        if payload == seq.to_be_bytes() {
            self.outstanding = None;
            Some(now.saturating_duration_since(sent))
        } else {
            None
        }
    }

    pub fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<Due> {
        if let Some((timeout, sleep)) = &mut self.idle {
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = self.last_seen + *timeout;
                if Instant::now() >= deadline {
                    // Fire once; the connection ends here.
                    self.idle = None;
                    return Poll::Ready(Due::Dead);
                }
                sleep.as_mut().reset(deadline);
            }
        }
        if let Some(ping) = &mut self.ping {
            if ping.poll_tick(cx).is_ready() {
                self.seq += 1;
                self.outstanding = Some((self.seq, Instant::now()));
                return Poll::Ready(Due::Ping(Bytes::copy_from_slice(&self.seq.to_be_bytes())));
            }
        }
        if let Some(pong) = &mut self.pong {
            if pong.poll_tick(cx).is_ready() {
                return Poll::Ready(Due::Pong);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn next(k: &mut Keepalive) -> Due {
        poll_fn(|cx| k.poll_due(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn pings_at_the_interval_and_measures_the_answer() {
        let start = Instant::now();
        let mut k = Keepalive::new(Duration::from_millis(200), Duration::ZERO, Duration::ZERO);
        let Due::Ping(first) = next(&mut k).await else { panic!("expected a ping") };
        assert_eq!(Instant::now() - start, Duration::from_millis(200));
        tokio::time::advance(Duration::from_millis(7)).await;
        assert_eq!(k.pong_received(b"not ours", Instant::now()), None);
        assert_eq!(k.pong_received(&first, Instant::now()), Some(Duration::from_millis(7)));
        // Answered once: a duplicate pong is not measured again.
        assert_eq!(k.pong_received(&first, Instant::now()), None);
        let Due::Ping(second) = next(&mut k).await else { panic!("expected a ping") };
        assert_ne!(first, second);
        assert_eq!(Instant::now() - start, Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn any_frame_defers_the_deadline() {
        let start = Instant::now();
        let mut k = Keepalive::new(Duration::ZERO, Duration::ZERO, Duration::from_millis(300));
        tokio::time::advance(Duration::from_millis(250)).await;
        k.saw_frame(Instant::now());
        assert_eq!(next(&mut k).await, Due::Dead);
        assert_eq!(Instant::now() - start, Duration::from_millis(550));
    }

    #[tokio::test(start_paused = true)]
    async fn unsolicited_pongs_and_disabled_timers() {
        let start = Instant::now();
        let mut k = Keepalive::new(Duration::ZERO, Duration::from_millis(100), Duration::ZERO);
        assert_eq!(next(&mut k).await, Due::Pong);
        assert_eq!(next(&mut k).await, Due::Pong);
        assert_eq!(Instant::now() - start, Duration::from_millis(200));
        let mut off = Keepalive::new(Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let waited = tokio::time::timeout(Duration::from_secs(3600), next(&mut off)).await;
        assert!(waited.is_err(), "no timer may fire when all are off");
    }
}
