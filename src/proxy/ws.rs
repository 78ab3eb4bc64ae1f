//! The WebSocket handshake, upstream first: the upstream's answer decides the client's.
//!
//! The upstream leg uses hyper's client upgrade rather than tungstenite's client handshake,
//! which keeps only part of a refusal's body and rejects a 101 without a subprotocol when some
//! were offered. A refusal reaches the client whole (status, headers, body); a 101 is checked in
//! full (RFC 6455 §4.1, `headers::check_upgrade_response`) before the client gets its own. Both
//! upgraded streams are then handed to `relay::run`, which frames them itself (`frame`), in a
//! task the drain tracks; if only one of them upgraded, `lone_leg` closes it.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::upstream::{self, ConnectError, UpstreamIo};
use super::{deflate, headers, lone_leg, text, Body, ConnMeta, Settings, Shared};
use crate::admission::is_out_of_resources;
use crate::legstream::LegStream;
use crate::relay::session::{self, SessionContext};
use crate::relay::{self, Outcome, RelaySettings};
use crate::resume::{self, Ask, Facts, Failure, Resumption};
use crate::vocab::{End, HttpVersion, Side, UpgradeFailure};

/// Why the upstream leg could not be opened, and what the client is told.
enum UpstreamFailure {
    Unreachable(String),
    TimedOut(&'static str),
    Refused(Response<Incoming>),
    BadHandshake(&'static str),
    /// wskeep itself is out of descriptors or memory: not the upstream's fault.
    LocalLimit(String),
    /// The upstream's certificate did not verify (or the TLS handshake failed otherwise).
    Tls(String),
}

pub async fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    meta: ConnMeta,
) -> Response<Body> {
    let metrics = &shared.metrics;
    let checked = match meta.http_version {
        HttpVersion::Http1 => headers::validate_upgrade(req.method(), req.version(), req.headers()).map(Some),
        HttpVersion::Http2 => validate_connect(req.headers()).map(|()| None),
    };
    // The client's key on HTTP/1.1; HTTP/2 has none (RFC 8441 §5).
    let client_key = match checked {
        Ok(key) => key.map(str::to_string),
        Err(bad) => {
            metrics.upgrade_failed(UpgradeFailure::BadRequest);
            crate::telemetry::upgrade_failure(UpgradeFailure::BadRequest, bad.reason.trim_end());
            let mut response = text(bad.status, bad.reason);
            if bad.status == StatusCode::UPGRADE_REQUIRED {
                response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            return response;
        }
    };
    let offered = headers::offered_protocols(req.headers());
    let resume = &settings.config.resume;
    let ask = if resume.enabled { resume::request::ask(req.uri().query()) } else { None };
    // A resume is answered 101 and refused with 4410 even while draining: a browser sees a
    // 503 only as a bare 1006, and the shim would retry rather than start afresh.
    if let Some(Ask::Resume { token, received }) = ask {
        return resume_session(&mut req, client_key.as_deref(), &offered, (token, received), &shared, &settings, meta);
    }
    if shared.drain.is_draining() {
        metrics.upgrade_failed(UpgradeFailure::Draining);
        return text(StatusCode::SERVICE_UNAVAILABLE, "wskeep is shutting down\n");
    }
    let mut deflate_offers =
        if settings.config.compression.enabled { deflate::client_offers(req.headers()) } else { Vec::new() };
    if ask == Some(Ask::New) {
        // A replay must decode on the new connection: every upstream message compressed alone.
        deflate_offers.iter_mut().for_each(|offer| offer.server_no_context_takeover = true);
    }
    let started = Instant::now();
    let upstream = open_upstream(&req, &shared, &settings, &meta, &offered, &deflate_offers).await;
    let (upstream_response, upstream_upgrade, deflate) = match upstream {
        Ok(ok) => ok,
        Err(failure) => return refuse(failure, &shared),
    };
    metrics.upstream_connect.observe(started.elapsed().as_secs_f64());

    // The client's 101 (HTTP/2: 200): the upstream's choice of subprotocol and its other
    // end-to-end headers (cookies, for instance), and on HTTP/1.1 the client's own accept key.
    let mut upstream_headers = upstream_response.headers().clone();
    headers::strip_response(&mut upstream_headers, true);
    let mut response = accepted(client_key.as_deref());
    response.headers_mut().extend(upstream_headers);
    if let Some(agreed) = &deflate {
        response.headers_mut().insert(header::SEC_WEBSOCKET_EXTENSIONS, deflate::client_answer(agreed));
        metrics.compressed_connections.inc();
    }

    let session = (ask == Some(Ask::New)).then(|| {
        Box::new(SessionContext {
            registry: shared.sessions.clone(),
            facts: Arc::new(Facts {
                binding: binding(&req, &shared, &settings),
                protocol: response.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned(),
                extensions: response.headers().get(header::SEC_WEBSOCKET_EXTENSIONS).cloned(),
            }),
            connections: shared.connections.clone(),
            grace: resume.grace,
            buffer: resume.buffer.0 as usize,
            hold: None,
        })
    });

    let client_upgrade = hyper::upgrade::on(&mut req);
    let path = super::loggable_path(req.uri());
    let task_shared = shared.clone();
    let relay_settings = settings.relay.clone();
    shared.drain.spawn(async move {
        let legs = Legs { client: client_upgrade, upstream: upstream_upgrade, deflate: deflate.is_some() };
        relay_task(legs, task_shared, relay_settings, meta, path, session).await;
    });
    response
}

/// The keyed hash of the request's `resume.bind` credentials.
fn binding(req: &Request<Incoming>, shared: &Shared, settings: &Settings) -> [u8; 32] {
    // Checked by `wskeep check` at load: every entry parses.
    let bind: Vec<_> = settings.config.resume.bind.iter().filter_map(|e| resume::BindKey::parse(e).ok()).collect();
    shared.sessions.binding(&resume::request::bound_values(&bind, req.headers(), req.uri().query()))
}

/// A resuming handshake, answered without contacting the upstream: 101 either way, then the
/// session's task gets the new leg, or the client gets 4410 (docs/resume.md). The connection's
/// place (`meta`) goes with the leg: to the session, or held until the 4410 is done.
fn resume_session(
    req: &mut Request<Incoming>,
    client_key: Option<&str>,
    offered: &[String],
    (token, received): (Option<resume::token::Token>, Option<u64>),
    shared: &Arc<Shared>,
    settings: &Settings,
    meta: ConnMeta,
) -> Response<Body> {
    let claimed_at = std::time::Instant::now();
    let claim = match (token, received) {
        // Every session is closing: the token is left for its session to spend as it ends.
        _ if shared.drain.is_draining() => Err(Failure::UpstreamGone),
        (Some(token), Some(received)) => {
            shared.sessions.claim(&token, &binding(req, shared, settings), offered).map(|claim| (claim, received))
        }
        (Some(_), None) => Err(Failure::BadCount),
        (None, _) => Err(Failure::BadToken),
    };
    // A compressed session's replay is compressed: the new offer must allow what was agreed.
    let claim = claim.and_then(|(claim, received)| match &claim.facts.extensions {
        Some(answer) if !deflate::allows(answer, &deflate::client_offers(req.headers())) => {
            Err(Failure::CredentialMismatch)
        }
        _ => Ok((claim, received)),
    });
    let mut response = accepted(client_key);
    let h = response.headers_mut();
    match &claim {
        Ok((claim, _)) => {
            if let Some(protocol) = &claim.facts.protocol {
                h.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
            }
            if let Some(extensions) = &claim.facts.extensions {
                h.insert(header::SEC_WEBSOCKET_EXTENSIONS, extensions.clone());
            }
        }
        // Echoing the first offer lets a browser accept the 101 and read the 4410 that follows.
        Err(_) => {
            if let Some(first) = offered.first().and_then(|p| HeaderValue::from_str(p).ok()) {
                h.insert(header::SEC_WEBSOCKET_PROTOCOL, first);
            }
        }
    }
    let upgrade = hyper::upgrade::on(req);
    let metrics = shared.metrics.clone();
    if let Err(why) = &claim {
        // Expiry and overflow were counted when they happened.
        if !matches!(why, Failure::Expired | Failure::Overflow) {
            metrics.resume_failed(*why);
        }
    }
    shared.drain.spawn(async move {
        let leg = match upgrade.await {
            Ok(upgraded) => LegStream::from_upgraded(upgraded),
            Err(e) => {
                tracing::debug!(error = %e, "resuming upgrade did not complete");
                return;
            }
        };
        let hold = resume::Hold { permit: meta.permit, stream: meta.stream };
        match claim {
            Ok((claim, received)) => {
                let resumption = Resumption { leg, hold, received, claimed: claimed_at };
                if let Err(back) = claim.handoff.send(resumption) {
                    // The session ended between the claim and now.
                    metrics.resume_failed(Failure::UpstreamGone);
                    session::refusal(back.leg, Failure::UpstreamGone, &metrics, Some(back.hold)).await;
                }
            }
            Err(why) => session::refusal(leg, why, &metrics, Some(hold)).await,
        }
    });
    response
}

/// The client's answer that its WebSocket is open: on HTTP/1.1 a 101 with its accept key, on
/// HTTP/2 (no key, RFC 8441 §5) a 200.
fn accepted(client_key: Option<&str>) -> Response<Body> {
    let mut response = Response::new(Body::default());
    if let Some(client_key) = client_key {
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        // The key passed validation (base64 characters only), so the derived value is a valid header.
        let accept = derive_accept_key(client_key.as_bytes());
        h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a header value"));
    }
    response
}

/// Checks an HTTP/2 extended CONNECT for a WebSocket (RFC 8441 §5): version 13 (else 426, as
/// RFC 6455 §4.4 answers on HTTP/1.1), no body.
fn validate_connect(headers: &hyper::HeaderMap) -> Result<(), headers::BadUpgrade> {
    let versions: Vec<_> = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter().collect();
    if versions.len() != 1 || versions[0] != "13" {
        return Err(headers::BadUpgrade {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "unsupported Sec-WebSocket-Version (13 is supported)\n",
        });
    }
    let empty = |v: &HeaderValue| v.to_str().is_ok_and(|v| v.trim().parse::<u64>() == Ok(0));
    if !headers.get_all(header::CONTENT_LENGTH).iter().all(empty) {
        return Err(headers::BadUpgrade {
            status: StatusCode::BAD_REQUEST,
            reason: "a WebSocket CONNECT must not have a body (Content-Length)\n",
        });
    }
    Ok(())
}

/// The two legs' upgrades, and whether messages may be compressed.
struct Legs {
    client: OnUpgrade,
    upstream: OnUpgrade,
    deflate: bool,
}

/// Connects to the upstream and asks it for the same WebSocket; `Ok` only on a checked 101,
/// with the permessage-deflate parameters it agreed to.
async fn open_upstream(
    req: &Request<Incoming>,
    shared: &Shared,
    settings: &Settings,
    meta: &ConnMeta,
    offered: &[String],
    deflate_offers: &[deflate::Params],
) -> Result<(Response<Incoming>, OnUpgrade, Option<deflate::Params>), UpstreamFailure> {
    let upstream = &settings.config.upstream;
    let io = match upstream::connect(&upstream::Target::of(upstream), upstream.connect_timeout).await {
        Ok(io) => io,
        Err(ConnectError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            return Err(UpstreamFailure::TimedOut("connect timed out"))
        }
        Err(ConnectError::Io(e)) if is_out_of_resources(&e) => return Err(UpstreamFailure::LocalLimit(e.to_string())),
        Err(ConnectError::Io(e)) => return Err(UpstreamFailure::Unreachable(e.to_string())),
        Err(e @ ConnectError::Tls(_)) => return Err(UpstreamFailure::Tls(e.to_string())),
    };
    // A TCP stream goes to hyper bare, so that `LegStream` finds the socket again after the upgrade.
    let mut sender = match io {
        UpstreamIo::Tcp(tcp) => http1_handshake(tcp).await?,
        other => http1_handshake(other).await?,
    };

    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    // wskeep's own parameters stay here (docs/resume.md), whether resuming is enabled or not.
    let path = match req.uri().query().map(resume::request::strip_query) {
        Some(Some(query)) => format!("{}?{query}", req.uri().path()),
        _ => req.uri().path().to_string(),
    };
    let mut upstream_req = Request::get(path).body(Body::default()).expect("a path from a parsed URI is valid");
    let trusted = crate::cidr::any_contains(&settings.config.listen.trusted_proxies, meta.peer.ip());
    let mut forwarded =
        headers::forward_request(req.headers(), meta.peer.ip(), trusted, shared.tls, &upstream.host, true);
    forwarded.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    forwarded.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    forwarded.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    forwarded.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_str(&key).expect("base64 is a header value"));
    if let Some(offer) = deflate::offer_header(deflate_offers) {
        forwarded.insert(header::SEC_WEBSOCKET_EXTENSIONS, offer);
    }
    *upstream_req.headers_mut() = forwarded;

    let mut response = match tokio::time::timeout(upstream.response_timeout, sender.send_request(upstream_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(UpstreamFailure::Unreachable(e.to_string())),
        Err(_) => return Err(UpstreamFailure::TimedOut("no response within upstream.response_timeout")),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(UpstreamFailure::Refused(response));
    }
    headers::check_upgrade_response(response.headers(), &key, offered).map_err(UpstreamFailure::BadHandshake)?;
    let agreed = deflate::agreed(response.headers(), deflate_offers).map_err(UpstreamFailure::BadHandshake)?;
    let upgrade = hyper::upgrade::on(&mut response);
    Ok((response, upgrade, agreed))
}

/// Starts HTTP/1.1 on a fresh upstream connection; the connection task ends at the upgrade, or
/// after streaming a refusal's body.
async fn http1_handshake<T>(io: T) -> Result<hyper::client::conn::http1::SendRequest<Body>, UpstreamFailure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamFailure::Unreachable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// The client's answer when the upstream leg failed.
fn refuse(failure: UpstreamFailure, shared: &Shared) -> Response<Body> {
    let (reason, status, detail) = match failure {
        UpstreamFailure::Refused(mut response) => {
            // Passed through as the upstream sent it: status, end-to-end headers and body.
            shared.metrics.upgrade_failed(UpgradeFailure::UpstreamRefused);
            crate::telemetry::upgrade_failure(UpgradeFailure::UpstreamRefused, response.status().as_str());
            headers::strip_response(response.headers_mut(), true);
            return response.map(|b| b.boxed());
        }
        UpstreamFailure::Unreachable(e) => (UpgradeFailure::UpstreamUnreachable, StatusCode::BAD_GATEWAY, e),
        UpstreamFailure::BadHandshake(e) => {
            (UpgradeFailure::UpstreamBadHandshake, StatusCode::BAD_GATEWAY, e.to_string())
        }
        UpstreamFailure::Tls(e) => (UpgradeFailure::UpstreamTls, StatusCode::BAD_GATEWAY, e),
        UpstreamFailure::TimedOut(e) => (UpgradeFailure::UpstreamTimeout, StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        UpstreamFailure::LocalLimit(e) => (UpgradeFailure::LocalLimit, StatusCode::SERVICE_UNAVAILABLE, e),
    };
    shared.metrics.upgrade_failed(reason);
    crate::telemetry::upgrade_failure(reason, &detail);
    let body = match status {
        StatusCode::GATEWAY_TIMEOUT => "upstream timed out\n",
        StatusCode::SERVICE_UNAVAILABLE => "wskeep is out of local resources\n",
        _ => "upstream unavailable\n",
    };
    text(status, body)
}

/// Waits for both upgrades, relays under the settings the upgrade started with, and reports the
/// ending.
async fn relay_task(
    Legs { client, upstream, deflate }: Legs,
    shared: Arc<Shared>,
    settings: Arc<RelaySettings>,
    meta: ConnMeta,
    path: String,
    session: Option<Box<SessionContext>>,
) {
    // Both are awaited (not `try_join`): a leg that did upgrade is closed properly when the
    // other did not, rather than dropped with the other's error.
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            if let Err(e) = client.as_ref().and(upstream.as_ref()) {
                tracing::debug!(error = %e, "upgrade did not complete");
            }
            close_lone_leg(client.ok(), upstream.ok(), &shared, &meta, path).await;
            return;
        }
    };
    let client = LegStream::from_upgraded(client);
    let upstream = LegStream::from_upgraded(upstream);
    // The connection's place: a session holds it itself, as its client legs come and go.
    let mut place = Some(resume::Hold { permit: meta.permit, stream: meta.stream });

    let metrics = &shared.metrics;
    metrics.connections_total.inc();
    metrics.websocket_upgrades[meta.http_version as usize].inc();
    metrics.connections_active.inc();
    let guard = shared.connections.open_over(meta.peer, path, meta.http_version, deflate);
    let conn = &guard.info;
    let closing = shared.drain.closing_token();
    let outcome = match session {
        None => relay::run(client, upstream, &settings, metrics, conn, closing).await,
        // Boxed: a session's future is larger, and an ordinary connection's task must not grow to
        // its size (this task's future holds whichever branch it awaits).
        Some(mut ctx) => {
            ctx.hold = place.take();
            Box::pin(session::run(client, upstream, &settings, metrics, conn, closing, *ctx)).await
        }
    };
    let duration = conn.started.elapsed();
    // The ending is recorded before the gauge drops, so a scrape that sees no active connection
    // also sees every ending.
    metrics.connection_ended(outcome.end, duration.as_secs_f64());
    crate::telemetry::connection_closed(conn, &outcome, duration);
    shared.endings.record(conn.clone(), outcome, duration);
    metrics.connections_active.dec();
    drop(guard);
    drop(place);
}

/// One leg upgraded and the other did not: the upgraded one is closed as the endings table says
/// for the other's loss (or the shutdown that cut it), and the ending is recorded.
async fn close_lone_leg(
    client: Option<Upgraded>,
    upstream: Option<Upgraded>,
    shared: &Shared,
    meta: &ConnMeta,
    path: String,
) {
    let shutdown = shared.drain.closing_token().is_cancelled();
    let (end, lost, survivor, code, reason) = match (client, upstream) {
        (None, upstream) if shutdown => {
            (End::Shutdown, None, upstream.map(|u| (Side::Upstream, u)), 1001, "going away")
        }
        (None, upstream) => {
            (End::ClientError, Some(Side::Client), upstream.map(|u| (Side::Upstream, u)), 1001, "client gone")
        }
        (Some(client), _) => {
            (End::UpstreamError, Some(Side::Upstream), Some((Side::Client, client)), 1014, "upstream connection lost")
        }
    };
    let guard = shared.connections.open_over(meta.peer, path, meta.http_version, false);
    let mut codes = [(None, None); 2];
    if let Some(side) = lost {
        // That leg ended without a close frame.
        codes[side as usize].0 = Some(1006);
    }
    if let Some((side, leg)) = survivor {
        codes[side as usize] = lone_leg::close(LegStream::from_upgraded(leg), side, code, reason).await;
    }
    let metrics = &shared.metrics;
    for side in Side::BOTH {
        let (received, sent) = codes[side as usize];
        if let Some(code) = received {
            metrics.close_code(side, true, code);
        }
        if let Some(code) = sent {
            metrics.close_code(side, false, code);
        }
    }
    let duration = guard.info.started.elapsed();
    let outcome = Outcome { end, codes };
    metrics.connection_ended(end, duration.as_secs_f64());
    crate::telemetry::connection_closed(&guard.info, &outcome, duration);
    shared.endings.record(guard.info.clone(), outcome, duration);
}
