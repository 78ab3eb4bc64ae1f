//! The JSON ping matcher on arbitrary text: it never panics; when it answers, the text is a JSON
//! object holding every match field and the reply is the configured object plus the echoed
//! fields; and (no false negatives) a small object that holds them, written without escapes, is
//! always answered. Valid JSON that `Value` cannot hold (a number like `1e99999` is "out of
//! range" for f64) may be answered: RFC 8259 allows it, and the matcher never reads such a value.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use wskeep::config::{Config, JsonPing};
use wskeep::jsonping::{JsonPingMatcher, MAX_PING_LEN};

fn matchers() -> &'static [(JsonPing, JsonPingMatcher)] {
    static MATCHERS: OnceLock<Vec<(JsonPing, JsonPingMatcher)>> = OnceLock::new();
    MATCHERS.get_or_init(|| {
        let default = Config::default().json_ping;
        let mut custom = default.clone();
        custom.match_fields = serde_json::from_str(r#"{"op":1,"ping":true,"k\"ey":"v\u00e9"}"#).unwrap();
        custom.reply = serde_json::from_str(r#"{"op":2,"nested":{"a":[1,null]}}"#).unwrap();
        custom.echo_fields = vec!["id".into(), "op".into()];
        [default, custom]
            .into_iter()
            .map(|c| {
                let m = JsonPingMatcher::new(&c).unwrap();
                (c, m)
            })
            .collect()
    })
}

fn holds(object: &Map<String, Value>, fields: &Map<String, Value>) -> bool {
    fields.iter().all(|(k, v)| object.get(k) == Some(v))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = serde_json::from_str::<Value>(text).ok();
    for (config, matcher) in matchers() {
        let answer = matcher.answer(text);
        let matching = match &parsed {
            Some(Value::Object(o)) if holds(o, &config.match_fields) => Some(o),
            _ => None,
        };
        match (&answer, matching) {
            (Some(reply), Some(ping)) => {
                let Ok(Value::Object(reply)) = serde_json::from_str::<Value>(reply) else {
                    panic!("the reply is not a JSON object: {reply:?}")
                };
                let mut expected = config.reply.clone();
                for field in &config.echo_fields {
                    if let Some(v) = ping.get(field) {
                        expected.insert(field.clone(), v.clone());
                    }
                }
                assert_eq!(reply, expected);
            }
            (Some(reply), None) => {
                // Grammatically valid JSON beyond `Value`'s numbers: the oracle cannot judge the
                // fields, only that both texts are JSON.
                let beyond_value = parsed.is_none() && serde_json::from_str::<Box<RawValue>>(text).is_ok();
                assert!(beyond_value, "answered {reply:?} to a text that is not a matching object");
                assert!(serde_json::from_str::<Box<RawValue>>(reply).is_ok(), "the reply is not JSON: {reply:?}");
            }
            (None, Some(_)) => {
                // Large messages are never parsed, and the pre-filter looks for each key as
                // written: a key spelt with escapes (`"\u0074ype"`) is not recognised.
                assert!(text.len() > MAX_PING_LEN || text.contains('\\'), "a matching ping was not answered");
            }
            (None, None) => {}
        }
    }
});
