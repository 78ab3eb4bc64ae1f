//! The listener: bind, accept, admit (or answer 503 past `max_connections`), terminate TLS under
//! the handshake timeout, and serve HTTP/1.1 with upgrades. `Server::run` also starts the admin
//! server and the certificate watcher, and returns once a requested shutdown has drained.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ConnMeta, Shared};
use crate::reload::Reloader;
use crate::shutdown::Drain;
use crate::tls::{self, CertResolver};
use crate::vocab::UpgradeFailure;

/// Request heads larger than this get 431 (hyper's read buffer is capped at it).
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Connections past the limit that may be in the middle of being told 503; beyond, dropped.
const REJECT_SLOTS: usize = 256;
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections the kernel queues for the accept loop. tokio (mio) listens with std's 128, which a
/// burst of connects overflows while the loop waits for a CPU: the dropped handshakes are retried
/// by the clients only a second later. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    admin: TcpListener,
    tls: Option<(TlsAcceptor, Arc<CertResolver>)>,
    /// Set once `run` serves; `/readyz` reads it.
    ready: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: io::Error },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

impl Server {
    /// Binds the proxy and admin listeners (port 0 picks a free port) and loads TLS material.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let listener = bind_listener(config.listen.addr).map_err(|source| StartError::Bind {
            key: "listen.addr",
            addr: config.listen.addr,
            source,
        })?;
        let admin = TcpListener::bind(config.admin.addr).await.map_err(|source| StartError::Bind {
            key: "admin.addr",
            addr: config.admin.addr,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
            (Some(cert), Some(key)) => {
                let pair = tls::load_pair(cert, key)?;
                metrics.tls_cert_not_after.set(pair.not_after);
                tracing::info!(
                    cert = %cert.display(),
                    not_after = %crate::telemetry::rfc3339(pair.not_after),
                    "TLS certificate loaded"
                );
                let resolver = Arc::new(CertResolver::new(&pair, cert, key));
                Some((TlsAcceptor::from(tls::server_config(resolver.clone())), resolver))
            }
            _ => None,
        };
        let shared = Arc::new(Shared::new(config, metrics, tls.is_some()));
        Ok(Server { shared, listener, admin, tls, ready: Arc::new(AtomicBool::new(false)) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has a local address.
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// The handle that drains and stops this server.
    pub fn drain(&self) -> Drain {
        self.shared.drain.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The handle that reloads this server's configuration from `path` (SIGHUP).
    pub fn reloader(&self, path: Option<std::path::PathBuf>) -> Reloader {
        Reloader::new(path, self.shared.clone(), self.tls.as_ref().map(|(_, resolver)| resolver.clone()))
    }

    /// Serves until `Drain::shutdown` and every connection has closed (or the close bound passed).
    pub async fn run(self) {
        let Server { shared, listener, admin, tls, ready } = self;
        let stop_background = CancellationToken::new();
        let proxy_addr = listener.local_addr().unwrap_or(shared.settings().config.listen.addr);
        let admin_task = crate::admin::serve(admin, shared.clone(), ready.clone(), stop_background.clone(), proxy_addr);
        tokio::spawn(admin_task);
        if let Some((_, resolver)) = &tls {
            tokio::spawn(tls::watch(resolver.clone(), shared.metrics.clone(), stop_background.clone()));
        }
        let acceptor = tls.map(|(acceptor, _)| acceptor);
        tracing::info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            tls = acceptor.is_some(),
            upstream = %shared.settings().config.upstream.url,
            "listening"
        );
        ready.store(true, Relaxed);
        accept_loop(&listener, &shared, acceptor).await;
        drop(listener);
        shared.drain.exit_requested().await;
        shared.drain.finished().await;
        stop_background.cancel();
        tracing::info!("stopped");
    }
}

async fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, acceptor: Option<TlsAcceptor>) {
    // A reload does not resize the listener: max_connections needs a restart (reload.rs).
    let permits = Arc::new(Semaphore::new(shared.settings().config.listen.max_connections as usize));
    let rejecting = Arc::new(Semaphore::new(REJECT_SLOTS));
    let mut draining = pin!(shared.drain.draining());
    let mut resource_errors = 0u64;
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = &mut draining => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    if is_resource_error(&e) {
                        // Out of descriptors or memory: log the first of a run, back off, retry.
                        if resource_errors == 0 {
                            tracing::error!(error = %e, "accept failed; backing off until descriptors free up");
                        }
                        resource_errors += 1;
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
        };
        if resource_errors > 0 {
            tracing::warn!(failed_accepts = resource_errors, "accepting again");
            resource_errors = 0;
        }
        let _ = tcp.set_nodelay(true);
        let admission = match permits.clone().try_acquire_owned() {
            Ok(permit) => Admission::Admitted(Arc::new(permit)),
            Err(_) => match rejecting.clone().try_acquire_owned() {
                Ok(slot) => Admission::OverLimit(slot),
                // Even the 503 slots are taken: closing at once is the only cheap answer.
                Err(_) => continue,
            },
        };
        shared.drain.spawn(serve_connection(tcp, peer, shared.clone(), acceptor.clone(), admission));
    }
}

/// Binds the proxy listener with `LISTEN_BACKLOG` (`TcpListener::bind` would use 128).
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12
    matches!(e.raw_os_error(), Some(24) | Some(23) | Some(105) | Some(12))
}

/// Whether this TCP connection got a listener slot.
enum Admission {
    Admitted(Arc<OwnedSemaphorePermit>),
    /// Past `max_connections`: every request gets 503 and the connection closes.
    #[allow(dead_code)] // the slot is held for its Drop
    OverLimit(OwnedSemaphorePermit),
}

async fn serve_connection(
    mut tcp: TcpStream,
    tcp_peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<TlsAcceptor>,
    admission: Admission,
) {
    // The timeouts in service when the connection came; its requests each read the settings anew.
    let settings = shared.settings();
    let listen = &settings.config.listen;
    let (handshake_timeout, idle_timeout) = (listen.handshake_timeout, listen.idle_timeout);
    // The PROXY header, TLS and the first request head must all arrive within the handshake timeout.
    let deadline = Instant::now() + handshake_timeout;
    let real_peer =
        crate::proxy_protocol::real_peer(&mut tcp, tcp_peer, listen.proxy_protocol, &listen.trusted_proxies, deadline);
    let peer = match real_peer.await {
        Ok(peer) => peer,
        Err(failure) => {
            shared.metrics.proxy_protocol_failed(failure);
            crate::telemetry::proxy_protocol_failure(tcp_peer, failure);
            return;
        }
    };
    drop(settings);
    let io = match acceptor {
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Either::Left(tls),
            Ok(Err(e)) => {
                shared.metrics.tls_handshake_failures.inc();
                crate::telemetry::tls_handshake_failure(peer, &e.to_string());
                return;
            }
            Err(_) => {
                shared.metrics.tls_handshake_failures.inc();
                let reason = format!(
                    "no handshake within listen.handshake_timeout ({})",
                    humantime::format_duration(handshake_timeout)
                );
                crate::telemetry::tls_handshake_failure(peer, &reason);
                return;
            }
        },
        None => Either::Right(tcp),
    };

    let first_request = Arc::new(AtomicBool::new(false));
    let seen = first_request.clone();
    let service_shared = shared.clone();
    let service = service_fn(move |req| {
        seen.store(true, Relaxed);
        let shared = service_shared.clone();
        let admitted = match &admission {
            Admission::Admitted(permit) => Some(ConnMeta { peer, permit: permit.clone() }),
            Admission::OverLimit(_) => None,
        };
        async move {
            // hyper's `max_buf_size` only bounds a head that is still incomplete: one that arrives
            // in a large read can be parsed past it, so the size is checked here as well.
            if request_head_len(&req) > MAX_REQUEST_HEAD {
                return Ok(head_too_large(&req, &shared));
            }
            match admitted {
                Some(meta) => proxy::handle(req, shared, meta).await,
                None => Ok(over_limit(&req, &shared)),
            }
        }
    });

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).max_buf_size(MAX_REQUEST_HEAD);
    if !idle_timeout.is_zero() {
        // Covers both a keep-alive connection waiting for its next request and a slow head.
        builder.header_read_timeout(idle_timeout);
    }
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
    let mut head_deadline = pin!(tokio::time::sleep_until(deadline));
    let mut head_checked = false;
    let mut draining = pin!(shared.drain.draining());
    let mut drain_seen = false;
    let mut closing = pin!(shared.drain.closing());
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = &mut head_deadline, if !head_checked => {
                head_checked = true;
                if !first_request.load(Relaxed) {
                    tracing::debug!(%peer, "no request head within listen.handshake_timeout");
                    return;
                }
            }
            _ = &mut draining, if !drain_seen => {
                drain_seen = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut closing => return,
        }
    }
}

/// The size of a request head as sent, at least: request line and header lines (httparse has
/// trimmed the whitespace around values).
fn request_head_len<B>(req: &hyper::Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len() + uri.scheme_str().map_or(0, |s| s.len() + 3));
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + 2 + v.len() + 2).sum();
    line + headers + 2
}

/// 431 for a head over `MAX_REQUEST_HEAD`, as hyper answers one it stops reading.
fn head_too_large<B>(req: &hyper::Request<B>, shared: &Shared) -> hyper::Response<proxy::Body> {
    let status = hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    if proxy::headers::wants_websocket(req.headers()) {
        shared.metrics.upgrade_failed(UpgradeFailure::BadRequest);
        crate::telemetry::upgrade_failure(UpgradeFailure::BadRequest, "request head over 32 KiB");
    } else {
        shared.metrics.http_request(status);
    }
    let mut response = proxy::text(status, "request head too large\n");
    response.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    response
}

fn over_limit<B>(req: &hyper::Request<B>, shared: &Shared) -> hyper::Response<proxy::Body> {
    if proxy::headers::wants_websocket(req.headers()) {
        shared.metrics.upgrade_failed(UpgradeFailure::Limit);
        crate::telemetry::upgrade_failure(UpgradeFailure::Limit, "listen.max_connections reached");
    } else {
        shared.metrics.http_request(hyper::StatusCode::SERVICE_UNAVAILABLE);
    }
    let mut response = proxy::text(hyper::StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
    response.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    response
}
