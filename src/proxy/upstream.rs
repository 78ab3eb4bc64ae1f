//! Where the upstream is and how a connection to it is opened: TCP (`ws://host:port`, IPv6
//! included) or a Unix domain socket (`unix:/run/orchestrator.sock`). The WebSocket handshake
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::Upstream;

/// Where connections to the upstream go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`, resolved at each connect.
    Tcp(String),
    Unix(PathBuf),
}

impl Target {
    pub fn of(upstream: &Upstream) -> Target {
        match &upstream.unix_path {
            Some(path) => Target::Unix(path.clone()),
            None => Target::Tcp(upstream.authority.clone()),
        }
    }
}

/// A connection to the upstream. The TCP case stays a bare `TcpStream` for the WebSocket leg
/// (`LegStream` unwraps it from hyper's upgrade), so only the other transports pay for this enum.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Opens a connection to `target` within `timeout` (an `io::ErrorKind::TimedOut` past it).
pub async fn connect(target: &Target, timeout: Duration) -> io::Result<UpstreamIo> {
    let connecting = async {
        Ok(match target {
            Target::Tcp(authority) => {
                let tcp = TcpStream::connect(authority.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                UpstreamIo::Tcp(tcp)
            }
            Target::Unix(path) => UpstreamIo::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
        })
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Unix(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_write(cx, data),
            UpstreamIo::Unix(io) => Pin::new(io).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Unix(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Unix(io) => Pin::new(io).poll_shutdown(cx),
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
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<UpstreamIo>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (target, timeout) = (self.target.clone(), self.timeout);
        Box::pin(async move { connect(&target, timeout).await.map(TokioIo::new) })
    }
}
