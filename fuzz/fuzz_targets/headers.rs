//! Request rules, upgrade validation (both sides) and header forwarding on arbitrary header maps:
//! nothing panics, a key that passes validation is a well-formed nonce on a request without a
//! body, a request that passes the request rules has exactly one Host (HTTP/1.1) and is no
//! CONNECT, forwarded headers never include a hop-by-hop header, a header the Connection header
//! lists, or (for WebSocket) a per-leg handshake header, and the headers about the client are
//! wskeep's own: `Forwarded` ends with this hop's element, `X-Real-IP` is the peer.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use libfuzzer_sys::fuzz_target;
use wskeep::proxy::headers::{
    check_request, check_upgrade_response, forward_request, offered_protocols, strip_response, validate_upgrade,
    wants_websocket,
};

// The oracle keeps its own copy of the lists (RFC 9110 §7.6.1, RFC 6455 §4): a check that
// imported the lists it checks could not catch a header missing from them.
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
const PER_LEG: &[&str] =
    &["sec-websocket-key", "sec-websocket-accept", "sec-websocket-version", "sec-websocket-extensions"];

/// One header per line, `name:value`; lines that are not a valid header are skipped.
fn header_map(bytes: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in bytes.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(&line[colon + 1..]))
        else {
            continue;
        };
        map.append(name, value);
    }
    map
}

/// Every header named by a Connection token (compared as header names are: case-insensitively).
fn listed(src: &HeaderMap) -> Vec<String> {
    src.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let src = header_map(rest);
    let method = [Method::GET, Method::POST, Method::CONNECT, Method::OPTIONS][(flags & 3) as usize].clone();
    let version = [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2, Version::HTTP_09][(flags >> 2 & 3) as usize];
    let tls = flags & 16 != 0;
    let websocket = flags & 32 != 0;
    let peer_trusted = flags & 128 != 0;
    let peer = if flags & 64 != 0 { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)) };

    let _ = wants_websocket(&src);
    let offered = offered_protocols(&src);
    if check_request(&method, version, &src).is_ok() {
        assert_ne!(method, Method::CONNECT);
        let hosts = src.get_all(http::header::HOST).iter().count();
        assert!(hosts <= 1 && (hosts == 1 || version != Version::HTTP_11), "{hosts} Host headers passed");
    }
    if let Ok(key) = validate_upgrade(&method, version, &src) {
        assert_eq!(method, Method::GET);
        assert!(version >= Version::HTTP_11);
        assert_eq!(key.len(), 24);
        assert!(key.ends_with("=="));
        assert_eq!(src.get_all(http::header::SEC_WEBSOCKET_KEY).iter().count(), 1);
        assert!(!src.contains_key(http::header::TRANSFER_ENCODING), "an upgrade with a body passed");
    }
    // The same map read as the upstream's 101: only a complete, offered answer passes.
    if check_upgrade_response(&src, "dGhlIHNhbXBsZSBub25jZQ==", &offered).is_ok() {
        assert!(!src.contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS));
        assert_eq!(src.get_all(http::header::SEC_WEBSOCKET_ACCEPT).iter().count(), 1);
        if let Some(chosen) = src.get(http::header::SEC_WEBSOCKET_PROTOCOL) {
            assert!(offered.iter().any(|p| p.as_bytes() == chosen.as_bytes()));
        }
    }

    let out = forward_request(&src, peer, peer_trusted, tls, "127.0.0.1:8080", websocket);
    let listed = listed(&src);
    for name in out.keys() {
        let name = name.as_str();
        assert!(!HOP_BY_HOP.contains(&name), "forwarded hop-by-hop header {name}");
        // The client's Connection header only governs the client's hop: the headers wskeep sets
        // itself for the upstream hop are new, whatever the client listed.
        let own = ["host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"]
            .contains(&name);
        assert!(own || !listed.iter().any(|t| t == name), "forwarded {name}, which Connection lists");
        if websocket {
            assert!(!PER_LEG.contains(&name), "forwarded per-leg header {name}");
        }
    }
    assert_eq!(out.get_all(http::header::HOST).iter().count(), 1);
    assert_eq!(out[http::header::HOST], "127.0.0.1:8080");
    assert_eq!(out["x-forwarded-proto"], if tls { "https" } else { "http" });
    let xff = out.get("x-forwarded-for").expect("x-forwarded-for is always set").to_str().unwrap();
    assert!(xff.ends_with(&peer.to_string()), "{xff}");
    assert_eq!(out.get_all("x-real-ip").iter().collect::<Vec<_>>(), [peer.to_string().as_str()]);
    assert_eq!(out.get_all("forwarded").iter().count(), 1);
    let forwarded = out["forwarded"].to_str().expect("Forwarded is visible ASCII");
    let ours = match peer {
        IpAddr::V4(ip) => format!("for={ip};proto="),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto="),
    };
    let last = forwarded.rsplit(", for=").next().map(|e| format!("for={}", e.trim_start_matches("for="))).unwrap();
    assert!(last.starts_with(&ours), "{forwarded}");
    if !peer_trusted {
        // An untrusted peer cannot put another address before its own.
        assert_eq!(xff, peer.to_string());
    }

    let mut response = src.clone();
    strip_response(&mut response, websocket);
    for name in response.keys() {
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "kept hop-by-hop header {name}");
    }
});
