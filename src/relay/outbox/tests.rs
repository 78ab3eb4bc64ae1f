use super::*;
use crate::frame::{FrameReader, Kind, Step, OP_BINARY, OP_PING, OP_TEXT};
// A transport that takes only as many bytes as it has budget for.
use crate::relay::harness::Wire as Trickle;
use std::future::poll_fn;

/// Starts a data frame in `out` as the relay does while it is still arriving: header and part
/// of the payload, not committed.
fn begin_partial(out: &mut Outbox, payload_len: u64, part: &[u8]) {
    frame::write_head(&mut out.buf, true, OP_BINARY, payload_len, None);
    out.buf.extend_from_slice(part);
}

#[test]
fn own_frames_wait_for_the_frame_still_arriving() {
    let mut out = Outbox::new(false);
    out.push_frame(OP_TEXT, b"whole");
    let whole = out.buf.clone();
    begin_partial(&mut out, 4, b"pa");
    out.push_frame(OP_PING, b"p");
    assert_eq!(out.committed, whole.len(), "nothing may go inside the frame still arriving");
    out.buf.extend_from_slice(b"rt");
    out.commit_forwarded(true);
    let expected = [&whole[..], &[0x82, 4, b'p', b'a', b'r', b't'], &[0x89, 1, b'p']].concat();
    assert_eq!(out.buf, expected);
    assert_eq!(out.committed, out.buf.len());
    assert_eq!(out.held_ping.capacity(), 0, "the held buffer is released");
}

#[test]
fn a_json_pong_waits_for_the_end_of_an_open_message() {
    let mut out = Outbox::new(false);
    // The upstream's message, first fragment forwarded.
    frame::write_head(&mut out.buf, false, OP_TEXT, 1, None);
    out.buf.push(b'a');
    out.commit_forwarded(false);
    out.push_frame(OP_TEXT, b"pong");
    out.push_frame(OP_PING, b"");
    assert_eq!(out.buf, [0x01, 1, b'a', 0x89, 0], "a ping may go between fragments, a data frame may not");
    // The last fragment ends the message; the JSON pong follows it.
    frame::write_head(&mut out.buf, true, frame::OP_CONTINUATION, 1, None);
    out.buf.push(b'b');
    out.commit_forwarded(true);
    assert_eq!(out.buf, [0x01, 1, b'a', 0x89, 0, 0x80, 1, b'b', 0x81, 4, b'p', b'o', b'n', b'g']);
    assert_eq!(out.committed, out.buf.len());
    assert_eq!(out.own_unwritten, 6 + 2, "both own frames count against the budget");
}

#[test]
fn a_dropped_partial_frame_releases_what_waited_for_it() {
    let mut out = Outbox::new(false);
    begin_partial(&mut out, 10, b"part");
    out.push_frame(OP_PING, b"");
    out.drop_partial();
    assert_eq!(out.buf, [0x89, 0]);
    assert_eq!(out.committed, 2);
}

#[test]
fn frames_towards_a_server_are_masked_with_a_fresh_key() {
    let mut out = Outbox::new(true);
    out.push_frame(OP_TEXT, b"hello");
    out.push_frame(OP_TEXT, b"hello");
    let mut reader = FrameReader::new(true, 1 << 10);
    let mut bytes = &out.buf[..];
    let mut keys = Vec::new();
    while let Some(Step::Data { frame, bytes: piece, .. }) = reader.next(&mut bytes).unwrap() {
        let key = frame.mask.expect("masked");
        let mut payload = piece.to_vec();
        frame::apply_mask(&mut payload, key);
        assert_eq!(payload, b"hello");
        keys.push(key);
    }
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "each frame draws its own key");
}

#[tokio::test]
async fn only_whole_frames_are_written() {
    let (mut peer, relay_end) = tokio::io::duplex(1 << 16);
    let mut io = LegStream::new(relay_end);
    let mut out = Outbox::new(false);
    out.push_frame(OP_TEXT, b"one");
    let whole = out.buf.clone();
    begin_partial(&mut out, 6, b"ab");
    poll_fn(|cx| out.poll_write(&mut io, cx)).await.unwrap();
    drop(io);
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut got).await.unwrap();
    assert_eq!(got, whole, "the frame still arriving stays behind");
    assert_eq!((out.committed, out.written), (0, 0));
    assert_eq!(out.buf, [0x82, 6, b'a', b'b'], "and moves to the front of the buffer");
}

#[tokio::test]
async fn a_large_buffer_is_released_once_written() {
    let (mut peer, relay_end) = tokio::io::duplex(1 << 20);
    let mut io = LegStream::new(relay_end);
    let mut out = Outbox::new(false);
    out.push_frame(OP_BINARY, &[7; 3 * KEEP_CAPACITY]);
    poll_fn(|cx| out.poll_write(&mut io, cx)).await.unwrap();
    assert_eq!(out.buf.capacity(), 0);
    out.push_frame(OP_BINARY, &[7; 100]);
    poll_fn(|cx| out.poll_write(&mut io, cx)).await.unwrap();
    assert!(out.buf.capacity() > 0, "a small one is kept for the next batch");
    drop(io);
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut got).await.unwrap();
    assert_eq!(got.len(), 4 + 3 * KEEP_CAPACITY + 2 + 100);
}

#[tokio::test]
async fn answers_count_against_the_budget_until_written_even_behind_a_frame_still_arriving() {
    let (_peer, relay_end) = tokio::io::duplex(1 << 16);
    let mut io = LegStream::new(relay_end);
    let mut out = Outbox::new(false);
    out.push_frame(frame::OP_PONG, b"x");
    begin_partial(&mut out, 6, b"part");
    out.push_frame(frame::OP_PONG, b"y");
    assert_eq!(out.own_unwritten, 3, "a held pong counts once released");
    poll_fn(|cx| out.poll_write(&mut io, cx)).await.unwrap();
    assert_eq!(out.own_unwritten, 0, "the written pong no longer counts, though a frame is still arriving");
    out.buf.extend_from_slice(b"xx");
    out.commit_forwarded(true);
    assert_eq!(out.own_unwritten, 3);
}

#[test]
fn held_answers_are_bounded() {
    let mut out = Outbox::new(false);
    begin_partial(&mut out, 10, b"part");
    out.push_frame(frame::OP_PONG, b"a");
    out.push_frame(frame::OP_PONG, b"b");
    assert_eq!(out.held_pong, [0x8a, 1, b'b'], "only the latest ping is answered");
    assert!(out.push_frame(OP_PING, b"1"));
    assert!(!out.push_frame(OP_PING, b"2"), "one timer ping waits at most");
    let pong = [b'j'; 100];
    let mut queued = 0;
    while out.push_frame(OP_TEXT, &pong) {
        queued += 1;
    }
    assert_eq!(queued, OWN_BUDGET.div_ceil(102), "JSON pongs past the budget are dropped");
    assert!(out.held_data.len() < OWN_BUDGET + 102);
}

#[derive(Debug, Clone)]
enum Op {
    /// A frame from the other leg begins: its payload length and whether it ends its message.
    Begin(u8, bool),
    /// Some of its payload arrives.
    Arrive(u8),
    /// The rest arrives and it is committed.
    Finish,
    /// It is dropped unfinished (a JSON ping that is not forwarded).
    Drop,
    Ping,
    Pong,
    JsonPong,
    /// A timer's ping, sent straight when nothing waits, with the transport taking up to this
    /// many bytes of it.
    TimerPing(u8),
    /// The transport takes up to this many bytes.
    Write(u16),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (0..40u8, any::<bool>()).prop_map(|(len, fin)| Op::Begin(len, fin)),
        (0..20u8).prop_map(Op::Arrive),
        Just(Op::Finish),
        Just(Op::Drop),
        Just(Op::Ping),
        Just(Op::Pong),
        Just(Op::JsonPong),
        (0..8u8).prop_map(Op::TimerPing),
        (0..200u16).prop_map(Op::Write),
    ]
}

/// Lets `out` write at most `budget` bytes through `trickle`.
fn write_some(out: &mut Outbox, io: &mut LegStream, trickle: &Trickle, budget: usize) {
    trickle.state().0 = budget;
    let _ = out.poll_write(io, &mut Context::from_waker(std::task::Waker::noop()));
}

proptest::proptest! {
    /// Whatever the interleaving of forwarded frames (arriving in pieces, finished or dropped),
    /// wskeep's own frames and partial writes, the bytes written parse as valid frames: nothing
    /// inside a frame, no JSON pong inside a fragmented message, every finished frame once and in
    /// order.
    #[test]
    fn the_written_stream_is_always_valid_frames(ops in proptest::collection::vec(op(), 0..60)) {
        let mut out = Outbox::new(false);
        let trickle = Trickle::default();
        let mut io = LegStream::new(trickle.clone());
        // The frame arriving: (payload length, fin, bytes arrived); and the finished ones.
        let mut arriving: Option<(u8, bool, u8)> = None;
        let mut finished = Vec::new();
        let mut next = 0u8;
        for op in ops {
            match op {
                Op::Begin(len, fin) if arriving.is_none() => {
                    let opcode = if out.open_message { frame::OP_CONTINUATION } else { OP_BINARY };
                    frame::write_head(&mut out.buf, fin, opcode, len as u64, None);
                    arriving = Some((len, fin, 0));
                }
                Op::Arrive(n) | Op::Begin(n, _) => {
                    if let Some((len, _, got)) = &mut arriving {
                        let n = n.min(*len - *got);
                        out.buf.extend((0..n).map(|_| { next = next.wrapping_add(1); next }));
                        *got += n;
                    }
                }
                Op::Finish => {
                    if let Some((len, fin, got)) = arriving.take() {
                        out.buf.extend((got..len).map(|_| { next = next.wrapping_add(1); next }));
                        let payload_at = out.buf.len() - len as usize;
                        finished.push(out.buf[payload_at..].to_vec());
                        out.commit_forwarded(fin);
                    }
                }
                Op::Drop => {
                    if let Some((len, _, got)) = arriving.take() {
                        next = next.wrapping_add(len - got);
                        out.drop_partial();
                    }
                }
                Op::Ping => { out.push_frame(OP_PING, b"p"); }
                Op::Pong => { out.push_frame(frame::OP_PONG, b"o"); }
                Op::JsonPong => { out.push_frame(OP_TEXT, b"{}"); }
                Op::TimerPing(n) => {
                    trickle.state().0 = n as usize;
                    out.send_control(&mut io, &mut Context::from_waker(std::task::Waker::noop()), OP_PING, b"t");
                }
                Op::Write(n) => write_some(&mut out, &mut io, &trickle, n as usize),
            }
            proptest::prop_assert!(out.written <= out.committed && out.committed <= out.buf.len());
        }
        write_some(&mut out, &mut io, &trickle, usize::MAX);
        let wire = std::mem::take(&mut trickle.state().1);
        let mut reader = FrameReader::new(false, 1 << 20);
        let mut bytes = &wire[..];
        let mut forwarded = Vec::new();
        while let Some(step) = reader.next(&mut bytes).map_err(|v| proptest::test_runner::TestCaseError::fail(v.reason))? {
            if let Step::Data { frame, bytes: piece, .. } = step {
                if frame.kind == Kind::Binary {
                    forwarded.extend_from_slice(piece);
                }
            }
        }
        proptest::prop_assert_eq!(forwarded, finished.concat(), "every finished frame, once, in order");
    }
}
