//! Logging: the subscriber (JSON or text, level from `[log]`), the one line every connection
//! ends with, and rate-limited failure lines (upgrades, TLS handshakes, plain-HTTP 502/504: an
//! attack or a dead upstream must not flood the log).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant, UNIX_EPOCH};

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
    let colour = use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour);
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

/// Colour codes only for a person at a terminal: files, journald and `kubectl logs` get plain
/// text, and a set `NO_COLOR` (<https://no-color.org>) turns colour off there too.
fn use_colour(terminal: bool, no_color: Option<OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A time as RFC 3339 in UTC (`2031-05-17T00:00:00Z`), for log fields that would otherwise be
/// epoch seconds.
pub fn rfc3339(unix_seconds: i64) -> String {
    let time = match u64::try_from(unix_seconds) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    };
    humantime::format_rfc3339_seconds(time).to_string()
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
        http_version = conn.http_version.as_str(),
        compressed = conn.deflate,
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

/// One line per kind per window; the lines in between are counted and reported with the next.
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Lets one line of a kind through per `FAILURE_LOG_WINDOW`, counting the ones it holds back.
struct Throttle {
    /// Milliseconds since `epoch()` at which the last line was written (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Throttle { last: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(lines held back since the last one)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
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

/// Logs why an upgrade failed, at most once per reason per window.
pub fn upgrade_failure(reason: UpgradeFailure, detail: &str) {
    static THROTTLES: [Throttle; UpgradeFailure::ALL.len()] = [const { Throttle::new() }; UpgradeFailure::ALL.len()];
    let i = UpgradeFailure::ALL.iter().position(|r| *r == reason).unwrap_or(0);
    if let Some(suppressed) = THROTTLES[i].admit() {
        tracing::warn!(reason = reason.as_str(), detail, suppressed, "upgrade failed");
    }
}

/// Logs a failed or timed-out TLS handshake with the peer and the reason, at most once per window.
pub fn tls_handshake_failure(peer: SocketAddr, reason: &str) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.admit() {
        tracing::warn!(%peer, reason, suppressed, "TLS handshake failed");
    }
}

/// Logs a connection closed for its PROXY protocol header, at most once per window.
pub fn proxy_protocol_failure(tcp_peer: SocketAddr, reason: crate::proxy_protocol::Failure) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.admit() {
        tracing::warn!(%tcp_peer, reason = reason.as_str(), suppressed, "PROXY protocol header refused; connection closed");
    }
}

/// Logs a plain-HTTP request answered 502 or 504 because of the upstream, at most once per
/// status per window (`reason` as in `upgrade_failures_total`, the path without its query).
pub fn http_failure(status: u16, reason: UpgradeFailure, peer: SocketAddr, path: &str, detail: &str) {
    static THROTTLES: [Throttle; 2] = [const { Throttle::new() }; 2];
    if let Some(suppressed) = THROTTLES[usize::from(status == 504)].admit() {
        tracing::warn!(status, reason = reason.as_str(), %peer, path, detail, suppressed, "upstream HTTP request failed");
    }
}

/// Logs a failed `accept` (out of descriptors or memory), at most once per window: a flood of
/// refused clients must not flood the log as well.
pub fn accept_failure(error: &std::io::Error) {
    static THROTTLE: Throttle = Throttle::new();
    if let Some(suppressed) = THROTTLE.admit() {
        tracing::error!(%error, suppressed, "accept failed: wskeep is out of local resources");
    }
}

/// Logs that `accept` works again after `failed` failures, at most once per window.
pub fn accept_recovered(failed: u64) {
    static THROTTLE: Throttle = Throttle::new();
    if THROTTLE.admit().is_some() {
        tracing::warn!(failed_accepts = failed, "accepting again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None));
        assert!(!use_colour(true, Some("1".into())));
        // NO_COLOR="" counts as unset (no-color.org).
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(false, Some("".into())));
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_952_035_200), "2031-11-10T00:00:00Z");
    }

    #[test]
    fn a_throttle_lets_one_line_through_per_window_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        assert_eq!(t.suppressed.load(Relaxed), 2);
    }
}
