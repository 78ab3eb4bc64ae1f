//! The admin server, on its own port and never in the clients' Service:
//!
//! - `GET /metrics`: Prometheus text exposition
//! - `GET /healthz`: 200 while the process runs
//! - `GET /readyz`: 200 while accepting connections; 503 before the listener serves and while draining
//! - `GET /connections`: the live proxied connections as JSON
//! - `GET|POST /drain`: start draining; with `?wait=true`, answer once every connection has
//!   closed or the drain has timed out (the orchestrator's `preStop` hook)

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, ready: Arc<AtomicBool>, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
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
                async move { Ok::<_, Infallible>(route(req, &shared, &ready).await) }
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

async fn route(req: Request<Incoming>, shared: &Shared, ready: &AtomicBool) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
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
        "/connections" => reply(StatusCode::OK, "application/json", shared.connections.to_json().to_string()),
        "/drain" => {
            shared.drain.start();
            let wait = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "wait=true" || kv == "wait=1"));
            if wait {
                shared.drain.finished().await;
                reply(StatusCode::OK, TEXT, format!("drained; {} connection(s) left\n", shared.connections.len()))
            } else {
                reply(StatusCode::ACCEPTED, TEXT, "draining\n")
            }
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found: try /metrics /healthz /readyz /connections /drain\n"),
    }
}
