//! A neutral echo upstream: every text and binary message goes back unchanged, pings are answered
//! (by tungstenite), closes are answered. Small buffers, so its own memory does not hide the
//! proxy's in a measurement.

use std::net::SocketAddr;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// tungstenite's limits for a server socket of the echo and legacy upstreams: messages and frames
/// up to `max_message_size`, and small buffers (the default 128 KiB read buffer is allocated
/// eagerly for every socket).
pub fn websocket_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        // One message plus the batch: the sink reports "not ready" before more is queued.
        .max_write_buffer_size(16 * 1024 + max_message_size + 1024)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Binds `addr` and echoes on every connection until the runtime ends.
pub async fn start(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    tokio::spawn(echo(tcp));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    });
    Ok(local)
}

async fn echo(tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    // 64 MiB: the conformance suite's largest cases go through.
    // 8 KiB reads: fewer syscalls than the proxy's idle-friendly 1 KiB, still far below 128 KiB.
    let config = websocket_config(64 << 20).read_buffer_size(8 * 1024);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await else {
        return;
    };
    let mut next = ws.next().await;
    while let Some(Ok(msg)) = next {
        if matches!(msg, Message::Close(_)) {
            break;
        }
        if (msg.is_text() || msg.is_binary()) && ws.feed(msg).await.is_err() {
            return;
        }
        // Echo what has already arrived in one write, as a server under load would.
        next = match ws.next().now_or_never() {
            Some(item) => item,
            None => {
                if ws.flush().await.is_err() {
                    return;
                }
                ws.next().await
            }
        };
    }
    // Flushing sends the close answer tungstenite queued (`close()` would refuse: the peer
    // already closed).
    let _ = ws.flush().await;
}
