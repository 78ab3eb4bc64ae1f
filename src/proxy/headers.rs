//! Header forwarding shared by the WebSocket and HTTP paths: hop-by-hop headers are dropped
//! (RFC 9110 §7.6.1), `X-Forwarded-*` are set as nginx's `$proxy_add_x_forwarded_for` does,
//! `Forwarded` (RFC 7239) is appended to the same way and `X-Real-IP` is wskeep's own; the
//! request rules (RFC 9112 §3.2, `CONNECT`) and both sides of the WebSocket handshake are checked
//! here so the rules live in one place.

use std::fmt::Write as _;
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

/// Why a request is refused before the upstream is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadUpgrade {
    pub status: StatusCode,
    pub reason: &'static str,
}

/// The rules every request must pass, upgrade or not: `CONNECT` is not proxied (405: wskeep is
/// not a tunnel), and an HTTP/1.1 request carries exactly one valid `Host` (RFC 9112 §3.2: 400).
pub fn check_request(method: &Method, version: Version, headers: &HeaderMap) -> Result<(), BadUpgrade> {
    if method == Method::CONNECT {
        return Err(BadUpgrade { status: StatusCode::METHOD_NOT_ALLOWED, reason: "CONNECT is not supported\n" });
    }
    let bad = |reason| Err(BadUpgrade { status: StatusCode::BAD_REQUEST, reason });
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => bad("an HTTP/1.1 request needs a Host header\n"),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => bad("more than one Host header\n"),
        (Some(host), None) if !valid_host(host.as_bytes()) => bad("the Host header is not a host[:port]\n"),
        (Some(_), None) => Ok(()),
    }
}

/// `uri-host [ ":" port ]`, or empty (RFC 9112 §3.2); no user information.
fn valid_host(host: &[u8]) -> bool {
    host.is_empty() || !host.contains(&b'@') && http::uri::Authority::try_from(host).is_ok()
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
    // The bytes after the head are the WebSocket stream: a body there would be read by an
    // upstream that honours the announced length as the first bytes of it.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return bad("a WebSocket upgrade must not have a body (Transfer-Encoding)\n");
    }
    let empty = |v: &HeaderValue| v.to_str().is_ok_and(|v| v.trim().parse::<u64>() == Ok(0));
    if !headers.get_all(header::CONTENT_LENGTH).iter().all(empty) {
        return bad("a WebSocket upgrade must not have a body (Content-Length)\n");
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

/// Checks the upstream's 101 against RFC 6455 §4.1 (the client's side of the handshake):
/// `Upgrade: websocket`, `Connection: upgrade`, the accept key for `key` and a subprotocol only if
/// it is one of `offered` (its extension is `deflate::agreed`'s to check).
pub fn check_upgrade_response(headers: &HeaderMap, key: &str, offered: &[String]) -> Result<(), &'static str> {
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err("the upstream's 101 has no Upgrade: websocket");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the upstream's 101 has no Connection: upgrade");
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut accepts = headers.get_all(header::SEC_WEBSOCKET_ACCEPT).iter();
    if !matches!((accepts.next(), accepts.next()), (Some(v), None) if v.as_bytes() == accept.as_bytes()) {
        return Err("the upstream answered with a wrong Sec-WebSocket-Accept");
    }
    let mut chosen = headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter();
    match (chosen.next(), chosen.next()) {
        (None, _) => Ok(()),
        (Some(p), None) if offered.iter().any(|o| o.as_bytes() == p.as_bytes()) => Ok(()),
        _ => Err("the upstream chose a subprotocol the client did not offer"),
    }
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

/// Headers about the client that wskeep writes itself from what it knows (a client's own
/// `X-Real-IP` is dropped, `Forwarded` and `X-Forwarded-For` are appended to).
const SET_BY_WSKEEP: &[&str] = &["x-forwarded-for", "forwarded", "x-real-ip"];

/// Copies the end-to-end request headers and adds the `X-Forwarded-*`, `Forwarded` and
/// `X-Real-IP` set.
///
/// `peer_trusted`: the peer is in `listen.trusted_proxies`, so the `X-Forwarded-For` and
/// `Forwarded` it sent are kept and extended; anyone else's are replaced by what wskeep saw (one
/// hop of trust, decided by the peer's own address, as nginx's `set_real_ip_from` without
/// recursion).
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
            || SET_BY_WSKEEP.contains(&name.as_str())
            || (websocket && (WEBSOCKET_PER_LEG.contains(&name.as_str()) || name == header::CONTENT_LENGTH))
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
    let proto = if tls { "https" } else { "http" };
    out.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(host) = src.get(header::HOST) {
        out.insert("x-forwarded-host", host.clone());
    }
    let mut forwarded = told_by(src, "forwarded", peer_trusted).join(", ");
    if !forwarded.is_empty() {
        forwarded.push_str(", ");
    }
    forwarded.push_str(&forwarded_element(peer, proto, src.get(header::HOST)));
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        out.insert(header::FORWARDED, v);
    }
    if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
        out.insert("x-real-ip", v);
    }
    if let Ok(v) = HeaderValue::from_str(upstream_authority) {
        out.insert(header::HOST, v);
    }
    out
}

/// This hop's `Forwarded` element (RFC 7239 §4): `for=` the peer (an IPv6 address bracketed and
/// quoted), `proto=`, and `host=` the client's `Host` when it sent one, quoted where needed.
fn forwarded_element(peer: IpAddr, proto: &str, host: Option<&HeaderValue>) -> String {
    let mut element = match peer {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    let _ = write!(element, ";proto={proto}");
    if let Some(host) = host.and_then(|h| h.to_str().ok()).filter(|h| !h.is_empty()) {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host);
    }
    element
}

/// A parameter value as a token when it is one, else as a quoted-string (RFC 9110 §5.6).
fn push_token_or_quoted(out: &mut String, value: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if value.chars().all(tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
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
        assert_eq!(out["forwarded"], "for=127.0.0.9;proto=https;host=app.example");
        assert_eq!(out["x-real-ip"], "127.0.0.9");
        for gone in ["connection", "x-secret-hop", "keep-alive", "sec-websocket-key", "sec-websocket-extensions"] {
            assert!(!out.contains_key(gone), "{gone} must not be forwarded");
        }
        assert_eq!(offered_protocols(&src), vec!["v2", "v1"]);
    }

    #[test]
    fn forwarded_is_appended_to_and_x_real_ip_is_wskeeps_own() {
        let src = map(&[
            ("host", "app.example:8443"),
            ("forwarded", "for=192.0.2.60;proto=http"),
            ("forwarded", "for=\"[2001:db8::1]\""),
            ("x-real-ip", "6.6.6.6"),
            ("content-length", "0"),
        ]);
        let out = forward_request(&src, "2001:db8::7".parse().unwrap(), true, false, "127.0.0.1:8080", true);
        assert_eq!(
            out["forwarded"],
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]\", for=\"[2001:db8::7]\";proto=http;host=\"app.example:8443\""
        );
        assert_eq!(out.get_all("forwarded").iter().count(), 1);
        assert_eq!(out.get_all("x-real-ip").iter().collect::<Vec<_>>(), ["2001:db8::7"]);
        assert!(!out.contains_key("content-length"), "an upgrade has no body to announce");
        // Without a Host (HTTP/1.0) there is no host parameter.
        let out = forward_request(&HeaderMap::new(), "10.1.2.3".parse().unwrap(), false, true, "127.0.0.1:8080", false);
        assert_eq!(out["forwarded"], "for=10.1.2.3;proto=https");
    }

    #[test]
    fn request_rules() {
        let check = |method: Method, version: Version, pairs: &[(&str, &str)]| {
            check_request(&method, version, &map(pairs)).map_err(|e| e.status)
        };
        assert_eq!(check(Method::GET, Version::HTTP_11, &[("host", "a.example:80")]), Ok(()));
        assert_eq!(check(Method::GET, Version::HTTP_11, &[("host", "[::1]:8443")]), Ok(()));
        assert_eq!(check(Method::GET, Version::HTTP_11, &[("host", "")]), Ok(()));
        assert_eq!(check(Method::GET, Version::HTTP_10, &[]), Ok(()));
        assert_eq!(check(Method::GET, Version::HTTP_11, &[]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::GET, Version::HTTP_11, &[("host", "a"), ("host", "a")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::GET, Version::HTTP_10, &[("host", "a"), ("host", "b")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::GET, Version::HTTP_11, &[("host", "u@a.example")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::GET, Version::HTTP_11, &[("host", "a b")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(Method::CONNECT, Version::HTTP_11, &[("host", "a:443")]), Err(StatusCode::METHOD_NOT_ALLOWED));
    }

    #[test]
    fn an_upgrade_with_a_body_is_refused() {
        let base = [
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", KEY),
        ];
        let check = |extra: &[(&str, &str)]| {
            let pairs: Vec<_> = base.iter().chain(extra).copied().collect();
            validate_upgrade(&Method::GET, Version::HTTP_11, &map(&pairs)).map(|_| ()).map_err(|e| e.status)
        };
        assert_eq!(check(&[("content-length", "0")]), Ok(()));
        assert_eq!(check(&[("content-length", "19")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(&[("transfer-encoding", "chunked")]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(check(&[("transfer-encoding", "identity")]), Err(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn the_upstreams_101_is_checked_in_full() {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(KEY.as_bytes());
        let good = [("upgrade", "WebSocket"), ("connection", "Upgrade"), ("sec-websocket-accept", accept.as_str())];
        let offered = vec!["v1".to_string(), "v2".to_string()];
        let check = |pairs: &[(&str, &str)]| check_upgrade_response(&map(pairs), KEY, &offered);
        assert_eq!(check(&good), Ok(()));
        assert_eq!(check(&[good[0], good[1], good[2], ("sec-websocket-protocol", "v2")]), Ok(()));
        for bad in [
            vec![good[1], good[2]],
            vec![("upgrade", "h2c"), good[1], good[2]],
            vec![good[0], good[2]],
            vec![good[0], ("connection", "keep-alive"), good[2]],
            vec![good[0], good[1]],
            vec![good[0], good[1], ("sec-websocket-accept", "bm90IHRoZSBrZXk=")],
            vec![good[0], good[1], good[2], good[2]],
            vec![good[0], good[1], good[2], ("sec-websocket-protocol", "v3")],
            vec![good[0], good[1], good[2], ("sec-websocket-protocol", "v1, v2")],
            vec![good[0], good[1], good[2], ("sec-websocket-protocol", "v1"), ("sec-websocket-protocol", "v2")],
        ] {
            assert!(check(&bad).is_err(), "accepted {bad:?}");
        }
        assert!(check_upgrade_response(&map(&[good[0], good[1], good[2], ("sec-websocket-protocol", "v1")]), KEY, &[])
            .is_err());
    }

    #[test]
    fn an_untrusted_peer_cannot_speak_for_others() {
        let src =
            map(&[("host", "app.example"), ("x-forwarded-for", "6.6.6.6, 7.7.7.7"), ("forwarded", "for=6.6.6.6")]);
        let out = forward_request(&src, "192.0.2.9".parse().unwrap(), false, false, "127.0.0.1:8080", false);
        assert_eq!(out.get_all("x-forwarded-for").iter().collect::<Vec<_>>(), ["192.0.2.9"]);
        assert_eq!(
            out["forwarded"], "for=192.0.2.9;proto=http;host=app.example",
            "an untrusted peer's Forwarded is replaced"
        );
        let out = forward_request(&src, "10.0.0.2".parse().unwrap(), true, false, "127.0.0.1:8080", false);
        assert_eq!(out["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 10.0.0.2");
        assert_eq!(out["forwarded"], "for=6.6.6.6, for=10.0.0.2;proto=http;host=app.example");
    }
}
