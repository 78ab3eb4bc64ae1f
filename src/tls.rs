//! TLS termination: load a PEM pair, serve it through a resolver that can be swapped without a
//! restart, and watch the files so a rotated Kubernetes Secret (a `..data` symlink swap) or a
//! rewritten file is picked up within seconds. A bad new pair is refused and the old one kept.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the certificate files are checked for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {0}: {1}")]
    CertRead(PathBuf, String),
    #[error("{0} holds no PEM certificate")]
    CertEmpty(PathBuf),
    #[error("cannot read private key {0}: {1}")]
    KeyRead(PathBuf, String),
    #[error("private key {0} is not usable: {1}")]
    KeyInvalid(PathBuf, String),
    #[error("private key {key} does not match certificate {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {0} expired at {at}", at = crate::telemetry::rfc3339(*.1))]
    Expired(PathBuf, i64),
}

impl TlsError {
    /// The configuration key the problem belongs to.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::KeyRead(..) | TlsError::KeyInvalid(..) | TlsError::Mismatch { .. } => "listen.tls_key",
            _ => "listen.tls_cert",
        }
    }
}

/// A loaded pair, with what the metrics and logs need to know about it.
pub struct LoadedPair {
    pub key: Arc<CertifiedKey>,
    /// The leaf certificate's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key: parseable, matching, not expired.
pub fn load_pair(cert_path: &Path, key_path: &Path) -> Result<LoadedPair, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::CertRead(cert_path.into(), e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| TlsError::CertEmpty(cert_path.into()))?;
    let not_after =
        cert_not_after(leaf).ok_or_else(|| TlsError::CertRead(cert_path.into(), "not an X.509 certificate".into()))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::KeyRead(key_path.into(), e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::KeyInvalid(key_path.into(), e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) = certified.keys_match() {
        return Err(TlsError::Mismatch { cert: cert_path.into(), key: key_path.into() });
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    if not_after <= now {
        return Err(TlsError::Expired(cert_path.into(), not_after));
    }
    Ok(LoadedPair { key: Arc::new(certified), not_after })
}

/// Hands every new handshake the current pair; a new pair replaces it for later handshakes only.
/// It also remembers which files the pair came from, so that the watcher and a configuration
/// reload (which may name other files) load each change once.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
    source: Mutex<Source>,
}

/// The files in service and what they were when last looked at.
#[derive(Debug)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
    seen: (Option<Fingerprint>, Option<Fingerprint>),
}

impl CertResolver {
    /// Serves `pair`, loaded from `cert` and `key`.
    pub fn new(pair: &LoadedPair, cert: &Path, key: &Path) -> Self {
        CertResolver {
            current: RwLock::new(pair.key.clone()),
            source: Mutex::new(Source {
                cert: cert.into(),
                key: key.into(),
                seen: (fingerprint(cert), fingerprint(key)),
            }),
        }
    }

    fn swap(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a panic elsewhere mid-swap; the Arc inside is still whole.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }

    fn source(&self) -> std::sync::MutexGuard<'_, Source> {
        self.source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the pair from `cert` and `key` (the files watched from now on) and serves it; on
    /// error the pair in service stays. For a configuration reload.
    pub fn load_from(&self, cert: &Path, key: &Path, metrics: &Metrics) -> Result<(), TlsError> {
        let mut source = self.source();
        *source = Source { cert: cert.into(), key: key.into(), seen: (fingerprint(cert), fingerprint(key)) };
        self.install(&source, metrics)
    }

    /// Reloads the pair if its files changed since last looked at. For the watcher.
    fn reload_if_changed(&self, metrics: &Metrics) -> Option<Result<(), TlsError>> {
        let mut source = self.source();
        let now = (fingerprint(&source.cert), fingerprint(&source.key));
        if now == source.seen {
            return None;
        }
        source.seen = now;
        Some(self.install(&source, metrics))
    }

    fn install(&self, source: &Source, metrics: &Metrics) -> Result<(), TlsError> {
        let pair = load_pair(&source.cert, &source.key)?;
        self.swap(pair.key);
        metrics.tls_cert_reloads.inc();
        metrics.tls_cert_not_after.set(pair.not_after);
        tracing::info!(cert = %source.cert.display(), not_after = %crate::telemetry::rfc3339(pair.not_after), "TLS certificate reloaded");
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Builds the rustls configuration: TLS 1.2 and 1.3, ALPN `h2` (with `http2`) and `http/1.1`,
/// the resolver's pair.
pub fn server_config(resolver: Arc<CertResolver>, http2: bool) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // The ring provider supports both versions: this cannot fail.
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = if http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
    // Resumption tickets would need a key rotation story; a per-process session cache is enough.
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    Arc::new(config)
}

pub type Fingerprint = (u64, u64, i64, i64, u64);

/// What identifies the file behind a path (symlinks followed): a swap or rewrite changes it.
pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// Polls the pair's files and swaps in a new pair when they change and load cleanly.
pub async fn watch(resolver: Arc<CertResolver>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(RELOAD_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Some(Err(e)) = resolver.reload_if_changed(&metrics) {
            tracing::error!(error = %e, "new TLS certificate refused; the previous one stays in service");
        }
    }
}

// === DER, just enough to read a certificate's validity ===

/// Reads one DER element at the start of `input`: (tag, contents, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The leaf certificate's serial number, as bytes (for tests and logs).
pub fn cert_serial(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, tbs, _) = der_element(der_element(cert)?.1)?;
    let mut fields = tbs;
    let (tag, _, rest) = der_element(fields)?;
    if tag == 0xa0 {
        fields = rest; // skip the explicit version
    }
    let (tag, serial, _) = der_element(fields)?;
    (tag == 0x02).then(|| serial.to_vec())
}

/// The certificate's notAfter as seconds since the Unix epoch.
pub fn cert_not_after(cert: &[u8]) -> Option<i64> {
    let (_, tbs, _) = der_element(der_element(cert)?.1)?;
    let mut fields = tbs;
    let (tag, _, rest) = der_element(fields)?;
    if tag == 0xa0 {
        fields = rest;
    }
    let (_, _, fields) = der_element(fields)?; // serial
    let (_, _, fields) = der_element(fields)?; // signature algorithm
    let (_, _, fields) = der_element(fields)?; // issuer
    let (_, validity, _) = der_element(fields)?;
    let (_, _, after) = der_element(validity)?; // notBefore
    let (tag, time, _) = der_element(after)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 26), 20_783);
    }

    #[test]
    fn reads_validity_and_serial_from_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x12, 0x34]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_not_after(cert.der()), Some(days_from_civil(2031, 5, 17) * 86_400));
        assert_eq!(cert_serial(cert.der()), Some(vec![0x12, 0x34]));
        assert_eq!(cert_not_after(b"\x30\x03garbage"), None);
    }
}
