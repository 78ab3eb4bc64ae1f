//! The live proxied connections, for `/connections` and the closing log line.
//!
//! The map is touched only when a connection opens or closes; everything that changes per frame
//! is a relaxed atomic in `LegStats`, written by the connection's own task, so listing costs the
//! relay nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::vocab::Side;

/// Per-leg counters of one connection. Messages and bytes count what was read from this leg.
#[derive(Debug, Default)]
pub struct LegStats {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// Microseconds after the connection opened at which the last frame arrived.
    pub last_frame_us: AtomicU64,
    /// The last ping round-trip time in microseconds; 0 until a pong came back.
    pub last_rtt_us: AtomicU64,
    pub pings_sent: AtomicU64,
    pub pongs_received: AtomicU64,
    pub pings_answered: AtomicU64,
}

#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    /// The request path without its query string (tokens travel there).
    pub path: String,
    pub started: Instant,
    pub legs: [LegStats; 2],
}

impl ConnInfo {
    pub fn leg(&self, side: Side) -> &LegStats {
        &self.legs[side as usize]
    }

    /// Records a frame from `side` seen at `now`.
    pub fn saw_frame(&self, side: Side, now: Instant) {
        let us = now.saturating_duration_since(self.started).as_micros() as u64;
        self.leg(side).last_frame_us.store(us, Relaxed);
    }

    pub fn last_rtt(&self, side: Side) -> Option<Duration> {
        match self.leg(side).last_rtt_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn to_json(&self, now: Instant) -> Value {
        let age = now.saturating_duration_since(self.started);
        let leg = |side: Side| {
            let l = self.leg(side);
            let last = Duration::from_micros(l.last_frame_us.load(Relaxed));
            json!({
                "since_last_frame_seconds": age.saturating_sub(last).as_secs_f64(),
                "last_rtt_seconds": self.last_rtt(side).map(|d| d.as_secs_f64()),
                "messages": l.messages.load(Relaxed),
                "bytes": l.bytes.load(Relaxed),
                "pings_sent": l.pings_sent.load(Relaxed),
                "pongs_received": l.pongs_received.load(Relaxed),
            })
        };
        json!({
            "id": self.id,
            "peer": self.peer.to_string(),
            "path": self.path,
            "age_seconds": age.as_secs_f64(),
            "client": leg(Side::Client),
            "upstream": leg(Side::Upstream),
        })
    }
}

#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<ConnInfo>>>,
}

impl Connections {
    /// Registers a connection; it leaves the list when the returned guard drops.
    pub fn open(self: &Arc<Self>, peer: SocketAddr, path: String) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let info = Arc::new(ConnInfo { id, peer, path, started: Instant::now(), legs: Default::default() });
        self.lock().insert(id, info.clone());
        ConnGuard { info, list: self.clone() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnInfo>>> {
        // The map holds plain data: a panic while holding the lock cannot leave it inconsistent.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live connections as a JSON array, oldest first.
    pub fn to_json(&self) -> Value {
        let now = Instant::now();
        let mut list: Vec<Arc<ConnInfo>> = self.lock().values().cloned().collect();
        list.sort_by_key(|c| c.id);
        Value::Array(list.iter().map(|c| c.to_json(now)).collect())
    }
}

/// Keeps a connection listed while it lives.
pub struct ConnGuard {
    pub info: Arc<ConnInfo>,
    list: Arc<Connections>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.list.lock().remove(&self.info.id);
    }
}
