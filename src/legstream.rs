//! The transport of a relay leg, read without a buffer of wskeep's own.
//!
//! The relay parses frames straight from the bytes the transport has: behind TLS those are in
//! rustls's plaintext buffer already (`AsyncBufRead`), so they are lent, not copied; a plain
//! socket reads into the caller's stack buffer. Either way an idle connection holds no read
//! buffer at all.
//!
//! It also unwraps hyper's upgraded stream back to the socket it came from, which removes a
//! boxed, dynamically dispatched layer from every read and write of the relay.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::proxy::upstream::UpstreamIo;

/// The listener's connection type (see `server.rs`).
pub type ClientIo = Either<TlsStream<TcpStream>, TcpStream>;

/// Any other byte stream (an upstream over TLS, or an in-memory pipe in tests).
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
    Other(Box<dyn Transport>),
}

pub struct LegStream {
    io: Io,
    /// Bytes hyper read past the handshake, handed out before anything else.
    leftover: Option<Bytes>,
}

impl LegStream {
    /// Takes an upgraded connection apart into its socket and any bytes hyper read past the
    /// handshake.
    pub fn from_upgraded(upgraded: Upgraded) -> LegStream {
        let (io, leftover) = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Io::Plain(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => match upgraded.downcast::<TokioIo<ClientIo>>() {
                Ok(parts) => match parts.io.into_inner() {
                    Either::Left(tls) => (Io::Tls(Box::new(tls)), parts.read_buf),
                    Either::Right(tcp) => (Io::Plain(tcp), parts.read_buf),
                },
                // An upstream over TLS or a Unix socket: its own stream, without hyper's layer.
                Err(upgraded) => match upgraded.downcast::<TokioIo<UpstreamIo>>() {
                    Ok(parts) => (Io::Other(Box::new(parts.io.into_inner())), parts.read_buf),
                    Err(upgraded) => (Io::Other(Box::new(TokioIo::new(upgraded))), Bytes::new()),
                },
            },
        };
        LegStream { io, leftover: (!leftover.is_empty()).then_some(leftover) }
    }

    /// A leg over any byte stream.
    pub fn new(io: impl Transport + 'static) -> LegStream {
        LegStream { io: Io::Other(Box::new(io)), leftover: None }
    }

    /// Waits for bytes and lets `use_bytes` see them; they are consumed, all of them, once it
    /// returns. An empty slice is the end of the stream. `scratch` is where transports without
    /// a buffer of their own read into.
    pub fn poll_read_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut [MaybeUninit<u8>],
        use_bytes: impl FnOnce(&[u8]) -> R,
    ) -> Poll<io::Result<R>> {
        if let Some(leftover) = self.leftover.take() {
            return Poll::Ready(Ok(use_bytes(&leftover)));
        }
        let io = match &mut self.io {
            Io::Tls(tls) => {
                let mut tls = Pin::new(tls.as_mut());
                let bytes = ready!(tls.as_mut().poll_fill_buf(cx))?;
                let (len, result) = (bytes.len(), use_bytes(bytes));
                tls.consume(len);
                return Poll::Ready(Ok(result));
            }
            Io::Plain(tcp) => tcp as &mut dyn Transport,
            Io::Other(io) => io.as_mut(),
        };
        let mut buf = ReadBuf::uninit(scratch);
        ready!(Pin::new(io).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(use_bytes(buf.filled())))
    }

    /// The transport, for writing: one dynamic call per write, next to a system call.
    fn transport(&mut self) -> Pin<&mut dyn Transport> {
        Pin::new(match &mut self.io {
            Io::Tls(io) => io.as_mut(),
            Io::Plain(io) => io,
            Io::Other(io) => io.as_mut(),
        })
    }

    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.transport().poll_write(cx, data)
    }

    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.transport().poll_flush(cx)
    }

    /// Flushes what the transport still buffers and shuts its write side (TLS: `close_notify`).
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.transport().poll_shutdown(cx)
    }
}
