//! What the status page shows beyond the live list: the last few hundred endings (a bounded
//! ring, pushed once per connection ending), counts of every ending since start by `end` and by
//! lifetime, and the number of open connections sampled over the last hour.
//!
//! A push clones an `Arc` into a ring whose capacity was reserved at start: no allocation, one
//! short lock per ending, nothing per frame.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::connections::ConnInfo;
use crate::metrics::DURATION_BUCKETS;
use crate::relay::Outcome;
use crate::vocab::{End, Side};

/// Endings kept for `/connections?ended=1` and the status page.
pub const RING_CAPACITY: usize = 500;
/// Samples of the open-connection count: one every `SAMPLE_EVERY`, an hour's worth.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
const SAMPLES: usize = 240;
/// The histogram's upper bounds, then one bucket for longer.
const LIFETIME_BUCKETS: usize = DURATION_BUCKETS.len() + 1;

pub struct Ended {
    /// The connection's final state (counts, RTTs): kept whole, it costs no copy.
    pub info: Arc<ConnInfo>,
    pub at: SystemTime,
    pub duration: Duration,
    pub outcome: Outcome,
}

struct State {
    ring: VecDeque<Ended>,
    by_end: [u64; End::ALL.len()],
    /// Endings by lifetime (`LIFETIME_BUCKETS`).
    by_lifetime: [u64; LIFETIME_BUCKETS],
    /// (unix seconds, open connections).
    samples: VecDeque<(u64, u64)>,
}

pub struct Endings {
    state: Mutex<State>,
}

impl Default for Endings {
    fn default() -> Self {
        Endings {
            state: Mutex::new(State {
                ring: VecDeque::with_capacity(RING_CAPACITY),
                by_end: [0; End::ALL.len()],
                by_lifetime: [0; LIFETIME_BUCKETS],
                samples: VecDeque::with_capacity(SAMPLES),
            }),
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl Endings {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters and a ring: a panic while holding the lock cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one ending (the relay task calls this once, after the closing handshakes).
    pub fn record(&self, info: Arc<ConnInfo>, outcome: Outcome, duration: Duration) {
        let ended = Ended { info, at: SystemTime::now(), duration, outcome };
        let bucket = DURATION_BUCKETS.iter().position(|&b| duration.as_secs_f64() <= b).unwrap_or(LIFETIME_BUCKETS - 1);
        let mut state = self.lock();
        if state.ring.len() == RING_CAPACITY {
            state.ring.pop_front();
        }
        state.ring.push_back(ended);
        state.by_end[outcome.end as usize] += 1;
        state.by_lifetime[bucket] += 1;
    }

    /// Records how many connections are open now (the sampler, every `SAMPLE_EVERY`).
    pub fn sample(&self, open: usize) {
        let now = unix_seconds(SystemTime::now()) as u64;
        let mut state = self.lock();
        if state.samples.len() == SAMPLES {
            state.samples.pop_front();
        }
        state.samples.push_back((now, open as u64));
    }

    /// The last `limit` endings, newest first.
    pub fn recent_json(&self, limit: usize) -> Value {
        let state = self.lock();
        Value::Array(state.ring.iter().rev().take(limit).map(ended_json).collect())
    }

    /// Counts for the charts: endings by `end` and by lifetime since start, and the samples.
    pub fn charts_json(&self) -> Value {
        let state = self.lock();
        let by_end: serde_json::Map<String, Value> =
            End::ALL.iter().map(|e| (e.as_str().to_string(), state.by_end[*e as usize].into())).collect();
        let lifetime: Vec<Value> = state
            .by_lifetime
            .iter()
            .enumerate()
            .map(|(i, n)| json!({ "le": DURATION_BUCKETS.get(i).copied(), "count": n }))
            .collect();
        let samples: Vec<Value> = state.samples.iter().map(|(t, n)| json!([t, n])).collect();
        json!({ "endings_by_end": by_end, "lifetime": lifetime, "open_samples": samples })
    }

    pub fn total(&self) -> u64 {
        self.lock().by_end.iter().sum()
    }
}

fn ended_json(e: &Ended) -> Value {
    let mut meanings = serde_json::Map::new();
    let leg = |side: Side| {
        let (received, sent) = e.outcome.codes[side as usize];
        json!({ "received": received, "sent": sent })
    };
    for code in e.outcome.codes.iter().flat_map(|(r, s)| [*r, *s]).flatten() {
        meanings.insert(code.to_string(), close_meaning(code).into());
    }
    json!({
        "id": e.info.id,
        "peer": e.info.peer.to_string(),
        "path": e.info.path,
        "http_version": e.info.http_version.as_str(),
        "compression": e.info.deflate.then_some(crate::proxy::deflate::NAME),
        "ended_at": (unix_seconds(e.at) * 1000.0).round() / 1000.0,
        "duration_seconds": e.duration.as_secs_f64(),
        "end": e.outcome.end.as_str(),
        "end_meaning": end_meaning(e.outcome.end),
        "client": leg(Side::Client),
        "upstream": leg(Side::Upstream),
        "code_meanings": meanings,
        "client_rtt_seconds": e.info.last_rtt(Side::Client).map(|d| d.as_secs_f64()),
        "upstream_rtt_seconds": e.info.last_rtt(Side::Upstream).map(|d| d.as_secs_f64()),
    })
}

/// The `end` label in plain words.
pub fn end_meaning(end: End) -> &'static str {
    match end {
        End::ClientClose => "the client closed the connection",
        End::UpstreamClose => "the upstream closed the connection",
        End::ClientTimeout => "nothing came from the client for client_keepalive.timeout",
        End::ClientError => "the client's connection was lost, or it sent what wskeep refuses",
        End::UpstreamTimeout => "nothing came from the upstream for upstream_keepalive.timeout",
        End::UpstreamError => "the upstream's connection was lost, or it sent what wskeep refuses",
        End::Shutdown => "wskeep shut down after the drain",
    }
}

/// A WebSocket close code in plain words (RFC 6455 §7.4, IANA registry).
pub fn close_meaning(code: u16) -> &'static str {
    match code {
        1000 => "normal closure: the connection was closed on purpose",
        1001 => "going away: a peer is leaving (a page closed, a server shutting down, or wskeep found the other side dead)",
        1002 => "protocol error: a peer broke the WebSocket rules",
        1003 => "unsupported data: a peer got a message type it cannot take",
        1005 => "a close frame without a code",
        1006 => "no close frame; a hop dropped the TCP connection (an idle timeout in a load balancer or proxy, a crash, a network cut)",
        1007 => "invalid data: a text message that is not UTF-8, for instance",
        1008 => "policy violation: the server refused what it was sent",
        1009 => "message too big for the receiver's limit",
        1010 => "the client needed an extension the server did not offer",
        1011 => "internal error in the server",
        1012 => "the service is restarting",
        1013 => "try again later: the server is overloaded",
        1014 => "bad gateway: the upstream behind the proxy timed out or was lost",
        1015 => "the TLS handshake failed",
        3000..=3999 => "a code registered for libraries and frameworks",
        4000..=4999 => "an application's own code: its meaning is the application's",
        _ => "not a valid close code",
    }
}

/// Every code `close_meaning` explains, for the test page.
pub fn close_meanings_json() -> Value {
    let mut map = serde_json::Map::new();
    for code in (1000..=1015).chain([3000, 4000]) {
        map.insert(code.to_string(), close_meaning(code).into());
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            id,
            peer: ([127, 0, 0, 1], 1).into(),
            path: "/ws".into(),
            http_version: crate::vocab::HttpVersion::Http1,
            started: std::time::Instant::now(),
            deflate: false,
            legs: Default::default(),
        })
    }

    #[test]
    fn the_ring_keeps_the_newest_endings_and_the_counts_keep_all() {
        let endings = Endings::default();
        let outcome = Outcome { end: End::ClientClose, codes: [(Some(1000), Some(1000)), (Some(1000), Some(1000))] };
        for id in 1..=(RING_CAPACITY as u64 + 20) {
            endings.record(info(id), outcome, Duration::from_secs(id % 100));
        }
        let recent = endings.recent_json(usize::MAX);
        let recent = recent.as_array().unwrap();
        assert_eq!(recent.len(), RING_CAPACITY);
        assert_eq!(recent[0]["id"], RING_CAPACITY as u64 + 20, "newest first");
        assert_eq!(recent[RING_CAPACITY - 1]["id"], 21, "the oldest 20 dropped");
        assert_eq!(recent[0]["code_meanings"]["1000"], close_meaning(1000));
        assert_eq!(endings.total(), RING_CAPACITY as u64 + 20);
        let charts = endings.charts_json();
        assert_eq!(charts["endings_by_end"]["client_close"], RING_CAPACITY as u64 + 20);
        let lifetimes: u64 = charts["lifetime"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
        assert_eq!(lifetimes, RING_CAPACITY as u64 + 20);
        // 0 s and 1 s land in the first bucket (le 1): ids 100 to 500 by 100, and 1 to 501 by 100.
        assert_eq!(charts["lifetime"][0]["count"], 11);
    }

    #[test]
    fn every_close_code_has_words() {
        assert!(close_meaning(1006).starts_with("no close frame; a hop dropped the TCP connection"));
        assert_eq!(close_meaning(4321), "an application's own code: its meaning is the application's");
        assert_eq!(close_meaning(999), "not a valid close code");
        assert_eq!(close_meanings_json().as_object().unwrap().len(), 18);
    }

    #[test]
    fn samples_keep_the_last_hour() {
        let endings = Endings::default();
        for n in 0..(SAMPLES + 5) {
            endings.sample(n);
        }
        let charts = endings.charts_json();
        let samples = charts["open_samples"].as_array().unwrap();
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!(samples[0][1], 5);
    }
}
