//! The pages people look at, served from the binary: `/` (what is happening now: live
//! connections, recent endings, charts) and `/probe` (the connection stability test), with their
//! script, style and JSON. No CDN, no inline script: a strict Content-Security-Policy allows only
//! this port's own files (and, for `/probe`, WebSocket connections to the URL the user enters).
//!
//! The status page polls `/status.json` every few seconds; one refresh locks the connection map
//! only to clone its `Arc`s and sends at most `MAX_ROWS` rows, whatever the number of connections.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::connections::Query;
use crate::endings::close_meanings_json;
use crate::proxy::Shared;

const STATUS_HTML: &str = include_str!("pages/status.html");
const STATUS_JS: &str = include_str!("pages/status.js");
const PROBE_HTML: &str = include_str!("pages/probe.html");
const PROBE_JS: &str = include_str!("pages/probe.js");
const PAGES_CSS: &str = include_str!("pages/pages.css");
const FAVICON: &str = include_str!("pages/favicon.svg");

/// Only this port's own files; nothing inline, no frames, no forms posting anywhere.
const CSP_STATUS: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                          connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// The test page also opens WebSockets to the URL the user enters.
const CSP_PROBE: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                         connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Endings the status page shows (all `RING_CAPACITY` are at `/connections?ended=1`).
const PAGE_ENDINGS: usize = 100;

/// The page or file at `path`, if it is one of them.
pub fn serve(path: &str, query: &str, shared: &Shared, proxy_addr: SocketAddr) -> Option<Response<Full<Bytes>>> {
    Some(match path {
        "/" => page("text/html; charset=utf-8", STATUS_HTML.into(), CSP_STATUS),
        "/status.js" => page("text/javascript; charset=utf-8", STATUS_JS.into(), CSP_STATUS),
        "/probe" => page("text/html; charset=utf-8", admin_probe_html(shared, proxy_addr).into(), CSP_PROBE),
        "/probe.js" => page("text/javascript; charset=utf-8", PROBE_JS.into(), CSP_STATUS),
        "/favicon.svg" => page("image/svg+xml", FAVICON.into(), CSP_STATUS),
        "/pages.css" => page("text/css; charset=utf-8", PAGES_CSS.into(), CSP_STATUS),
        "/status.json" => page("application/json", status_json(shared, query).into(), CSP_STATUS),
        "/close-codes.json" => page("application/json", close_meanings_json().to_string().into(), CSP_STATUS),
        _ => return None,
    })
}

fn page(content_type: &'static str, body: Bytes, csp: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    h.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    h.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    response
}

/// One refresh of the status page.
fn status_json(shared: &Shared, query: &str) -> String {
    let view = shared.connections.query(&Query::parse(query));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "draining": shared.drain.is_draining(),
        "now": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
        "live": view,
        "ended_total": shared.endings.total(),
        "endings": shared.endings.recent_json(PAGE_ENDINGS),
        "charts": shared.endings.charts_json(),
    })
    .to_string()
}

/// The test page on the admin port, with this wskeep's own proxy address as the default target:
/// its scheme, port and (unless it listens on every address) its IP; the page takes the host it
/// was loaded from otherwise. All three come from the configuration, never from the request.
fn admin_probe_html(shared: &Shared, proxy_addr: SocketAddr) -> String {
    let scheme = if shared.tls { "wss" } else { "ws" };
    let host = if proxy_addr.ip().is_unspecified() {
        String::new()
    } else if proxy_addr.is_ipv6() {
        format!("[{}]", proxy_addr.ip())
    } else {
        proxy_addr.ip().to_string()
    };
    probe_html(scheme, &host, &proxy_addr.port().to_string(), "/", "")
}

/// `probe.html` with its placeholders filled: values wskeep chose or validated (the port's
/// `listen.probe_path` holds only letters, digits and `/-_.~`), never request data.
fn probe_html(scheme: &str, host: &str, port: &str, base: &str, nav: &str) -> String {
    PROBE_HTML
        .replace("{{scheme}}", scheme)
        .replace("{{host}}", host)
        .replace("{{port}}", port)
        .replace("{{base}}", base)
        .replace("{{nav}}", nav)
}

/// The test page on the proxy port (`listen.probe_path`, off when empty): the page at the path,
/// its files under it (`PATH/probe.js` ...). The default target is the address the page was
/// loaded from; the admin port's links are hidden (that port is not this one).
pub fn serve_on_proxy(path: &str, probe_path: &str) -> Option<Response<Full<Bytes>>> {
    if probe_path.is_empty() {
        return None;
    }
    if path == probe_path {
        let html = probe_html("", "", "", &format!("{probe_path}/"), "hidden");
        return Some(page("text/html; charset=utf-8", html.into(), CSP_PROBE));
    }
    let file = path.strip_prefix(probe_path)?.strip_prefix('/')?;
    Some(match file {
        "probe.js" => page("text/javascript; charset=utf-8", PROBE_JS.into(), CSP_STATUS),
        "pages.css" => page("text/css; charset=utf-8", PAGES_CSS.into(), CSP_STATUS),
        "favicon.svg" => page("image/svg+xml", FAVICON.into(), CSP_STATUS),
        "close-codes.json" => page("application/json", close_meanings_json().to_string().into(), CSP_STATUS),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::relay::Outcome;
    use crate::vocab::{End, Side};

    #[test]
    fn the_proxy_port_serves_only_the_test_page_and_its_files_and_only_when_asked() {
        assert!(serve_on_proxy("/wskeep/probe", "").is_none(), "off by default");
        let page = serve_on_proxy("/wskeep/probe", "/wskeep/probe").unwrap();
        assert_eq!(page.headers()[CONTENT_SECURITY_POLICY], CSP_PROBE);
        for file in ["probe.js", "pages.css", "favicon.svg", "close-codes.json"] {
            assert!(serve_on_proxy(&format!("/wskeep/probe/{file}"), "/wskeep/probe").is_some(), "{file}");
        }
        for other in ["/wskeep/probex", "/wskeep/probe/status.js", "/wskeep/probe/", "/wskeep", "/status.json", "/"] {
            assert!(serve_on_proxy(other, "/wskeep/probe").is_none(), "{other} is the upstream's");
        }
        let html = probe_html("", "", "", "/wskeep/probe/", "hidden");
        assert!(html.contains(r#"<script src="/wskeep/probe/probe.js" defer>"#) && !html.contains("{{"), "{html}");
    }

    /// The cost README states: one refresh of the status page with 9,000 open connections and
    /// a full endings ring is bounded in bytes whatever the count, and takes milliseconds.
    #[test]
    fn a_refresh_with_9000_connections_is_bounded() {
        let config = crate::config::Config::from_toml("[upstream]\nurl = \"ws://127.0.0.1:9\"\n").unwrap();
        let shared = Shared::new(config, Arc::new(crate::metrics::Metrics::new()), false);
        let guards: Vec<_> = (0..9000u32)
            .map(|i| shared.connections.open(([10, 0, (i >> 8) as u8, i as u8], 40000).into(), format!("/voice/{i}")))
            .collect();
        for g in &guards {
            g.info.leg(Side::Client).last_rtt_us.store(100 + g.info.id % 5000, std::sync::atomic::Ordering::Relaxed);
        }
        let outcome = Outcome { end: End::ClientError, codes: [(Some(1006), None), (Some(1001), Some(1001))] };
        for g in guards.iter().take(crate::endings::RING_CAPACITY) {
            shared.endings.record(g.info.clone(), outcome, Duration::from_secs(61));
        }
        let mut sizes = Vec::new();
        let started = Instant::now();
        for query in ["", "sort=client_rtt&order=desc&limit=100", "path=%2Fvoice%2F1&sort=age", "limit=500"] {
            let json = status_json(&shared, query);
            let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(parsed["live"]["open"], 9000);
            sizes.push(json.len());
        }
        let per_refresh = started.elapsed() / 4;
        eprintln!("status.json with 9000 connections: {sizes:?} bytes, {per_refresh:?} per refresh");
        assert!(sizes[0] < 128 * 1024, "100 rows and 100 endings: {sizes:?}");
        assert!(sizes[3] < 320 * 1024, "at most MAX_ROWS rows: {sizes:?}");
        assert!(per_refresh < Duration::from_millis(500), "{per_refresh:?}");
    }
}
