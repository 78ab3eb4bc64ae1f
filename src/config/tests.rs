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
        url = "wss://example.com"
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
