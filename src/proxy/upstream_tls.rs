//! TLS to the upstream (`wss://`, `https://`): one rustls `ClientConfig` per configuration,
//! shared by every upstream connection so that its session cache resumes sessions (a reconnect
//! storm then pays one full handshake, not one per client). Certificates are always verified,
//! against `upstream.ca_file` or the system's roots; the name checked (and sent as SNI) is
//! `upstream.server_name` or the URL's host. `upstream.client_cert` and `upstream.client_key`
//! add a client certificate (mTLS). The files are read when the configuration is loaded, and
//! again when they change on disk (looked at, at most once per `RELOAD_POLL`, by the next
//! connection), as the listener's are: a set that no longer loads is logged and the one in
//! service kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::config::Upstream;

/// A problem with the upstream TLS keys: (key, message).
pub type KeyProblem = (&'static str, String);

/// The client configuration in service for a `wss://` upstream, and the files it came from.
#[derive(Debug)]
pub struct UpstreamTls {
    /// The name verified and sent as SNI.
    pub name: String,
    sni_host: String,
    keys: Upstream,
    current: RwLock<Arc<ClientConfig>>,
    /// When the files were last looked at, and what they were then.
    seen: Mutex<(Instant, Vec<Option<crate::tls::Fingerprint>>)>,
}

impl UpstreamTls {
    /// Loads the files `upstream` names, or lists every problem with them.
    pub fn load(upstream: &Upstream, sni_host: &str) -> Result<UpstreamTls, Vec<KeyProblem>> {
        let keys = Upstream { tls: None, ..upstream.clone() };
        let seen = fingerprints(&keys);
        let config = client_config(&keys, sni_host)?;
        let name = if keys.server_name.is_empty() { sni_host.to_string() } else { keys.server_name.clone() };
        Ok(UpstreamTls {
            name,
            sni_host: sni_host.to_string(),
            keys,
            current: RwLock::new(config),
            seen: Mutex::new((Instant::now(), seen)),
        })
    }

    /// The configuration for a new connection, reloaded first if the files changed.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.reload_if_changed();
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn reload_if_changed(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.0.elapsed() < crate::tls::RELOAD_POLL {
            return;
        }
        let now = fingerprints(&self.keys);
        let changed = now != seen.1;
        *seen = (Instant::now(), now);
        if !changed {
            return;
        }
        match client_config(&self.keys, &self.sni_host) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
                tracing::info!("upstream TLS files reloaded");
            }
            Err(problems) => {
                for (key, message) in problems {
                    tracing::error!(key, error = %message, "upstream TLS files refused; the previous ones stay in service");
                }
            }
        }
    }
}

fn fingerprints(keys: &Upstream) -> Vec<Option<crate::tls::Fingerprint>> {
    [&keys.ca_file, &keys.client_cert, &keys.client_key]
        .into_iter()
        .flatten()
        .map(|p: &PathBuf| crate::tls::fingerprint(p))
        .collect()
}

/// The client configuration for `upstream`, or every problem with its files.
pub fn client_config(upstream: &Upstream, sni_host: &str) -> Result<Arc<ClientConfig>, Vec<KeyProblem>> {
    let mut problems = Vec::new();
    let roots = match &upstream.ca_file {
        Some(path) => match read_certs(path) {
            Ok(certs) => {
                let mut roots = RootCertStore::empty();
                let (_, unusable) = roots.add_parsable_certificates(certs);
                if roots.is_empty() || unusable > 0 {
                    problems.push((
                        "upstream.ca_file",
                        format!("{} holds a certificate that is not a usable CA", path.display()),
                    ));
                }
                roots
            }
            Err(e) => {
                problems.push(("upstream.ca_file", e));
                RootCertStore::empty()
            }
        },
        None => system_roots(),
    };
    if upstream.ca_file.is_none() && roots.is_empty() {
        problems.push(("upstream.ca_file", "no system CA certificates were found: name the upstream's CA here".into()));
    }
    let name = if upstream.server_name.is_empty() { sni_host } else { upstream.server_name.as_str() };
    if server_name(name).is_none() {
        problems.push(("upstream.server_name", format!("{name:?} is not a DNS name or IP address")));
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // The ring provider supports both versions: this cannot fail.
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots);
    let config = match (&upstream.client_cert, &upstream.client_key) {
        (None, None) => Some(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(|e| problems.push(("upstream.client_cert", e))).ok();
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| problems.push(("upstream.client_key", format!("cannot read {}: {e}", key.display()))))
                .ok();
            match (chain, key_der) {
                (Some(chain), Some(key_der)) => builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| {
                        problems.push(("upstream.client_key", format!("{} is not usable: {e}", key.display())))
                    })
                    .ok(),
                _ => None,
            }
        }
        (Some(_), None) => {
            problems.push(("upstream.client_key", "must be set together with upstream.client_cert".into()));
            None
        }
        (None, Some(_)) => {
            problems.push(("upstream.client_cert", "must be set together with upstream.client_key".into()));
            None
        }
    };
    match config {
        Some(mut config) if problems.is_empty() => {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        }
        _ => Err(problems),
    }
}

/// The name to verify and send as SNI: a DNS name, or an IP address (bracketed IPv6 accepted).
pub fn server_name(name: &str) -> Option<ServerName<'static>> {
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    ServerName::try_from(bare.to_string()).ok()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    roots
}
