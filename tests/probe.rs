//! `wskeep probe` and `bench` (the real binary) against wskeep serving certificates operators
//! really have: each TLS failure is one sentence with the option that fixes it, never a rustls
//! debug dump; `probe --help` lists only the options probe uses.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestCert, TestUpstream};

struct Probe {
    success: bool,
    stdout: String,
    stderr: String,
}

/// `wskeep probe URL ARGS... --duration 300ms`, bounded by the probe's own 10 s connect timeout.
async fn probe(url: String, args: &[&str]) -> Probe {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_wskeep"))
            .arg("probe")
            .arg(&url)
            .args(&args)
            .args(["--duration", "300ms"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Probe {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// Asserts the probe failed with exactly one line that says `words` and none of rustls's
/// internal names.
fn assert_one_sentence(p: &Probe, words: &[&str]) {
    assert!(!p.success, "the probe should fail: {}{}", p.stdout, p.stderr);
    let lines: Vec<&str> = p.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {:?}", p.stderr);
    for word in words {
        assert!(lines[0].contains(word), "{word:?} missing from: {}", lines[0]);
    }
    for internal in ["Other(", "OtherError", "CaUsedAsEndEntity", "InvalidCertificate", "UnknownIssuer", "DnsName"] {
        assert!(!lines[0].contains(internal), "rustls's words leak: {}", lines[0]);
    }
}

fn test_cert_from(dir: tempfile::TempDir, cert: PathBuf, key: PathBuf) -> TestCert {
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    TestCert { dir, cert, key, cert_pem, key_pem }
}

/// What `openssl req -x509` makes when given only a subject: a self-signed certificate flagged
/// as a CA (basicConstraints CA:TRUE from openssl.cnf's v3_ca). CI installs openssl
/// (deploy/ci-install.sh).
fn openssl_default_cert() -> TestCert {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success());
    test_cert_from(dir, cert, key)
}

/// An rcgen certificate: `names` as its subjectAltNames, valid until `not_after` (y, m, d).
fn rcgen_cert(names: &[&str], not_after: Option<(i32, u8, u8)>) -> TestCert {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(y - 1, m, d);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    test_cert_from(dir, c, k)
}

/// wskeep serving `cert`, in front of an echo upstream.
async fn serve(cert: &TestCert) -> (common::Sidecar, TestUpstream) {
    let upstream = TestUpstream::start().await;
    (common::start_sidecar(common::test_config(upstream.addr, Some(cert), "")).await, upstream)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_flagged_self_signed_certificate_gets_a_hint_not_a_debug_dump() {
    let cert = openssl_default_cert();
    let (sidecar, _upstream) = serve(&cert).await;
    let url = format!("wss://localhost:{}/", sidecar.addr.port());
    let p = probe(url.clone(), &["--cacert", path(&cert.cert)]).await;
    assert_one_sentence(&p, &["presents a CA certificate", "openssl req -x509", "--cacert wants the CA", "--insecure"]);
    // bench connects through the same client and says the same.
    let bench_url = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_wskeep"))
            .args(["bench", "latency", &bench_url, "--conns", "1", "--duration", "1s"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let bench = Probe {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_one_sentence(&bench, &["bench failed: localhost", "presents a CA certificate", "--insecure"]);
    // And the hint works.
    let p = probe(url, &["--insecure"]).await;
    assert!(p.success, "{}{}", p.stdout, p.stderr);
    assert!(p.stdout.contains("(probe finished)"), "{}", p.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_issuer_name_mismatch_and_expiry_each_say_what_to_do() {
    let cert = rcgen_cert(&["localhost"], None);
    let (sidecar, _upstream) = serve(&cert).await;
    let port = sidecar.addr.port();
    let url = format!("wss://localhost:{port}/");

    let p = probe(url.clone(), &[]).await;
    assert_one_sentence(&p, &["is not signed by a CA this system trusts", "--cacert", "--insecure"]);
    let other = rcgen_cert(&["localhost"], None);
    let p = probe(url.clone(), &["--cacert", path(&other.cert)]).await;
    assert_one_sentence(&p, &[&format!("is not signed by a CA in {}", other.cert.display()), "--insecure"]);

    // The certificate names localhost only.
    let p = probe(format!("wss://127.0.0.1:{port}/"), &["--cacert", path(&cert.cert)]).await;
    assert_one_sentence(&p, &["is not valid for \"127.0.0.1\" (it names localhost)", "--insecure"]);

    // The trusted certificate itself works.
    let p = probe(url, &["--cacert", path(&cert.cert)]).await;
    assert!(p.success, "{}{}", p.stdout, p.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_names_its_expiry() {
    let cert = rcgen_cert(&["localhost"], Some((2021, 1, 1)));
    // wskeep refuses to load an expired pair, so a plain rustls server presents this one.
    let acceptor = {
        use rustls::pki_types::pem::PemObject;
        let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await;
            });
        }
    });
    let p = probe(format!("wss://localhost:{port}/"), &["--cacert", path(&cert.cert)]).await;
    assert_one_sentence(&p, &["expired at 2021-01-01T00:00:00Z", "renew", "--insecure"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_to_a_plain_endpoint_and_a_missing_ca_file_are_explained() {
    // wskeep without TLS answers the ClientHello with an HTTP 400, as any plain server does.
    let upstream = TestUpstream::start().await;
    let plain = common::start_sidecar(common::test_config(upstream.addr, None, "")).await;
    let p = probe(format!("wss://127.0.0.1:{}/", plain.addr.port()), &["--insecure"]).await;
    assert_one_sentence(&p, &["did not answer with TLS", "use a ws:// URL"]);
    // A server that just hangs up.
    let p = probe(format!("wss://127.0.0.1:{}/", upstream.addr.port()), &["--insecure"]).await;
    assert_one_sentence(&p, &["TLS handshake with 127.0.0.1", "is it a TLS endpoint"]);

    let p = probe(format!("wss://127.0.0.1:{}/", plain.addr.port()), &["--cacert", "/nonexistent/ca.pem"]).await;
    assert_one_sentence(&p, &["--cacert /nonexistent/ca.pem: cannot be read"]);
}

#[test]
fn probe_help_lists_only_what_probe_uses() {
    let out = Command::new(env!("CARGO_BIN_EXE_wskeep")).args(["probe", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    for option in ["--insecure", "--cacert", "--header", "--json-ping", "--no-auto-pong", "--duration"] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    assert!(!help.contains("--config"), "probe reads no configuration file:\n{help}");
    // run and check still take it, before or after the command.
    for args in [&["check", "--help"][..], &["--help"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_wskeep")).args(args).output().unwrap();
        assert!(String::from_utf8(out.stdout).unwrap().contains("--config"), "{args:?}");
    }
}
