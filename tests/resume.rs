//! Lossless reconnect (issue 16, docs/resume.md) through the real binary: a client whose
//! connection dies comes back to the same upstream session, and nothing is lost or doubled.
//!
//! The upstream is a tokio-tungstenite server each test drives by hand; the clients are
//! tokio-tungstenite clients that speak the resume protocol as the shim does (count, ack,
//! resend above wskeep's count). A client "drops" by dropping its socket: no close frame.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::binary::Wskeep;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const LIMIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

/// An upstream whose connections (with the request URI they came with) go to the test.
async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<(String, Ws)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut uri = String::new();
                // tungstenite's callback signature returns its (large) ErrorResponse by value.
                #[allow(clippy::result_large_err)]
                let callback = |req: &Request, resp: Response| {
                    uri = req.uri().to_string();
                    Ok(resp)
                };
                if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await {
                    let _ = tx.send((uri, ws));
                }
            });
        }
    });
    (addr, rx)
}

fn config(upstream: SocketAddr, extra: &str) -> impl Fn(u16, u16) -> String {
    let extra = extra.to_string();
    move |port, admin| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n[admin]\naddr = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"ws://{upstream}\"\n[limits]\nmax_message_size = \"16KiB\"\n\
             [log]\nlevel = \"info\"\nformat = \"text\"\n{extra}"
        )
    }
}

const RESUME: &str = "[resume]\nenabled = true\ngrace = \"3s\"\nbuffer = \"64KiB\"\n\
                      [client_keepalive]\nping_interval = \"0s\"\ntimeout = \"0s\"\n";

async fn connect(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> Ws {
    let mut req = format!("ws://{addr}{path_and_query}").into_client_request().unwrap();
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        req.headers_mut().insert(name, value.parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.expect("101");
    ws
}

/// The next text or close message; pings and pongs are passed over.
async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(LIMIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                other => panic!("connection ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a message within the limit")
}

async fn next_text(ws: &mut Ws) -> String {
    match next(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// The close code the client gets next.
async fn close_code(ws: &mut Ws) -> u16 {
    match next(ws).await {
        Message::Close(Some(frame)) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// A `\0wskeep:session <token> <received>` message: the token and the count.
fn session(text: &str) -> (String, u64) {
    let rest = text.strip_prefix("\0wskeep:session ").unwrap_or_else(|| panic!("not a session message: {text:?}"));
    let (token, received) = rest.split_once(' ').unwrap();
    (token.to_string(), received.parse().unwrap())
}

/// Waits until wskeep has read `n` messages from the upstream of its (only) connection.
async fn upstream_messages_reach(wskeep: &Wskeep, n: u64) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (_, body) = common::http_get(wskeep.admin, "/connections").await.unwrap();
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        if list[0]["upstream"]["messages"].as_u64() >= Some(n) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "wskeep never read {n} upstream messages: {list}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn resume_query(token: &str, received: u64) -> String {
    format!("/chat?room=1&wskeep_resume=1&wskeep_token={token}&wskeep_received={received}")
}

#[tokio::test]
async fn a_resume_replays_the_gap_once_in_order_and_the_upstream_sees_one_connection() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let mut client = connect(wskeep.addr, "/chat?room=1&wskeep_resume=1", &[("authorization", "Bearer a")]).await;
    let (uri, mut up) = upstreams.recv().await.unwrap();
    assert_eq!(uri, "/chat?room=1", "wskeep's parameters are not forwarded");
    let (token, received) = session(&next_text(&mut client).await);
    assert_eq!(received, 0);

    // Both ways before the drop.
    for m in ["c1", "c2"] {
        client.send(Message::text(m)).await.unwrap();
    }
    up.send(Message::text("u1")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "u1");
    for want in ["c1", "c2"] {
        assert_eq!(next_text(&mut up).await, want);
    }
    // The client's last send and its TCP drop: no close frame. The client keeps c3 until wskeep
    // says it has it.
    client.send(Message::text("c3")).await.unwrap();
    assert_eq!(next_text(&mut up).await, "c3");
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, "wskeep_resume_sessions_detached"), 1.0);
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 1.0, "a detached session is still open");
    let (_, listing) = common::http_get(wskeep.admin, "/connections").await.unwrap();
    assert!(listing.contains("\"state\":\"detached\""), "{listing}");
    assert!(!listing.contains(&token[17..]), "the secret is never shown");

    // The upstream talks during the gap.
    for m in ["u2", "u3"] {
        up.send(Message::text(m)).await.unwrap();
    }
    upstream_messages_reach(&wskeep, 3).await;
    let mut client = connect(wskeep.addr, &resume_query(&token, 1), &[("authorization", "Bearer a")]).await;
    let (new_token, wskeep_has) = session(&next_text(&mut client).await);
    assert_ne!(new_token, token, "the token is rotated on every resume");
    assert_eq!(wskeep_has, 3, "wskeep received c1..c3: the client resends nothing");
    for want in ["u2", "u3"] {
        assert_eq!(next_text(&mut client).await, want);
    }
    client.send(Message::text("c4")).await.unwrap();
    assert_eq!(next_text(&mut up).await, "c4", "no duplicate of c1..c3 reached the upstream");
    up.send(Message::text("u4")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "u4");

    wskeep.wait_metric("wskeep_resume_sessions_resumed_total", 1.0, LIMIT).await;
    let line = wskeep.wait_log_line(&["session resumed", "replayed_to_client=2"], LIMIT).await;
    assert!(line.contains("gap_ms="), "{line}");
    assert!(!wskeep.log().contains(&token[17..]), "the secret is never logged");
    assert!(upstreams.try_recv().is_err(), "the upstream saw one connection");

    // The spent token does not resume again.
    let mut thief = connect(wskeep.addr, &resume_query(&token, 1), &[("authorization", "Bearer a")]).await;
    assert_eq!(close_code(&mut thief).await, 4410);
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"bad_token\"}", 1.0, LIMIT).await;
    // And the session carries on.
    up.send(Message::text("u5")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "u5");
}
