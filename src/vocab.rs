//! The shared vocabulary of a proxied connection: its two legs (`Side`), how it ended (`End`)
//! and why an upgrade failed (`UpgradeFailure`). A leaf: relay, keepalive, telemetry and metrics
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

/// Why an upgrade did not become a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeFailure {
    UpstreamRefused,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// The TLS handshake with a `wss://` upstream failed: its certificate did not verify (502).
    UpstreamTls,
    BadRequest,
    Limit,
}

impl UpgradeFailure {
    pub const ALL: [UpgradeFailure; 6] = [
        UpgradeFailure::UpstreamRefused,
        UpgradeFailure::UpstreamUnreachable,
        UpgradeFailure::UpstreamTimeout,
        UpgradeFailure::UpstreamTls,
        UpgradeFailure::BadRequest,
        UpgradeFailure::Limit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeFailure::UpstreamRefused => "upstream_refused",
            UpgradeFailure::UpstreamUnreachable => "upstream_unreachable",
            UpgradeFailure::UpstreamTimeout => "upstream_timeout",
            UpgradeFailure::UpstreamTls => "upstream_tls",
            UpgradeFailure::BadRequest => "bad_request",
            UpgradeFailure::Limit => "limit",
        }
    }
}
