//! `wskeep check`, driven as the real binary: every validation error exits 1 and names its key,
//! several problems are all listed, a valid file prints the effective configuration, and the
//! environment (`WSKEEP_<SECTION>__<KEY>`, `WSKEEP_CONFIG`) is applied as documented.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VALID: &str = "[upstream]\nurl = \"ws://127.0.0.1:9000\"\n";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().expect("exited, not killed"),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }
}

/// `wskeep check` with a clean WSKEEP_* environment plus `env`, and `args` after `check`.
fn wskeep_check(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wskeep"));
    cmd.arg("check").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("WSKEEP_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the binary runs").into()
}

/// Writes `text` to a fresh file and checks it.
fn check_text(text: &str, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wskeep.toml");
    std::fs::write(&path, text).unwrap();
    wskeep_check(&["--config", path.to_str().unwrap()], env)
}

/// Asserts the run failed with exit code 1 and that the problem list names `key` with `words`.
fn assert_problem(run: &Run, key: &str, words: &str) {
    assert_eq!(run.code, 1, "expected exit 1\nstdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("- {key}:")))
        .unwrap_or_else(|| panic!("no problem for {key}:\n{}", run.stderr));
    assert!(line.contains(words), "the problem for {key} should mention {words:?}: {line}");
    assert!(run.stdout.is_empty(), "no effective configuration on error: {}", run.stdout);
}

fn tls_lines(cert: &Path, key: &Path) -> String {
    format!("[listen]\ntls_cert = {:?}\ntls_key = {:?}\n", cert.display().to_string(), key.display().to_string())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// === TLS ===

#[test]
fn a_missing_certificate_file_is_named() {
    let cert = common::test_cert();
    let missing = cert.dir.path().join("nope.crt");
    let run = check_text(&format!("{}{VALID}", tls_lines(&missing, &cert.key)), &[]);
    assert_problem(&run, "listen.tls_cert", "nope.crt");
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_named() {
    let cert = common::test_cert();
    let (_, other_key) = common::cert_pair(&[0x02]);
    let key = write(cert.dir.path(), "other.key", &other_key);
    let run = check_text(&format!("{}{VALID}", tls_lines(&cert.cert, &key)), &[]);
    assert_problem(&run, "listen.tls_key", "does not match");
}

#[test]
fn a_certificate_without_a_key_is_refused() {
    let cert = common::test_cert();
    let text = format!("[listen]\ntls_cert = {:?}\n{VALID}", cert.cert.display().to_string());
    assert_problem(&check_text(&text, &[]), "listen.tls_key", "listen.tls_cert");
    let text = format!("[listen]\ntls_key = {:?}\n{VALID}", cert.key.display().to_string());
    assert_problem(&check_text(&text, &[]), "listen.tls_cert", "listen.tls_key");
}

#[test]
fn an_expired_certificate_is_named_with_its_expiry_time() {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = write(dir.path(), "tls.crt", &params.self_signed(&key).unwrap().pem());
    let key = write(dir.path(), "tls.key", &key.serialize_pem());
    let run = check_text(&format!("{}{VALID}", tls_lines(&cert, &key)), &[]);
    assert_problem(&run, "listen.tls_cert", "expired at 2021-01-01T00:00:00Z");
}

#[test]
fn a_valid_tls_pair_passes() {
    let cert = common::test_cert();
    let run = check_text(&format!("{}{VALID}", tls_lines(&cert.cert, &cert.key)), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains(&format!("tls_cert = {:?}", cert.cert.display().to_string())), "{}", run.stdout);
}

// === values ===

#[test]
fn bad_upstream_urls_are_named() {
    let url = |u: &str| check_text(&format!("[upstream]\nurl = {u:?}\n"), &[]);
    assert_problem(&url("ws://bad host:1"), "upstream.url", "not a URL");
    assert_problem(&url("gopher://127.0.0.1:9000"), "upstream.url", "unsupported scheme");
    assert_problem(&url("ws://127.0.0.1:9000/chat"), "upstream.url", "path");
    assert_problem(&url("ws://127.0.0.1:9000/?a=1"), "upstream.url", "query");
    assert_problem(&url("ftp://127.0.0.1:9000"), "upstream.url", "ws://");
}

#[test]
fn upstream_tls_keys_are_checked() {
    let run = check_text("[upstream]\nurl = \"wss://127.0.0.1:9000\"\nca_file = \"/nonexistent/ca.crt\"\n", &[]);
    assert_problem(&run, "upstream.ca_file", "cannot read /nonexistent/ca.crt");
    let run = check_text("[upstream]\nurl = \"wss://127.0.0.1:9000\"\nclient_cert = \"/x.crt\"\n", &[]);
    assert_problem(&run, "upstream.client_key", "must be set together with upstream.client_cert");
    let run = check_text("[upstream]\nurl = \"ws://127.0.0.1:9000\"\nserver_name = \"app\"\n", &[]);
    assert_problem(&run, "upstream.server_name", "only used with a wss:// or https://");
    let cert = common::test_cert();
    let text =
        format!("[upstream]\nurl = \"https://localhost:9000\"\nca_file = {:?}\n", cert.cert.display().to_string());
    let run = check_text(&text, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn zero_limits_are_refused() {
    let run = check_text(&format!("[listen]\nmax_connections = 0\n{VALID}"), &[]);
    assert_problem(&run, "listen.max_connections", "at least 1");
    let run = check_text(&format!("{VALID}[limits]\nmax_message_size = 0\n"), &[]);
    assert_problem(&run, "limits.max_message_size", "above 0");
    let run = check_text(&format!("{VALID}[limits]\nmax_message_size = \"0KiB\"\n"), &[]);
    assert_problem(&run, "limits.max_message_size", "above 0");
}

#[test]
fn keepalive_timeouts_must_outlast_the_ping_interval() {
    let run = check_text(&format!("{VALID}[client_keepalive]\nping_interval = \"20s\"\ntimeout = \"20s\"\n"), &[]);
    assert_problem(&run, "client_keepalive.timeout", "ping_interval");
    let run = check_text(&format!("{VALID}[client_keepalive]\nping_interval = \"20s\"\ntimeout = \"5s\"\n"), &[]);
    assert_problem(&run, "client_keepalive.timeout", "ping_interval");
    let run = check_text(&format!("{VALID}[upstream_keepalive]\nping_interval = \"10s\"\ntimeout = \"10s\"\n"), &[]);
    assert_problem(&run, "upstream_keepalive.timeout", "ping_interval");
    let run = check_text(&format!("{VALID}[upstream_keepalive]\nping_interval = \"10s\"\ntimeout = \"9s\"\n"), &[]);
    assert_problem(&run, "upstream_keepalive.timeout", "ping_interval");
    // Longer passes.
    let run = check_text(&format!("{VALID}[upstream_keepalive]\nping_interval = \"10s\"\ntimeout = \"11s\"\n"), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

/// `wskeep check` on `text` under a known descriptor limit (soft and hard), so that the result
/// does not depend on the machine's.
fn check_under_limit(nofile: u64, text: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "wskeep.toml", text);
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" check --config \"$1\""))
        .arg(env!("CARGO_BIN_EXE_wskeep"))
        .arg(&path)
        .output()
        .unwrap()
        .into()
}

fn effective_limits(run: &Run) -> (i64, i64) {
    assert_eq!(run.code, 0, "{}", run.stderr);
    let effective: toml::Table = run.stdout.parse().expect("the effective configuration is TOML");
    let listen = &effective["listen"];
    (listen["max_connections"].as_integer().unwrap(), listen["max_handshakes"].as_integer().unwrap())
}

#[test]
fn max_connections_beyond_the_descriptor_limit_is_refused() {
    let run = check_under_limit(4096, &format!("[listen]\nmax_connections = 1000000\n{VALID}"));
    assert_problem(&run, "listen.max_connections", "file-descriptor");
}

#[test]
fn unset_limits_are_derived_from_the_descriptor_limit_and_check_says_how() {
    // 256 descriptors, 64 kept for wskeep: 192 / 8 = 24 handshake places, (192 - 24) / 2 = 84
    // proxied connections (two descriptors each).
    let run = check_under_limit(256, VALID);
    assert_eq!(effective_limits(&run), (84, 24));
    assert!(run.stderr.contains("note: listen.max_connections = 84: not set"), "{}", run.stderr);
    assert!(run.stderr.contains("hard limit 256"), "{}", run.stderr);
    assert!(!run.stderr.contains("warning"), "derived limits fit: {}", run.stderr);

    // Set, and too many for the limit: kept, with the warning.
    let run = check_under_limit(256, &format!("[listen]\nmax_connections = 150\n{VALID}"));
    assert_eq!(effective_limits(&run), (150, 24));
    assert!(run.stderr.contains("warning: listen.max_connections = 150"), "{}", run.stderr);
    assert!(run.stderr.contains("at most about 84"), "{}", run.stderr);

    // Set, and fitting: no warning, nothing derived but the handshake places.
    let run = check_under_limit(256, &format!("[listen]\nmax_connections = 80\n{VALID}"));
    assert_eq!(effective_limits(&run), (80, 24));
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
    assert!(!run.stderr.contains("note: listen.max_connections"), "{}", run.stderr);
}

#[test]
fn unknown_keys_and_sections_are_errors() {
    assert_problem(&check_text(&format!("{VALID}bogus = 1\n"), &[]), "upstream.bogus", "unknown key");
    assert_problem(&check_text(&format!("{VALID}[nope]\nx = 1\n"), &[]), "nope", "unknown section");
}

#[test]
fn bad_durations_sizes_and_levels_are_named() {
    let run = check_text("[upstream]\nurl = \"ws://127.0.0.1:9000\"\nconnect_timeout = \"5 parsecs\"\n", &[]);
    assert_problem(&run, "upstream.connect_timeout", "");
    let run = check_text(&format!("{VALID}[limits]\nmax_message_size = \"12 parsecs\"\n"), &[]);
    assert_problem(&run, "limits.max_message_size", "not a size");
    for level in ["loud", "warnig", "info=verbose", "[["] {
        let run = check_text(&format!("{VALID}[log]\nlevel = {level:?}\n"), &[]);
        assert_problem(&run, "log.level", "");
    }
    // Levels and filters that are valid pass.
    for level in ["debug", "WARN", "wskeep=debug,info", "off"] {
        let run = check_text(&format!("{VALID}[log]\nlevel = {level:?}\n"), &[]);
        assert_eq!(run.code, 0, "{level}: {}", run.stderr);
    }
}

#[test]
fn every_problem_in_a_file_is_listed() {
    let text = "[listen]\nmax_connections = 0\nbogus = true\n\
                [upstream]\nurl = \"gopher://orchestrator:443\"\nconnect_timeout = \"soon\"\n\
                [limits]\nmax_message_size = \"lots\"\n\
                [log]\nlevel = \"info=verbose\"\n\
                [extra]\nx = 1\n";
    let run = check_text(text, &[]);
    let keys = [
        "listen.max_connections",
        "listen.bogus",
        "upstream.url",
        "upstream.connect_timeout",
        "limits.max_message_size",
        "log.level",
        "extra",
    ];
    for key in keys {
        assert_problem(&run, key, "");
    }
    assert!(run.stderr.contains(&format!("({} problem(s))", keys.len())), "{}", run.stderr);
}

#[test]
fn a_missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let run = wskeep_check(&["--config", missing.to_str().unwrap()], &[]);
    assert_problem(&run, "--config", "absent.toml");
}

// === a valid file and the environment ===

#[test]
fn a_valid_file_prints_the_effective_configuration() {
    let run = check_text(&format!("{VALID}[client_keepalive]\nping_interval = \"15s\"\n"), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // What the file set, and the defaults for the rest, as TOML that reads back.
    let effective: toml::Table = run.stdout.parse().expect("the effective configuration is TOML");
    assert_eq!(effective["upstream"]["url"].as_str(), Some("ws://127.0.0.1:9000"));
    assert_eq!(effective["client_keepalive"]["ping_interval"].as_str(), Some("15s"));
    assert_eq!(effective["shutdown"]["drain_timeout"].as_str(), Some("25s"));
    assert_eq!(effective["limits"]["max_message_size"].as_str(), Some("1MiB"));
    // Derived from this machine's descriptor limit (see the test above), at most 10000.
    let derived = effective["listen"]["max_connections"].as_integer().unwrap();
    assert!((1..=10_000).contains(&derived), "{derived}");
    // And the printed configuration itself passes check.
    let again = check_text(&run.stdout, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout, run.stdout);
}

#[test]
fn environment_variables_override_the_file() {
    let env = [("WSKEEP_UPSTREAM__URL", "ws://127.0.0.1:9100"), ("WSKEEP_LIMITS__MAX_MESSAGE_SIZE", "4MiB")];
    let run = check_text(VALID, &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("url = \"ws://127.0.0.1:9100\""), "{}", run.stdout);
    assert!(run.stdout.contains("max_message_size = \"4MiB\""), "{}", run.stdout);
    // A bad value from the environment is named like one from the file.
    let run = check_text(VALID, &[("WSKEEP_UPSTREAM__URL", "gopher://127.0.0.1:9100")]);
    assert_problem(&run, "upstream.url", "unsupported scheme");
}

#[test]
fn variables_without_a_section_separator_are_ignored() {
    // Kubernetes injects these for a Service named wskeep; read as configuration they would be
    // unknown sections.
    let env = [("WSKEEP_PORT", "1234"), ("WSKEEP_SERVICE_HOST", "10.0.0.1")];
    let run = check_text(VALID, &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stdout.contains("1234"), "{}", run.stdout);
}

#[test]
fn an_unknown_key_from_the_environment_names_the_variable() {
    let run = check_text(VALID, &[("WSKEEP_UPSTREAM__URLL", "ws://127.0.0.1:9100")]);
    assert_problem(
        &run,
        "upstream.urll",
        "unknown key (set by WSKEEP_UPSTREAM__URLL); did you mean WSKEEP_UPSTREAM__URL?",
    );
    // A bad value names its variable too.
    let run = check_text(VALID, &[("WSKEEP_LISTEN__ADDR", "localhost:8443")]);
    assert_problem(&run, "listen.addr", "(set by WSKEEP_LISTEN__ADDR)");
}

#[test]
fn a_variable_with_one_underscore_is_warned_about() {
    let warning = "WSKEEP_UPSTREAM_URL is ignored: configuration variables separate the section and the key with \
                   two underscores (write WSKEEP_UPSTREAM__URL)";
    let env = [("WSKEEP_UPSTREAM_URL", "ws://127.0.0.1:9100"), ("WSKEEP_PORT", "tcp://10.0.0.1:8443")];
    let run = check_text(VALID, &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains(warning), "{}", run.stderr);
    assert!(!run.stderr.contains("WSKEEP_PORT"), "Kubernetes' variables are not warned about: {}", run.stderr);
    // Also when the configuration is refused: the misspelt variable may be why.
    let run = check_text("[upstream]\nurl = \"gopher://x:1\"\n", &env);
    assert_problem(&run, "upstream.url", "unsupported scheme");
    assert!(run.stderr.contains(warning), "{}", run.stderr);
}

#[test]
fn a_toml_syntax_error_names_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "wskeep.toml",
        "[upstream]\nurl = \"ws://127.0.0.1:9000\"\n[limits]\nmax_message_size = 1 MiB\n",
    );
    let run = wskeep_check(&["--config", path.to_str().unwrap()], &[]);
    assert_problem(&run, &format!("{}:4:22", path.display()), "TOML syntax error");
}

#[test]
fn messages_show_the_value_and_suggest_the_nearest_name() {
    let text = "[listen]\naddr = \"localhost:8443\"\nmax_conections = 5\n\
                [upstream]\nurl = \"gopher://orchestrator:70\"\n\
                [log]\nformat = \"xml\"\n[shutdwn]\ndrain_timeout = \"5s\"\n";
    let run = check_text(text, &[]);
    assert_problem(&run, "listen.addr", "\"localhost:8443\" is not a socket address");
    assert_problem(&run, "listen.max_conections", "did you mean listen.max_connections?");
    assert_problem(&run, "upstream.url", "unsupported scheme \"gopher\"");
    assert_problem(&run, "log.format", "\"xml\" is not a log format: use \"json\" or \"text\"");
    assert_problem(&run, "shutdwn", "did you mean [shutdown]?");
    assert!(!run.stderr.contains("``"), "{}", run.stderr);
}

#[test]
fn run_refuses_a_bad_configuration_with_the_same_list() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wskeep"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WSKEEP_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.arg("run").env("WSKEEP_UPSTREAM__URLL", "ws://127.0.0.1:9100").output().unwrap();
    let run: Run = out.into();
    assert_problem(&run, "upstream.urll", "WSKEEP_UPSTREAM__URLL");
}

#[test]
fn wskeep_config_names_the_file_when_config_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "from-env.toml", "[upstream]\nurl = \"ws://127.0.0.1:9200\"\n");
    let run = wskeep_check(&[], &[("WSKEEP_CONFIG", path.to_str().unwrap())]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("url = \"ws://127.0.0.1:9200\""), "{}", run.stdout);
    // --config wins over WSKEEP_CONFIG.
    let other = write(dir.path(), "flag.toml", "[upstream]\nurl = \"ws://127.0.0.1:9300\"\n");
    let run = wskeep_check(&["--config", other.to_str().unwrap()], &[("WSKEEP_CONFIG", path.to_str().unwrap())]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("url = \"ws://127.0.0.1:9300\""), "{}", run.stdout);
    // And a bad file named by WSKEEP_CONFIG fails like one named by --config.
    let bad = write(dir.path(), "bad.toml", "[upstream]\nurl = \"gopher://x:1\"\n");
    assert_problem(
        &wskeep_check(&[], &[("WSKEEP_CONFIG", bad.to_str().unwrap())]),
        "upstream.url",
        "unsupported scheme",
    );
}

#[test]
fn the_shipped_example_passes_check() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/wskeep.toml");
    let run = wskeep_check(&["--config", example.to_str().unwrap()], &[]);
    assert_eq!(run.code, 0, "config/wskeep.toml must pass check:\n{}", run.stderr);
    assert!(run.stderr.contains("configuration OK"), "{}", run.stderr);
}

#[test]
fn a_drain_token_file_must_be_readable_and_long_enough() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-token");
    let admin = |path: &Path| format!("[admin]\ndrain_token_file = {:?}\n{VALID}", path.display().to_string());
    assert_problem(&check_text(&admin(&missing), &[]), "admin.drain_token_file", "no-token");
    let short = write(dir.path(), "short-token", "secret\n");
    assert_problem(&check_text(&admin(&short), &[]), "admin.drain_token_file", "at least 16 characters");
    let good = write(dir.path(), "token", "3f9a0c5e8b7d41f2a6c0e9b8d7f6a5c4\n");
    let run = check_text(&admin(&good), &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // The path is shown, never the token.
    assert!(run.stdout.contains("drain_token_file") && !run.stdout.contains("3f9a0c5e"), "{}", run.stdout);
}
