//! The shared vocabulary of a proxied connection: its two legs (`Side`), how it ended (`End`)
//! why an upgrade failed (`UpgradeFailure`) and why a session did not resume (`ResumeFailure`). A leaf: relay, keepalive, telemetry and metrics
//! all use it, and it uses none of them.

/// Which leg of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Client, Side::Upstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// The relay direction of messages read from this side.
    pub fn direction_from(self) -> &'static str {
        match self {
            Side::Client => "client_to_upstream",
            Side::Upstream => "upstream_to_client",
        }
    }
}

/// The HTTP version a WebSocket came over: 1.1 (an upgraded TCP connection) or 2 (a stream of an
/// HTTP/2 connection, RFC 8441). The `http_version` label and log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1 = 0,
    Http2 = 1,
}

impl HttpVersion {
    pub const ALL: [HttpVersion; 2] = [HttpVersion::Http1, HttpVersion::Http2];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

/// How a proxied connection ended: the `end` label (DESIGN.md, Endings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    ClientClose,
    UpstreamClose,
    ClientTimeout,
    ClientError,
    UpstreamTimeout,
    UpstreamError,
    Shutdown,
}

impl End {
    pub const ALL: [End; 7] = [
        End::ClientClose,
        End::UpstreamClose,
        End::ClientTimeout,
        End::ClientError,
        End::UpstreamTimeout,
        End::UpstreamError,
        End::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClose => "client_close",
            End::UpstreamClose => "upstream_close",
            End::ClientTimeout => "client_timeout",
            End::ClientError => "client_error",
            End::UpstreamTimeout => "upstream_timeout",
            End::UpstreamError => "upstream_error",
            End::Shutdown => "shutdown",
        }
    }
}

/// Why an upgrade did not become a proxied connection (the `reason` label). The upstream's
/// failures, the client's, and wskeep's own limits are kept apart, so that each alert points at
/// the hop that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeFailure {
    /// The upstream answered with something other than 101: passed to the client.
    UpstreamRefused,
    /// The upstream could not be reached (502).
    UpstreamUnreachable,
    /// The upstream did not connect or answer in time (504).
    UpstreamTimeout,
    /// The upstream's 101 broke RFC 6455 §4.1 (502).
    UpstreamBadHandshake,
    /// The TLS handshake with a `wss://` upstream failed: its certificate did not verify (502).
    UpstreamTls,
    /// The client's request was malformed (400, 426, 431).
    BadRequest,
    /// `listen.max_connections` was reached (503).
    Limit,
    /// `listen.max_handshakes` connections were in their handshake: the oldest was dropped.
    HandshakeLimit,
    /// wskeep ran out of descriptors or memory (503): its own limit, not the upstream's fault.
    LocalLimit,
    /// wskeep is draining for a shutdown (503).
    Draining,
}

impl UpgradeFailure {
    pub const ALL: [UpgradeFailure; 10] = [
        UpgradeFailure::UpstreamRefused,
        UpgradeFailure::UpstreamUnreachable,
        UpgradeFailure::UpstreamTimeout,
        UpgradeFailure::UpstreamBadHandshake,
        UpgradeFailure::UpstreamTls,
        UpgradeFailure::BadRequest,
        UpgradeFailure::Limit,
        UpgradeFailure::HandshakeLimit,
        UpgradeFailure::LocalLimit,
        UpgradeFailure::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeFailure::UpstreamRefused => "upstream_refused",
            UpgradeFailure::UpstreamUnreachable => "upstream_unreachable",
            UpgradeFailure::UpstreamTimeout => "upstream_timeout",
            UpgradeFailure::UpstreamBadHandshake => "upstream_bad_handshake",
            UpgradeFailure::UpstreamTls => "upstream_tls",
            UpgradeFailure::BadRequest => "bad_request",
            UpgradeFailure::Limit => "limit",
            UpgradeFailure::HandshakeLimit => "handshake_limit",
            UpgradeFailure::LocalLimit => "local_limit",
            UpgradeFailure::Draining => "draining",
        }
    }
}

/// Why a resumable session could not be resumed (`wskeep_resume_failures_total{reason}`,
/// docs/resume.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFailure {
    /// The client did not come back within `resume.grace`.
    Expired,
    /// What the client had not acknowledged outgrew `resume.buffer` while it was away.
    Overflow,
    /// No live session has this token (unknown, spent, or a wrong secret).
    BadToken,
    /// The resuming handshake's `resume.bind` credentials, Origin or subprotocol offer differ.
    CredentialMismatch,
    /// The session's upstream leg ended.
    UpstreamGone,
    /// The client's count of received messages is outside what wskeep kept.
    BadCount,
}

impl ResumeFailure {
    pub const ALL: [ResumeFailure; 6] = [
        ResumeFailure::Expired,
        ResumeFailure::Overflow,
        ResumeFailure::BadToken,
        ResumeFailure::CredentialMismatch,
        ResumeFailure::UpstreamGone,
        ResumeFailure::BadCount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResumeFailure::Expired => "expired",
            ResumeFailure::Overflow => "overflow",
            ResumeFailure::BadToken => "bad_token",
            ResumeFailure::CredentialMismatch => "credential_mismatch",
            ResumeFailure::UpstreamGone => "upstream_gone",
            ResumeFailure::BadCount => "bad_count",
        }
    }
}
