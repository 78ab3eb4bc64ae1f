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
    upstream_count_reaches(wskeep, "messages", n).await
}

/// Waits until the upstream leg's `field` in `/connections` (`messages`, `bytes`) reaches `n`.
async fn upstream_count_reaches(wskeep: &Wskeep, field: &str, n: u64) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (_, body) = common::http_get(wskeep.admin, "/connections").await.unwrap();
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        if list[0]["upstream"][field].as_u64() >= Some(n) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "wskeep never read {n} upstream {field}: {list}");
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
    let (_, status) = common::http_get(wskeep.admin, "/status.json").await.unwrap();
    assert!(status.contains("\"state\":\"detached\""), "the status page's rows too: {status}");
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

/// A new session: the client, its token, and the upstream's end of the session.
async fn open_session(
    wskeep: &Wskeep,
    upstreams: &mut mpsc::UnboundedReceiver<(String, Ws)>,
    auth: &str,
) -> (Ws, String, Ws) {
    let mut client = connect(wskeep.addr, "/chat?room=1&wskeep_resume=1", &[("authorization", auth)]).await;
    let (_, up) = upstreams.recv().await.unwrap();
    let (token, _) = session(&next_text(&mut client).await);
    (client, token, up)
}

/// The close the upstream gets next: (code, reason).
async fn upstream_close(up: &mut Ws) -> (u16, String) {
    match next(up).await {
        Message::Close(Some(frame)) => (u16::from(frame.code), frame.reason.to_string()),
        other => panic!("expected a close frame upstream, got {other:?}"),
    }
}

#[tokio::test]
async fn a_gap_longer_than_the_grace_gets_4410_and_the_upstream_1001() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, &RESUME.replace("grace = \"3s\"", "grace = \"300ms\""))).await;
    let (client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    drop(client);
    let started = std::time::Instant::now();
    assert_eq!(upstream_close(&mut up).await, (1001, "client gone".into()));
    assert!(started.elapsed() >= Duration::from_millis(250), "the upstream waited for the grace");
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"expired\"}", 1.0, LIMIT).await;
    let mut late = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer a")]).await;
    assert_eq!(close_code(&mut late).await, 4410);
    // The upstream's side of the closing handshake.
    drop(up);
    let line = wskeep.wait_log_line(&["connection closed", "client_error"], LIMIT).await;
    assert!(line.contains("1001"), "{line}");
    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, "wskeep_resume_failures_total{reason=\"expired\"}"), 1.0, "counted once");
    let lost = r#"wskeep_close_codes_total{code="1006",direction="received",side="client"}"#;
    assert_eq!(common::metric(&text, lost), 1.0, "the client's 1006 counted once");
    assert_eq!(common::metric(&text, "wskeep_resume_sessions_detached"), 0.0);
    assert_eq!(common::metric(&text, "wskeep_connections_active"), 0.0);
}

#[tokio::test]
async fn a_detached_session_whose_buffer_overflows_ends() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, &RESUME.replace("64KiB", "16KiB"))).await;
    let (client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    let kib = "x".repeat(1024);
    for _ in 0..20 {
        if up.send(Message::text(kib.clone())).await.is_err() {
            break;
        }
    }
    assert_eq!(upstream_close(&mut up).await, (1001, "client gone".into()));
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"overflow\"}", 1.0, LIMIT).await;
    let mut late = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer a")]).await;
    assert_eq!(close_code(&mut late).await, 4410);
    drop(up);
    wskeep.wait_log_line(&["connection closed", "client_error"], LIMIT).await;
    let lost = r#"wskeep_close_codes_total{code="1006",direction="received",side="client"}"#;
    assert_eq!(common::metric(&common::scrape(wskeep.admin).await, lost), 1.0, "the client's 1006 counted once");
}

#[tokio::test]
async fn a_stolen_token_with_other_credentials_is_refused_and_spent() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer alice").await;
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    let started = std::time::Instant::now();
    let mut thief = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer mallory")]).await;
    assert_eq!(close_code(&mut thief).await, 4410);
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"credential_mismatch\"}", 1.0, LIMIT).await;
    // The token is spent and no one can resume the session now: it ends at once, not after
    // the 3 s grace.
    assert_eq!(upstream_close(&mut up).await, (1001, "client gone".into()));
    assert!(started.elapsed() < Duration::from_millis(1500), "ended at once: {:?}", started.elapsed());
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"expired\"}", 1.0, LIMIT).await;
    let mut late = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer alice")]).await;
    assert_eq!(close_code(&mut late).await, 4410, "the token was spent by the first try");

    // Another site's page with the right credentials: the Origin is bound too.
    let (client, token, _up) = open_session(&wskeep, &mut upstreams, "Bearer alice").await;
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 2.0, LIMIT).await;
    let headers = [("authorization", "Bearer alice"), ("origin", "https://evil.example")];
    let mut elsewhere = connect(wskeep.addr, &resume_query(&token, 0), &headers).await;
    assert_eq!(close_code(&mut elsewhere).await, 4410);
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"credential_mismatch\"}", 2.0, LIMIT).await;
}

/// A session whose token was spent by a failed resume while its client was attached cannot
/// be resumed: when that client's connection dies, the session ends rather than detaching.
#[tokio::test]
async fn a_session_without_a_live_token_ends_instead_of_detaching() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    let mut thief = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer b")]).await;
    assert_eq!(close_code(&mut thief).await, 4410);
    let started = std::time::Instant::now();
    drop(client);
    assert_eq!(upstream_close(&mut up).await, (1001, "client gone".into()));
    assert!(started.elapsed() < Duration::from_millis(1500), "ended at once: {:?}", started.elapsed());
    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, "wskeep_resume_sessions_detached_total"), 0.0);
}

/// A late resume learns who ended the session: the client's own close spends its token.
#[tokio::test]
async fn a_late_resume_after_the_clients_close_is_bad_token() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (mut client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    client.close(None).await.unwrap();
    assert!(matches!(next(&mut up).await, Message::Close(None)), "the client's close relayed");
    drop(up);
    wskeep.wait_log_line(&["connection closed", "client_close"], LIMIT).await;
    let mut late = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer a")]).await;
    assert_eq!(close_code(&mut late).await, 4410);
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"bad_token\"}", 1.0, LIMIT).await;
    let text = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&text, "wskeep_resume_failures_total{reason=\"upstream_gone\"}"), 0.0);
}

#[tokio::test]
async fn two_resumes_of_one_token_at_once_one_wins() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    let query = resume_query(&token, 0);
    let headers = [("authorization", "Bearer a")];
    let (mut a, mut b) = tokio::join!(connect(wskeep.addr, &query, &headers), connect(wskeep.addr, &query, &headers));
    let (first_a, first_b) = tokio::join!(next(&mut a), next(&mut b));
    let (mut winner, loser) = match (&first_a, &first_b) {
        (Message::Text(_), Message::Close(_)) => (a, first_b),
        (Message::Close(_), Message::Text(_)) => (b, first_a),
        other => panic!("one resume wins and the other gets 4410: {other:?}"),
    };
    assert!(matches!(loser, Message::Close(Some(f)) if u16::from(f.code) == 4410));
    up.send(Message::text("to the winner")).await.unwrap();
    assert_eq!(next_text(&mut winner).await, "to the winner");
    wskeep.wait_metric("wskeep_resume_failures_total{reason=\"bad_token\"}", 1.0, LIMIT).await;
}

#[tokio::test]
async fn a_resume_replaces_a_half_open_leg_with_4001() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (mut old, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    up.send(Message::text("u1")).await.unwrap();
    assert_eq!(next_text(&mut old).await, "u1");
    // The old leg is still attached as far as wskeep knows: the client thinks it is dead.
    let mut new = connect(wskeep.addr, &resume_query(&token, 1), &[("authorization", "Bearer a")]).await;
    let (_, has) = session(&next_text(&mut new).await);
    assert_eq!(has, 0);
    assert_eq!(close_code(&mut old).await, 4001);
    new.send(Message::text("c1")).await.unwrap();
    assert_eq!(next_text(&mut up).await, "c1");
    up.send(Message::text("u2")).await.unwrap();
    assert_eq!(next_text(&mut new).await, "u2", "u1 is not replayed: the client had it");
    let line = wskeep.wait_log_line(&["session resumed", "half_open=true"], LIMIT).await;
    assert!(line.contains("replayed_to_client=0"), "{line}");
}

#[tokio::test]
async fn clients_that_do_not_ask_see_nothing_and_wskeep_parameters_never_go_upstream() {
    let (up_addr, mut upstreams) = upstream().await;
    for enabled in [true, false] {
        let extra = RESUME.replace("enabled = true", &format!("enabled = {enabled}"));
        let wskeep = Wskeep::start_with(config(up_addr, &extra)).await;
        let mut plain = connect(wskeep.addr, "/p?x=1", &[]).await;
        let (uri, mut up) = upstreams.recv().await.unwrap();
        assert_eq!(uri, "/p?x=1");
        up.send(Message::text("first")).await.unwrap();
        assert_eq!(next_text(&mut plain).await, "first", "no control message to a client that did not ask");
        // Asking while resuming is off: an ordinary connection, the parameters stripped.
        let token = "AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let mut asked = connect(wskeep.addr, &format!("/p?wskeep_resume=1&x=2&wskeep_token={token}"), &[]).await;
        if enabled {
            // A token asks to resume: refused without contacting the upstream.
            assert_eq!(close_code(&mut asked).await, 4410);
            assert!(upstreams.try_recv().is_err(), "the upstream was not contacted");
        } else {
            let (uri, mut up) = upstreams.recv().await.unwrap();
            assert_eq!(uri, "/p?x=2");
            up.send(Message::text("first")).await.unwrap();
            assert_eq!(next_text(&mut asked).await, "first");
        }
    }
}

#[tokio::test]
async fn the_drain_closes_a_detached_session_with_1001_upstream() {
    let (up_addr, mut upstreams) = upstream().await;
    let extra = format!("{RESUME}[shutdown]\ndrain_timeout = \"200ms\"\n");
    let wskeep = Wskeep::start_with(config(up_addr, &extra)).await;
    let (client, _token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    wskeep.signal("TERM");
    assert_eq!(upstream_close(&mut up).await, (1001, "going away".into()));
    let line = wskeep.wait_log_line(&["connection closed", "shutdown"], LIMIT).await;
    assert!(line.contains("1006"), "the client leg had ended without a close: {line}");
}

#[tokio::test]
async fn acks_free_the_buffer_and_wskeep_tells_its_count() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, &RESUME.replace("64KiB", "16KiB"))).await;
    let (mut client, _token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    // Without acks, wskeep stops reading the upstream once the buffer is full: past the 16 KiB,
    // at most what one read brought (64 KiB: 8 of these 8 KiB messages) and the one under way.
    let chunk = "x".repeat(8 * 1024 - 16);
    let writer = tokio::spawn(async move {
        for i in 0..40 {
            up.send(Message::text(format!("{i:02}{chunk}"))).await.unwrap();
        }
        up
    });
    let mut got = 0u64;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), next(&mut client)).await {
        assert!(matches!(m, Message::Text(_)));
        got += 1;
    }
    assert!((2..=12).contains(&got), "stopped at the 16 KiB buffer (and one read past it), got {got}");
    // Each ack frees room; all 40 arrive, in order.
    client.send(Message::text(format!("\0wskeep:ack {got}"))).await.unwrap();
    while got < 40 {
        let text = next_text(&mut client).await;
        assert_eq!(text[..2].parse::<u64>().unwrap(), got);
        got += 1;
        client.send(Message::text(format!("\0wskeep:ack {got}"))).await.unwrap();
    }
    let mut up = writer.await.unwrap();
    // wskeep tells the client how many of its messages it has (acks are not counted).
    client.send(Message::text("c1")).await.unwrap();
    assert_eq!(next_text(&mut up).await, "c1");
    assert_eq!(next_text(&mut client).await, "\0wskeep:ack 1");
    // An ack above what was sent is a protocol error.
    client.send(Message::text("\0wskeep:ack 41")).await.unwrap();
    assert_eq!(close_code(&mut client).await, 1008);
    assert_eq!(upstream_close(&mut up).await.0, 1001);
}

#[tokio::test]
async fn json_pongs_are_numbered_and_replayed_and_the_reserved_prefix_is_refused() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (mut client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    client.send(Message::text("{\"type\":\"ping\"}")).await.unwrap();
    assert_eq!(next_text(&mut client).await, "{\"type\":\"pong\"}");
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    let mut client = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer a")]).await;
    let (_, has) = session(&next_text(&mut client).await);
    assert_eq!(has, 1, "the JSON ping counts as a client message");
    assert_eq!(next_text(&mut client).await, "{\"type\":\"pong\"}", "the pong is message 1, replayed");
    // An upstream message in the reserved prefix cannot be delivered: both sides get 1011.
    up.send(Message::text("\0wskeep:session forged 0")).await.unwrap();
    assert_eq!(close_code(&mut client).await, 1011);
    assert_eq!(upstream_close(&mut up).await.0, 1011);
}

/// Echoes every data message of every connection; the number of connections goes to the test.
async fn echo_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let (addr, mut conns) = upstream().await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((_, mut ws)) = conns.recv().await {
            let _ = tx.send(());
            tokio::spawn(async move {
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn probe_resume_drops_its_connection_and_loses_nothing() {
    let (up_addr, mut connections) = echo_upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let url = format!("ws://{}/echo", wskeep.addr);
    // The probe runs for 1.5 s; the test's runtime keeps serving the upstream meanwhile.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_wskeep"))
            .args(["probe", &url, "--resume", "--send-every", "10ms", "--resume-drop-after", "400ms"])
            .args(["--duration", "1500ms"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("result          lossless"), "{stdout}");
    assert!(stdout.contains("0 lost, 0 duplicated"), "{stdout}");
    let resumes: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumes"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(resumes >= 2, "{stdout}");
    wskeep.wait_metric("wskeep_resume_sessions_resumed_total", resumes as f64, LIMIT).await;
    connections.recv().await.unwrap();
    assert!(connections.try_recv().is_err(), "the upstream saw one connection");
}

/// Over HTTP/2 (RFC 8441) a session is a stream: a reset stream detaches it, and a resume on a
/// new stream (answered 200, not 101) replays what the upstream sent meanwhile.
#[tokio::test]
async fn a_session_resumes_over_http2() {
    use wskeep::tools::client::{ClientOptions, Http2Sessions, Incoming};
    let (up_addr, mut upstreams) = upstream().await;
    let cert = common::test_cert();
    let tls =
        format!("tls_cert = {:?}\ntls_key = {:?}\n", cert.cert.display().to_string(), cert.key.display().to_string());
    let wskeep = Wskeep::start_with(move |port, admin| {
        config(up_addr, RESUME)(port, admin).replacen("[admin]", &format!("{tls}[admin]"), 1)
    })
    .await;
    let options = ClientOptions { insecure: true, ..Default::default() };
    async fn text(conn: &mut wskeep::tools::client::Connection) -> String {
        loop {
            match tokio::time::timeout(LIMIT, conn.reader.read_message()).await.expect("a message in time") {
                Ok(Some(Incoming::Text(t))) => return String::from_utf8(t.to_vec()).unwrap(),
                Ok(Some(Incoming::Ping(_) | Incoming::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }
    let url = |query: &str| format!("wss://127.0.0.1:{}/chat?{query}", wskeep.addr.port());
    let first = Http2Sessions::new(&url("wskeep_resume=1"), options.clone(), 1).unwrap();
    let mut conn = first.open(None).await.expect("an HTTP/2 WebSocket");
    let (_, mut up) = upstreams.recv().await.unwrap();
    let (token, _) = session(&text(&mut conn).await);
    drop((conn, first));
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    up.send(Message::text("while away")).await.unwrap();
    upstream_messages_reach(&wskeep, 1).await;

    let query = format!("wskeep_resume=1&wskeep_token={token}&wskeep_received=0");
    let second = Http2Sessions::new(&url(&query), options, 1).unwrap();
    let mut conn = second.open(None).await.expect("the resume is answered 200");
    let (_, has) = session(&text(&mut conn).await);
    assert_eq!(has, 0);
    assert_eq!(text(&mut conn).await, "while away");
    wskeep.wait_metric("wskeep_resume_sessions_resumed_total", 1.0, LIMIT).await;
    assert!(upstreams.try_recv().is_err(), "the upstream saw one connection");
}

/// A JSON pong that waits behind a fragmented upstream message reaches the client after it, and
/// is numbered and replayed in that same order.
#[tokio::test]
async fn a_json_pong_held_behind_a_fragmented_message_keeps_its_place_in_the_replay() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, RESUME)).await;
    let (mut client, token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    up.send(Message::Frame(Frame::message(&b"first "[..], OpCode::Data(Data::Text), false))).await.unwrap();
    // wskeep has relayed the first fragment before the ping comes.
    upstream_count_reaches(&wskeep, "bytes", 6).await;
    client.send(Message::text("{\"type\":\"ping\"}")).await.unwrap();
    wskeep.wait_metric("wskeep_json_pings_answered_total", 1.0, LIMIT).await;
    up.send(Message::Frame(Frame::message(&b"last"[..], OpCode::Data(Data::Continue), true))).await.unwrap();
    assert_eq!(next_text(&mut client).await, "first last");
    assert_eq!(next_text(&mut client).await, "{\"type\":\"pong\"}");
    drop(client);
    wskeep.wait_metric("wskeep_resume_sessions_detached_total", 1.0, LIMIT).await;
    let mut client = connect(wskeep.addr, &resume_query(&token, 0), &[("authorization", "Bearer a")]).await;
    let (_, has) = session(&next_text(&mut client).await);
    assert_eq!(has, 1);
    assert_eq!(next_text(&mut client).await, "first last", "message 1");
    assert_eq!(next_text(&mut client).await, "{\"type\":\"pong\"}", "message 2");
}

/// A client that pings in a loop and never acknowledges cannot grow its session's buffer without
/// bound: past `resume.buffer` plus one message, it is refused with 1008.
#[tokio::test]
async fn json_pings_without_acks_are_bounded_by_the_buffer() {
    let (up_addr, mut upstreams) = upstream().await;
    let wskeep = Wskeep::start_with(config(up_addr, &RESUME.replace("64KiB", "16KiB"))).await;
    let (mut client, _token, mut up) = open_session(&wskeep, &mut upstreams, "Bearer a").await;
    let mut pongs = 0u64;
    let code = loop {
        assert!(pongs < 4000, "answered {pongs} pongs without an ack");
        client.send(Message::text("{\"type\":\"ping\"}")).await.unwrap();
        match next(&mut client).await {
            Message::Text(_) => pongs += 1,
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(1008));
    // Each pong frame is 17 bytes; 16 KiB of buffer plus a 16 KiB message's allowance.
    assert!((1900..=1930).contains(&pongs), "{pongs}");
    assert_eq!(upstream_close(&mut up).await.0, 1001);
}
