//! Configuration: defaults in code, then the TOML file, then `WSKEEP_<SECTION>__<KEY>` variables.
//!
//! Each key is declared once, in `settings!` below: its section, name, type and default (the
//! macro lives in `keys`). Loading never stops at the first mistake: every key is read on its
//! own, so a bad file yields the full list of problems, each with its key path (like `nginx -t`)
//! and, for a value from the environment, the variable that set it. Unknown sections and keys are
//! errors (`unknown`). Cross-field rules (`validate`) run on the typed result.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::Dict;
use figment::Figment;
use serde_json::{Map, Value as Json};

use crate::cidr::Cidr;
pub use crate::proxy_protocol::Mode as ProxyProtocol;
use crate::size::ByteSize;

#[macro_use]
mod keys;
mod env;
mod fd_budget;
mod unknown;
pub use fd_budget::{MAX_CONNECTIONS_CAP, MAX_HANDSHAKES_CAP};

/// The environment variable that names the configuration file when `--config` is absent.
pub const CONFIG_ENV: &str = "WSKEEP_CONFIG";
/// The most streams an HTTP/2 connection may have open at once (`listen.http2_max_streams`).
pub const MAX_HTTP2_STREAMS: u64 = 1000;
/// Descriptors kept free for the listeners, the admin server, the upstream pool and logging.
pub const FD_HEADROOM: u64 = 64;

settings! {
    [listen] Listen {
        addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8443)),
        tls_cert: Option<PathBuf> = None,
        tls_key: Option<PathBuf> = None,
        handshake_timeout: Duration = Duration::from_secs(10),
        /// A connection must send its first byte within this (or `handshake_timeout`, if shorter).
        first_byte_timeout: Duration = Duration::from_secs(3),
        idle_timeout: Duration = Duration::from_secs(60),
        /// Unset, derived from the descriptor limit (`fd_budget`).
        max_connections: u64 = MAX_CONNECTIONS_CAP,
        /// Connections still in their handshake (first byte, TLS, first request head); unset,
        /// derived like `max_connections`.
        max_handshakes: u64 = MAX_HANDSHAKES_CAP,
        /// PROXY protocol header expected before TLS or HTTP: "off", "v1", "v2" or "any".
        proxy_protocol: ProxyProtocol = ProxyProtocol::Off,
        /// Peers whose PROXY header, X-Forwarded-For and Forwarded are believed.
        trusted_proxies: Vec<Cidr> = Vec::new(),
        /// Serves the stability test page on this port at this path ("/wskeep/probe"); "": off.
        probe_path: String = String::new(),
        /// Offers HTTP/2 (ALPN `h2`) on a TLS listener, WebSockets over it by RFC 8441.
        http2: bool = true,
        /// Concurrent streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
        http2_max_streams: u64 = 100,
    }
    derived {
        /// How the limits the configuration left unset were derived (`check` prints it).
        derived: Vec<String> = Vec::new(),
    }

    [upstream] Upstream {
        /// Kept as written for display; `authority` is what connections use.
        url: String = "ws://127.0.0.1:8080".into(),
        connect_timeout: Duration = Duration::from_secs(5),
        response_timeout: Duration = Duration::from_secs(30),
        /// The `Host` sent upstream; empty: the URL's `host:port` (`localhost` for a Unix socket).
        host_header: String = String::new(),
        /// PEM CA certificates a `wss://` upstream is verified against; unset: the system's.
        ca_file: Option<PathBuf> = None,
        /// The name verified in (and sent as SNI to) a `wss://` upstream; empty: the URL's host.
        server_name: String = String::new(),
        /// A client certificate (PEM chain) and key for a `wss://` upstream that asks for one.
        client_cert: Option<PathBuf> = None,
        client_key: Option<PathBuf> = None,
    }
    derived {
        /// `host:port` of `url`, filled by `validate`.
        authority: String = "127.0.0.1:8080".into(),
        /// The socket of a `unix:` URL, filled by `validate`.
        unix_path: Option<PathBuf> = None,
        /// The `Host` header for the upstream, filled by `validate`.
        host: String = "127.0.0.1:8080".into(),
        /// For a `wss://` upstream: the shared client configuration and the name to verify.
        tls: Option<std::sync::Arc<crate::proxy::upstream_tls::UpstreamTls>> = None,
    }

    [client_keepalive] ClientKeepalive {
        ping_interval: Duration = Duration::from_secs(20),
        timeout: Duration = Duration::from_secs(60),
    }

    [upstream_keepalive] UpstreamKeepalive {
        ping_interval: Duration = Duration::ZERO,
        pong_interval: Duration = Duration::ZERO,
        timeout: Duration = Duration::ZERO,
    }

    [json_ping] JsonPing {
        enabled: bool = true,
        match_fields("match"): Map<String, Json> = json_object(&[("type", "ping")]),
        reply: Map<String, Json> = json_object(&[("type", "pong")]),
        echo_fields: Vec<String> = vec!["id".into(), "ts".into()],
        forward: bool = false,
    }

    [limits] Limits {
        max_message_size: ByteSize = ByteSize(1 << 20),
    }

    /// permessage-deflate (RFC 7692) passed through end to end, compressed frames unchanged;
    /// off: stripped from the client's offer.
    [compression] Compression {
        enabled: bool = true,
    }

    /// Lossless reconnect (docs/resume.md): sessions a client may resume after its connection dies.
    [resume] Resume {
        enabled: bool = false,
        /// How long a detached session waits for its client.
        grace: Duration = Duration::from_secs(30),
        /// The bytes of messages to the client kept per session until the client acknowledges them.
        buffer: ByteSize = ByteSize(1 << 20),
        /// What a resuming handshake must carry as the first one did: `authorization`, `origin`,
        /// `cookie:NAME`, `query:NAME`, `header:NAME`.
        bind: Vec<String> = vec!["authorization".into(), "origin".into()],
    }

    [admin] Admin {
        addr: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 9090)),
        /// A file holding the secret `/drain` requires (`Authorization: Bearer` or `?token=`).
        drain_token_file: Option<PathBuf> = None,
    }

    [shutdown] Shutdown {
        drain_timeout: Duration = Duration::from_secs(25),
    }

    [log] Log {
        format: LogFormat = LogFormat::Json,
        level: String = "info".into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// One thing wrong with the configuration, tied to the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration; `Display` prints one per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Problem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

fn json_object(pairs: &[(&str, &str)]) -> Map<String, Json> {
    pairs.iter().map(|(k, v)| (k.to_string(), Json::String(v.to_string()))).collect()
}

// === impl Config ===

impl Config {
    /// Loads defaults, then `file` (if any), then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            let text = read_file(path).map_err(|p| ConfigError(vec![p]))?;
            figment = figment.merge(Toml::string(&text));
        }
        // Only `SECTION__KEY` variables are configuration: WSKEEP_CONFIG names the file, and
        // Kubernetes injects WSKEEP_PORT and friends for a Service named wskeep.
        figment = figment.merge(Env::prefixed(env::PREFIX).filter(|k| k.as_str().contains("__")).split("__"));
        Self::from_figment(&figment, &env::configuration_variables(std::env::vars_os()))
    }

    /// Reads a TOML document (defaults underneath), without the environment. For tests and fuzzing.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        check_syntax(text, "<toml>").map_err(|p| ConfigError(vec![p]))?;
        Self::from_figment(&Figment::from(Toml::string(text)), &[])
    }

    fn from_figment(figment: &Figment, origins: &unknown::Origins) -> Result<Config, ConfigError> {
        let dict: Dict = figment.extract().map_err(|e| {
            let key = if e.path.is_empty() { "configuration".to_string() } else { e.path.join(".") };
            ConfigError(vec![Problem { key, message: e.kind.to_string() }])
        })?;
        let mut problems = Vec::new();
        let mut config = Config::read_keys(&dict, &mut problems);
        // Unset, the two limits are derived from the descriptor limit (`fd_budget`).
        let set = |key: &str| dict.get("listen").and_then(|l| l.as_dict()).is_some_and(|l| l.contains_key(key));
        let sized = fd_budget::size(
            set("max_connections").then_some(config.listen.max_connections),
            set("max_handshakes").then_some(config.listen.max_handshakes),
            fd_hard_limit(),
        );
        config.listen.max_connections = sized.max_connections;
        config.listen.max_handshakes = sized.max_handshakes;
        config.listen.derived = sized.derived;
        problems.extend(sized.problems);
        problems.extend(unknown::unknown(&dict, origins));
        problems.extend(config.validate());
        if problems.is_empty() {
            return Ok(config);
        }
        // Name the variable to fix when a value came from the environment (unknown keys say so
        // already, with the variable to write instead).
        for p in &mut problems {
            let variables = unknown::variables_under(origins, &p.key);
            if !variables.is_empty() && !p.message.contains(variables[0]) {
                p.message = format!("{} (set by {})", p.message, variables.join(", "));
            }
        }
        Err(ConfigError(problems))
    }

    /// Cross-field and environment rules; also fills derived fields (`upstream.authority`).
    fn validate(&mut self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| p.push(Problem { key: key.into(), message });

        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::load_pair(cert, key) {
                    bad(e.key(), e.to_string());
                }
            }
            (Some(_), None) => bad("listen.tls_key", "must be set together with listen.tls_cert".into()),
            (None, Some(_)) => bad("listen.tls_cert", "must be set together with listen.tls_key".into()),
            (None, None) => {}
        }
        if self.listen.proxy_protocol != ProxyProtocol::Off && self.listen.trusted_proxies.is_empty() {
            bad(
                "listen.trusted_proxies",
                format!(
                    "must list the balancers' addresses while listen.proxy_protocol is \"{}\" \
                     (a header is believed only from them)",
                    self.listen.proxy_protocol.as_str()
                ),
            );
        }
        let probe = &self.listen.probe_path;
        let plain = |c: char| c.is_ascii_alphanumeric() || "/-_.~".contains(c);
        if !probe.is_empty() && (!probe.starts_with('/') || probe.ends_with('/') || !probe.chars().all(plain)) {
            let message = format!(
                "{probe:?} must be \"\" (off) or a path such as \"/wskeep/probe\": starting with /, not ending \
                 with /, of letters, digits and / - _ . ~ only"
            );
            bad("listen.probe_path", message);
        }
        if !(1..=MAX_HTTP2_STREAMS).contains(&self.listen.http2_max_streams) {
            bad("listen.http2_max_streams", format!("must be between 1 and {MAX_HTTP2_STREAMS}"));
        }
        if self.listen.handshake_timeout.is_zero() {
            bad("listen.handshake_timeout", "must be above 0s: without it a silent socket is held forever".into());
        }
        if self.listen.first_byte_timeout.is_zero() {
            bad("listen.first_byte_timeout", "must be above 0s: without it a silent socket is held forever".into());
        }
        if let Some(path) = self.upstream.url.strip_prefix("unix:") {
            // `unix:/path` or, as Docker writes it, `unix:///path`.
            let path = path.strip_prefix("//").filter(|p| p.starts_with('/')).unwrap_or(path);
            if Path::new(path).is_absolute() {
                self.upstream.unix_path = Some(PathBuf::from(path));
                self.upstream.authority = "localhost".into();
            } else {
                bad(
                    "upstream.url",
                    format!("{:?}: a Unix socket is written \"unix:/absolute/path\"", self.upstream.url),
                );
            }
        } else {
            match parse_upstream_url(&self.upstream.url) {
                Ok(parsed) => {
                    self.upstream.authority = parsed.authority;
                    if parsed.tls {
                        match crate::proxy::upstream_tls::UpstreamTls::load(&self.upstream, &parsed.host) {
                            Ok(tls) => self.upstream.tls = Some(std::sync::Arc::new(tls)),
                            Err(problems) => problems.into_iter().for_each(|(key, message)| bad(key, message)),
                        }
                    }
                }
                Err(e) => bad("upstream.url", e),
            }
        }
        if self.upstream.tls.is_none() {
            let u = &self.upstream;
            let tls_keys = [
                ("upstream.ca_file", u.ca_file.is_some()),
                ("upstream.server_name", !u.server_name.is_empty()),
                ("upstream.client_cert", u.client_cert.is_some()),
                ("upstream.client_key", u.client_key.is_some()),
            ];
            let scheme_is_tls = ["wss://", "https://"].iter().any(|s| u.url.to_ascii_lowercase().starts_with(s));
            for (key, set) in tls_keys {
                if set && !scheme_is_tls {
                    bad(key, "is only used with a wss:// or https:// upstream.url".into());
                }
            }
        }
        let host = self.upstream.host_header.trim();
        if host.is_empty() {
            self.upstream.host = self.upstream.authority.clone();
        } else if host.contains('@') || http::uri::Authority::try_from(host).is_err() {
            bad("upstream.host_header", format!("{host:?} is not a host[:port]"));
        } else {
            self.upstream.host = host.to_string();
        }
        if self.upstream.connect_timeout.is_zero() {
            bad("upstream.connect_timeout", "must be above 0s".into());
        }
        if self.upstream.response_timeout.is_zero() {
            bad("upstream.response_timeout", "must be above 0s".into());
        }
        let ck = &self.client_keepalive;
        if !ck.timeout.is_zero() && !ck.ping_interval.is_zero() && ck.timeout <= ck.ping_interval {
            bad(
                "client_keepalive.timeout",
                format!(
                    "\"{}\" must be longer than client_keepalive.ping_interval (\"{}\"), or the client cannot \
                     answer in time",
                    humantime::format_duration(ck.timeout),
                    humantime::format_duration(ck.ping_interval)
                ),
            );
        }
        let uk = &self.upstream_keepalive;
        if !uk.timeout.is_zero() && !uk.ping_interval.is_zero() && uk.timeout <= uk.ping_interval {
            bad(
                "upstream_keepalive.timeout",
                format!(
                    "\"{}\" must be longer than upstream_keepalive.ping_interval (\"{}\")",
                    humantime::format_duration(uk.timeout),
                    humantime::format_duration(uk.ping_interval)
                ),
            );
        }
        if self.json_ping.enabled {
            if self.json_ping.match_fields.is_empty() {
                bad("json_ping.match", "must name at least one field while json_ping is enabled".into());
            }
            if self.json_ping.reply.is_empty() {
                bad("json_ping.reply", "must name at least one field while json_ping is enabled".into());
            }
        }
        let max = self.limits.max_message_size.0;
        if max == 0 {
            bad("limits.max_message_size", "must be above 0".into());
        } else if max > 1 << 30 {
            bad("limits.max_message_size", format!("\"{}\" must be at most 1GiB", self.limits.max_message_size));
        }
        for (key, message) in crate::resume::config_problems(&self.resume, max) {
            bad(key, message);
        }
        if self.admin.addr == self.listen.addr && self.admin.addr.port() != 0 {
            bad("admin.addr", format!("\"{}\" must differ from listen.addr", self.admin.addr));
        }
        if let Some(path) = &self.admin.drain_token_file {
            if let Err(e) = read_drain_token(path) {
                bad("admin.drain_token_file", e);
            }
        }
        // EnvFilter reads a bare word as a target name ("warnig" would log nothing of wskeep's),
        // so a directive without `=` must be a level; targets are written `target=level`.
        let bare = self.log.level.split(',').map(str::trim).find(|d| {
            !d.is_empty() && !d.contains(['=', '[']) && d.parse::<tracing_subscriber::filter::LevelFilter>().is_err()
        });
        if let Some(word) = bare {
            bad(
                "log.level",
                format!("{word:?} is not a level (off, error, warn, info, debug, trace); filters are target=level"),
            );
        } else if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            bad("log.level", format!("{:?} is not a level or filter: {e}", self.log.level));
        }
        p
    }

    /// The effective configuration as TOML, for `wskeep check`.
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings, numbers and tables cannot fail.
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }

    /// Warnings that do not stop wskeep (printed by `check` and logged by `run`): limits that
    /// were set and do not fit the descriptor limit (derived ones always fit).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = variable_warnings();
        w.extend(fd_budget::warning(self.listen.max_connections, self.listen.max_handshakes, fd_hard_limit()));
        w
    }
}

/// `WSKEEP_` variables that look like configuration but are not read (`WSKEEP_UPSTREAM_URL`);
/// `check` and `run` print these even when the configuration is refused.
pub fn variable_warnings() -> Vec<String> {
    env::misspelled_variables(std::env::vars_os())
}

/// `upstream.url` taken apart.
struct UpstreamUrl {
    /// `host:port` to connect to.
    authority: String,
    /// The host alone (brackets kept for IPv6), the name a TLS upstream is verified against.
    host: String,
    tls: bool,
}

/// Accepts `ws://host:port`, `http://`, and over TLS `wss://` or `https://` (the port defaults to
/// 80 or 443), with no path.
fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, String> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(format!("{url:?} has no scheme: write it like \"ws://127.0.0.1:8080\""));
    };
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => false,
        "wss" | "https" => true,
        _ => {
            return Err(format!(
                "{url:?}: unsupported scheme {scheme:?}; the upstream is ws://host:port (or wss://, http://, https://, \
                 or unix:/path)"
            ))
        }
    };
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!("{url:?} must not have a path or query: the client's own path is forwarded"));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(UpstreamUrl { authority: format!("{host}:{port}"), host: host.to_string(), tls })
}

/// The secret in `admin.drain_token_file`: the file's content without surrounding whitespace,
/// at least 16 bytes (a guessable token protects nothing).
pub fn read_drain_token(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim_ascii();
    if token.len() < 16 {
        return Err(format!("{} must hold a token of at least 16 characters", path.display()));
    }
    Ok(token.to_vec())
}

/// The hard `RLIMIT_NOFILE`, or `None` where it is unlimited or unknown.
pub fn fd_hard_limit() -> Option<u64> {
    match rlimit::Resource::NOFILE.get() {
        Ok((_, hard)) if hard != rlimit::INFINITY => Some(hard),
        _ => None,
    }
}

/// Reads the configuration file; a problem names the file (and the line and column of a TOML
/// syntax error).
fn read_file(path: &Path) -> Result<String, Problem> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".to_string(),
            _ if path.is_dir() => "is a directory, not a file".to_string(),
            _ => format!("cannot be read: {e}"),
        };
        Problem { key: "--config".into(), message: format!("{} {why}", path.display()) }
    })?;
    check_syntax(&text, &path.display().to_string())?;
    Ok(text)
}

/// A TOML syntax error as `FILE:LINE:COLUMN: message`, the way compilers point at a mistake.
fn check_syntax(text: &str, origin: &str) -> Result<(), Problem> {
    let Err(e) = text.parse::<toml::Table>() else { return Ok(()) };
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    Err(Problem {
        key: format!("{origin}:{line}:{column}"),
        message: format!("TOML syntax error: {}", e.message().trim()),
    })
}

#[cfg(test)]
mod tests;
