//! Property tests of the relay's ordering invariant, on in-memory WebSockets (tokio duplex pipes,
//! the peers framed by tungstenite) so that nothing but `relay::run` is between the two peers: whatever the
//! messages (text and binary, 0 to 70,000 bytes, from both sides at once) and however small the
//! pipes (backpressure), each peer receives exactly the other's messages in order, and a close
//! from one side reaches the other after every message sent before it, with its code and reason.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::io::DuplexStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use wskeep::connections::ConnInfo;
use wskeep::keepalive::LegTimers;
use wskeep::legstream::LegStream;
use wskeep::metrics::Metrics;
use wskeep::relay::{self, RelaySettings};
use wskeep::vocab::End;

type Ws = WebSocketStream<DuplexStream>;

#[derive(Debug, Clone)]
struct Case {
    client: Vec<Message>,
    upstream: Vec<Message>,
    /// Which side closes: true for the client.
    client_closes: bool,
    /// The closer waits until it has every message of the other side before closing.
    closer_waits: bool,
    code: u16,
    reason: String,
    /// Capacity of each in-memory pipe: small ones make every write wait for the reader.
    pipe: usize,
}

fn message() -> impl Strategy<Value = Message> {
    let len = prop_oneof![0..130usize, 60_000..70_001usize, 0..70_001usize];
    (any::<bool>(), len, any::<u8>()).prop_map(|(text, len, seed)| {
        if text {
            // ASCII and multi-byte characters, so fragment and buffer edges fall inside them.
            let alphabet = ['a', 'Z', '0', ' ', 'é', '€', '😀', '\n'];
            let mut s = String::with_capacity(len + 4);
            let mut i = seed as usize;
            while s.len() < len {
                s.push(alphabet[i % alphabet.len()]);
                i = i.wrapping_mul(31).wrapping_add(7);
            }
            Message::text(s)
        } else {
            Message::binary((0..len).map(|i| (i as u8).wrapping_mul(seed | 1)).collect::<Vec<u8>>())
        }
    })
}

fn case() -> impl Strategy<Value = Case> {
    let code = prop_oneof![Just(1000u16), Just(1001), Just(1008), Just(1011), 3000..5000u16];
    let reason = prop::collection::vec(prop::sample::select(&b"abcxyz -_.0123456789"[..]), 0..40)
        .prop_map(|b| String::from_utf8(b).unwrap());
    let pipe = prop_oneof![Just(64usize), Just(1024), Just(65_536)];
    (
        prop::collection::vec(message(), 0..12),
        prop::collection::vec(message(), 0..12),
        any::<bool>(),
        any::<bool>(),
        code,
        reason,
        pipe,
    )
        .prop_map(|(client, upstream, client_closes, closer_waits, code, reason, pipe)| Case {
            client,
            upstream,
            client_closes,
            closer_waits,
            code,
            reason,
            pipe,
        })
}

/// Two framed ends of one pipe: (the peer's end, the relay's end).
/// A peer framed by tungstenite, and the relay's end of its pipe. `peer_role`: the client peer
/// is a `Client`, the upstream peer a `Server`.
async fn pipe(capacity: usize, peer_role: Role) -> (Ws, LegStream) {
    let (a, b) = tokio::io::duplex(capacity);
    let config = wskeep::tools::bench::echo::websocket_config(1 << 20);
    let peer = WebSocketStream::from_raw_socket(a, peer_role, Some(config)).await;
    (peer, LegStream::new(b))
}

/// What one peer saw: the data messages, then the close frame (if one came).
#[derive(Debug)]
struct Seen {
    messages: Vec<Message>,
    close: Option<Option<CloseFrame>>,
}

/// Sends `outgoing` while reading; the closer then sends its close (after it has `expect`
/// messages, if given) and reads until the answer. The other side reads until the close.
async fn peer(ws: Ws, outgoing: Vec<Message>, close: Option<(CloseFrame, Option<usize>)>) -> Seen {
    let (mut tx, mut rx) = ws.split();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
    let expect = close.as_ref().and_then(|(_, n)| *n);
    let reader = async move {
        let mut got_tx = Some(got_tx);
        let mut seen = Seen { messages: Vec::new(), close: None };
        if expect == Some(0) {
            let _ = got_tx.take().unwrap().send(());
        }
        while let Some(item) = rx.next().await {
            match item {
                Ok(Message::Close(frame)) => {
                    seen.close = Some(frame);
                    // Read on until the stream ends, so tungstenite sends its answer.
                }
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                    seen.messages.push(m);
                    if Some(seen.messages.len()) == expect {
                        if let Some(tx) = got_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        seen
    };
    let writer = async move {
        for m in outgoing {
            if tx.feed(m).await.is_err() {
                return;
            }
        }
        let _ = tx.flush().await;
        let _ = sent_tx.send(());
        if let Some((frame, expect)) = close {
            if expect.is_some() {
                let _ = got_rx.await;
            }
            let _ = tx.send(Message::Close(Some(frame))).await;
        } else {
            drop(got_rx);
        }
    };
    let (seen, ()) = tokio::join!(reader, writer);
    drop(sent_rx);
    seen
}

async fn run(case: Case) -> Result<(), TestCaseError> {
    let (client_peer, client_end) = pipe(case.pipe, Role::Client).await;
    let (upstream_peer, upstream_end) = pipe(case.pipe, Role::Server).await;
    let off = LegTimers { ping_interval: Duration::ZERO, pong_interval: Duration::ZERO, timeout: Duration::ZERO };
    let settings = RelaySettings {
        timers: [off, off],
        json_ping: None,
        max_message_size: 1 << 20,
        timer_slots: Default::default(),
    };
    let conn = ConnInfo {
        id: 1,
        peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        path: "/".into(),
        started: Instant::now(),
        legs: Default::default(),
    };
    let closing = CancellationToken::new();
    let relay = tokio::spawn({
        let closing = closing.clone();
        async move { relay::run(client_end, upstream_end, &settings, &Metrics::new(), &conn, closing).await }
    });

    let frame = CloseFrame { code: CloseCode::from(case.code), reason: case.reason.clone().into() };
    let (client_close, upstream_close) = if case.client_closes {
        (Some((frame.clone(), case.closer_waits.then_some(case.upstream.len()))), None)
    } else {
        (None, Some((frame.clone(), case.closer_waits.then_some(case.client.len()))))
    };
    let client = tokio::spawn(peer(client_peer, case.client.clone(), client_close));
    let upstream = tokio::spawn(peer(upstream_peer, case.upstream.clone(), upstream_close));
    let (client, upstream, outcome) = tokio::time::timeout(Duration::from_secs(5), async {
        let (c, u, r) = tokio::join!(client, upstream, relay);
        (c.unwrap(), u.unwrap(), r.unwrap())
    })
    .await
    .map_err(|_| TestCaseError::fail("the exchange did not finish within 5 s"))?;

    let (closer, other, closer_sent, other_sent) = if case.client_closes {
        (&client, &upstream, &case.client, &case.upstream)
    } else {
        (&upstream, &client, &case.upstream, &case.client)
    };
    // The other side gets every message the closer sent, in order, then the close as it was sent.
    prop_assert_eq!(other.messages.len(), closer_sent.len());
    for (i, (got, sent)) in other.messages.iter().zip(closer_sent).enumerate() {
        prop_assert!(got == sent, "message {} of the closer differs ({} vs {} bytes)", i, got.len(), sent.len());
    }
    prop_assert_eq!(&other.close, &Some(Some(frame.clone())), "the close reaches the other side unchanged");
    // The closer gets the other side's messages in order: all of them if it waited, else a prefix.
    if case.closer_waits {
        prop_assert_eq!(closer.messages.len(), other_sent.len());
    }
    prop_assert!(closer.messages.len() <= other_sent.len());
    for (i, (got, sent)) in closer.messages.iter().zip(other_sent).enumerate() {
        prop_assert!(got == sent, "message {} of the other side differs ({} vs {} bytes)", i, got.len(), sent.len());
    }
    // Its close is answered with the same code.
    let answer = closer.close.clone().flatten().map(|f| u16::from(f.code));
    prop_assert_eq!(answer, Some(case.code), "the closer's close is answered");
    let end = if case.client_closes { End::ClientClose } else { End::UpstreamClose };
    prop_assert_eq!(outcome.end, end);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, max_shrink_time: 60_000, ..ProptestConfig::default() })]

    #[test]
    fn each_side_gets_the_others_messages_in_order_then_the_close(case in case()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(case))?;
    }
}
