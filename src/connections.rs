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

use crate::metrics::RTT_BUCKETS;
use crate::vocab::{HttpVersion, Side};

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
    /// The client's HTTP version: a WebSocket of its own TCP connection, or an HTTP/2 stream.
    pub http_version: HttpVersion,
    pub started: Instant,
    /// permessage-deflate was negotiated: messages may cross compressed.
    pub deflate: bool,
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

    /// `session`: the state of a resumable session; an ordinary connection's is `open`.
    fn to_json(&self, now: Instant, session: Option<&'static str>) -> Value {
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
                "pings_answered": l.pings_answered.load(Relaxed),
            })
        };
        json!({
            "id": self.id,
            "peer": self.peer.to_string(),
            "path": self.path,
            "http_version": self.http_version.as_str(),
            "age_seconds": age.as_secs_f64(),
            "compression": self.deflate.then_some(crate::proxy::deflate::NAME),
            "state": session.unwrap_or("open"),
            "client": leg(Side::Client),
            "upstream": leg(Side::Upstream),
        })
    }
}

#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<ConnInfo>>>,
    /// The state of resumable sessions (`attached`, `detached`), by id: kept apart so that an
    /// ordinary connection's entry stays as it was; touched on attach and detach only.
    sessions: Mutex<HashMap<u64, &'static str>>,
}

impl Connections {
    /// Registers a connection; it leaves the list when the returned guard drops.
    pub fn open(self: &Arc<Self>, peer: SocketAddr, path: String) -> ConnGuard {
        self.open_over(peer, path, HttpVersion::Http1, false)
    }

    /// Registers a connection that came over `http_version`, with permessage-deflate agreed or not.
    pub fn open_over(
        self: &Arc<Self>,
        peer: SocketAddr,
        path: String,
        http_version: HttpVersion,
        deflate: bool,
    ) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let started = Instant::now();
        let info = Arc::new(ConnInfo { id, peer, path, http_version, started, deflate, legs: Default::default() });
        self.lock().insert(id, info.clone());
        ConnGuard { info, list: self.clone() }
    }

    /// A resumable session's state, shown in its row; `None` when the session ends.
    pub fn set_session_state(&self, id: u64, state: Option<&'static str>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match state {
            Some(state) => sessions.insert(id, state),
            None => sessions.remove(&id),
        };
    }

    fn session_states(&self) -> HashMap<u64, &'static str> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
        let states = self.session_states();
        Value::Array(list.iter().map(|c| c.to_json(now, states.get(&c.id).copied())).collect())
    }

    /// The status page's view: at most `query.limit` connections whose path contains
    /// `query.path`, in `query.sort` order, plus how many matched and the RTT distribution of
    /// every live connection per leg. The map is locked only to clone its `Arc`s; sorting and
    /// JSON happen after, and only the shown rows are turned into JSON.
    pub fn query(&self, query: &Query) -> Value {
        let now = Instant::now();
        let all: Vec<Arc<ConnInfo>> = self.lock().values().cloned().collect();
        let mut rtt = [[0u64; RTT_BUCKETS.len() + 1]; 2];
        for conn in &all {
            for side in Side::BOTH {
                if let Some(d) = conn.last_rtt(side) {
                    let bucket = RTT_BUCKETS.iter().position(|&b| d.as_secs_f64() <= b).unwrap_or(RTT_BUCKETS.len());
                    rtt[side as usize][bucket] += 1;
                }
            }
        }
        let mut rows: Vec<(u64, &ConnInfo)> = all
            .iter()
            .filter(|c| query.path.as_deref().is_none_or(|p| c.path.contains(p)))
            .map(|c| (query.sort.key(c, now), &**c))
            .collect();
        let matched = rows.len();
        let states = self.session_states();
        let order = |a: &(u64, &ConnInfo), b: &(u64, &ConnInfo)| {
            let by_key = if query.descending { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) };
            by_key.then(a.1.id.cmp(&b.1.id))
        };
        let limit = query.limit.min(rows.len());
        if limit < rows.len() && limit > 0 {
            rows.select_nth_unstable_by(limit - 1, order);
        }
        rows.truncate(limit);
        rows.sort_unstable_by(order);
        let histogram = |side: Side| {
            let counts = &rtt[side as usize];
            let buckets: Vec<Value> = counts
                .iter()
                .enumerate()
                .map(|(i, n)| json!({ "le": RTT_BUCKETS.get(i).copied(), "count": n }))
                .collect();
            Value::Array(buckets)
        };
        json!({
            "open": all.len(),
            "matched": matched,
            "connections": rows.iter().map(|(_, c)| c.to_json(now, states.get(&c.id).copied())).collect::<Vec<_>>(),
            "rtt": { "client": histogram(Side::Client), "upstream": histogram(Side::Upstream) },
        })
    }
}

/// What the status page asks for: `?sort=KEY&order=asc|desc&path=TEXT&limit=N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub sort: SortKey,
    pub descending: bool,
    pub path: Option<String>,
    pub limit: usize,
}

/// Rows the status page shows at most, whatever it asks for.
pub const MAX_ROWS: usize = 500;

impl Default for Query {
    fn default() -> Self {
        Query { sort: SortKey::Age, descending: true, path: None, limit: 100 }
    }
}

impl Query {
    /// Parses the page's query string; unknown keys and bad values are ignored (a read-only
    /// view has nothing to refuse), the limit is capped at `MAX_ROWS`.
    pub fn parse(query: &str) -> Query {
        let mut q = Query::default();
        for (key, value) in query.split('&').map(|kv| kv.split_once('=').unwrap_or((kv, ""))) {
            match key {
                "sort" => q.sort = SortKey::parse(value).unwrap_or(q.sort),
                "order" => q.descending = value != "asc",
                "path" if !value.is_empty() => q.path = Some(percent_decode(value)),
                "limit" => q.limit = value.parse::<usize>().map_or(q.limit, |n| n.min(MAX_ROWS)),
                _ => {}
            }
        }
        q
    }
}

/// `%XX` and `+` decoding of a query value; bad escapes stay as they are.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The column the status page sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Id,
    Age,
    ClientIdle,
    UpstreamIdle,
    ClientRtt,
    UpstreamRtt,
    Messages,
}

impl SortKey {
    fn parse(name: &str) -> Option<SortKey> {
        Some(match name {
            "id" => SortKey::Id,
            "age" => SortKey::Age,
            "client_idle" => SortKey::ClientIdle,
            "upstream_idle" => SortKey::UpstreamIdle,
            "client_rtt" => SortKey::ClientRtt,
            "upstream_rtt" => SortKey::UpstreamRtt,
            "messages" => SortKey::Messages,
            _ => return None,
        })
    }

    fn key(self, c: &ConnInfo, now: Instant) -> u64 {
        let age_us = now.saturating_duration_since(c.started).as_micros() as u64;
        let idle = |side: Side| age_us.saturating_sub(c.leg(side).last_frame_us.load(Relaxed));
        match self {
            SortKey::Id => c.id,
            SortKey::Age => age_us,
            SortKey::ClientIdle => idle(Side::Client),
            SortKey::UpstreamIdle => idle(Side::Upstream),
            SortKey::ClientRtt => c.leg(Side::Client).last_rtt_us.load(Relaxed),
            SortKey::UpstreamRtt => c.leg(Side::Upstream).last_rtt_us.load(Relaxed),
            SortKey::Messages => Side::BOTH.iter().map(|s| c.leg(*s).messages.load(Relaxed)).sum(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_query_is_parsed_and_bounded() {
        let q = Query::parse("sort=client_rtt&order=asc&path=%2Fvoice+x&limit=100000&token=secret");
        assert_eq!(
            q,
            Query { sort: SortKey::ClientRtt, descending: false, path: Some("/voice x".into()), limit: MAX_ROWS }
        );
        assert_eq!(
            Query::parse("sort=nope&limit=x&path=%zz%"),
            Query { path: Some("%zz%".into()), ..Query::default() }
        );
    }

    #[test]
    fn a_query_shows_the_top_rows_of_the_matching_connections() {
        let list = Arc::new(Connections::default());
        let guards: Vec<ConnGuard> = (0..50)
            .map(|i| {
                let path = format!("/{}", if i % 2 == 0 { "even" } else { "odd" });
                list.open_over(([127, 0, 0, 1], 1).into(), path, HttpVersion::Http2, false)
            })
            .collect();
        for g in &guards {
            g.info.leg(Side::Client).messages.store(g.info.id * 7 % 50, Relaxed);
        }
        let q = Query { sort: SortKey::Messages, descending: true, path: Some("even".into()), limit: 5 };
        let view = list.query(&q);
        assert_eq!(view["open"], 50);
        assert_eq!(view["matched"], 25);
        assert_eq!(view["connections"][0]["http_version"], "2");
        let shown: Vec<u64> =
            view["connections"].as_array().unwrap().iter().map(|c| c["client"]["messages"].as_u64().unwrap()).collect();
        let mut expected: Vec<u64> =
            guards.iter().filter(|g| g.info.path == "/even").map(|g| g.info.id * 7 % 50).collect();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(shown, expected[..5]);
    }
}
