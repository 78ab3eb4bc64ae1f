//! Plain HTTP requests (the orchestrator's other endpoints: WHIP offers, health checks) are
//! reverse-proxied to the upstream with streamed bodies both ways, through one pooled client.

use std::net::SocketAddr;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::upstream::Connector;
use super::{headers, text, Body, Settings, Shared};
use crate::config::Config;
use crate::vocab::UpgradeFailure;

pub type UpstreamClient = Client<Connector, Incoming>;

/// The pooled client for plain HTTP, built once.
pub fn client(config: &Config) -> UpstreamClient {
    let connector = Connector::new(&config.upstream);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .build(connector)
}

pub async fn forward(req: Request<Incoming>, shared: &Shared, settings: &Settings, peer: SocketAddr) -> Response<Body> {
    let upstream = &settings.config.upstream;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = Uri::builder().scheme("http").authority(upstream.authority.as_str()).path_and_query(path).build()
    else {
        return text(StatusCode::BAD_REQUEST, "bad request target\n");
    };
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    let trusted = crate::cidr::any_contains(&settings.config.listen.trusted_proxies, peer.ip());
    *out.headers_mut() =
        headers::forward_request(&parts.headers, peer.ip(), trusted, shared.tls, &upstream.host, false);

    match tokio::time::timeout(upstream.response_timeout, settings.http.request(out)).await {
        Ok(Ok(mut response)) => {
            headers::strip_response(response.headers_mut(), false);
            response.map(|b| b.boxed())
        }
        Ok(Err(e)) => {
            let detail = error_chain(&e);
            if timed_out(&e) {
                failed(StatusCode::GATEWAY_TIMEOUT, peer, parts.uri.path(), &detail)
            } else if io_source(&e).is_some_and(crate::admission::is_out_of_resources) {
                // wskeep's own descriptors or memory ran out: not the upstream's fault.
                text(StatusCode::SERVICE_UNAVAILABLE, "wskeep is out of local resources\n")
            } else {
                failed(StatusCode::BAD_GATEWAY, peer, parts.uri.path(), &detail)
            }
        }
        Err(_) => {
            let detail = format!(
                "no response within upstream.response_timeout ({})",
                humantime::format_duration(upstream.response_timeout)
            );
            failed(StatusCode::GATEWAY_TIMEOUT, peer, parts.uri.path(), &detail)
        }
    }
}

/// 502 or 504 for a request the upstream did not answer, logged (rate-limited) like an upgrade
/// that failed for the same reason.
fn failed(status: StatusCode, peer: SocketAddr, path: &str, detail: &str) -> Response<Body> {
    let (reason, body) = if status == StatusCode::GATEWAY_TIMEOUT {
        (UpgradeFailure::UpstreamTimeout, "upstream timed out\n")
    } else if detail.contains("TLS handshake with the upstream failed") {
        (UpgradeFailure::UpstreamTls, "upstream unavailable\n")
    } else {
        (UpgradeFailure::UpstreamUnreachable, "upstream unavailable\n")
    };
    crate::telemetry::http_failure(status.as_u16(), reason, peer, path, detail);
    text(status, body)
}

/// An error and its causes on one line: hyper's own message ("client error (Connect)") says
/// little without the OS error beneath it.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let more = err.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = err.source();
    }
    text
}

/// Whether the connector gave up on `upstream.connect_timeout` (an `io::ErrorKind::TimedOut`
/// somewhere in the error's source chain).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    io_source(e).is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// The first I/O error in the error's source chain.
fn io_source<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = err.source();
    }
    None
}
