//! The listener: bind, accept, admit (`admission`: a place among the connections in their
//! handshake, then at the first request a slot of `max_connections` or 503), wait for the first
//! byte, terminate TLS under the handshake timeout, and serve HTTP/1.1 with upgrades, or HTTP/2
//! (ALPN `h2`) with WebSockets as extended CONNECT streams (RFC 8441).
//! `Server::run` also starts the admin server and the certificate watcher, and returns once a
//! requested shutdown has drained.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{self, is_out_of_resources, HandshakePlace, Handshakes, ReserveTicket};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ConnMeta, Shared};
use crate::reload::Reloader;
use crate::shutdown::{Drain, CLOSE_BOUND};
use crate::tls::{self, CertResolver};
use crate::vocab::{HttpVersion, UpgradeFailure};

/// Request heads larger than this get 431 (hyper's read buffer is capped at it).
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Pause after an accept error such as EMFILE (with the reserve in use), so the loop does not spin.
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
                Some((TlsAcceptor::from(tls::server_config(resolver.clone(), config.listen.http2)), resolver))
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
    // A reload does not resize the listener: both limits need a restart (reload.rs).
    let (max_connections, max_handshakes) = {
        let settings = shared.settings();
        (settings.config.listen.max_connections, settings.config.listen.max_handshakes)
    };
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let handshakes = Handshakes::new(max_handshakes as usize);
    let mut draining = pin!(shared.drain.draining());
    // Failed accepts since the last one that worked, for the recovery line.
    let mut failed_accepts = 0u64;
    loop {
        admission::refill_reserve();
        let (tcp, peer, admitted_by) = tokio::select! {
            biased;
            _ = &mut draining => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    if failed_accepts > 0 {
                        crate::telemetry::accept_recovered(std::mem::take(&mut failed_accepts));
                    }
                    (tcp, peer, Admission::Slots(slots.clone()))
                }
                Err(e) if is_out_of_resources(&e) => {
                    failed_accepts += 1;
                    crate::telemetry::accept_failure(&e);
                    match accept_on_reserve(listener).await {
                        Some((tcp, peer, ticket)) => (tcp, peer, Admission::OutOfResources(ticket)),
                        None => continue,
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (place, evicted) = handshakes.enter();
        if evicted {
            shared.metrics.upgrade_failed(UpgradeFailure::HandshakeLimit);
            crate::telemetry::upgrade_failure(
                UpgradeFailure::HandshakeLimit,
                "listen.max_handshakes connections were in their handshake: the oldest was dropped",
            );
        }
        shared.drain.spawn(serve_connection(tcp, peer, shared.clone(), acceptor.clone(), place, admitted_by));
    }
}

/// `accept` failed for want of a descriptor: the reserved one is freed and a waiting client taken
/// in the same breath, to be told 503. Linux reports EMFILE before it looks at the queue, so
/// there may be no client: the descriptor is then taken back. Without the reserve (in use, or
/// taken by something else meanwhile), waits a little.
async fn accept_on_reserve(listener: &TcpListener) -> Option<(TcpStream, SocketAddr, ReserveTicket)> {
    if admission::reserve_ready() {
        let spent = std::future::poll_fn(|cx| {
            Poll::Ready(admission::spend_reserve(|| match listener.poll_accept(cx) {
                Poll::Ready(Ok(pair)) => Some(pair),
                _ => None,
            }))
        })
        .await;
        if let Some(((tcp, peer), ticket)) = spent {
            return Some((tcp, peer, ticket));
        }
        if admission::reserve_ready() {
            // Nobody was waiting, and the descriptor is back.
            return None;
        }
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
    None
}

/// Binds the proxy listener with `LISTEN_BACKLOG` (`TcpListener::bind` would use 128).
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How a connection's requests are admitted.
enum Admission {
    /// Its first request takes a slot of `max_connections` for the connection's life, or gets
    /// 503 (`limit`) with every later one if none is free.
    Slots(Arc<Semaphore>),
    /// Accepted on the reserved descriptor: every request gets 503 (`local_limit`).
    #[allow(dead_code)] // the ticket is held for its Drop
    OutOfResources(ReserveTicket),
}

/// The first byte, TLS and the first request head must all arrive within the handshake timeout
/// (the first byte within `first_byte_timeout`), while the connection holds its handshake `place`;
/// a newer connection may take that place, which ends this one.
async fn serve_connection(
    mut tcp: TcpStream,
    tcp_peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<TlsAcceptor>,
    place: HandshakePlace,
    admission: Admission,
) {
    // The timeouts in service when the connection came; its requests each read the settings anew.
    let settings = shared.settings();
    let listen = &settings.config.listen;
    let (handshake_timeout, first_byte_timeout, idle_timeout) =
        (listen.handshake_timeout, listen.first_byte_timeout, listen.idle_timeout);
    // The PROXY header, TLS and the first request head must all arrive within the handshake
    // timeout, the first byte within the first-byte timeout.
    let deadline = Instant::now() + handshake_timeout;
    let first_byte_deadline = deadline.min(Instant::now() + first_byte_timeout);
    let tls = acceptor.is_some();
    let handshake_failed = |peer: SocketAddr, reason: &str| {
        if tls {
            shared.metrics.tls_handshake_failures.inc();
            crate::telemetry::tls_handshake_failure(peer, reason);
        } else {
            tracing::debug!(%peer, reason, "connection let go before its first request");
        }
    };
    let within = |key: &str, limit: std::time::Duration| {
        format!("nothing within listen.{key} ({})", humantime::format_duration(limit))
    };
    let mut byte = [0u8; 1];
    let first_byte = tokio::select! {
        peeked = tokio::time::timeout_at(first_byte_deadline, tcp.peek(&mut byte)) => peeked,
        _ = place.dropped() => return,
    };
    match first_byte {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return, // closed, or failed, before a byte came
        Err(_) => return handshake_failed(tcp_peer, &within("first_byte_timeout", first_byte_timeout)),
    }
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
        Some(acceptor) => tokio::select! {
            accepted = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => match accepted {
                Ok(Ok(tls)) => Either::Left(tls),
                Ok(Err(e)) => return handshake_failed(peer, &e.to_string()),
                Err(_) => return handshake_failed(peer, &within("handshake_timeout", handshake_timeout)),
            },
            _ = place.dropped() => return,
        },
        None => Either::Right(tcp),
    };

    let http2 = matches!(&io, Either::Left(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()));
    let http_version = if http2 { HttpVersion::Http2 } else { HttpVersion::Http1 };
    let place = Arc::new(place);
    let first_request = Arc::new(AtomicBool::new(false));
    let seen = first_request.clone();
    let requests = Arc::new(AtomicU64::new(0));
    let service_requests = requests.clone();
    let service_shared = shared.clone();
    let service_place = place.clone();
    // HTTP/2: the connection's WebSocket streams, which end before its GOAWAY.
    let websockets = TaskTracker::new();
    let service_websockets = websockets.clone();
    // Decided at the first request, for the connection's life.
    let slot: Arc<OnceLock<Option<Arc<OwnedSemaphorePermit>>>> = Arc::default();
    let service = service_fn(move |req| {
        if !seen.swap(true, Relaxed) {
            // The handshake is over: its place goes to another connection.
            service_place.leave();
        }
        service_requests.fetch_add(1, Relaxed);
        let shared = service_shared.clone();
        let admitted = slot.get_or_init(|| match &admission {
            Admission::Slots(slots) => slots.clone().try_acquire_owned().ok().map(Arc::new),
            Admission::OutOfResources(_) => None,
        });
        let admitted = match (admitted, &admission) {
            // Each WebSocket stream of an HTTP/2 connection opens an upstream connection of its
            // own: it takes a slot of its own too, beside the connection's.
            (Some(_), Admission::Slots(slots)) if http2 && proxy::is_websocket_connect(&req) => {
                slots.clone().try_acquire_owned().ok().map(|permit| ConnMeta {
                    peer,
                    permit: Arc::new(permit),
                    http_version,
                    stream: Some(service_websockets.token()),
                })
            }
            (Some(permit), _) => Some(ConnMeta { peer, permit: permit.clone(), http_version, stream: None }),
            (None, _) => None,
        };
        let refusal = match admission {
            Admission::Slots(_) => UpgradeFailure::Limit,
            Admission::OutOfResources(_) => UpgradeFailure::LocalLimit,
        };
        async move {
            // hyper's `max_buf_size` only bounds a head that is still incomplete: one that arrives
            // in a large read can be parsed past it, so the size is checked here as well.
            if request_head_len(&req) > MAX_REQUEST_HEAD {
                return Ok(head_too_large(&req, &shared));
            }
            match admitted {
                Some(meta) => proxy::handle(req, shared, meta).await,
                None => Ok(refuse(&req, &shared, refusal)),
            }
        }
    });

    let watch = Watch { shared: &shared, peer, place: &place, deadline, first_request: &first_request };
    if http2 {
        let max_streams = shared.settings().config.listen.http2_max_streams;
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            // Caps the streams, so their buffers below, of one connection.
            .max_concurrent_streams(u32::try_from(max_streams).unwrap_or(u32::MAX))
            .initial_stream_window_size(http2_limits::STREAM_WINDOW)
            .initial_connection_window_size(http2_limits::CONNECTION_WINDOW)
            .max_frame_size(http2_limits::MAX_FRAME)
            .max_send_buf_size(http2_limits::STREAM_WINDOW as usize)
            .max_header_list_size(MAX_REQUEST_HEAD as u32);
        let conn = pin!(builder.serve_connection(TokioIo::new(io), service));
        let idle = (!idle_timeout.is_zero()).then_some((idle_timeout, &*requests));
        watch.run(conn, hyper::server::conn::http2::Connection::graceful_shutdown, Some((&websockets, idle))).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).max_buf_size(MAX_REQUEST_HEAD);
        if !idle_timeout.is_zero() {
            // Covers both a keep-alive connection waiting for its next request and a slow head.
            builder.header_read_timeout(idle_timeout);
        }
        let conn = pin!(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
        watch.run(conn, hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown, None).await;
    }
}

/// The HTTP/2 settings that bound a connection's memory (README, "HTTP/2"): what a client may
/// send on a stream before wskeep reads it, and on all its streams together. The stream window
/// also caps what hyper buffers of a plain response body for a client that does not read
/// (`max_send_buf_size`); of a WebSocket stream's writes, hyper holds at most four (its bridge's
/// channel, one waiting for the window, one in h2's queue).
mod http2_limits {
    pub const STREAM_WINDOW: u32 = 128 * 1024;
    pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
    /// The smallest a peer must accept (RFC 9113 §6.5.2).
    pub const MAX_FRAME: u32 = 16 * 1024;
}

/// What watches a connection while hyper serves it: the handshake deadline, the handshake place,
/// the drain and the close phase.
struct Watch<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    place: &'a HandshakePlace,
    deadline: Instant,
    first_request: &'a AtomicBool,
}

/// An HTTP/2 connection's WebSocket streams and, with `listen.idle_timeout`, its request count.
type Http2Watch<'a> = (&'a TaskTracker, Option<(Duration, &'a AtomicU64)>);

impl Watch<'_> {
    /// Drives `conn` to its end. On a drain, an HTTP/1.1 connection shuts down gracefully at once
    /// (an upgraded one has left hyper already); an HTTP/2 connection sends its GOAWAY only once
    /// its WebSocket streams have ended (each relay sends 1001 at the close phase), so that no
    /// client sees a GOAWAY while its WebSocket is open, and it is held through the close phase
    /// for them, within the close bound.
    async fn run<C>(
        self,
        mut conn: std::pin::Pin<&mut C>,
        graceful: fn(std::pin::Pin<&mut C>),
        http2: Option<Http2Watch<'_>>,
    ) where
        C: std::future::Future<Output = hyper::Result<()>>,
    {
        let Watch { shared, peer, place, deadline, first_request } = self;
        let mut head_deadline = pin!(tokio::time::sleep_until(deadline));
        let mut head_checked = false;
        let mut draining = pin!(shared.drain.draining());
        let mut drain_seen = false;
        let mut closing = pin!(shared.drain.closing());
        let mut closing_seen = false;
        let mut goaway_sent = false;
        let websockets = http2.map(|(tracker, _)| tracker);
        let mut websockets_done = pin!(async {
            match websockets {
                Some(tracker) => tracker.wait().await,
                None => std::future::pending().await,
            }
        });
        let idle = http2.and_then(|(_, idle)| idle);
        let mut idle_tick = tokio::time::interval(idle.map_or(Duration::from_secs(3600), |(timeout, _)| timeout));
        idle_tick.reset();
        let mut requests_seen = 0;
        let mut close_bound = pin!(tokio::time::sleep(Duration::ZERO));
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
                // Only a connection before its first request has a place a newer one can take.
                _ = place.dropped() => return,
                _ = &mut draining, if !drain_seen => {
                    drain_seen = true;
                    match websockets {
                        // Closed, it is waited for: GOAWAY follows its last stream.
                        Some(tracker) => { tracker.close(); }
                        None => graceful(conn.as_mut()),
                    }
                }
                _ = &mut websockets_done, if drain_seen && !goaway_sent => {
                    goaway_sent = true;
                    graceful(conn.as_mut());
                }
                // An HTTP/2 connection with no WebSocket and no new request for the idle timeout.
                _ = idle_tick.tick(), if idle.is_some() && !goaway_sent => {
                    let requests = idle.map_or(0, |(_, count)| count.load(Relaxed));
                    if requests == requests_seen && websockets.is_some_and(TaskTracker::is_empty) {
                        goaway_sent = true;
                        graceful(conn.as_mut());
                    }
                    requests_seen = requests;
                }
                _ = &mut closing, if !closing_seen => {
                    if websockets.is_none() {
                        return;
                    }
                    // The relays on this connection's streams are sending their 1001 now.
                    closing_seen = true;
                    close_bound.as_mut().reset(Instant::now() + CLOSE_BOUND);
                }
                _ = &mut close_bound, if closing_seen => return,
            }
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

/// 503 past `max_connections` (`Limit`) or on the reserved descriptor (`LocalLimit`).
fn refuse<B>(req: &hyper::Request<B>, shared: &Shared, reason: UpgradeFailure) -> hyper::Response<proxy::Body> {
    let (detail, body) = match reason {
        UpgradeFailure::LocalLimit => ("out of file descriptors at accept", "wskeep is out of local resources\n"),
        _ => ("listen.max_connections reached", "too many connections\n"),
    };
    if proxy::headers::wants_websocket(req.headers()) || proxy::is_websocket_connect(req) {
        shared.metrics.upgrade_failed(reason);
        crate::telemetry::upgrade_failure(reason, detail);
    } else {
        shared.metrics.http_request(hyper::StatusCode::SERVICE_UNAVAILABLE);
    }
    let mut response = proxy::text(hyper::StatusCode::SERVICE_UNAVAILABLE, body);
    if req.version() < hyper::Version::HTTP_2 {
        // HTTP/2 has no Connection header: a stream is refused, the connection stays.
        response.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    response
}
