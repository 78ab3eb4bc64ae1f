use super::*;

#[test]
fn defaults_are_valid() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.upstream.authority, "127.0.0.1:8080");
    assert_eq!(config.limits.max_message_size, ByteSize(1 << 20));
}
