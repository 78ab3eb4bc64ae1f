//! Logging: the subscriber (JSON or text, level from `[log]`), the one line every connection
//! ends with, and rate-limited upgrade-failure lines (an attack must not flood the log).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};
use crate::connections::ConnInfo;
use crate::relay::Outcome;
use crate::vocab::{Side, UpgradeFailure};

/// Installs the global subscriber; logs go to stderr. Safe to call more than once (tests).
pub fn init(log: &Log) {
    let filter = EnvFilter::builder().parse_lossy(&log.level);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

/// The closing line of a proxied connection (DESIGN.md: id, peer, path, duration, end, codes,
/// counts, pings and the last round-trip times).
pub fn connection_closed(conn: &ConnInfo, outcome: &Outcome, duration: Duration) {
    let c = conn.leg(Side::Client);
    let u = conn.leg(Side::Upstream);
    let [(c_rx, c_tx), (u_rx, u_tx)] = outcome.codes;
    tracing::info!(
        conn = conn.id,
        peer = %conn.peer,
        path = %conn.path,
        duration_s = (duration.as_secs_f64() * 1000.0).round() / 1000.0,
        end = outcome.end.as_str(),
        client_close_received = c_rx,
        client_close_sent = c_tx,
        upstream_close_received = u_rx,
        upstream_close_sent = u_tx,
        messages_client_to_upstream = c.messages.load(Relaxed),
        messages_upstream_to_client = u.messages.load(Relaxed),
        bytes_client_to_upstream = c.bytes.load(Relaxed),
        bytes_upstream_to_client = u.bytes.load(Relaxed),
        client_pings_sent = c.pings_sent.load(Relaxed),
        client_pongs_received = c.pongs_received.load(Relaxed),
        upstream_pings_sent = u.pings_sent.load(Relaxed),
        upstream_pongs_received = u.pongs_received.load(Relaxed),
        upstream_pings_answered = u.pings_answered.load(Relaxed),
        client_rtt_ms = ms(conn.last_rtt(Side::Client)),
        upstream_rtt_ms = ms(conn.last_rtt(Side::Upstream)),
        "connection closed"
    );
}

/// One line per reason per window; the lines in between are counted and reported with the next.
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);

/// One rate-limited kind of log line.
#[derive(Default)]
struct Window {
    /// Milliseconds since the epoch at which the last line was written (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Window {
    /// `Some(lines suppressed since the last one)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Relaxed);
        let window = FAILURE_LOG_WINDOW.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < window
            || self.last.compare_exchange(last, now, Relaxed, Relaxed).is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Logs why an upgrade failed, at most once per reason per window.
pub fn upgrade_failure(reason: UpgradeFailure, detail: &str) {
    static WINDOWS: OnceLock<[Window; UpgradeFailure::ALL.len()]> = OnceLock::new();
    let windows = WINDOWS.get_or_init(Default::default);
    let i = UpgradeFailure::ALL.iter().position(|r| *r == reason).unwrap_or(0);
    if let Some(suppressed) = windows[i].admit() {
        tracing::warn!(reason = reason.as_str(), detail, suppressed, "upgrade failed");
    }
}

/// Logs a failed `accept` (out of descriptors or memory), at most once per window: a flood of
/// refused clients must not flood the log as well.
pub fn accept_failure(error: &std::io::Error) {
    static WINDOW: OnceLock<Window> = OnceLock::new();
    if let Some(suppressed) = WINDOW.get_or_init(Default::default).admit() {
        tracing::error!(%error, suppressed, "accept failed: wskeep is out of local resources");
    }
}

/// Logs that `accept` works again after `failed` failures, at most once per window.
pub fn accept_recovered(failed: u64) {
    static WINDOW: OnceLock<Window> = OnceLock::new();
    if WINDOW.get_or_init(Default::default).admit().is_some() {
        tracing::warn!(failed_accepts = failed, "accepting again");
    }
}
