// figment's Jail API returns its own (large) error type; boxing it is not ours to change.
#![allow(clippy::result_large_err)]

use super::*;

fn problems(text: &str) -> Vec<String> {
    match Config::from_toml(text) {
        Ok(_) => Vec::new(),
        Err(ConfigError(p)) => p.into_iter().map(|p| p.key).collect(),
    }
}

#[test]
fn defaults_are_valid() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.upstream.authority, "127.0.0.1:8080");
    assert_eq!(config.limits.max_message_size, ByteSize(1 << 20));
    assert_eq!(config.client_keepalive.ping_interval, Duration::from_secs(20));
}

#[test]
fn the_shipped_example_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/wskeep.toml")).unwrap();
    Config::from_toml(&text).unwrap();
}

#[test]
fn every_problem_is_listed_with_its_key() {
    let keys = problems(
        r#"
        bogus = 1
        [listen]
        addr = "nowhere"
        handshake_timeout = "soon"
        colour = "blue"
        [upstream]
        url = "ftp://example.com"
        [client_keepalive]
        ping_interval = "30s"
        timeout = "10s"
        [limits]
        max_message_size = "lots"
        [log]
        format = "xml"
        "#,
    );
    for key in [
        "bogus",
        "listen.addr",
        "listen.handshake_timeout",
        "listen.colour",
        "upstream.url",
        "client_keepalive.timeout",
        "limits.max_message_size",
        "log.format",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
}

#[test]
fn cross_field_rules() {
    assert_eq!(problems("[listen]\nmax_connections = 0"), ["listen.max_connections"]);
    assert_eq!(problems("[limits]\nmax_message_size = 0"), ["limits.max_message_size"]);
    assert_eq!(
        problems("[upstream_keepalive]\nping_interval = \"5s\"\ntimeout = \"5s\""),
        ["upstream_keepalive.timeout"]
    );
    assert_eq!(problems("[listen]\ntls_cert = \"/nonexistent.crt\""), ["listen.tls_key"]);
    assert_eq!(problems("[upstream]\nurl = \"ws://host:1/path\""), ["upstream.url"]);
    assert_eq!(problems("[log]\nlevel = \"[[\""), ["log.level"]);
    // A zero timeout switches the check off.
    assert!(problems("[client_keepalive]\nping_interval = \"5s\"\ntimeout = \"0s\"").is_empty());
}

#[test]
fn environment_overrides_only_sectioned_variables() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("wskeep.toml", "[upstream]\nurl = \"ws://127.0.0.1:1000\"\n")?;
        jail.set_env("WSKEEP_UPSTREAM__URL", "ws://127.0.0.1:2000");
        jail.set_env("WSKEEP_LISTEN__MAX_CONNECTIONS", "77");
        jail.set_env("WSKEEP_PORT", "tcp://10.0.0.1:8443");
        jail.set_env("WSKEEP_CONFIG", "ignored.toml");
        let config = Config::load(Some(Path::new("wskeep.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(config.upstream.authority, "127.0.0.1:2000");
        assert_eq!(config.listen.max_connections, 77);
        Ok(())
    });
}

#[test]
fn a_bad_environment_value_names_its_key() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("WSKEEP_CLIENT_KEEPALIVE__TIMEOUT", "forever");
        let err = Config::load(None).unwrap_err();
        assert_eq!(err.0[0].key, "client_keepalive.timeout");
        Ok(())
    });
}

/// The problem lines as `check` prints them.
fn messages(text: &str) -> Vec<String> {
    match Config::from_toml(text) {
        Ok(_) => Vec::new(),
        Err(ConfigError(p)) => p.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn every_declared_key_is_read_and_printed() {
    // A value no key accepts, for every declared key: each must be reported at its own path.
    let mut text = String::new();
    for (section, keys) in KEYS {
        text.push_str(&format!("[{section}]\n"));
        for key in *keys {
            text.push_str(&format!("{key} = [1]\n"));
        }
    }
    let keys = problems(&text);
    for (section, declared) in KEYS {
        for key in *declared {
            let path = format!("{section}.{key}");
            assert!(keys.contains(&path), "{path} is not read: {keys:?}");
        }
    }
    // And every key with a value is printed, in a form that reads back the same (the optional
    // files, unset by default, are not).
    let printed = Config::default().to_toml();
    let table: toml::Table = printed.parse().unwrap();
    for (section, declared) in KEYS {
        // Files are unset by default, and an unset option is left out.
        let unset = ["drain_token_file", "ca_file", "client_cert", "client_key"];
        for key in declared.iter().filter(|k| !k.starts_with("tls_") && !unset.contains(k)) {
            assert!(table[*section].get(*key).is_some(), "{section}.{key} missing from\n{printed}");
        }
    }
    assert_eq!(Config::from_toml(&printed).unwrap().to_toml(), printed);
}

#[test]
fn problems_show_the_offending_value() {
    let m = messages("[listen]\naddr = \"localhost:8443\"\nmax_connections = -3\n[upstream]\nconnect_timeout = 5");
    assert!(m.iter().any(|l| l.starts_with("listen.addr: \"localhost:8443\" is not a socket address")), "{m:?}");
    assert!(m.iter().any(|l| l.starts_with("listen.max_connections: -3 is not a whole number")), "{m:?}");
    assert!(m.iter().any(|l| l.starts_with("upstream.connect_timeout: 5 is not a duration")), "{m:?}");
    let m = messages("[log]\nformat = \"xml\"\n[json_ping]\nmatch = \"ping\"");
    assert!(m.iter().any(|l| l.contains("\"xml\" is not a log format: use \"json\" or \"text\"")), "{m:?}");
    assert!(m.iter().any(|l| l.contains("\"ping\" is not a table")), "{m:?}");
    // No message quotes a value twice over (figment's own wording did: ``json` or `text``).
    assert!(m.iter().all(|l| !l.contains("``")), "{m:?}");
}

#[test]
fn unsupported_schemes_are_named() {
    for (url, words) in [
        ("gopher://127.0.0.1:70", "unsupported scheme \"gopher\""),
        ("ftp://127.0.0.1:21", "unsupported scheme \"ftp\""),
        ("127.0.0.1:8080", "has no scheme"),
    ] {
        let m = messages(&format!("[upstream]\nurl = {url:?}"));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with(&format!("upstream.url: {url:?}")) && m[0].contains(words), "{m:?}");
    }
}

#[test]
fn typos_get_the_nearest_key_or_section() {
    let m = messages(
        "[listen]\nadr = \"x\"\nurl = \"ws://x:1\"\ncolour = 1\n[lgo]\nlevel = \"info\"\n[upstream]\ntimout = \"1s\"",
    );
    let line = |key: &str| m.iter().find(|l| l.starts_with(&format!("{key}:"))).cloned().unwrap_or_default();
    assert_eq!(line("listen.adr"), "listen.adr: unknown key; did you mean listen.addr?");
    // A key that belongs to another section.
    assert_eq!(line("listen.url"), "listen.url: unknown key; did you mean upstream.url?");
    assert_eq!(line("listen.colour"), "listen.colour: unknown key");
    assert_eq!(line("lgo"), "lgo: unknown section; did you mean [log]?");
    assert!(line("upstream.timout").contains("did you mean"), "{m:?}");
    // A key written outside any section.
    assert_eq!(
        messages("max_connections = 5"),
        ["max_connections: unknown section; did you mean listen.max_connections?"]
    );
}

#[test]
fn a_syntax_error_names_the_line_and_column() {
    // The column is where the parser stopped: at the unit after the number (toml says the same).
    let text = "[listen]\naddr = \"0.0.0.0:1\"\nhandshake_timeout = 10s\n";
    assert_eq!(problems(text), ["<toml>:3:23"]);
    assert!(text.parse::<toml::Table>().unwrap_err().to_string().contains("line 3, column 23"));
    let m = messages("[listen]\naddr = \"unterminated\n");
    assert!(m[0].starts_with("<toml>:2:21: TOML syntax error: "), "{m:?}");
}

#[test]
fn a_syntax_error_in_a_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wskeep.toml");
    std::fs::write(&path, "[upstream]\nurl = ws://127.0.0.1:9000\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].key, format!("{}:2:7", path.display()));
}

#[test]
fn an_unknown_key_from_the_environment_names_the_variable() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("WSKEEP_UPSTREAM__URLL", "ws://127.0.0.1:2000");
        jail.set_env("WSKEEP_LISTEN__ADDR", "localhost:8443");
        let err = Config::load(None).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(|p| p.to_string()).collect();
        assert!(
            lines.contains(
                &"upstream.urll: unknown key (set by WSKEEP_UPSTREAM__URLL); did you mean WSKEEP_UPSTREAM__URL?"
                    .to_string()
            ),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("listen.addr: \"localhost:8443\" is not a socket address")
                && l.ends_with("(set by WSKEEP_LISTEN__ADDR)")),
            "{lines:?}"
        );
        Ok(())
    });
}

#[test]
fn a_json_ping_table_json_cannot_carry_is_refused() {
    // nan would become JSON null, which `check` could not print back (it used to panic there).
    assert_eq!(problems("[json_ping]\nmatch = { type = \"ping\", x = nan }"), ["json_ping.match"]);
    assert_eq!(problems("[json_ping]\nreply = { t = [inf] }"), ["json_ping.reply"]);
}

#[test]
fn proxy_protocol_needs_trusted_proxies_and_ranges_are_checked() {
    let m = messages("[listen]\nproxy_protocol = \"v2\"");
    assert!(m.iter().any(|l| l.starts_with("listen.trusted_proxies: must list")), "{m:?}");
    let m = messages("[listen]\nproxy_protocol = \"on\"\ntrusted_proxies = [\"10.0.0.1/8\", 5]");
    assert!(m.iter().any(|l| l.starts_with("listen.proxy_protocol: \"on\" is not a PROXY protocol setting")), "{m:?}");
    assert!(m.iter().any(|l| l.contains("\"10.0.0.1/8\" has host bits set")), "{m:?}");
    let config =
        Config::from_toml("[listen]\nproxy_protocol = \"any\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]").unwrap();
    assert_eq!(config.listen.proxy_protocol, ProxyProtocol::Any);
    assert!(
        config.to_toml().contains("trusted_proxies = [\n    \"10.0.0.0/8\",\n    \"::1/128\",\n]"),
        "{}",
        config.to_toml()
    );
}

#[test]
fn a_unix_socket_upstream_and_its_host() {
    let config = Config::from_toml("[upstream]\nurl = \"unix:/run/orchestrator.sock\"").unwrap();
    assert_eq!(config.upstream.unix_path.as_deref(), Some(Path::new("/run/orchestrator.sock")));
    assert_eq!(config.upstream.host, "localhost");
    let config = Config::from_toml("[upstream]\nurl = \"unix:///run/orchestrator.sock\"").unwrap();
    assert_eq!(config.upstream.unix_path.as_deref(), Some(Path::new("/run/orchestrator.sock")));
    let config = Config::from_toml("[upstream]\nurl = \"ws://[::1]:9000\"\nhost_header = \"app.internal\"").unwrap();
    assert_eq!((config.upstream.authority.as_str(), config.upstream.host.as_str()), ("[::1]:9000", "app.internal"));
    let m = messages("[upstream]\nurl = \"unix:run/orchestrator.sock\"\nhost_header = \"a b\"");
    assert!(
        m.iter().any(|l| l.starts_with("upstream.url: \"unix:run/orchestrator.sock\": a Unix socket is written")),
        "{m:?}"
    );
    assert!(m.iter().any(|l| l.starts_with("upstream.host_header: \"a b\" is not a host[:port]")), "{m:?}");
}

#[test]
fn the_probe_path_is_off_or_a_plain_path() {
    assert_eq!(Config::from_toml("").unwrap().listen.probe_path, "", "off by default");
    assert!(problems("[listen]\nprobe_path = \"/wskeep/probe\"").is_empty());
    for bad in ["wskeep", "/", "/probe/", "/probe?x=1", "/a\\\"b", "/<script>", "/a b"] {
        let text = format!("[listen]\nprobe_path = \"{bad}\"");
        assert_eq!(problems(&text), ["listen.probe_path"], "{bad}");
    }
}

#[test]
fn http2_streams_per_connection_are_bounded() {
    for bad in ["0", "1001"] {
        assert_eq!(problems(&format!("[listen]\nhttp2_max_streams = {bad}\n")), ["listen.http2_max_streams"]);
    }
    assert!(problems("[listen]\nhttp2 = false\nhttp2_max_streams = 1000\n").is_empty());
    let config = Config::from_toml("").unwrap();
    assert!(config.listen.http2, "HTTP/2 is on by default");
    assert_eq!(config.listen.http2_max_streams, 100);
}
