//! Where the upstream is and how a connection to it is opened: TCP (`ws://host:port`, IPv6
//! included), TLS (`wss://`, `upstream_tls`) or a Unix domain socket (`unix:/run/orchestrator.sock`). The WebSocket handshake
//! (`ws`) and the pooled plain-HTTP client (`http`, through `Connector`) both connect here.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::upstream_tls::UpstreamTls;
use crate::config::Upstream;

/// Where connections to the upstream go.
#[derive(Debug, Clone)]
pub enum Target {
    /// `host:port`, resolved at each connect.
    Tcp(String),
    Unix(PathBuf),
    /// TCP to `host:port`, then TLS verified for `name` with the configuration's shared client
    /// configuration (and so its session cache).
    Tls {
        authority: String,
        name: ServerName<'static>,
        config: Arc<UpstreamTls>,
    },
}

impl Target {
    pub fn of(upstream: &Upstream) -> Target {
        if let Some(path) = &upstream.unix_path {
            return Target::Unix(path.clone());
        }
        if let Some(tls) = &upstream.tls {
            // `validate` checked the name.
            if let Some(name) = super::upstream_tls::server_name(&tls.name) {
                return Target::Tls { authority: upstream.authority.clone(), name, config: tls.clone() };
            }
        }
        Target::Tcp(upstream.authority.clone())
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Tcp(a), Target::Tcp(b)) => a == b,
            (Target::Unix(a), Target::Unix(b)) => a == b,
            (Target::Tls { authority: a, name: n, config: c }, Target::Tls { authority: b, name: m, config: d }) => {
                a == b && n == m && Arc::ptr_eq(c, d)
            }
            _ => false,
        }
    }
}

/// A connection to the upstream. The TCP case stays a bare `TcpStream` for the WebSocket leg
/// (`LegStream` unwraps it from hyper's upgrade), so only the other transports pay for this enum.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why no connection to the upstream was opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connecting failed, or timed out (`io::ErrorKind::TimedOut`).
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The TLS handshake failed: a certificate that does not verify, a wrong name, an expired
    /// certificate, a refused client certificate, or not TLS at all.
    #[error("TLS handshake with the upstream failed: {0}")]
    Tls(String),
}

/// Opens a connection to `target` within `timeout` (TLS handshake included).
pub async fn connect(target: &Target, timeout: Duration) -> Result<UpstreamIo, ConnectError> {
    let connecting = async {
        Ok(match target {
            Target::Tcp(authority) => UpstreamIo::Tcp(tcp(authority).await.map_err(ConnectError::Io)?),
            Target::Unix(path) => UpstreamIo::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| ConnectError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display()))))?,
            ),
            Target::Tls { authority, name, config } => {
                let tcp = tcp(authority).await.map_err(ConnectError::Io)?;
                let tls = TlsConnector::from(config.current())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| ConnectError::Tls(e.to_string()))?;
                UpstreamIo::Tls(Box::new(tls))
            }
        })
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Io(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))),
    }
}

/// `TcpStream::connect`, with each socket made by `admission::upstream_socket` (a descriptor
/// freed meanwhile goes to the reserve first).
async fn tcp(authority: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(authority).await? {
        match crate::admission::upstream_socket(addr)?.connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the upstream host has no address")))
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Unix(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_write(cx, data),
            UpstreamIo::Unix(io) => Pin::new(io).poll_write(cx, data),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Unix(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Unix(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// The plain-HTTP client's connector: every request's connection goes to the configured target,
/// whatever the request's URI says (for a Unix socket it names only the `Host`).
#[derive(Clone)]
pub struct Connector {
    target: Arc<Target>,
    timeout: Duration,
}

impl Connector {
    pub fn new(upstream: &Upstream) -> Connector {
        Connector { target: Arc::new(Target::of(upstream)), timeout: upstream.connect_timeout }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<UpstreamIo>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (target, timeout) = (self.target.clone(), self.timeout);
        Box::pin(async move { connect(&target, timeout).await.map(TokioIo::new) })
    }
}
