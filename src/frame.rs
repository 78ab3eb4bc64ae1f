//! WebSocket frames as the relay reads and writes them (RFC 6455 §5).
//!
//! The relay forwards frames, not messages: a data frame's payload goes from the bytes the
//! transport hands over straight into the other leg's write buffer (unmasked and re-masked on the
//! way), so nothing is assembled or allocated per message. `FrameReader` is the incremental parser
//! that makes this possible: it takes whatever bytes arrived, however they are split, enforces
//! the protocol (masking by role, reserved bits and opcodes, control frame rules, fragmentation
//! order, size limits) and yields payload pieces and complete control frames.

use std::str::Utf8Error;

use bytes::BufMut;

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEAD: usize = 14;
/// Control frames carry at most this much payload.
pub const MAX_CONTROL: usize = 125;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;
/// The first reserved bit: with permessage-deflate (RFC 7692), set on the first frame of a
/// compressed message.
pub const RSV1: u8 = 0x40;

/// Input the peer must be closed for: the close code it is sent and a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    pub const fn protocol(reason: &'static str) -> Violation {
        Violation { code: 1002, reason }
    }
    pub const TOO_BIG: Violation = Violation { code: 1009, reason: "message too big" };
    pub const INVALID_UTF8: Violation = Violation { code: 1007, reason: "invalid UTF-8" };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// A data frame being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFrame {
    /// The kind of the message it belongs to.
    pub kind: Kind,
    /// It starts its message (opcode text or binary, not continuation).
    pub first: bool,
    /// It ends its message.
    pub fin: bool,
    pub len: u64,
    /// The peer's masking key (frames from a client), as on the wire.
    pub mask: Option<[u8; 4]>,
    /// Its message is compressed (permessage-deflate): the payload is not text yet.
    pub compressed: bool,
}

impl DataFrame {
    /// The opcode to write it with, and RSV1 on the first frame of a compressed message.
    pub fn opcode(&self) -> u8 {
        match (self.first, self.kind) {
            (false, _) => OP_CONTINUATION,
            (true, Kind::Text) => OP_TEXT | if self.compressed { RSV1 } else { 0 },
            (true, Kind::Binary) => OP_BINARY | if self.compressed { RSV1 } else { 0 },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Ping,
    Pong,
    Close,
}

/// What the reader found next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Payload bytes of a data frame, still masked as they arrived, starting at `offset` in the
    /// frame's payload. A frame yields one or more pieces, the first at offset 0 (an empty frame
    /// yields one empty piece); the last ends at `frame.len`.
    Data { frame: DataFrame, bytes: &'a [u8], offset: u64 },
    /// A complete control frame; its unmasked payload is `FrameReader::control_payload`.
    Control(Control),
}

#[derive(Debug, Clone, Copy)]
enum Current {
    Data {
        frame: DataFrame,
        done: u64,
    },
    Control {
        op: Control,
        len: u8,
        mask: Option<[u8; 4]>,
    },
    /// The payload of a refused frame, passed over so that the frames after it (the peer's
    /// answer to wskeep's close) are read as frames.
    Skip {
        left: u64,
    },
}

/// Parses one leg's incoming frames, whatever the read boundaries.
pub struct FrameReader {
    /// Frames from this peer must be masked (it is a client) or must not be (a server).
    peer_masks: bool,
    max_size: u64,
    /// A header split across reads.
    head: [u8; MAX_HEAD],
    head_len: u8,
    current: Option<Current>,
    /// A fragmented message is open: its kind, whether it is compressed, and its size so far.
    message: Option<(Kind, bool, u64)>,
    /// permessage-deflate was negotiated: RSV1 may start a message.
    deflate: bool,
    control: [u8; MAX_CONTROL],
    control_len: u8,
}

impl FrameReader {
    /// `peer_masks`: the peer is a client. `max_size`: the largest message (and frame) accepted.
    pub fn new(peer_masks: bool, max_size: u64) -> FrameReader {
        FrameReader {
            peer_masks,
            max_size,
            head: [0; MAX_HEAD],
            head_len: 0,
            current: None,
            message: None,
            deflate: false,
            control: [0; MAX_CONTROL],
            control_len: 0,
        }
    }

    /// Accepts compressed messages (RSV1 on a message's first frame): permessage-deflate was
    /// negotiated on this connection.
    pub fn with_deflate(mut self, deflate: bool) -> FrameReader {
        self.deflate = deflate;
        self
    }

    /// The payload of the control frame the last `Step::Control` reported, unmasked.
    pub fn control_payload(&self) -> &[u8] {
        &self.control[..self.control_len as usize]
    }

    /// The next step found in `buf`, which is advanced past what was used. `Ok(None)`: `buf` is
    /// used up (anything incomplete is kept for the next call).
    pub fn next<'a>(&mut self, buf: &mut &'a [u8]) -> Result<Option<Step<'a>>, Violation> {
        loop {
            match &mut self.current {
                Some(Current::Data { frame, done }) => {
                    let take = (frame.len - *done).min(buf.len() as u64) as usize;
                    let complete = *done + take as u64 == frame.len;
                    if take == 0 && !complete {
                        return Ok(None);
                    }
                    let (bytes, rest) = buf.split_at(take);
                    *buf = rest;
                    let (frame, offset) = (*frame, *done);
                    *done += take as u64;
                    if complete {
                        self.current = None;
                    }
                    return Ok(Some(Step::Data { frame, bytes, offset }));
                }
                Some(Current::Control { op, len, mask }) => {
                    let (op, len, mask) = (*op, *len as usize, *mask);
                    let have = self.control_len as usize;
                    let take = (len - have).min(buf.len());
                    let piece = &mut self.control[have..have + take];
                    piece.copy_from_slice(&buf[..take]);
                    if let Some(mask) = mask {
                        apply_mask(piece, rotate(mask, have as u64));
                    }
                    *buf = &buf[take..];
                    self.control_len += take as u8;
                    if have + take < len {
                        return Ok(None);
                    }
                    self.current = None;
                    return Ok(Some(Step::Control(op)));
                }
                Some(Current::Skip { left }) => {
                    let take = (*left).min(buf.len() as u64);
                    *left -= take;
                    *buf = &buf[take as usize..];
                    if *left > 0 {
                        return Ok(None);
                    }
                    self.current = None;
                }
                None => {
                    let Some(head) = self.take_head(buf) else { return Ok(None) };
                    if let Err(violation) = self.start(head) {
                        self.current = Some(Current::Skip { left: head.len });
                        return Err(violation);
                    }
                }
            }
        }
    }

    /// A whole header from `buf`, or from the part kept from earlier reads plus `buf`.
    fn take_head(&mut self, buf: &mut &[u8]) -> Option<Head> {
        if self.head_len == 0 {
            if let Some((head, used)) = Head::parse(buf) {
                *buf = &buf[used..];
                return Some(head);
            }
            self.head[..buf.len()].copy_from_slice(buf); // shorter than a header, so it fits
            self.head_len = buf.len() as u8;
            *buf = &[];
            return None;
        }
        let kept = self.head_len as usize;
        let take = (MAX_HEAD - kept).min(buf.len());
        self.head[kept..kept + take].copy_from_slice(&buf[..take]);
        match Head::parse(&self.head[..kept + take]) {
            Some((head, used)) => {
                *buf = &buf[used - kept..];
                self.head_len = 0;
                Some(head)
            }
            None => {
                self.head_len += take as u8;
                *buf = &buf[take..];
                None
            }
        }
    }

    /// Checks a header against the protocol and the limits, and begins its frame.
    fn start(&mut self, head: Head) -> Result<(), Violation> {
        if let Some(violation) = head.length_violation() {
            return Err(violation);
        }
        // RSV1 belongs to permessage-deflate, and only on a message's first frame (RFC 7692 §6).
        let compressed = head.rsv == RSV1 && self.deflate;
        if head.rsv != 0 && !(compressed && matches!(head.opcode, OP_TEXT | OP_BINARY)) {
            return Err(Violation::protocol(if head.rsv == RSV1 && self.deflate {
                "RSV1 set on a control or continuation frame"
            } else {
                "reserved bits set without an extension"
            }));
        }
        if head.mask.is_some() != self.peer_masks {
            return Err(Violation::protocol(if self.peer_masks {
                "unmasked frame from a client"
            } else {
                "masked frame from a server"
            }));
        }
        let control = match head.opcode {
            OP_PING => Some(Control::Ping),
            OP_PONG => Some(Control::Pong),
            OP_CLOSE => Some(Control::Close),
            _ => None,
        };
        if let Some(op) = control {
            if !head.fin {
                return Err(Violation::protocol("fragmented control frame"));
            }
            if head.len > MAX_CONTROL as u64 {
                return Err(Violation::protocol("control frame over 125 bytes"));
            }
            self.control_len = 0;
            self.current = Some(Current::Control { op, len: head.len as u8, mask: head.mask });
            return Ok(());
        }
        let (kind, first, compressed, so_far) = match (head.opcode, self.message) {
            (OP_CONTINUATION, Some((kind, compressed, so_far))) => (kind, false, compressed, so_far),
            (OP_CONTINUATION, None) => return Err(Violation::protocol("continuation frame without a message")),
            (OP_TEXT | OP_BINARY, Some(_)) => return Err(Violation::protocol("new message inside a fragmented one")),
            (OP_TEXT, None) => (Kind::Text, true, compressed, 0),
            (OP_BINARY, None) => (Kind::Binary, true, compressed, 0),
            _ => return Err(Violation::protocol("reserved opcode")),
        };
        // A compressed message is limited by its size on the wire.
        let size = so_far.saturating_add(head.len);
        if size > self.max_size {
            return Err(Violation::TOO_BIG);
        }
        self.message = (!head.fin).then_some((kind, compressed, size));
        let frame = DataFrame { kind, first, fin: head.fin, len: head.len, mask: head.mask, compressed };
        self.current = Some(Current::Data { frame, done: 0 });
        Ok(())
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    /// The three reserved bits, in place.
    pub rsv: u8,
    pub opcode: u8,
    pub len: u64,
    /// The 7-bit length field as sent: 126 and 127 announce a 16- and a 64-bit length.
    pub len_field: u8,
    pub mask: Option<[u8; 4]>,
}

impl Head {
    /// What is wrong with the length's encoding (RFC 6455 §5.2), if anything: it must use the
    /// shortest form, and a 64-bit length must have its most significant bit clear.
    pub fn length_violation(&self) -> Option<Violation> {
        match self.len_field {
            127 if self.len >> 63 != 0 => Some(Violation::protocol("64-bit frame length with the top bit set")),
            127 if self.len <= 0xffff => Some(Violation::protocol("frame length not in its shortest form")),
            126 if self.len < 126 => Some(Violation::protocol("frame length not in its shortest form")),
            _ => None,
        }
    }

    /// The header at the start of `b` and its length; `None` if `b` holds only part of it.
    pub fn parse(b: &[u8]) -> Option<(Head, usize)> {
        let [first, second, ..] = *b else { return None };
        let len_field = second & 0x7f;
        let (len, mut used) = match len_field {
            126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64, 4),
            127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
            n => (n as u64, 2),
        };
        let mask = if second & 0x80 != 0 {
            let key = b.get(used..used + 4)?.try_into().ok()?;
            used += 4;
            Some(key)
        } else {
            None
        };
        let head = Head { fin: first & 0x80 != 0, rsv: first & 0x70, opcode: first & 0x0f, len, len_field, mask };
        Some((head, used))
    }
}

/// Appends a frame header: FIN set when `fin`, the opcode (with RSV1 if set in it), the payload
/// length and the mask.
pub fn write_head(out: &mut impl BufMut, fin: bool, opcode: u8, len: u64, mask: Option<[u8; 4]>) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.put_u8(if fin { 0x80 } else { 0 } | opcode);
    match len {
        0..=125 => out.put_u8(mask_bit | len as u8),
        126..=0xffff => {
            out.put_u8(mask_bit | 126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(len);
        }
    }
    if let Some(key) = mask {
        out.put_slice(&key);
    }
}

/// Appends a whole frame: header, then the payload, masked when `mask` is given.
pub fn write_frame<B: BufMut + AsMut<[u8]>>(out: &mut B, fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    write_head(out, fin, opcode, payload.len() as u64, mask);
    let start = out.as_mut().len();
    out.put_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out.as_mut()[start..], key);
    }
}

/// A whole control frame built on the stack, for writing without a buffer.
pub struct ControlFrame {
    bytes: [u8; 2 + 4 + MAX_CONTROL],
    len: usize,
}

impl ControlFrame {
    /// `payload` is at most `MAX_CONTROL` bytes; more is not a control frame and is cut.
    pub fn new(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> ControlFrame {
        debug_assert!(payload.len() <= MAX_CONTROL, "a control frame's payload is at most 125 bytes");
        let payload = &payload[..payload.len().min(MAX_CONTROL)];
        let mut bytes = [0; 2 + 4 + MAX_CONTROL];
        let mut rest = &mut bytes[..];
        write_head(&mut rest, true, opcode, payload.len() as u64, mask);
        let head = 2 + 4 + MAX_CONTROL - rest.len();
        let len = head + payload.len();
        bytes[head..len].copy_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut bytes[head..len], key);
        }
        ControlFrame { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// XORs `buf` with the masking key, `buf[0]` taking `key[0]` (RFC 6455 §5.3).
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        // `chunks_exact_mut(8)` yields 8-byte slices, so the conversion cannot fail.
        let value = u64::from_ne_bytes((&*word).try_into().expect("8-byte chunk")) ^ wide;
        word.copy_from_slice(&value.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key starts over.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// The key to apply to payload bytes that start at `offset` in their frame.
pub fn rotate(key: [u8; 4], offset: u64) -> [u8; 4] {
    let mut key = key;
    key.rotate_left((offset % 4) as usize);
    key
}

/// Validates a text message piece by piece: a character may be split across frames.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Check {
    /// The start of a character the last piece ended inside.
    pending: [u8; 3],
    pending_len: u8,
}

impl Utf8Check {
    /// Checks the next piece of the message; `last`: the message ends with it.
    pub fn check(&mut self, mut piece: &[u8], last: bool) -> Result<(), Utf8Error> {
        if self.pending_len > 0 {
            let kept = self.pending_len as usize;
            let width = char_width(self.pending[0]);
            let mut char_bytes = [0u8; 4];
            char_bytes[..kept].copy_from_slice(&self.pending[..kept]);
            let take = (width - kept).min(piece.len());
            char_bytes[kept..kept + take].copy_from_slice(&piece[..take]);
            piece = &piece[take..];
            self.pending_len = 0;
            if kept + take < width {
                return self.keep_incomplete(&char_bytes[..kept + take], last);
            }
            std::str::from_utf8(&char_bytes[..width])?;
        }
        match std::str::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => self.keep_incomplete(&piece[e.valid_up_to()..], last),
            Err(e) => Err(e),
        }
    }

    /// `tail` is a valid start of a character that did not end: fine unless the message did.
    fn keep_incomplete(&mut self, tail: &[u8], last: bool) -> Result<(), Utf8Error> {
        match std::str::from_utf8(tail) {
            Err(e) if e.error_len().is_none() && !last => {
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(e) => Err(e),
            // An incomplete character is never valid on its own; an empty tail is.
            Ok(_) => Ok(()),
        }
    }
}

/// The length of a UTF-8 character from its first byte (the caller has seen it is a valid one).
fn char_width(first: u8) -> usize {
    match first {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xff => 4,
        _ => 1,
    }
}

/// A close frame's payload: `None` for an empty one, else its code and reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(Violation::protocol("close code no endpoint may send"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| Violation::INVALID_UTF8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// A close frame's payload: the code and reason, or nothing for a close without a code.
pub fn close_payload(code: Option<u16>, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    if let Some(code) = code {
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
    }
    payload
}

/// Codes an endpoint may send (RFC 6455 §7.4, and the IANA registry's 1012–1014): not 1004–1006,
/// 1015, other values below 3000, or 5000 and up.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests;
