//! The configuration parser on arbitrary UTF-8: it never panics, and an accepted configuration
//! printed as `wskeep check` prints it reads back to the same configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wskeep::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Paths are read by the validation (TLS files): keep the fuzzer away from the file system.
    if text.contains("tls_") {
        return;
    }
    let Ok(config) = Config::from_toml(text) else { return };
    let printed = config.to_toml();
    let again =
        Config::from_toml(&printed).unwrap_or_else(|e| panic!("the printed configuration is refused: {e}\n{printed}"));
    assert_eq!(again.to_toml(), printed);
});
