//! Configuration reload on SIGHUP, as nginx and HAProxy do it: the file (and the environment) is
//! read and validated again; a valid result goes into service for the connections and requests
//! that start from then on, while live ones keep the settings they started with; an invalid one
//! is refused whole, each problem logged with its key, and the running configuration stays.
//!
//! What the listeners were bound and sized with cannot change in a running process: those keys
//! (`RESTART_KEYS`) keep their running values and are logged as needing a restart. The log level,
//! the drain timeout and the certificate apply at once; the certificate is read again even when
//! its files did not change.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, ConfigError};
use crate::metrics::ReloadResult;
use crate::proxy::{Settings, Shared};
use crate::tls::CertResolver;

/// The keys a reload does not apply (README, "Reloading the configuration").
pub const RESTART_KEYS: &[&str] = &[
    "listen.addr",
    "listen.max_connections",
    "listen.max_handshakes",
    "listen.http2",
    "listen.tls_cert",
    "listen.tls_key",
    "admin.addr",
    "log.format",
];

/// Reloads one server's configuration; `reload` is called for each SIGHUP.
pub struct Reloader {
    path: Option<PathBuf>,
    shared: Arc<Shared>,
    tls: Option<Arc<CertResolver>>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, shared: Arc<Shared>, tls: Option<Arc<CertResolver>>) -> Reloader {
        Reloader { path, shared, tls }
    }

    /// Loads the configuration again and puts what it can into service. Reads a few small files:
    /// cheap enough for the signal task.
    pub fn reload(&self) -> ReloadResult {
        let metrics = &self.shared.metrics;
        let running = self.shared.settings();
        let mut next = match Config::load(self.path.as_deref()) {
            Ok(config) => config,
            Err(ConfigError(problems)) => {
                for p in &problems {
                    tracing::error!(key = %p.key, problem = %p.message, "invalid configuration");
                }
                metrics.config_reloaded(ReloadResult::Invalid);
                tracing::error!(
                    problems = problems.len(),
                    "configuration reload refused: the running configuration stays in service"
                );
                return ReloadResult::Invalid;
            }
        };
        let pending = keep_restart_keys(&running.config, &mut next);
        for key in &pending {
            tracing::warn!(key, "changed in the configuration, but needs a restart: the running value stays");
        }
        for warning in next.warnings() {
            tracing::warn!("{warning}");
        }
        let changed = changed_keys(&running.config, &next);

        if next.log.level != running.config.log.level {
            crate::telemetry::set_level(&next.log.level);
        }
        self.shared.drain.set_timeout(next.shutdown.drain_timeout);
        if let (Some(resolver), Some(cert), Some(key)) = (&self.tls, &next.listen.tls_cert, &next.listen.tls_key) {
            if let Err(e) = resolver.load_from(cert, key, metrics) {
                tracing::error!(error = %e, "new TLS certificate refused; the previous one stays in service");
            }
        }
        self.shared.replace_settings(Settings::new(next, Some(&running)));
        metrics.config_reloaded(ReloadResult::Success);
        tracing::info!(
            changed = %list(&changed),
            restart_needed = %list(&pending),
            "configuration reloaded: changes apply to new connections"
        );
        ReloadResult::Success
    }
}

fn list<S: AsRef<str>>(keys: &[S]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(",")
}

/// Sets the `RESTART_KEYS` of `next` back to their running values; returns those that differed.
fn keep_restart_keys(running: &Config, next: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($section:ident . $key:ident),*) => {$(
            if next.$section.$key != running.$section.$key {
                kept.push(concat!(stringify!($section), ".", stringify!($key)));
                next.$section.$key = running.$section.$key.clone();
            }
        )*};
    }
    keep!(listen.addr, listen.max_connections, listen.max_handshakes, listen.http2);
    // Other certificate files are fine; switching TLS on or off changes what the listener is.
    if next.listen.tls_cert.is_some() != running.listen.tls_cert.is_some() {
        kept.extend(["listen.tls_cert", "listen.tls_key"]);
        next.listen.tls_cert.clone_from(&running.listen.tls_cert);
        next.listen.tls_key.clone_from(&running.listen.tls_key);
    }
    keep!(admin.addr, log.format);
    kept
}

/// The `section.key` paths whose values differ (names only: values may be secrets).
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    // Serialising plain structs of strings, numbers and tables cannot fail.
    let old = serde_json::to_value(old).expect("config serialises");
    let new = serde_json::to_value(new).expect("config serialises");
    let (Value::Object(old), Value::Object(new)) = (old, new) else { return Vec::new() };
    let empty = serde_json::Map::new();
    let mut changed = Vec::new();
    for (section, new_table) in &new {
        let new_table = new_table.as_object().unwrap_or(&empty);
        let old_table = old.get(section).and_then(Value::as_object).unwrap_or(&empty);
        let keys = new_table.keys().chain(old_table.keys().filter(|k| !new_table.contains_key(*k)));
        let mut keys: Vec<&String> = keys.collect();
        keys.sort();
        for key in keys {
            if new_table.get(key) != old_table.get(key) {
                changed.push(format!("{section}.{key}"));
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn changed_keys_name_each_key_that_differs() {
        let token = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token.path(), "0123456789abcdef0123").unwrap();
        let old = config("[client_keepalive]\nping_interval = \"20s\"\n");
        let new = config(&format!(
            "[client_keepalive]\nping_interval = \"5s\"\n[json_ping]\nmatch = {{ kind = \"ping\" }}\n\
             [admin]\ndrain_token_file = {:?}\n",
            token.path().display().to_string()
        ));
        assert_eq!(
            changed_keys(&old, &new),
            ["admin.drain_token_file", "client_keepalive.ping_interval", "json_ping.match"]
        );
        assert!(changed_keys(&new, &new).is_empty());
    }

    #[test]
    fn restart_keys_keep_their_running_values() {
        let running = config("[listen]\naddr = \"127.0.0.1:8443\"\n[log]\nformat = \"json\"\n");
        let mut next = config(
            "[listen]\naddr = \"127.0.0.1:9443\"\nmax_connections = 5\nhttp2 = false\nhttp2_max_streams = 7\n\
             [admin]\naddr = \"127.0.0.1:9191\"\n\
             [log]\nformat = \"text\"\nlevel = \"debug\"\n[limits]\nmax_message_size = \"2MiB\"\n",
        );
        let kept = keep_restart_keys(&running.clone(), &mut next);
        assert_eq!(kept, ["listen.addr", "listen.max_connections", "listen.http2", "admin.addr", "log.format"]);
        assert!(kept.iter().all(|k| RESTART_KEYS.contains(k)));
        // The streams per HTTP/2 connection apply to new connections.
        assert_eq!(changed_keys(&running, &next), ["limits.max_message_size", "listen.http2_max_streams", "log.level"]);
    }
}
