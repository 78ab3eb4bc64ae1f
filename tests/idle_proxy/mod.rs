//! An intermediary that cuts idle TCP connections, as load balancers and ingress proxies do
//! (nginx's `proxy_read_timeout`, a cloud load balancer's idle timeout): it relays bytes both
//! ways, any byte in either direction resets the connection's idle timer, and a connection idle
//! for the whole timeout has both its sockets closed, without a word to either side.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub struct IdleProxy {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Connections cut because they were idle for the timeout.
    pub cuts: Arc<AtomicUsize>,
}

impl IdleProxy {
    pub fn cuts(&self) -> usize {
        self.cuts.load(Relaxed)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }
}

/// Listens on 127.0.0.1 port 0 and relays every connection to `target`.
pub async fn start(target: SocketAddr, idle: Duration) -> IdleProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let cuts = Arc::new(AtomicUsize::new(0));
    let (n, c) = (connections.clone(), cuts.clone());
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            n.fetch_add(1, Relaxed);
            tokio::spawn(relay(inbound, target, idle, c.clone()));
        }
    });
    IdleProxy { addr, connections, cuts }
}

async fn relay(inbound: TcpStream, target: SocketAddr, idle: Duration, cuts: Arc<AtomicUsize>) {
    let Ok(outbound) = TcpStream::connect(target).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let epoch = Instant::now();
    // Microseconds since `epoch` of the last byte seen in either direction.
    let last = Arc::new(AtomicU64::new(0));
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let up = tokio::spawn(pipe(in_read, out_write, epoch, last.clone()));
    let down = tokio::spawn(pipe(out_read, in_write, epoch, last.clone()));
    let (abort_up, abort_down) = (up.abort_handle(), down.abort_handle());
    let both_ended = async {
        let _ = up.await;
        let _ = down.await;
    };
    tokio::pin!(both_ended);
    loop {
        let deadline = epoch + Duration::from_micros(last.load(Relaxed)) + idle;
        tokio::select! {
            _ = &mut both_ended => return,
            _ = tokio::time::sleep_until(deadline) => {
                if Instant::now() >= epoch + Duration::from_micros(last.load(Relaxed)) + idle {
                    // Idle for the whole timeout: drop both sockets (their halves live in the tasks).
                    cuts.fetch_add(1, Relaxed);
                    abort_up.abort();
                    abort_down.abort();
                    return;
                }
            }
        }
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, epoch: Instant, last: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                last.store(epoch.elapsed().as_micros() as u64, Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
