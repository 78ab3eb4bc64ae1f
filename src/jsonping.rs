//! Answers the client's JSON application pings (`{"type":"ping"}`) on wskeep's behalf.
//!
//! Most messages are not pings, so the check is staged: a byte test (first non-blank byte is
//! `{`), a size cap and a substring search for every match key, all without allocating; only a
//! message that passes them is parsed.

use memchr::memmem::Finder;
use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::JsonPing;

/// Messages longer than this are never taken for pings: a ping is a few dozen bytes, and parsing
/// a large message on the relay path would cost what the matcher promises not to.
pub const MAX_PING_LEN: usize = 16 * 1024;

pub struct JsonPingMatcher {
    fields: Map<String, Value>,
    /// One finder per match key, searching for `"key"` in the raw text.
    key_finders: Vec<Finder<'static>>,
    /// The reply's own fields, serialised once: (key, `"key":value`).
    reply: Vec<(String, String)>,
    /// Fields copied from the ping, each with its key serialised once: (name, `"name":`).
    echo_fields: Vec<(String, String)>,
    pub forward: bool,
}

impl JsonPingMatcher {
    /// `None` when JSON ping answering is disabled.
    pub fn new(config: &JsonPing) -> Option<JsonPingMatcher> {
        if !config.enabled || config.match_fields.is_empty() {
            return None;
        }
        let key_finders =
            config.match_fields.keys().map(|k| Finder::new(json_string(k).as_bytes()).into_owned()).collect();
        let reply = config.reply.iter().map(|(k, v)| (k.clone(), format!("{}:{v}", json_string(k)))).collect();
        let mut echo_fields: Vec<(String, String)> = Vec::new();
        for field in &config.echo_fields {
            if !echo_fields.iter().any(|(f, _)| f == field) {
                echo_fields.push((field.clone(), format!("{}:", json_string(field))));
            }
        }
        Some(JsonPingMatcher {
            fields: config.match_fields.clone(),
            key_finders,
            reply,
            echo_fields,
            forward: config.forward,
        })
    }

    /// The reply to send when `text` is a JSON ping, else `None`.
    pub fn answer(&self, text: &str) -> Option<String> {
        let bytes = text.as_bytes();
        if bytes.len() > MAX_PING_LEN || bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        if !self.key_finders.iter().all(|f| f.find(bytes).is_some()) {
            return None;
        }
        // Field values stay as written, so an echoed `ts` or `id` comes back byte for byte (a
        // number beyond 64 bits would otherwise come back rounded).
        let ping: HashMap<String, &RawValue> = serde_json::from_str(text).ok()?;
        let matches = |(k, v): (&String, &Value)| {
            ping.get(k).and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok()).as_ref() == Some(v)
        };
        if !self.fields.iter().all(matches) {
            return None;
        }
        let echoed: Vec<(&String, &String, &RawValue)> =
            self.echo_fields.iter().filter_map(|(f, key)| ping.get(f).map(|raw| (f, key, *raw))).collect();
        let mut out = String::with_capacity(64);
        out.push('{');
        // Echoed fields take precedence over reply fields of the same name.
        for (key, pair) in &self.reply {
            if !echoed.iter().any(|(f, _, _)| *f == key) {
                out.push_str(pair);
                out.push(',');
            }
        }
        for (_, key, raw) in echoed {
            out.push_str(key);
            out.push_str(raw.get());
            out.push(',');
        }
        if out.ends_with(',') {
            out.pop();
        }
        out.push('}');
        Some(out)
    }
}

fn json_string(s: &str) -> String {
    // Serialising a string cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn matcher(forward: bool) -> JsonPingMatcher {
        let mut config = Config::default().json_ping;
        config.forward = forward;
        JsonPingMatcher::new(&config).unwrap()
    }

    #[test]
    fn matches_regardless_of_order_whitespace_and_extra_fields() {
        let m = matcher(false);
        assert_eq!(m.answer(r#"{"type":"ping"}"#).as_deref(), Some(r#"{"type":"pong"}"#));
        assert!(m.answer(" \n{ \"seq\": 3,\n  \"type\" :  \"ping\" } ").is_some());
        assert!(m.answer(r#"{"a":[1,2],"type":"ping","b":{"c":null}}"#).is_some());
    }

    #[test]
    fn echoes_configured_fields_when_present() {
        let m = matcher(false);
        let reply: Value =
            serde_json::from_str(&m.answer(r#"{"type":"ping","id":"x7","ts":1700,"other":1}"#).unwrap()).unwrap();
        assert_eq!(reply, serde_json::json!({"type":"pong","id":"x7","ts":1700}));
        let reply: Value = serde_json::from_str(&m.answer(r#"{"type":"ping","ts":5}"#).unwrap()).unwrap();
        assert_eq!(reply, serde_json::json!({"type":"pong","ts":5}));
    }

    #[test]
    fn ignores_everything_that_is_not_a_matching_object() {
        let m = matcher(false);
        for text in [
            r#"{"type":"pong"}"#,
            r#"{"type":"PING"}"#,
            r#"{"kind":"ping"}"#,
            r#"["type","ping"]"#,
            r#""{\"type\":\"ping\"}""#,
            r#"{"type":"ping""#,
            r#"{"type":"ping"} trailing"#,
            r#"{"type":["ping"]}"#,
            "ping",
            "",
            "   ",
        ] {
            assert_eq!(m.answer(text), None, "{text:?}");
        }
    }

    #[test]
    fn echoed_values_come_back_as_written() {
        let m = matcher(false);
        let ts = "17600000000000000000000000000000000000018088332603364649575";
        let reply = m.answer(&format!(r#"{{"type":"ping","ts":{ts},"id":"a\u00e9"}}"#)).unwrap();
        assert!(reply.contains(&format!(r#""ts":{ts}"#)), "{reply}");
        assert!(reply.contains(r#""id":"a\u00e9""#), "{reply}");
    }

    #[test]
    fn numbers_beyond_f64_are_valid_json_and_echo_as_written() {
        // Found by the fuzzer: `serde_json::Value` refuses `1e99999` ("number out of range"),
        // but RFC 8259 allows it; the ping is answered and the number comes back untouched.
        let m = matcher(false);
        let reply = m.answer(r#"{"type":"ping","ts":1e99999,"other":[-1e-99999]}"#).unwrap();
        assert!(reply.contains(r#""ts":1e99999"#), "{reply}");
        assert_eq!(m.answer(r#"{"type":"ping","ts":1e99999"#), None, "still not JSON");
    }

    #[test]
    fn huge_messages_are_not_parsed() {
        let m = matcher(false);
        let padding = "x".repeat(MAX_PING_LEN);
        assert_eq!(m.answer(&format!(r#"{{"type":"ping","pad":"{padding}"}}"#)), None);
        let just_fits = "x".repeat(MAX_PING_LEN - 40);
        assert!(m.answer(&format!(r#"{{"type":"ping","pad":"{just_fits}"}}"#)).is_some());
    }

    #[test]
    fn forward_flag_and_disabled_matcher() {
        assert!(matcher(true).forward);
        assert!(!matcher(false).forward);
        let mut config = Config::default().json_ping;
        config.enabled = false;
        assert!(JsonPingMatcher::new(&config).is_none());
    }

    #[test]
    fn non_string_match_values_compare_as_json() {
        let mut config = Config::default().json_ping;
        config.match_fields = serde_json::from_str(r#"{"op":1,"ping":true}"#).unwrap();
        let m = JsonPingMatcher::new(&config).unwrap();
        assert!(m.answer(r#"{"ping":true,"op":1}"#).is_some());
        assert!(m.answer(r#"{"ping":"true","op":1}"#).is_none());
    }
}
