use super::*;
use crate::frame::{FrameReader, Step, OP_BINARY, OP_PING, OP_TEXT};

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
    assert_eq!(out.held_control.capacity(), 0, "the held buffer is released");
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
    assert_eq!(out.own, 6 + 2, "both own frames count against the budget");
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
