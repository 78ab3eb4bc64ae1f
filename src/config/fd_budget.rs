//! The listener's limits against the file-descriptor limit (DESIGN.md, "File descriptors").
//!
//! A proxied connection holds two descriptors (client and upstream), a connection still in its
//! handshake one, and the process needs some for itself: so `listen.max_connections` and
//! `listen.max_handshakes` fit when `2 × max_connections + max_handshakes + FD_HEADROOM` is
//! within the hard limit, which `run` raises the soft limit to. What the configuration does not
//! set is derived so that it fits; what it sets is kept, with a warning when it does not fit.

use super::{Problem, FD_HEADROOM};

/// `max_connections` when the descriptor limit allows it (and when it is unlimited).
pub const MAX_CONNECTIONS_CAP: u64 = 10_000;
/// `max_handshakes` when the descriptor limit allows it.
pub const MAX_HANDSHAKES_CAP: u64 = 1024;

/// The limits in force, and how the ones not set were chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sized {
    pub max_connections: u64,
    pub max_handshakes: u64,
    /// One line per derived limit, saying how it was derived (`check` prints them).
    pub derived: Vec<String>,
    pub problems: Vec<Problem>,
}

/// Fills in the limits the configuration left unset from `hard` (the hard `RLIMIT_NOFILE`,
/// `None` when unlimited): a handshake place per 8 descriptors, up to `MAX_HANDSHAKES_CAP`, and
/// half of the rest for proxied connections, up to `MAX_CONNECTIONS_CAP`.
pub fn size(max_connections: Option<u64>, max_handshakes: Option<u64>, hard: Option<u64>) -> Sized {
    let budget = hard.map(|h| h.saturating_sub(FD_HEADROOM));
    let mut derived = Vec::new();
    let max_handshakes = max_handshakes.unwrap_or_else(|| {
        let (value, how) = match (hard, budget) {
            (Some(h), Some(b)) => (
                (b / 8).clamp(1, MAX_HANDSHAKES_CAP),
                format!("min({MAX_HANDSHAKES_CAP}, (file-descriptor hard limit {h} - headroom {FD_HEADROOM}) / 8)"),
            ),
            _ => (MAX_HANDSHAKES_CAP, "the descriptor limit is unlimited".to_string()),
        };
        derived.push(format!("listen.max_handshakes = {value}: not set, so {how}"));
        value
    });
    let max_connections = max_connections.unwrap_or_else(|| {
        let (value, how) = match (hard, budget) {
            (Some(h), Some(b)) => (
                (b.saturating_sub(max_handshakes) / 2).clamp(1, MAX_CONNECTIONS_CAP),
                format!(
                    "min({MAX_CONNECTIONS_CAP}, (file-descriptor hard limit {h} - headroom {FD_HEADROOM} \
                     - max_handshakes {max_handshakes}) / 2), two descriptors per proxied connection"
                ),
            ),
            _ => (MAX_CONNECTIONS_CAP, "the descriptor limit is unlimited".to_string()),
        };
        derived.push(format!("listen.max_connections = {value}: not set, so {how}"));
        value
    });

    let mut problems = Vec::new();
    for (key, value) in [("listen.max_connections", max_connections), ("listen.max_handshakes", max_handshakes)] {
        if value == 0 {
            problems.push(Problem { key: key.into(), message: "must be at least 1".into() });
        }
    }
    // The client sockets alone must fit; the upstream legs are a warning (`warning`).
    if let Some(limit) = hard.filter(|&limit| max_connections > 0 && max_connections + FD_HEADROOM > limit) {
        problems.push(Problem {
            key: "listen.max_connections".into(),
            message: format!(
                "{max_connections} connections cannot be held: the file-descriptor hard limit is {limit} \
                 (raise `ulimit -Hn` or lower max_connections to at most {}, or leave it unset to derive it)",
                limit.saturating_sub(FD_HEADROOM)
            ),
        });
    }
    Sized { max_connections, max_handshakes, derived, problems }
}

/// A warning when the limits in force cannot all be served within `hard` descriptors.
pub fn warning(max_connections: u64, max_handshakes: u64, hard: Option<u64>) -> Option<String> {
    let limit = hard?;
    let need = 2 * max_connections + max_handshakes + FD_HEADROOM;
    (need > limit).then(|| {
        format!(
            "listen.max_connections = {max_connections} and listen.max_handshakes = {max_handshakes} need about \
             {need} file descriptors (two per proxied WebSocket, one per connection in its handshake, \
             {FD_HEADROOM} for wskeep), but the hard limit is {limit}: at most about {} WebSocket \
             connections can be proxied, and clients past that get 503 (reason local_limit); \
             leave max_connections unset to derive it from the limit",
            limit.saturating_sub(FD_HEADROOM + max_handshakes) / 2
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_limits_fit_the_descriptor_limit() {
        let s = size(None, None, Some(20_000));
        assert_eq!((s.max_connections, s.max_handshakes), (9456, 1024));
        assert_eq!(s.derived.len(), 2);
        assert!(s.derived[0].contains("hard limit 20000"), "{:?}", s.derived);
        assert!(warning(s.max_connections, s.max_handshakes, Some(20_000)).is_none());
        // A large limit: the caps.
        let s = size(None, None, Some(1 << 20));
        assert_eq!((s.max_connections, s.max_handshakes), (MAX_CONNECTIONS_CAP, MAX_HANDSHAKES_CAP));
        // Unlimited: the caps too.
        let s = size(None, None, None);
        assert_eq!((s.max_connections, s.max_handshakes), (MAX_CONNECTIONS_CAP, MAX_HANDSHAKES_CAP));
        assert!(s.problems.is_empty());
        // A small one: everything still fits.
        for hard in [160, 256, 1024, 4096] {
            let s = size(None, None, Some(hard));
            assert!(s.problems.is_empty(), "{hard}: {:?}", s.problems);
            assert!(2 * s.max_connections + s.max_handshakes + FD_HEADROOM <= hard, "{hard}: {s:?}");
            assert!(warning(s.max_connections, s.max_handshakes, Some(hard)).is_none());
        }
        assert_eq!(size(None, None, Some(256)).max_connections, 84);
    }

    #[test]
    fn set_limits_are_kept_and_warned_about_when_they_do_not_fit() {
        let s = size(Some(96), None, Some(160));
        assert_eq!((s.max_connections, s.max_handshakes), (96, 12));
        assert_eq!(s.derived.len(), 1, "only max_handshakes was derived");
        assert!(s.problems.is_empty());
        assert!(warning(96, 12, Some(160)).unwrap().contains("at most about 42"));
        let s = size(Some(50), Some(8), Some(256));
        assert!(s.derived.is_empty());
        assert!(warning(50, 8, Some(256)).is_none());
        // Past the limit even without the upstream legs: an error, as before.
        let s = size(Some(5000), None, Some(4096));
        assert_eq!(s.problems.len(), 1);
        assert_eq!(s.problems[0].key, "listen.max_connections");
        assert_eq!(size(Some(0), Some(0), None).problems.len(), 2);
    }
}
