//! Inflates one small compressed message (permessage-deflate, RFC 7692), only to let the JSON
//! ping matcher see it.
//!
//! wskeep relays compressed messages as they are and never keeps a compression context: it
//! answers the client `client_no_context_takeover`, so each client message is compressed on its
//! own and can be inflated alone. Only candidates are inflated (a whole text message in one frame,
//! at most `MAX_WIRE` bytes), into a buffer on the stack that bounds the output (`MAX_TEXT`), so a
//! compression bomb costs at most that much work and nothing is allocated.

use std::cell::RefCell;

use miniz_oxide::inflate::core::inflate_flags::{TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF};
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Compressed messages longer than this are never inflated: a JSON ping compresses to a few dozen
/// bytes.
pub const MAX_WIRE: usize = 1024;
/// A candidate that inflates to more than this is not a ping.
pub const MAX_TEXT: usize = 4096;

thread_local! {
    /// One decompressor per worker thread, reset for each candidate: its tables are about 11 KiB,
    /// too much to allocate and clear per message or to put on the relay task's stack.
    static DECOMPRESSOR: RefCell<Box<DecompressorOxide>> = RefCell::default();
}

/// RFC 7692 §7.2.2: the sender removed these four bytes (the end of a sync flush) from the end of
/// the message; the receiver puts them back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What `look` makes of the text `compressed` inflates to; `None` without a look if it is too long
/// on the wire or inflated, is not valid DEFLATE on its own, or is not UTF-8.
pub fn small_text<R>(compressed: &[u8], look: impl FnOnce(&str) -> Option<R>) -> Option<R> {
    if compressed.len() > MAX_WIRE {
        return None;
    }
    let mut out = [0u8; MAX_TEXT];
    inflate_into(compressed, &mut out).and_then(look)
}

fn inflate_into<'a>(compressed: &[u8], out: &'a mut [u8; MAX_TEXT]) -> Option<&'a str> {
    let mut input = [0u8; MAX_WIRE + TAIL.len()];
    input[..compressed.len()].copy_from_slice(compressed);
    input[compressed.len()..compressed.len() + TAIL.len()].copy_from_slice(&TAIL);
    let input = &input[..compressed.len() + TAIL.len()];
    // The message ends without a final block, so a whole message leaves the decompressor waiting
    // for more input, with every byte of it consumed.
    let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF | TINFL_FLAG_HAS_MORE_INPUT;
    let (status, used, written) = DECOMPRESSOR.with_borrow_mut(|state| {
        state.init();
        decompress(state, input, out, 0, flags)
    });
    match status {
        // A message may also end with a final block, which leaves the tail unread.
        TINFLStatus::NeedsMoreInput if used == input.len() => std::str::from_utf8(&out[..written]).ok(),
        TINFLStatus::Done => std::str::from_utf8(&out[..written]).ok(),
        _ => None,
    }
}

/// Inflates the start of a compressed message (or of its first frame) into `out`: how many bytes
/// came out, and whether that is all of what `compressed` holds. `None` if it is not DEFLATE that
/// decodes on its own. At most `MAX_WIRE` bytes of input are looked at.
pub fn start(compressed: &[u8], out: &mut [u8]) -> Option<(usize, bool)> {
    let input = &compressed[..compressed.len().min(MAX_WIRE)];
    let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF | TINFL_FLAG_HAS_MORE_INPUT;
    let (status, _, written) = DECOMPRESSOR.with_borrow_mut(|state| {
        state.init();
        decompress(state, input, out, 0, flags)
    });
    match status {
        TINFLStatus::NeedsMoreInput | TINFLStatus::Done => Some((written, input.len() == compressed.len())),
        TINFLStatus::HasMoreOutput => Some((written, false)),
        _ => None,
    }
}

/// `data` as one permessage-deflate message in DEFLATE stored blocks (RFC 1951 §3.2.4), without
/// the sync flush's last four bytes (RFC 7692 §7.2.1): not compressed, but valid for any
/// inflater, so tests and the load generator can send compressed frames without a compressor.
pub fn stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    for block in data.chunks(0xffff) {
        let len = block.len() as u16;
        out.push(0x00); // not final, stored
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    // The sync flush: an empty stored block whose LEN and NLEN are left off.
    out.push(0x00);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflated(compressed: &[u8]) -> Option<String> {
        small_text(compressed, |text| Some(text.to_owned()))
    }

    #[test]
    fn a_message_compressed_on_its_own_is_inflated() {
        // "Hello" as RFC 7692 §7.2.3.1 shows it compressed with fixed Huffman codes.
        assert_eq!(inflated(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]), Some("Hello".into()));
        assert_eq!(inflated(&stored(br#"{"type":"ping"}"#)), Some(r#"{"type":"ping"}"#.into()));
    }

    #[test]
    fn the_start_of_a_message_is_inflated_as_far_as_asked() {
        let mut start = [0u8; 8];
        assert_eq!(super::start(&stored(b"\0wskeep:ack 12"), &mut start), Some((8, false)));
        assert_eq!(&start, b"\0wskeep:");
        // "Hello" whole: all of it, fewer bytes than asked.
        assert_eq!(super::start(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut start), Some((5, true)));
        assert_eq!(super::start(&[0xff, 0xff, 0xff], &mut start), None);
    }

    #[test]
    fn a_message_that_needs_an_earlier_context_is_not_inflated() {
        // RFC 7692 §7.2.3.2: the second "Hello" refers back into the first message.
        assert_eq!(inflated(&[0xf2, 0x00, 0x11, 0x00, 0x00]), None);
    }

    /// One literal zero, then `repeats` back-references of 258 bytes at distance 1: a message of
    /// a few bytes per 258 inflated.
    fn zeros(repeats: usize) -> Vec<u8> {
        let mut bits = BitWriter::default();
        bits.push(0, 1); // BFINAL = 0
        bits.push(1, 2); // BTYPE = 01, fixed Huffman
        bits.push_code(0b00110000, 8); // literal 0
        for _ in 0..repeats {
            bits.push_code(0b11000101, 8); // length code 285: 258 bytes
            bits.push_code(0, 5); // distance code 0: distance 1
        }
        bits.push_code(0, 7); // end of block
        bits.finish()
    }

    #[test]
    fn a_compression_bomb_stops_at_the_output_bound() {
        assert_eq!(inflated(&zeros(10)), Some("\0".repeat(2581)), "the bomb is valid DEFLATE");
        let bomb = zeros(100);
        assert!(bomb.len() < 200, "{} bytes", bomb.len());
        assert_eq!(inflated(&bomb), None);
    }

    #[test]
    fn stored_blocks_inflate_to_the_message() {
        for len in [0, 64, 1000] {
            let text = "x".repeat(len);
            assert_eq!(inflated(&stored(text.as_bytes())), Some(text));
        }
    }

    #[test]
    fn long_or_invalid_input_is_not_inflated() {
        assert_eq!(inflated(&stored(&[b'a'; MAX_WIRE])), None);
        assert_eq!(inflated(&[0xff, 0xff, 0xff]), None);
        assert_eq!(inflated(&stored(&[0xff, 0xfe])), None, "not UTF-8");
    }

    /// DEFLATE's bit order: fields least significant bit first, Huffman codes most significant
    /// bit first.
    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        used: u32,
    }

    impl BitWriter {
        fn push(&mut self, value: u32, bits: u32) {
            for i in 0..bits {
                if self.used % 8 == 0 {
                    self.bytes.push(0);
                }
                let bit = ((value >> i) & 1) as u8;
                *self.bytes.last_mut().expect("pushed above") |= bit << (self.used % 8);
                self.used += 1;
            }
        }

        fn push_code(&mut self, code: u32, bits: u32) {
            for i in (0..bits).rev() {
                self.push((code >> i) & 1, 1);
            }
        }

        fn finish(mut self) -> Vec<u8> {
            // The sync flush: an empty stored block, aligned, whose last four bytes are removed.
            self.push(0, 3);
            self.bytes
        }
    }
}
