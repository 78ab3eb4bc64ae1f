//! Prometheus metrics, with the names, labels and buckets of DESIGN.md.
//!
//! Everything the relay touches per message is resolved once here (`[IntCounter; 2]` indexed by
//! side or direction), so counting a message is a relaxed atomic add: no label lookup, no lock,
//! no allocation. Label values are closed sets; never a per-connection, path or peer label.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::proxy_protocol::Failure as ProxyFailure;
use crate::vocab::{End, HttpVersion, ResumeFailure, Side, UpgradeFailure};

mod process;

/// The close code as a bounded label: 1000–1015 by number, else its class.
pub fn close_code_label(code: u16) -> &'static str {
    const NAMED: [&str; 16] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010", "1011", "1012", "1013",
        "1014", "1015",
    ];
    match code {
        1000..=1015 => NAMED[(code - 1000) as usize],
        3000..=3999 => "3xxx",
        4000..=4999 => "4xxx",
        _ => "other",
    }
}

pub const DURATION_BUCKETS: &[f64] =
    &[1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0];
pub const RTT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const CONNECT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How a configuration reload ended (`wskeep_config_reloads_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The file was valid; what can change without a restart is in service.
    Success,
    /// The file had problems; the running configuration was kept.
    Invalid,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Invalid => "invalid",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: IntGauge,
    /// Resumable sessions whose client leg is gone and that wait for it (also counted in
    /// `connections_active`: their upstream leg is open).
    pub resume_sessions_detached: IntGauge,
    pub resume_detached: IntCounter,
    pub resume_resumed: IntCounter,
    resume_failures: IntCounterVec,
    pub connections_total: IntCounter,
    /// Indexed by `HttpVersion`: the transport each completed WebSocket came over.
    pub websocket_upgrades: [IntCounter; 2],
    upgrade_failures: IntCounterVec,
    connection_duration: HistogramVec,
    close_codes: IntCounterVec,
    /// Indexed by the side the messages were read from.
    pub messages: [IntCounter; 2],
    pub message_bytes: [IntCounter; 2],
    /// Indexed by `Side`.
    pub pings_sent: [IntCounter; 2],
    pub pongs_received: [IntCounter; 2],
    pub pings_answered: [IntCounter; 2],
    pub ping_rtt: [Histogram; 2],
    pub json_pings_answered: IntCounter,
    pub compressed_connections: IntCounter,
    pub upstream_connect: Histogram,
    http_requests: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    pub tls_cert_reloads: IntCounter,
    pub tls_cert_not_after: IntGauge,
    config_reloads: IntCounterVec,
    proxy_protocol_failures: IntCounterVec,
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    // Names are fixed and distinct: registering each once cannot collide.
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric name"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name"))
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(r, HistogramVec::new(opts, labels).expect("valid metric name"))
}

fn per_side<T>(make: impl Fn(Side) -> T) -> [T; 2] {
    [make(Side::Client), make(Side::Upstream)]
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let messages = counter_vec(&r, "wskeep_messages_total", "WebSocket messages relayed", &["direction"]);
        let bytes = counter_vec(&r, "wskeep_message_bytes_total", "Payload bytes of relayed messages", &["direction"]);
        let pings = counter_vec(&r, "wskeep_pings_sent_total", "Protocol pings sent by wskeep", &["side"]);
        let pongs = counter_vec(&r, "wskeep_pongs_received_total", "Protocol pongs received", &["side"]);
        let answered =
            counter_vec(&r, "wskeep_pings_answered_total", "Pongs sent in answer to a peer's ping", &["side"]);
        let rtt =
            histogram_vec(&r, "wskeep_ping_rtt_seconds", "Round-trip time of wskeep's pings", &["side"], RTT_BUCKETS);
        let upgrades = counter_vec(
            &r,
            "wskeep_websocket_upgrades_total",
            "WebSocket upgrades completed on both legs, by the client's HTTP version (1.1, or 2: RFC 8441)",
            &["http_version"],
        );
        let build = register(
            &r,
            IntGaugeVec::new(Opts::new("wskeep_build_info", "Build information"), &["version", "commit"])
                .expect("valid"),
        );
        // The commit is empty when built outside a git checkout (build.rs).
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("WSKEEP_COMMIT")]).set(1);
        // The process collector has its own fixed names; it registers once per registry.
        r.register(Box::new(process::ProcessMetrics::for_self())).expect("process metrics register once");

        let m = Metrics {
            connections_active: register(
                &r,
                IntGauge::new("wskeep_connections_active", "Proxied WebSocket connections open now").expect("valid"),
            ),
            connections_total: counter(&r, "wskeep_connections_total", "WebSocket upgrades completed on both legs"),
            websocket_upgrades: HttpVersion::ALL.map(|v| upgrades.with_label_values(&[v.as_str()])),
            resume_sessions_detached: register(
                &r,
                IntGauge::new("wskeep_resume_sessions_detached", "Resumable sessions waiting for their client now")
                    .expect("valid"),
            ),
            resume_detached: counter(
                &r,
                "wskeep_resume_sessions_detached_total",
                "Resumable sessions whose client leg ended without a close frame (the upstream leg kept)",
            ),
            resume_resumed: counter(&r, "wskeep_resume_sessions_resumed_total", "Sessions a client resumed"),
            resume_failures: counter_vec(
                &r,
                "wskeep_resume_failures_total",
                "Resumable sessions lost (expired, overflow) and resumes refused with 4410, by reason",
                &["reason"],
            ),
            upgrade_failures: counter_vec(
                &r,
                "wskeep_upgrade_failures_total",
                "Upgrade requests that did not become a proxied connection",
                &["reason"],
            ),
            connection_duration: histogram_vec(
                &r,
                "wskeep_connection_duration_seconds",
                "Lifetime of proxied WebSocket connections, by how they ended",
                &["end"],
                DURATION_BUCKETS,
            ),
            close_codes: counter_vec(
                &r,
                "wskeep_close_codes_total",
                "Close codes received and sent per leg (1006: the leg ended without a close frame)",
                &["side", "direction", "code"],
            ),
            messages: per_side(|s| messages.with_label_values(&[s.direction_from()])),
            message_bytes: per_side(|s| bytes.with_label_values(&[s.direction_from()])),
            pings_sent: per_side(|s| pings.with_label_values(&[s.as_str()])),
            pongs_received: per_side(|s| pongs.with_label_values(&[s.as_str()])),
            pings_answered: per_side(|s| answered.with_label_values(&[s.as_str()])),
            ping_rtt: per_side(|s| rtt.with_label_values(&[s.as_str()])),
            json_pings_answered: counter(&r, "wskeep_json_pings_answered_total", "JSON pings answered by wskeep"),
            compressed_connections: counter(
                &r,
                "wskeep_compressed_connections_total",
                "Proxied WebSocket connections that negotiated permessage-deflate",
            ),
            upstream_connect: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("wskeep_upstream_connect_seconds", "Time to open the upstream WebSocket")
                        .buckets(CONNECT_BUCKETS.to_vec()),
                )
                .expect("valid"),
            ),
            http_requests: counter_vec(
                &r,
                "wskeep_http_requests_total",
                "Plain HTTP requests answered, wskeep's own errors included",
                &["code"],
            ),
            tls_handshake_failures: counter(
                &r,
                "wskeep_tls_handshake_failures_total",
                "Failed or timed-out TLS handshakes",
            ),
            tls_cert_reloads: counter(&r, "wskeep_tls_cert_reloads_total", "Certificate pairs reloaded from disk"),
            tls_cert_not_after: register(
                &r,
                IntGauge::new(
                    "wskeep_tls_cert_not_after_timestamp_seconds",
                    "Expiry of the certificate in service, seconds since the Unix epoch",
                )
                .expect("valid"),
            ),
            config_reloads: counter_vec(
                &r,
                "wskeep_config_reloads_total",
                "Configuration reloads (SIGHUP) by result: success, or invalid (the running configuration kept)",
                &["result"],
            ),
            proxy_protocol_failures: counter_vec(
                &r,
                "wskeep_proxy_protocol_failures_total",
                "Connections closed before TLS or HTTP for want of a good PROXY protocol header, by reason",
                &["reason"],
            ),
            registry: r,
        };
        // Every closed label set starts at zero, so rates and alerts see a series from the start.
        for reason in UpgradeFailure::ALL {
            m.upgrade_failures.with_label_values(&[reason.as_str()]);
        }
        for end in End::ALL {
            m.connection_duration.with_label_values(&[end.as_str()]);
        }
        for reason in ProxyFailure::ALL {
            m.proxy_protocol_failures.with_label_values(&[reason.as_str()]);
        }
        for reason in ResumeFailure::ALL {
            m.resume_failures.with_label_values(&[reason.as_str()]);
        }
        for result in [ReloadResult::Success, ReloadResult::Invalid] {
            m.config_reloads.with_label_values(&[result.as_str()]);
        }
        m
    }

    pub fn config_reloaded(&self, result: ReloadResult) {
        self.config_reloads.with_label_values(&[result.as_str()]).inc();
    }

    pub fn proxy_protocol_failed(&self, reason: ProxyFailure) {
        self.proxy_protocol_failures.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn upgrade_failed(&self, reason: UpgradeFailure) {
        self.upgrade_failures.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn resume_failed(&self, reason: ResumeFailure) {
        self.resume_failures.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn connection_ended(&self, end: End, seconds: f64) {
        self.connection_duration.with_label_values(&[end.as_str()]).observe(seconds);
    }

    /// `code` is the close code on the wire, 1005 for a close frame without one, 1006 for none.
    pub fn close_code(&self, side: Side, received: bool, code: u16) {
        let direction = if received { "received" } else { "sent" };
        self.close_codes.with_label_values(&[side.as_str(), direction, close_code_label(code)]).inc();
    }

    pub fn http_request(&self, status: http::StatusCode) {
        self.http_requests.with_label_values(&[status.as_str()]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on invalid metric families, which `new` cannot build.
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding into memory");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_labels_are_bounded() {
        assert_eq!(close_code_label(1000), "1000");
        assert_eq!(close_code_label(1015), "1015");
        assert_eq!(close_code_label(1016), "other");
        assert_eq!(close_code_label(3123), "3xxx");
        assert_eq!(close_code_label(4001), "4xxx");
        assert_eq!(close_code_label(999), "other");
    }

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::new();
        m.messages[Side::Client as usize].inc();
        m.close_code(Side::Upstream, true, 4001);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains("wskeep_messages_total{direction=\"client_to_upstream\"} 1"), "{text}");
        assert!(text.contains("wskeep_close_codes_total{code=\"4xxx\",direction=\"received\",side=\"upstream\"} 1"));
        assert!(text.contains("wskeep_upgrade_failures_total{reason=\"limit\"} 0"));
        assert!(text.contains("wskeep_build_info{commit="));
        assert!(text.contains("wskeep_config_reloads_total{result=\"invalid\"} 0"));
        assert!(text.contains("wskeep_proxy_protocol_failures_total{reason=\"untrusted\"} 0"));
        assert!(text.contains("process_resident_memory_bytes"));
        assert!(text.contains("wskeep_websocket_upgrades_total{http_version=\"2\"} 0"), "{text}");
    }
}
