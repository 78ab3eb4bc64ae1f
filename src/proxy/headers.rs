//! Header forwarding shared by the WebSocket and HTTP paths: hop-by-hop headers are dropped
//! (RFC 9110 §7.6.1), `X-Forwarded-*` are set as nginx's `$proxy_add_x_forwarded_for` does, and
//! the WebSocket handshake headers are checked here so the rules live in one place.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Version};

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Handshake headers wskeep sets itself on each leg.
const WEBSOCKET_PER_LEG: &[&str] =
    &["sec-websocket-key", "sec-websocket-accept", "sec-websocket-version", "sec-websocket-extensions"];

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the request asks for a WebSocket (even a malformed ask, which then gets a 400).
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
}

/// Why an upgrade request is refused before the upstream is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadUpgrade {
    pub status: StatusCode,
    pub reason: &'static str,
}

/// Checks an upgrade request against RFC 6455 §4.2.1; returns the client's key.
pub fn validate_upgrade<'a>(method: &Method, version: Version, headers: &'a HeaderMap) -> Result<&'a str, BadUpgrade> {
    let bad = |reason| Err(BadUpgrade { status: StatusCode::BAD_REQUEST, reason });
    if method != Method::GET {
        return bad("a WebSocket upgrade must be a GET request\n");
    }
    if version < Version::HTTP_11 {
        return bad("a WebSocket upgrade needs HTTP/1.1\n");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return bad("Connection: Upgrade is missing\n");
    }
    let versions: Vec<_> = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter().collect();
    if versions.len() != 1 || versions[0] != "13" {
        return Err(BadUpgrade {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "unsupported Sec-WebSocket-Version (13 is supported)\n",
        });
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return bad("exactly one Sec-WebSocket-Key is required\n");
    };
    let key =
        key.to_str().map_err(|_| BadUpgrade { status: StatusCode::BAD_REQUEST, reason: "bad Sec-WebSocket-Key\n" })?;
    // A base64-encoded 16-byte nonce is 24 characters ending in "==".
    let valid = key.len() == 24
        && key.ends_with("==")
        && key[..22].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if !valid {
        return bad("Sec-WebSocket-Key is not a base64 16-byte nonce\n");
    }
    Ok(key)
}

/// The offered subprotocols, in order.
pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Names listed in `Connection`, which are hop-by-hop for this message too.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || listed.iter().any(|t| t == name.as_str())
}

/// Copies the end-to-end request headers and adds the `X-Forwarded-*` set.
///
/// `peer_trusted`: the peer is in `listen.trusted_proxies`, so the `X-Forwarded-For` it sent is
/// kept and extended; anyone else's is replaced by the peer's address alone (one hop of trust,
/// decided by the peer's own address, as nginx's `set_real_ip_from` without recursion).
pub fn forward_request(
    src: &HeaderMap,
    peer: IpAddr,
    peer_trusted: bool,
    tls: bool,
    upstream_authority: &str,
    websocket: bool,
) -> HeaderMap {
    let listed = connection_tokens(src);
    let mut out = HeaderMap::with_capacity(src.len() + 4);
    for (name, value) in src {
        if is_hop_by_hop(name, &listed)
            || name == header::HOST
            || name.as_str() == "x-forwarded-for"
            || (!peer_trusted && name == header::FORWARDED)
            || (websocket && WEBSOCKET_PER_LEG.contains(&name.as_str()))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    let prior = told_by(src, "x-forwarded-for", peer_trusted);
    let xff = if prior.is_empty() { peer.to_string() } else { format!("{}, {peer}", prior.join(", ")) };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert("x-forwarded-for", v);
    }
    out.insert("x-forwarded-proto", HeaderValue::from_static(if tls { "https" } else { "http" }));
    if let Some(host) = src.get(header::HOST) {
        out.insert("x-forwarded-host", host.clone());
    }
    if let Ok(v) = HeaderValue::from_str(upstream_authority) {
        out.insert(header::HOST, v);
    }
    out
}

/// The values of `name` the peer sent, when it is trusted to tell; none otherwise.
fn told_by<'a>(src: &'a HeaderMap, name: &str, peer_trusted: bool) -> Vec<&'a str> {
    if !peer_trusted {
        return Vec::new();
    }
    src.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect()
}

/// Drops hop-by-hop headers from a response (and the per-leg handshake headers of a 101).
pub fn strip_response(headers: &mut HeaderMap, websocket: bool) {
    let listed = connection_tokens(headers);
    let names: Vec<HeaderName> = headers.keys().cloned().collect();
    for name in names {
        if is_hop_by_hop(&name, &listed) || (websocket && WEBSOCKET_PER_LEG.contains(&name.as_str())) {
            headers.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    #[test]
    fn accepts_a_well_formed_upgrade() {
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", KEY),
        ]);
        assert_eq!(validate_upgrade(&Method::GET, Version::HTTP_11, &h), Ok(KEY));
    }

    #[test]
    fn refuses_bad_upgrades_with_the_right_status() {
        let base = [
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", KEY),
        ];
        let check = |pairs: &[(&str, &str)], method: Method| {
            validate_upgrade(&method, Version::HTTP_11, &map(pairs)).map(|_| ()).map_err(|e| e.status)
        };
        assert_eq!(check(&base, Method::POST), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(&base[1..], Method::GET), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            check(&[base[0], base[1], ("sec-websocket-version", "8"), base[3]], Method::GET),
            Err(StatusCode::UPGRADE_REQUIRED)
        );
        assert_eq!(check(&base[..3], Method::GET), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            check(&[base[0], base[1], base[2], ("sec-websocket-key", "short")], Method::GET),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(check(&[base[0], base[1], base[2], base[3], base[3]], Method::GET), Err(StatusCode::BAD_REQUEST));
        let h = map(&base);
        assert!(validate_upgrade(&Method::GET, Version::HTTP_10, &h).is_err());
    }

    #[test]
    fn forwards_end_to_end_headers_and_appends_the_peer() {
        let src = map(&[
            ("host", "app.example"),
            ("cookie", "a=1"),
            ("authorization", "Bearer t"),
            ("connection", "Upgrade, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "10.0.0.1"),
            ("sec-websocket-key", KEY),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-protocol", "v2, v1"),
        ]);
        let out = forward_request(&src, "127.0.0.9".parse().unwrap(), true, true, "127.0.0.1:8080", true);
        assert_eq!(out["cookie"], "a=1");
        assert_eq!(out["authorization"], "Bearer t");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "app.example");
        assert_eq!(out["host"], "127.0.0.1:8080");
        assert_eq!(out["sec-websocket-protocol"], "v2, v1");
        for gone in ["connection", "x-secret-hop", "keep-alive", "sec-websocket-key", "sec-websocket-extensions"] {
            assert!(!out.contains_key(gone), "{gone} must not be forwarded");
        }
        assert_eq!(offered_protocols(&src), vec!["v2", "v1"]);
    }

    #[test]
    fn an_untrusted_peer_cannot_speak_for_others() {
        let src =
            map(&[("host", "app.example"), ("x-forwarded-for", "6.6.6.6, 7.7.7.7"), ("forwarded", "for=6.6.6.6")]);
        let out = forward_request(&src, "192.0.2.9".parse().unwrap(), false, false, "127.0.0.1:8080", false);
        assert_eq!(out.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["192.0.2.9"]);
        assert!(!out.contains_key("forwarded"), "an untrusted peer's Forwarded is dropped");
        let out = forward_request(&src, "10.0.0.2".parse().unwrap(), true, false, "127.0.0.1:8080", false);
        assert_eq!(out["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 10.0.0.2");
        assert_eq!(out["forwarded"], "for=6.6.6.6");
    }
}
