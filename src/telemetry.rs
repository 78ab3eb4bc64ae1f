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

/// Swaps the level filter of the installed subscriber (its type depends on the log format).
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), tracing_subscriber::reload::Error> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Installs the global subscriber; logs go to stderr. Safe to call more than once (tests).
pub fn init(log: &Log) {
    let filter = EnvFilter::builder().parse_lossy(&log.level);
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_current_span(false);
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| SET_FILTER.set(Box::new(move |f| handle.reload(f))))
        }
        LogFormat::Text => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map(|()| SET_FILTER.set(Box::new(move |f| handle.reload(f))))
        }
    };
}

/// Applies a new `log.level` (already validated) to the running subscriber.
pub fn set_level(level: &str) {
    if let Some(set) = SET_FILTER.get() {
        if let Err(e) = set(EnvFilter::builder().parse_lossy(level)) {
            tracing::warn!(error = %e, "cannot apply the new log.level");
        }
    }
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

struct Limiter {
    /// Milliseconds since `epoch` at which the last line for each reason was written (0: never).
    last: [AtomicU64; 5],
    suppressed: [AtomicU64; 5],
    epoch: Instant,
}

fn limiter() -> &'static Limiter {
    static LIMITER: OnceLock<Limiter> = OnceLock::new();
    LIMITER.get_or_init(|| Limiter { last: Default::default(), suppressed: Default::default(), epoch: Instant::now() })
}

/// Logs why an upgrade failed, at most once per reason per window.
pub fn upgrade_failure(reason: UpgradeFailure, detail: &str) {
    let l = limiter();
    let i = UpgradeFailure::ALL.iter().position(|r| *r == reason).unwrap_or(0);
    let now = l.epoch.elapsed().as_millis() as u64 + 1;
    let last = l.last[i].load(Relaxed);
    let window = FAILURE_LOG_WINDOW.as_millis() as u64;
    if last != 0 && now.saturating_sub(last) < window
        || l.last[i].compare_exchange(last, now, Relaxed, Relaxed).is_err()
    {
        l.suppressed[i].fetch_add(1, Relaxed);
        return;
    }
    let suppressed = l.suppressed[i].swap(0, Relaxed);
    tracing::warn!(reason = reason.as_str(), detail, suppressed, "upgrade failed");
}
