//! Configuration: defaults in code, then the TOML file, then `WSKEEP_<SECTION>__<KEY>` variables.
//!
//! Loading never stops at the first mistake: every key is read on its own, so a bad file yields
//! the full list of problems, each with its key path (like `nginx -t`). Cross-field rules
//! (`validate`) run on the typed result.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::size::ByteSize;

mod fd_budget;
pub use fd_budget::{MAX_CONNECTIONS_CAP, MAX_HANDSHAKES_CAP};

/// The environment variable that names the configuration file when `--config` is absent.
pub const CONFIG_ENV: &str = "WSKEEP_CONFIG";
/// Descriptors kept free for the listeners, the admin server, the upstream pool and logging.
pub const FD_HEADROOM: u64 = 64;

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: Listen,
    pub upstream: Upstream,
    pub client_keepalive: ClientKeepalive,
    pub upstream_keepalive: UpstreamKeepalive,
    pub json_ping: JsonPing,
    pub limits: Limits,
    pub admin: Admin,
    pub shutdown: Shutdown,
    pub log: Log,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listen {
    pub addr: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection must send its first byte within this (or `handshake_timeout`, if shorter).
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    pub max_connections: u64,
    /// Connections still in their handshake (first byte, TLS, first request head).
    pub max_handshakes: u64,
    /// How the limits the configuration left unset were derived (`check` prints it).
    #[serde(skip)]
    pub derived: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Upstream {
    /// Kept as written for display; `authority` is what connections use.
    pub url: String,
    #[serde(skip)]
    pub authority: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientKeepalive {
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamKeepalive {
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct JsonPing {
    pub enabled: bool,
    #[serde(rename = "match")]
    pub match_fields: Map<String, Json>,
    pub reply: Map<String, Json>,
    pub echo_fields: Vec<String>,
    pub forward: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub max_message_size: ByteSize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shutdown {
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Listen {
                addr: SocketAddr::from(([0, 0, 0, 0], 8443)),
                tls_cert: None,
                tls_key: None,
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                first_byte_timeout: Duration::from_secs(3),
                max_connections: MAX_CONNECTIONS_CAP,
                max_handshakes: MAX_HANDSHAKES_CAP,
                derived: Vec::new(),
            },
            upstream: Upstream {
                url: "ws://127.0.0.1:8080".into(),
                authority: "127.0.0.1:8080".into(),
                connect_timeout: Duration::from_secs(5),
                response_timeout: Duration::from_secs(30),
            },
            client_keepalive: ClientKeepalive {
                ping_interval: Duration::from_secs(20),
                timeout: Duration::from_secs(60),
            },
            upstream_keepalive: UpstreamKeepalive {
                ping_interval: Duration::ZERO,
                pong_interval: Duration::ZERO,
                timeout: Duration::ZERO,
            },
            json_ping: JsonPing {
                enabled: true,
                match_fields: json_object(&[("type", "ping")]),
                reply: json_object(&[("type", "pong")]),
                echo_fields: vec!["id".into(), "ts".into()],
                forward: false,
            },
            limits: Limits { max_message_size: ByteSize(1 << 20) },
            admin: Admin { addr: SocketAddr::from(([0, 0, 0, 0], 9090)) },
            shutdown: Shutdown { drain_timeout: Duration::from_secs(25) },
            log: Log { format: LogFormat::Json, level: "info".into() },
        }
    }
}

// === impl Config ===

impl Config {
    /// Loads defaults, then `file` (if any), then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(vec![Problem {
                    key: "--config".into(),
                    message: format!("{} is not a readable file", path.display()),
                }]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only `SECTION__KEY` variables are configuration: WSKEEP_CONFIG names the file, and
        // Kubernetes injects WSKEEP_PORT and friends for a Service named wskeep.
        figment = figment.merge(Env::prefixed("WSKEEP_").filter(|k| k.as_str().contains("__")).split("__"));
        Self::from_figment(&figment)
    }

    /// Reads a TOML document (defaults underneath), without the environment. For tests and fuzzing.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(&Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
        let dict: Dict = figment
            .extract()
            .map_err(|e| ConfigError(vec![Problem { key: e.path.join("."), message: e.kind.to_string() }]))?;
        let mut r = Reader::new(&dict);
        let d = Config::default();
        // Unset, these two are derived from the descriptor limit (`fd_budget`).
        let max_connections: Option<u64> = r.get("listen", "max_connections", None);
        let max_handshakes: Option<u64> = r.get("listen", "max_handshakes", None);
        let sized = fd_budget::size(max_connections, max_handshakes, fd_hard_limit());
        let mut config = Config {
            listen: Listen {
                addr: r.get("listen", "addr", d.listen.addr),
                tls_cert: r.get("listen", "tls_cert", d.listen.tls_cert),
                tls_key: r.get("listen", "tls_key", d.listen.tls_key),
                handshake_timeout: r.duration("listen", "handshake_timeout", d.listen.handshake_timeout),
                idle_timeout: r.duration("listen", "idle_timeout", d.listen.idle_timeout),
                first_byte_timeout: r.duration("listen", "first_byte_timeout", d.listen.first_byte_timeout),
                max_connections: sized.max_connections,
                max_handshakes: sized.max_handshakes,
                derived: sized.derived,
            },
            upstream: Upstream {
                url: r.get("upstream", "url", d.upstream.url),
                authority: String::new(),
                connect_timeout: r.duration("upstream", "connect_timeout", d.upstream.connect_timeout),
                response_timeout: r.duration("upstream", "response_timeout", d.upstream.response_timeout),
            },
            client_keepalive: ClientKeepalive {
                ping_interval: r.duration("client_keepalive", "ping_interval", d.client_keepalive.ping_interval),
                timeout: r.duration("client_keepalive", "timeout", d.client_keepalive.timeout),
            },
            upstream_keepalive: UpstreamKeepalive {
                ping_interval: r.duration("upstream_keepalive", "ping_interval", d.upstream_keepalive.ping_interval),
                pong_interval: r.duration("upstream_keepalive", "pong_interval", d.upstream_keepalive.pong_interval),
                timeout: r.duration("upstream_keepalive", "timeout", d.upstream_keepalive.timeout),
            },
            json_ping: JsonPing {
                enabled: r.get("json_ping", "enabled", d.json_ping.enabled),
                match_fields: r.get("json_ping", "match", d.json_ping.match_fields),
                reply: r.get("json_ping", "reply", d.json_ping.reply),
                echo_fields: r.get("json_ping", "echo_fields", d.json_ping.echo_fields),
                forward: r.get("json_ping", "forward", d.json_ping.forward),
            },
            limits: Limits { max_message_size: r.get("limits", "max_message_size", d.limits.max_message_size) },
            admin: Admin { addr: r.get("admin", "addr", d.admin.addr) },
            shutdown: Shutdown { drain_timeout: r.duration("shutdown", "drain_timeout", d.shutdown.drain_timeout) },
            log: Log { format: r.get("log", "format", d.log.format), level: r.get("log", "level", d.log.level) },
        };
        let mut problems = r.finish();
        problems.extend(sized.problems);
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(problems))
        }
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
        if self.listen.handshake_timeout.is_zero() {
            bad("listen.handshake_timeout", "must be above 0s: without it a silent socket is held forever".into());
        }
        if self.listen.first_byte_timeout.is_zero() {
            bad("listen.first_byte_timeout", "must be above 0s: without it a silent socket is held forever".into());
        }
        match parse_upstream_url(&self.upstream.url) {
            Ok(authority) => self.upstream.authority = authority,
            Err(e) => bad("upstream.url", e),
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
                    "must be longer than client_keepalive.ping_interval ({}), or the client cannot answer in time",
                    humantime::format_duration(ck.ping_interval)
                ),
            );
        }
        let uk = &self.upstream_keepalive;
        if !uk.timeout.is_zero() && !uk.ping_interval.is_zero() && uk.timeout <= uk.ping_interval {
            bad(
                "upstream_keepalive.timeout",
                format!(
                    "must be longer than upstream_keepalive.ping_interval ({})",
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
            bad("limits.max_message_size", "must be at most 1GiB".into());
        }
        if self.admin.addr == self.listen.addr && self.admin.addr.port() != 0 {
            bad("admin.addr", format!("must differ from listen.addr ({})", self.listen.addr));
        }
        // EnvFilter reads a bare word as a target name ("warnig" would log nothing of wskeep's),
        // so a directive without `=` must be a level; targets are written `target=level`.
        let bare = self.log.level.split(',').map(str::trim).find(|d| {
            !d.is_empty() && !d.contains(['=', '[']) && d.parse::<tracing_subscriber::filter::LevelFilter>().is_err()
        });
        if let Some(word) = bare {
            bad(
                "log.level",
                format!("`{word}` is not a level (off, error, warn, info, debug, trace); filters are `target=level`"),
            );
        } else if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            bad("log.level", format!("not a level or filter: {e}"));
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
        fd_budget::warning(self.listen.max_connections, self.listen.max_handshakes, fd_hard_limit())
            .into_iter()
            .collect()
    }
}

/// Accepts `ws://host:port` or `http://host:port` (the port defaults to 80) with no path.
fn parse_upstream_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("ws") | Some("http") => {}
        Some("wss") | Some("https") => {
            return Err(format!("`{url}`: TLS to the upstream is not supported; wskeep runs beside it (use ws://)"))
        }
        _ => return Err(format!("`{url}` must start with ws:// (or http://)")),
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("`{url}` has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!("`{url}` must not have a path or query: the client's own path is forwarded"));
    }
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}

/// The hard `RLIMIT_NOFILE`, or `None` where it is unlimited or unknown.
pub fn fd_hard_limit() -> Option<u64> {
    match rlimit::Resource::NOFILE.get() {
        Ok((_, hard)) if hard != rlimit::INFINITY => Some(hard),
        _ => None,
    }
}

/// Reads each key on its own so that one bad value does not hide the next.
struct Reader<'a> {
    dict: &'a Dict,
    known: Vec<(&'static str, &'static str)>,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn new(dict: &'a Dict) -> Self {
        Reader { dict, known: Vec::new(), problems: Vec::new() }
    }

    fn get<T: DeserializeOwned>(&mut self, section: &'static str, key: &'static str, default: T) -> T {
        self.known.push((section, key));
        let Some(Value::Dict(_, table)) = self.dict.get(section) else { return default };
        let Some(value) = table.get(key) else { return default };
        match value.deserialize::<T>() {
            Ok(v) => v,
            Err(e) => {
                self.problems.push(Problem { key: format!("{section}.{key}"), message: e.kind.to_string() });
                default
            }
        }
    }

    fn duration(&mut self, section: &'static str, key: &'static str, default: Duration) -> Duration {
        self.get(section, key, humantime_serde::Serde::from(default)).into_inner()
    }

    /// Reports sections and keys that no `get` asked for.
    fn finish(mut self) -> Vec<Problem> {
        for (section, value) in self.dict {
            let Value::Dict(_, table) = value else {
                let message = if self.known.iter().any(|(s, _)| s == section) {
                    "must be a table".to_string()
                } else {
                    "unknown section".to_string()
                };
                self.problems.push(Problem { key: section.clone(), message });
                continue;
            };
            if !self.known.iter().any(|(s, _)| s == section) {
                self.problems.push(Problem { key: section.clone(), message: "unknown section".into() });
                continue;
            }
            for key in table.keys() {
                if !self.known.iter().any(|(s, k)| s == section && k == key) {
                    self.problems.push(Problem { key: format!("{section}.{key}"), message: "unknown key".into() });
                }
            }
        }
        self.problems
    }
}

#[cfg(test)]
mod tests;
