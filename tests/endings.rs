//! Endings that must blame the right peer: a peer that stops reading is the one that timed
//! out, never the healthy peer wskeep stopped reading because of it; and on the upstream leg,
//! where wskeep is the client, the upstream closes TCP first (RFC 6455 §7.1.1).
//!
//! The upstreams here are tokio-tungstenite servers written for each case; the clients are
//! wskeep's own frame client, which reports close codes raw.
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wskeep::tools::client::{self, ClientOptions, Incoming, OP_BINARY, OP_TEXT};

const LIMIT: Duration = Duration::from_secs(10);

/// Both legs judged after 1 s; pings on both legs so that each healthy peer shows it is alive.
const KEEPALIVE: &str = "[client_keepalive]\nping_interval = \"300ms\"\ntimeout = \"1s\"\n\
                         [upstream_keepalive]\nping_interval = \"300ms\"\ntimeout = \"1s\"\n";

/// An upstream that runs `serve` on its first WebSocket connection, and keeps the close frames
/// it receives.
async fn upstream<F, Fut>(serve: F) -> (std::net::SocketAddr, Arc<Mutex<Vec<(u16, String)>>>)
where
    F: FnOnce(WebSocketStream<TcpStream>, Arc<Mutex<Vec<(u16, String)>>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let kept = closes.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let config = wskeep::tools::bench::echo::websocket_config(1 << 20);
        let ws = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await.unwrap();
        serve(ws, kept).await;
    });
    (addr, closes)
}

fn record_close(closes: &Mutex<Vec<(u16, String)>>, frame: Option<CloseFrame>) {
    let entry = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
    closes.lock().unwrap().push(entry);
}

/// Waits (bounded) until the sidecar has recorded `n` endings with this `end` label.
async fn await_ending(admin: std::net::SocketAddr, end: &str) -> String {
    let series = format!(r#"wskeep_connection_duration_seconds_count{{end="{end}"}}"#);
    let deadline = Instant::now() + LIMIT;
    loop {
        let text = common::scrape(admin).await;
        if common::metric(&text, &series) >= 1.0 || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endings(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("wskeep_connection_duration_seconds_count{") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect()
}

/// A client that sends a message every 100 ms but reads nothing: wskeep stops reading the
/// streaming upstream (the client's leg is full), and must not blame the upstream for the
/// silence that follows; the client's writes that make no progress for its timeout end it.
#[tokio::test]
async fn a_client_that_stops_reading_is_the_one_that_timed_out() {
    let (addr, closes) = upstream(|ws, closes| async move {
        let (mut sink, mut stream) = ws.split();
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Close(frame) = msg {
                    record_close(&closes, frame);
                    return;
                }
            }
        });
        // Stream 16 KiB messages, with a ping every 300 ms, until the close.
        let chunk = vec![7u8; 16 * 1024];
        let mut ping = tokio::time::interval(Duration::from_millis(300));
        while !reader.is_finished() {
            let sent = tokio::select! {
                _ = ping.tick() => sink.send(Message::Ping(b"up".to_vec().into())).await,
                r = sink.send(Message::Binary(chunk.clone().into())) => r,
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = reader.await;
    })
    .await;
    let sidecar = common::start_sidecar(common::test_config(addr, None, KEEPALIVE)).await;
    let url = format!("ws://{}/", sidecar.addr);
    let mut conn = client::connect(&url, &ClientOptions::default()).await.unwrap();
    let talker = tokio::spawn(async move {
        for i in 0..200u32 {
            if conn.writer.send(OP_TEXT, format!("still talking {i}").as_bytes()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        conn
    });
    let text = await_ending(sidecar.admin, "client_timeout").await;
    assert_eq!(endings(&text), [r#"wskeep_connection_duration_seconds_count{end="client_timeout"} 1"#], "{text}");
    let deadline = Instant::now() + LIMIT;
    while closes.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closes.lock().unwrap().first(), Some(&(1001, "client timed out".to_string())));
    talker.abort();
}

/// The mirror case: an upstream that reads nothing (but pings every 300 ms) while the client
/// sends as fast as it can. wskeep stops reading the client, so the client's silence is not
/// its fault: the upstream is the one that timed out, and the client is told 1014.
#[tokio::test]
async fn an_upstream_that_stops_reading_is_the_one_that_timed_out() {
    let (addr, _closes) = upstream(|mut ws, _| async move {
        // Pings, and never a read: what wskeep writes piles up in the socket buffers.
        for _ in 0..100 {
            if ws.send(Message::Ping(b"up".to_vec().into())).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    let sidecar = common::start_sidecar(common::test_config(addr, None, KEEPALIVE)).await;
    let url = format!("ws://{}/", sidecar.addr);
    let client::Connection { mut reader, mut writer, .. } =
        client::connect(&url, &ClientOptions::default()).await.unwrap();
    let sender = tokio::spawn(async move {
        let chunk = vec![3u8; 16 * 1024];
        for _ in 0..10_000 {
            if writer.send(OP_BINARY, &chunk).await.is_err() {
                return;
            }
        }
    });
    // The client reads, and answers wskeep's pings as a browser does, until the close.
    let close = tokio::time::timeout(LIMIT, async {
        loop {
            match reader.read_message().await {
                Ok(Some(Incoming::Close(code, reason))) => return (code, reason),
                Ok(Some(_)) => {}
                other => panic!("the connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame in time");
    assert_eq!(close, (Some(1014), "upstream timed out".to_string()));
    let text = await_ending(sidecar.admin, "upstream_timeout").await;
    assert_eq!(endings(&text), [r#"wskeep_connection_duration_seconds_count{end="upstream_timeout"} 1"#], "{text}");
    sender.abort();
}

/// After the closing handshake, the upstream (the server of that leg) closes TCP first: wskeep
/// waits for it rather than hanging up, whichever side began the close.
#[tokio::test]
async fn the_upstream_closes_tcp_first() {
    for upstream_begins in [true, false] {
        let (addr, closes) = upstream(move |mut ws, closes| async move {
            if upstream_begins {
                let frame = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
                ws.send(Message::Close(Some(frame))).await.unwrap();
            }
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Close(frame) = msg {
                    record_close(&closes, frame);
                }
            }
            // The closing handshake is complete on this side. wskeep must not hang up now:
            // it waits for this server to close TCP.
            let mut byte = [0u8; 1];
            let hung_up = tokio::time::timeout(Duration::from_millis(300), ws.get_mut().read(&mut byte)).await;
            closes.lock().unwrap().push((0, format!("wskeep hung up first: {}", hung_up.is_ok())));
        })
        .await;
        let sidecar = common::start_sidecar(common::test_config(addr, None, "")).await;
        let url = format!("ws://{}/", sidecar.addr);
        let mut conn = client::connect(&url, &ClientOptions::default()).await.unwrap();
        if !upstream_begins {
            conn.writer.queue_close(Some(1000), "done");
            conn.writer.flush().await.unwrap();
        }
        let close = tokio::time::timeout(LIMIT, async {
            loop {
                match conn.reader.read_message().await {
                    Ok(Some(Incoming::Close(code, _))) => return code,
                    Ok(Some(_)) => {}
                    other => panic!("no close frame: {other:?}"),
                }
            }
        })
        .await
        .unwrap();
        if upstream_begins {
            assert_eq!(close, Some(1000));
            conn.writer.queue_close(Some(1000), "");
            let _ = conn.writer.flush().await;
        }
        let deadline = Instant::now() + LIMIT;
        while closes.lock().unwrap().len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = closes.lock().unwrap().clone();
        assert_eq!(
            seen.get(1),
            Some(&(0, "wskeep hung up first: false".to_string())),
            "upstream began: {upstream_begins}"
        );
        let end = if upstream_begins { "upstream_close" } else { "client_close" };
        let text = await_ending(sidecar.admin, end).await;
        assert_eq!(endings(&text), [format!(r#"wskeep_connection_duration_seconds_count{{end="{end}"}} 1"#)]);
    }
}
