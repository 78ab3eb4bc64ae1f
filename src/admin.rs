//! The admin server, on its own port and never in the clients' Service:
//!
//! - `GET /metrics`: Prometheus text exposition
//! - `GET /healthz`: 200 while the process runs
//! - `GET /readyz`: 200 while accepting connections; 503 before the listener serves and while draining
//! - `GET /connections`: the live proxied connections as JSON; `?ended=1`: the last endings
//! - `GET /`, `/probe`: the status page and the connection stability test page (`pages`)
//! - `GET|POST /drain`: start draining; with `?wait=true`, answer once every connection has
//!   closed or the drain has timed out (the orchestrator's `preStop` hook)
//!
//! `/drain` takes the proxy out of service until the process restarts, so it is guarded: no
//! other method drains (a monitoring sweep's HEAD gets 405), with `admin.drain_token_file` set it
//! requires that secret, and every request to it is logged with the caller's address and user
//! agent, whether it drained or not.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, USER_AGENT, WWW_AUTHENTICATE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;

pub(crate) mod pages;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
    proxy_addr: SocketAddr,
) {
    tokio::spawn(sample_open_connections(shared.clone(), stop.clone()));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(route(req, peer, &shared, &ready, proxy_addr).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Samples the number of open connections for the status page's hour chart.
async fn sample_open_connections(shared: Arc<Shared>, stop: CancellationToken) {
    let mut every = tokio::time::interval(crate::endings::SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => shared.endings.sample(shared.connections.len()),
        }
    }
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    ready: &AtomicBool,
    proxy_addr: SocketAddr,
) -> Response<Full<Bytes>> {
    if let Some(page) = pages::serve(req.uri().path(), req.uri().query().unwrap_or(""), shared, proxy_addr) {
        return page;
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", shared.metrics.encode()),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => {
            if ready.load(Relaxed) && !shared.drain.is_draining() {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n")
            }
        }
        "/connections" if query_params(&req).any(|(k, v)| k == "ended" && (v == "1" || v == "true")) => {
            reply(StatusCode::OK, "application/json", shared.endings.recent_json(usize::MAX).to_string())
        }
        "/connections" => reply(StatusCode::OK, "application/json", shared.connections.to_json().to_string()),
        "/drain" => drain(&req, peer, shared).await,
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try / /probe /metrics /healthz /readyz /connections /drain\n",
        ),
    }
}

/// `/drain`, once the caller has shown it may (`authorize`).
async fn drain(req: &Request<Incoming>, peer: SocketAddr, shared: &Shared) -> Response<Full<Bytes>> {
    // A header value is the caller's to choose: bounded, and logged escaped (`?`).
    let user_agent = req.headers().get(USER_AGENT).map_or("", |v| v.to_str().unwrap_or("(not text)"));
    let user_agent = user_agent.get(..user_agent.len().min(200)).unwrap_or("(not text)");
    if let Err(refusal) = authorize(req, shared).await {
        tracing::warn!(%peer, user_agent = ?user_agent, method = %req.method(), reason = refusal.reason, "drain refused");
        return refusal.response;
    }
    let wait = query_params(req).any(|(k, v)| k == "wait" && (v == "true" || v == "1"));
    tracing::info!(%peer, user_agent = ?user_agent, wait, "drain requested");
    shared.drain.start();
    if wait {
        shared.drain.finished().await;
        reply(StatusCode::OK, TEXT, format!("drained; {} connection(s) left\n", shared.connections.len()))
    } else {
        reply(StatusCode::ACCEPTED, TEXT, "draining\n")
    }
}

struct Refusal {
    reason: &'static str,
    response: Response<Full<Bytes>>,
}

/// Only GET (the kubelet's `httpGet` preStop hook) and POST drain; with `admin.drain_token_file`
/// set, only with that token, as `Authorization: Bearer <token>` or `?token=<token>`.
async fn authorize(req: &Request<Incoming>, shared: &Shared) -> Result<(), Refusal> {
    if req.method() != Method::GET && req.method() != Method::POST {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "/drain takes GET or POST\n");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, POST"));
        return Err(Refusal { reason: "method not allowed", response });
    }
    let Some(path) = shared.settings().config.admin.drain_token_file.clone() else { return Ok(()) };
    // Read on every request, so a rotated secret needs no reload; an unreadable one refuses
    // everybody rather than nobody.
    let read = tokio::task::spawn_blocking(move || crate::config::read_drain_token(&path)).await;
    let token = match read.unwrap_or_else(|e| Err(e.to_string())) {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %e, "admin.drain_token_file: cannot check /drain requests");
            let response = reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "drain token unavailable\n");
            return Err(Refusal { reason: "token file unreadable", response });
        }
    };
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| v[7..].trim_ascii());
    let query = query_params(req).find(|(k, _)| *k == "token").map(|(_, v)| v.as_bytes());
    match bearer.or(query) {
        Some(given) if bool::from(given.ct_eq(&token)) => Ok(()),
        given => {
            let mut response =
                reply(StatusCode::UNAUTHORIZED, TEXT, "/drain needs the token of admin.drain_token_file\n");
            response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            let reason = if given.is_some() { "wrong token" } else { "no token" };
            Err(Refusal { reason, response })
        }
    }
}

fn query_params<B>(req: &Request<B>) -> impl Iterator<Item = (&str, &str)> {
    req.uri().query().unwrap_or("").split('&').map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}
