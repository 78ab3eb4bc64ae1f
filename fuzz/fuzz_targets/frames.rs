//! The relay's frame reader on arbitrary bytes from either kind of peer: nothing panics, the
//! frames and the violations do not depend on how the bytes are split into reads (reading goes
//! on past a violation, as the closing handshake does, through the refused frame's payload),
//! every frame keeps the limits, and the piecewise UTF-8 check agrees with checking each whole
//! text message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wskeep::frame::{apply_mask, rotate, Control, FrameReader, Kind, Step, Utf8Check, Violation};

const MAX: u64 = 4096;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Data { kind: Kind, first: bool, fin: bool, payload: Vec<u8> },
    Control(Control, Vec<u8>),
    Refused(Violation),
}

/// A text message being checked frame by frame, as the relay does.
struct Text {
    whole: Vec<u8>,
    check: Utf8Check,
    failed: bool,
}

/// Reads `stream` in pieces of `split` bytes: what the reader reported.
fn read(stream: &[u8], split: usize, from_client: bool) -> Vec<Event> {
    let mut reader = FrameReader::new(from_client, MAX);
    let mut events = Vec::new();
    let mut frame_payload = Vec::new();
    let mut message_size = 0u64;
    let mut text: Option<Text> = None;
    for chunk in stream.chunks(split) {
        let mut buf = chunk;
        loop {
            let step = match reader.next(&mut buf) {
                Ok(Some(step)) => step,
                Ok(None) => break,
                Err(violation) => {
                    events.push(Event::Refused(violation));
                    continue;
                }
            };
            match step {
                Step::Data { frame, bytes, offset } => {
                    assert_eq!(frame.mask.is_some(), from_client, "masking follows the peer's role");
                    assert_eq!(offset, frame_payload.len() as u64, "pieces come in order");
                    assert!(frame.len <= MAX, "a frame over the limit was accepted");
                    let start = frame_payload.len();
                    frame_payload.extend_from_slice(bytes);
                    if let Some(key) = frame.mask {
                        apply_mask(&mut frame_payload[start..], rotate(key, offset));
                    }
                    if offset + bytes.len() as u64 != frame.len {
                        continue;
                    }
                    let payload = std::mem::take(&mut frame_payload);
                    message_size = if frame.first { frame.len } else { message_size + frame.len };
                    assert!(message_size <= MAX, "a message over the limit was accepted");
                    if frame.kind == Kind::Text {
                        let t = text.get_or_insert_with(|| Text { whole: Vec::new(), check: Utf8Check::default(), failed: false });
                        t.whole.extend_from_slice(&payload);
                        t.failed |= t.check.check(&payload, frame.fin).is_err();
                        if frame.fin {
                            let t = text.take().expect("inserted above");
                            assert_eq!(t.failed, std::str::from_utf8(&t.whole).is_err(), "piecewise UTF-8 check disagrees");
                        }
                    }
                    events.push(Event::Data { kind: frame.kind, first: frame.first, fin: frame.fin, payload });
                }
                Step::Control(op) => events.push(Event::Control(op, reader.control_payload().to_vec())),
            }
        }
        assert!(buf.is_empty(), "the reader uses every byte it is given");
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else { return };
    let from_client = flags & 1 != 0;
    let split = (flags >> 1) as usize + 1;
    let whole = read(stream, stream.len().max(1), from_client);
    assert_eq!(read(stream, split, from_client), whole, "split into {split}-byte reads");
    assert_eq!(read(stream, 1, from_client), whole, "split into 1-byte reads");
});
