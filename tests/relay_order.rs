//! Property tests of the relay's ordering invariant, on in-memory WebSockets (tokio duplex pipes,
//! the peers framed by tungstenite) so that nothing but `relay::run` is between the two peers: whatever the
//! messages (text and binary, 0 to 70,000 bytes, from both sides at once) and however small the
//! pipes (backpressure), each peer receives exactly the other's messages in order, and a close
//! from one side reaches the other after every message sent before it, with its code and reason.
//! Then the hard cases, through the whole sidecar over real sockets (see below).
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::io::DuplexStream;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
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
    (any::<bool>(), len, any::<u8>()).prop_map(|(text, len, seed)| make_message(text, len, seed))
}

/// A text or binary message of about `len` bytes whose content `seed` varies.
fn make_message(text: bool, len: usize, seed: u8) -> Message {
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
        http_version: wskeep::vocab::HttpVersion::Http1,
        started: Instant::now(),
        deflate: false,
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

// === The hard cases, through the whole sidecar over real sockets ===
//
// The same invariant through `wskeep::Server` over loopback TCP, with the test peers' socket
// buffers of a few KiB, so that most writes wait for the reader (not the kernel's minimum: there
// Linux's sender-side silly-window avoidance stalls loopback TCP for seconds at a time, whatever
// the program on either end does). Each
// peer follows a random script: whole messages; messages in random fragments (cut anywhere, inside
// a UTF-8 character too, empty fragments included) with pings and pauses between the fragments;
// pings of its own; and, from the client, JSON pings. wskeep's timers fire every 1-5 ms on both
// legs (pings both ways, unsolicited pongs upstream). tungstenite on each peer refuses what the
// RFC forbids (a frame masked by the wrong side, a data frame inside a fragmented message, bad
// UTF-8, ...), and the checks below cover the rest: every data message in order and unchanged,
// the JSON pongs answering the JSON pings in order, the pongs answering the peer's own pings,
// none of the other peer's pings leaking through, and the close as sent.
//
// The scripts come from a seeded generator: a failure prints the seed and the case number, and
// `WSKEEP_TEST_SEED=N [WSKEEP_TEST_CASE=K] cargo test --test relay_order real_peers` replays the
// same scripts (the timing of the two peers and of wskeep's timers is the machine's).

/// At most this many cases, and no new case after `REAL_BUDGET`: bounded in count and time.
const REAL_CASES: usize = 200;
const REAL_BUDGET: Duration = Duration::from_secs(10);
/// Fewer cases than this within the budget is a failure (the relay got very slow).
const REAL_MIN_CASES: usize = 20;

/// One thing a peer does, in order.
#[derive(Debug, Clone)]
enum Step {
    /// A whole message (JSON pings among them).
    Whole(Message),
    /// One frame of a message sent in pieces.
    Fragment(Frame),
    /// A protocol ping carrying `ping_payload(peer, index)`.
    Ping(usize),
    Pause(Duration),
}

#[derive(Debug, Default)]
struct Script {
    steps: Vec<Step>,
    /// The data messages the other peer must receive, in order.
    delivered: Vec<Message>,
    pings: usize,
    json_pings: usize,
    /// Pings and JSON pings sent before the last message of `delivered`: once the other peer
    /// has that message wskeep has read them, so their answers come before any close.
    pings_before_last: usize,
    json_pings_before_last: usize,
}

fn ping_payload(peer: &str, index: usize) -> Bytes {
    Bytes::from(format!("{peer}-ping-{index}"))
}

fn json_ping(id: usize) -> String {
    format!(r#"{{"type":"ping","id":{id}}}"#)
}

impl Script {
    /// A random script. `json`: the client's, whose JSON pings wskeep answers and, with
    /// `forward`, also relays.
    fn random(rng: &mut fastrand::Rng, json: bool, forward: bool) -> Script {
        let mut s = Script::default();
        for _ in 0..rng.usize(0..24) {
            match rng.u8(0..10) {
                0..=2 => {
                    let m = random_message(rng);
                    s.steps.push(Step::Whole(m.clone()));
                    s.deliver(m);
                }
                3..=4 => s.fragmented(rng),
                5 => s.ping(),
                // A burst of pings, so that some arrive while a frame towards this peer is only
                // partly in: their pong waits for it.
                6 => {
                    for _ in 0..rng.usize(2..=6) {
                        s.ping();
                        s.steps.push(Step::Pause(Duration::from_micros(rng.u64(0..1000))));
                    }
                }
                7 if json => {
                    let text = json_ping(s.json_pings);
                    s.json_pings += 1;
                    s.steps.push(Step::Whole(Message::text(text.clone())));
                    if forward {
                        s.deliver(Message::text(text));
                    }
                }
                // The upstream may send what looks like a JSON ping: it is data, relayed as is.
                7 => {
                    let m = Message::text(json_ping(rng.usize(..1000)));
                    s.steps.push(Step::Whole(m.clone()));
                    s.deliver(m);
                }
                _ => s.steps.push(Step::Pause(Duration::from_micros(rng.u64(0..3000)))),
            }
        }
        s
    }

    fn deliver(&mut self, m: Message) {
        self.delivered.push(m);
        self.pings_before_last = self.pings;
        self.json_pings_before_last = self.json_pings;
    }

    fn ping(&mut self) {
        self.steps.push(Step::Ping(self.pings));
        self.pings += 1;
    }

    /// A message in 2-6 frames cut at random byte offsets, pings and pauses between them.
    fn fragmented(&mut self, rng: &mut fastrand::Rng) {
        let m = random_message(rng);
        let (kind, payload) = match &m {
            Message::Text(t) => (Data::Text, Bytes::copy_from_slice(t.as_bytes())),
            Message::Binary(b) => (Data::Binary, b.clone()),
            _ => unreachable!("random_message makes text or binary"),
        };
        let pieces = rng.usize(2..=6);
        let mut cuts: Vec<usize> = (1..pieces).map(|_| rng.usize(0..=payload.len())).collect();
        cuts.sort_unstable();
        cuts.push(payload.len());
        let mut start = 0;
        for (i, end) in cuts.into_iter().enumerate() {
            let opcode = OpCode::Data(if i == 0 { kind } else { Data::Continue });
            let last = i + 1 == pieces;
            self.steps.push(Step::Fragment(Frame::message(payload.slice(start..end), opcode, last)));
            start = end;
            if !last {
                match rng.u8(0..3) {
                    0 => self.ping(),
                    1 => self.steps.push(Step::Pause(Duration::from_micros(rng.u64(0..3000)))),
                    _ => {}
                }
            }
        }
        self.deliver(m);
    }
}

/// Small messages, messages of a few KiB, and large ones of up to 70,000 bytes.
fn random_message(rng: &mut fastrand::Rng) -> Message {
    let len = match rng.u8(0..10) {
        0..=4 => rng.usize(0..130),
        5..=7 => rng.usize(130..8192),
        _ => rng.usize(8192..70_000),
    };
    make_message(rng.bool(), len, rng.u8(..))
}

#[derive(Debug)]
struct RealCase {
    client: Script,
    upstream: Script,
    client_closes: bool,
    code: u16,
    reason: String,
    forward: bool,
    /// wskeep's client ping, upstream ping and upstream pong intervals, in ms.
    timers: [u64; 3],
    /// SO_SNDBUF and SO_RCVBUF of the client peer's socket, then of the upstream peer's
    /// (the kernel doubles them); `None`: the default.
    buffers: [Option<u32>; 2],
}

impl RealCase {
    fn random(rng: &mut fastrand::Rng) -> RealCase {
        let forward = rng.bool();
        let buffer = |rng: &mut fastrand::Rng| [Some(4096), Some(8192), Some(16_384), None][rng.usize(..4)];
        RealCase {
            client: Script::random(rng, true, forward),
            upstream: Script::random(rng, false, false),
            client_closes: rng.bool(),
            code: [1000, 1001, 1008, 1011, rng.u16(3000..5000)][rng.usize(..5)],
            reason: (0..rng.usize(0..40)).map(|_| char::from(b"abcxyz -_.0123456789"[rng.usize(..20)])).collect(),
            forward,
            timers: [rng.u64(1..=5), rng.u64(1..=5), rng.u64(1..=5)],
            buffers: [buffer(rng), buffer(rng)],
        }
    }

    fn summary(&self) -> String {
        let bytes = |s: &Script| s.delivered.iter().map(|m| m.len()).sum::<usize>();
        format!(
            "client: {} steps, {} messages ({} B), {} pings, {} JSON pings (forward {}); upstream: {} steps, \
             {} messages ({} B), {} pings; {} closes with {}; timers {:?} ms; buffers {:?}",
            self.client.steps.len(),
            self.client.delivered.len(),
            bytes(&self.client),
            self.client.pings,
            self.client.json_pings,
            self.forward,
            self.upstream.steps.len(),
            self.upstream.delivered.len(),
            bytes(&self.upstream),
            self.upstream.pings,
            if self.client_closes { "the client" } else { "the upstream" },
            self.code,
            self.timers,
            self.buffers,
        )
    }
}

/// A TCP socket with the given send and receive buffer sizes.
fn small_socket(size: Option<u32>) -> TcpSocket {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = size {
        socket.set_send_buffer_size(size).unwrap();
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket
}

/// What one real peer received.
#[derive(Debug, Default)]
struct Received {
    data: Vec<Message>,
    /// The JSON pongs the client received, parsed.
    json_pongs: Vec<serde_json::Value>,
    pings: Vec<Bytes>,
    pongs: Vec<Bytes>,
    close: Option<Option<CloseFrame>>,
    /// What tungstenite refused before a close came (a protocol violation, a lost connection).
    error: Option<String>,
}

/// Plays `steps` while reading. The closer then waits until it has `awaited` (data messages,
/// JSON pongs), sends its close and reads until the answer; the other reads until the close.
async fn scripted_peer(
    ws: WebSocketStream<TcpStream>,
    is_client: bool,
    name: &'static str,
    steps: Vec<Step>,
    close: Option<(CloseFrame, (usize, usize))>,
) -> Received {
    let (mut tx, mut rx) = ws.split();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
    let awaited = close.as_ref().map(|(_, a)| *a);
    let reader = async move {
        let mut got_tx = Some(got_tx);
        let mut seen = Received::default();
        loop {
            if let Some((data, json)) = awaited {
                if seen.data.len() >= data && seen.json_pongs.len() >= json {
                    if let Some(tx) = got_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
            let Some(item) = rx.next().await else { break };
            match item {
                Ok(Message::Text(t)) if is_client && t.contains(r#""pong""#) => {
                    match serde_json::from_str::<serde_json::Value>(&t) {
                        Ok(v) => seen.json_pongs.push(v),
                        Err(e) => seen.error = Some(format!("a JSON pong that is not JSON ({e}): {t}")),
                    }
                }
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => seen.data.push(m),
                Ok(Message::Ping(p)) => seen.pings.push(p),
                Ok(Message::Pong(p)) => seen.pongs.push(p),
                Ok(Message::Close(frame)) => seen.close = Some(frame),
                Ok(Message::Frame(_)) => {}
                Err(e) => {
                    if seen.close.is_none() {
                        seen.error.get_or_insert(e.to_string());
                    }
                    break;
                }
            }
        }
        seen
    };
    let writer = async move {
        for step in steps {
            let sent = match step {
                Step::Whole(m) => tx.send(m).await,
                Step::Fragment(f) => tx.send(Message::Frame(f)).await,
                Step::Ping(i) => tx.send(Message::Ping(ping_payload(name, i))).await,
                Step::Pause(d) => {
                    tokio::time::sleep(d).await;
                    Ok(())
                }
            };
            // A failed write shows as a missing message on the other side.
            if sent.is_err() {
                return;
            }
        }
        if let Some((frame, _)) = close {
            let _ = got_rx.await;
            let _ = tx.send(Message::Close(Some(frame))).await;
        }
    };
    tokio::join!(reader, writer).0
}

/// wskeep's own pings each peer saw: the timers did fire.
type TimerPings = [usize; 2];

async fn run_real(case: &RealCase) -> Result<TimerPings, String> {
    let upstream_listener = small_socket(case.buffers[1]);
    upstream_listener.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let upstream_listener = upstream_listener.listen(8).unwrap();
    let [client_ping, upstream_ping, upstream_pong] = case.timers;
    let extra = format!(
        "[client_keepalive]\nping_interval = \"{client_ping}ms\"\ntimeout = \"3s\"\n\
         [upstream_keepalive]\nping_interval = \"{upstream_ping}ms\"\npong_interval = \"{upstream_pong}ms\"\n\
         timeout = \"3s\"\n[json_ping]\nenabled = true\nforward = {}\n",
        case.forward
    );
    let sidecar =
        common::start_sidecar(common::test_config(upstream_listener.local_addr().unwrap(), None, &extra)).await;
    let config = wskeep::tools::bench::echo::websocket_config(1 << 20);

    let accept = tokio::spawn(async move {
        let (tcp, _) = upstream_listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await.unwrap()
    });
    let tcp = small_socket(case.buffers[0]).connect(sidecar.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let url = format!("ws://127.0.0.1:{}/", sidecar.addr.port());
    let (client_ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await.unwrap();
    let upstream_ws = accept.await.unwrap();

    let frame = CloseFrame { code: CloseCode::from(case.code), reason: case.reason.clone().into() };
    let (client_close, upstream_close) = if case.client_closes {
        (Some((frame.clone(), (case.upstream.delivered.len(), case.client.json_pings))), None)
    } else {
        (None, Some((frame.clone(), (case.client.delivered.len(), 0))))
    };
    let client = tokio::spawn(scripted_peer(client_ws, true, "client", case.client.steps.clone(), client_close));
    let upstream =
        tokio::spawn(scripted_peer(upstream_ws, false, "upstream", case.upstream.steps.clone(), upstream_close));
    let (client, upstream) = tokio::time::timeout(Duration::from_secs(10), async {
        let (c, u) = tokio::join!(client, upstream);
        (c.unwrap(), u.unwrap())
    })
    .await
    .map_err(|_| "the exchange did not finish within 10 s".to_string())?;

    check_peer("client", &client, &case.upstream, &case.client, case.client_closes)?;
    check_peer("upstream", &upstream, &case.client, &case.upstream, !case.client_closes)?;
    // JSON pongs answer the JSON pings in order, each echoing its id; all of them if the client
    // closed, else at least those sent before its last message the upstream waited for.
    let json_ids: Vec<Option<u64>> = client.json_pongs.iter().map(|v| v["id"].as_u64()).collect();
    let expected: Vec<Option<u64>> = (0..json_ids.len() as u64).map(Some).collect();
    if json_ids != expected
        || client.json_pongs.iter().any(|v| v["type"] != "pong" || v.as_object().unwrap().len() != 2)
    {
        return Err(format!("the JSON pongs do not answer the JSON pings in order: {:?}", client.json_pongs));
    }
    let least = if case.client_closes { case.client.json_pings } else { case.client.json_pings_before_last };
    if json_ids.len() < least || json_ids.len() > case.client.json_pings {
        return Err(format!(
            "{} JSON pongs for {} JSON pings ({least} must be answered)",
            json_ids.len(),
            case.client.json_pings
        ));
    }
    // A close is answered with its own code; the other side gets it as it was sent.
    let (closer, other) = if case.client_closes { (&client, &upstream) } else { (&upstream, &client) };
    if other.close != Some(Some(frame.clone())) {
        return Err(format!("the other side got the close {:?}, not {frame:?}", other.close));
    }
    let answer = closer.close.clone().flatten().map(|f| u16::from(f.code));
    if answer != Some(case.code) {
        return Err(format!("the closer's close is answered with {answer:?}"));
    }

    // wskeep's account of it agrees.
    let end = if case.client_closes { "client_close" } else { "upstream_close" };
    let series = format!("wskeep_connection_duration_seconds_count{{end=\"{end}\"}}");
    let mut text = String::new();
    for _ in 0..300 {
        text = common::scrape(sidecar.admin).await;
        if common::metric(&text, &series) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counts = [
        (series.as_str(), 1),
        (r#"wskeep_messages_total{direction="client_to_upstream"}"#, case.client.delivered.len()),
        (r#"wskeep_messages_total{direction="upstream_to_client"}"#, case.upstream.delivered.len()),
        ("wskeep_json_pings_answered_total", client.json_pongs.len()),
    ];
    for (series, count) in counts {
        if common::metric(&text, series) != count as f64 {
            return Err(format!("{series} is {}, not {count}", common::metric(&text, series)));
        }
    }
    let closer_side =
        if case.client_closes { ("client", case.client.pings) } else { ("upstream", case.upstream.pings) };
    let answered = format!("wskeep_pings_answered_total{{side=\"{}\"}}", closer_side.0);
    if common::metric(&text, &answered) != closer_side.1 as f64 {
        return Err(format!("{answered} is {}, not {}", common::metric(&text, &answered), closer_side.1));
    }
    sidecar.drain.shutdown();
    tokio::time::timeout(Duration::from_secs(5), sidecar.task).await.map_err(|_| "the sidecar did not stop")?.unwrap();
    Ok([client.pings.len(), upstream.pings.len()])
}

/// What `name` received: no protocol error, the other peer's messages in order and unchanged,
/// pongs only for its own pings (in order, the last ones answered), no ping of the other peer.
fn check_peer(name: &str, seen: &Received, other: &Script, own: &Script, closed: bool) -> Result<(), String> {
    if let Some(e) = &seen.error {
        return Err(format!("the {name} peer's connection failed: {e}"));
    }
    if seen.data.len() != other.delivered.len() {
        return Err(format!("the {name} peer got {} messages, not {}", seen.data.len(), other.delivered.len()));
    }
    for (i, (got, sent)) in seen.data.iter().zip(&other.delivered).enumerate() {
        if got != sent {
            return Err(format!("message {i} to the {name} peer differs ({} vs {} bytes)", got.len(), sent.len()));
        }
    }
    let other_name = if name == "client" { "upstream" } else { "client" };
    if let Some(p) = seen.pings.iter().find(|p| p.starts_with(other_name.as_bytes())) {
        return Err(format!("the {other_name}'s ping {p:?} reached the {name} peer"));
    }
    // Unsolicited pongs are empty, and go upstream only.
    let mut last: Option<usize> = None;
    for pong in &seen.pongs {
        if pong.is_empty() && name == "upstream" {
            continue;
        }
        let index = (0..own.pings).find(|&i| ping_payload(name, i) == pong);
        match index {
            Some(i) if last.is_none_or(|l| i > l) => last = Some(i),
            _ => return Err(format!("the {name} peer got the pong {pong:?} after one for ping {last:?}")),
        }
    }
    // wskeep answers the latest ping it has read (RFC 6455 5.5.3), before any close.
    let must = if closed { own.pings } else { own.pings_before_last };
    if must > 0 && last.is_none_or(|l| l + 1 < must) {
        return Err(format!("the {name} peer's ping {} has no answer (last pong: {last:?})", must - 1));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_peers_get_every_message_in_order_through_fragments_pings_timers_and_json_pings() {
    let seed = std::env::var("WSKEEP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed} (replay: WSKEEP_TEST_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let mut timer_pings = [0; 2];
    let mut cases = 0;
    let only: Option<usize> = std::env::var("WSKEEP_TEST_CASE").ok().and_then(|s| s.parse().ok());
    while cases < REAL_CASES && started.elapsed() < REAL_BUDGET {
        let case = RealCase::random(&mut rng);
        if only.is_some_and(|n| n != cases) {
            cases += 1;
            continue;
        }
        match run_real(&case).await {
            Ok(pings) => (0..2).for_each(|i| timer_pings[i] += pings[i]),
            Err(e) => panic!("seed {seed}, case {cases}: {e}\n{}", case.summary()),
        }
        cases += 1;
    }
    eprintln!("{cases} cases in {:?}; wskeep's pings seen: {timer_pings:?}", started.elapsed());
    assert!(cases >= REAL_MIN_CASES, "only {cases} cases within {REAL_BUDGET:?}");
    assert!(timer_pings.iter().all(|&n| n > 0), "wskeep's 1-5 ms ping timers never fired: {timer_pings:?}");
}
