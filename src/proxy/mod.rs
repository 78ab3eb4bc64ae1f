//! The hyper service behind the listener: WebSocket upgrades go to `ws`, everything else is
//! reverse-proxied by `http`. Both forward headers the same way (`headers`), and both pass the
//! same request rules first (`headers::check_request`: 405 for `CONNECT`, 400 for a bad `Host`).

pub mod deflate;
pub mod headers;
pub mod http;
mod lone_leg;
pub mod upstream;
pub mod upstream_tls;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::Config;
use crate::connections::Connections;
use crate::endings::Endings;
use crate::metrics::Metrics;
use crate::relay::RelaySettings;
use crate::shutdown::Drain;
use crate::vocab::HttpVersion;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Everything the request handlers share, built once at start.
pub struct Shared {
    /// Replaced whole by a configuration reload; read once per TCP connection and per request,
    /// never per frame.
    settings: RwLock<Arc<Settings>>,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
    /// The last endings and the counts behind the status page's charts.
    pub endings: Endings,
    pub drain: Drain,
    /// Whether the listener terminates TLS (for `X-Forwarded-Proto`).
    pub tls: bool,
}

/// What a configuration reload changes: a connection or request takes a snapshot when it starts
/// and keeps it to its end, so a reload reaches new ones only.
pub struct Settings {
    pub config: Config,
    /// Shared with every relay started under these settings.
    pub relay: Arc<RelaySettings>,
    pub http: http::UpstreamClient,
}

impl Settings {
    /// Builds the settings for `config`; a reload passes the running ones, whose keepalive timer
    /// slots (and HTTP connection pool, if the upstream connection settings did not change) are
    /// kept.
    pub fn new(config: Config, running: Option<&Settings>) -> Settings {
        let mut relay = RelaySettings::from_config(&config);
        let mut http = None;
        if let Some(running) = running {
            relay.timer_slots = running.relay.timer_slots.clone();
            let (was, now) = (&running.config.upstream, &config.upstream);
            if was.connect_timeout == now.connect_timeout && upstream::Target::of(was) == upstream::Target::of(now) {
                http = Some(running.http.clone());
            }
        }
        let http = http.unwrap_or_else(|| http::client(&config));
        Settings { relay: Arc::new(relay), http, config }
    }
}

impl Shared {
    pub fn new(config: Config, metrics: Arc<Metrics>, tls: bool) -> Shared {
        Shared {
            drain: Drain::new(config.shutdown.drain_timeout),
            settings: RwLock::new(Arc::new(Settings::new(config, None))),
            metrics,
            connections: Arc::new(Connections::default()),
            endings: Endings::default(),
            tls,
        }
    }

    /// The settings in service now.
    pub fn settings(&self) -> Arc<Settings> {
        // The lock guards a pointer swap that cannot panic halfway: a poisoned lock is whole.
        self.settings.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Puts `settings` in service for the connections and requests that start from now on.
    pub fn replace_settings(&self, settings: Settings) {
        *self.settings.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(settings);
    }
}

/// What a request knows about the TCP connection it came on.
#[derive(Clone)]
pub struct ConnMeta {
    pub peer: SocketAddr,
    /// The listener slot a relay keeps for as long as it lives: its TCP connection's over
    /// HTTP/1.1, a slot of its own for a WebSocket stream of an HTTP/2 connection.
    pub permit: Arc<OwnedSemaphorePermit>,
    pub http_version: HttpVersion,
    /// A WebSocket stream of an HTTP/2 connection: the connection sends its GOAWAY only once
    /// every such token is dropped (the relay has sent its 1001 and ended).
    pub stream: Option<TaskTrackerToken>,
}

/// Whether the request is an HTTP/2 extended CONNECT for a WebSocket (RFC 8441 §4).
pub fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == hyper::Method::CONNECT
        && req.extensions().get::<hyper::ext::Protocol>().is_some_and(|p| p.as_str() == "websocket")
}

pub async fn handle(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    meta: ConnMeta,
) -> Result<Response<Body>, Infallible> {
    let websocket_connect = is_websocket_connect(&req);
    if req.version() == hyper::Version::HTTP_2 && !req.headers().contains_key(hyper::header::HOST) {
        // HTTP/2's :authority is HTTP/1.1's Host, for the forwarding headers (RFC 9113 §8.3.1).
        if let Some(authority) = req.uri().authority().and_then(|a| a.as_str().parse().ok()) {
            req.headers_mut().insert(hyper::header::HOST, authority);
        }
    }
    // An extended CONNECT is a WebSocket handshake, held to the rules of a GET.
    let method = if websocket_connect { &hyper::Method::GET } else { req.method() };
    if let Err(bad) = headers::check_request(method, req.version(), req.headers()) {
        return Ok(refuse_request(&req, &shared, bad));
    }
    let settings = shared.settings();
    if let Some(page) = crate::admin::pages::serve_on_proxy(req.uri().path(), &settings.config.listen.probe_path) {
        shared.metrics.http_request(page.status());
        return Ok(page.map(|body| body.map_err(|never| match never {}).boxed()));
    }
    if websocket_connect || headers::wants_websocket(req.headers()) {
        Ok(ws::upgrade(req, shared, settings, meta).await)
    } else {
        let response = http::forward(req, &shared, &settings, meta.peer).await;
        shared.metrics.http_request(response.status());
        Ok(response)
    }
}

/// wskeep's answer to a request that breaks the request rules; counted as an upgrade failure for
/// an upgrade (except `CONNECT`, which is never one) and as an HTTP request otherwise.
fn refuse_request<B>(req: &Request<B>, shared: &Shared, bad: headers::BadUpgrade) -> Response<Body> {
    let mut response = text(bad.status, bad.reason);
    if bad.status == StatusCode::METHOD_NOT_ALLOWED {
        shared.metrics.http_request(bad.status);
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),
        );
    } else if headers::wants_websocket(req.headers()) {
        shared.metrics.upgrade_failed(crate::vocab::UpgradeFailure::BadRequest);
        crate::telemetry::upgrade_failure(crate::vocab::UpgradeFailure::BadRequest, bad.reason.trim_end());
    } else {
        shared.metrics.http_request(bad.status);
    }
    response
}

/// A short plain-text response of wskeep's own.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The path without its query string, for logs (tokens travel in queries).
pub fn loggable_path(uri: &hyper::Uri) -> String {
    uri.path().to_string()
}
