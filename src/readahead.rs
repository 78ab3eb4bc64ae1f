//! The socket of a relay leg, with a read-ahead buffer that exists only while data flows.
//!
//! tungstenite reads at most its read-buffer size per call, and that buffer is allocated for
//! every socket whether it is busy or idle. A small one keeps idle connections cheap, but on a
//! plain socket it turns a large message into many small `read` syscalls. `LegStream` squares
//! the two: when a plain socket is readable it reads up to `CHUNK` bytes in one syscall into a
//! buffer allocated for the occasion and dropped once tungstenite has taken it all, so an idle
//! connection holds no read-ahead memory. Behind TLS, rustls already buffers whole records.
//!
//! It also unwraps hyper's upgraded stream back to the socket it came from, which removes a
//! boxed, dynamically dispatched layer from every read and write of the relay.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

/// The most one syscall reads ahead on a plain socket.
const CHUNK: usize = 64 * 1024;

/// The listener's connection type (see `server.rs`).
pub type ClientIo = Either<TlsStream<TcpStream>, TcpStream>;

enum Io {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
    /// Anything else hyper hands over (not expected; kept so nothing is ever refused).
    Other(TokioIo<Upgraded>),
}

pub struct LegStream {
    io: Io,
    /// Bytes read and not yet handed out: first hyper's leftover from the handshake, then the
    /// read-ahead of a plain socket. `None` while there are none.
    buffered: Option<Bytes>,
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
                Err(upgraded) => (Io::Other(TokioIo::new(upgraded)), Bytes::new()),
            },
        };
        LegStream { io, buffered: (!leftover.is_empty()).then_some(leftover) }
    }

    /// Reads what a plain socket has (up to `CHUNK`) into a fresh buffer.
    fn poll_read_ahead(tcp: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            // Allocate only once the socket says it has data: most polls of an idle leg end here.
            ready!(tcp.poll_read_ready(cx))?;
            let mut chunk = BytesMut::with_capacity(CHUNK);
            // `poll_read` (unlike `try_read`) clears readiness after a short read, which saves
            // the `EAGAIN` syscall that would otherwise follow every burst.
            match tokio_util::io::poll_read_buf(Pin::new(&mut *tcp), cx, &mut chunk) {
                Poll::Ready(Ok(_)) => return Poll::Ready(Ok(chunk.freeze())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The readiness was stale and is cleared now: wait for the next one.
                Poll::Pending => continue,
            }
        }
    }
}

impl AsyncRead for LegStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered.is_none() {
            match &mut this.io {
                Io::Tls(tls) => return Pin::new(tls.as_mut()).poll_read(cx, out),
                Io::Other(io) => return Pin::new(io).poll_read(cx, out),
                Io::Plain(tcp) if out.remaining() >= CHUNK => return Pin::new(tcp).poll_read(cx, out),
                Io::Plain(tcp) => {
                    let chunk = ready!(Self::poll_read_ahead(tcp, cx))?;
                    if chunk.is_empty() {
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    this.buffered = Some(chunk);
                }
            }
        }
        if let Some(buffered) = &mut this.buffered {
            let n = buffered.len().min(out.remaining());
            out.put_slice(&buffered.split_to(n));
            if buffered.is_empty() {
                this.buffered = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $call
            }
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Other($io) => {
                let $io = Pin::new($io);
                $call
            }
        }
    };
}

impl AsyncWrite for LegStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tls(io) => io.is_write_vectored(),
            Io::Plain(io) => io.is_write_vectored(),
            Io::Other(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}
