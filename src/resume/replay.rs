//! The messages written to a resumable session's client, kept (their frames as written) until
//! the client acknowledges them, so that a resume can write again what the client missed.

use std::collections::VecDeque;

/// Above this, an empty buffer gives its memory back: an idle session keeps none.
const KEEP_CAPACITY: usize = 4 * 1024;

#[derive(Default)]
pub struct Replay {
    /// The frames of the kept messages, oldest first, then those of the message still arriving.
    bytes: VecDeque<u8>,
    /// The byte length of each complete kept message, oldest first.
    lengths: VecDeque<usize>,
    /// Data messages written to the client on this session: the number of the newest.
    sent: u64,
    /// Bytes at the end of `bytes` that belong to the message still arriving.
    open: usize,
}

/// An acknowledgement outside what was kept: below an earlier one, or above what was sent.
#[derive(Debug, PartialEq, Eq)]
pub struct BadCount;

impl Replay {
    /// A frame went to the client; `fin` ends its message, which then has its number.
    pub fn push_frame(&mut self, frame: &[u8], fin: bool) {
        self.bytes.extend(frame);
        self.open += frame.len();
        if fin {
            self.lengths.push_back(self.open);
            self.open = 0;
            self.sent += 1;
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The messages the client acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.sent - self.lengths.len() as u64
    }

    /// Bytes kept.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes kept of complete messages (those an acknowledgement can free).
    pub fn complete_len(&self) -> usize {
        self.bytes.len() - self.open
    }

    /// The client has received `received` messages: those are freed.
    pub fn ack(&mut self, received: u64) -> Result<(), BadCount> {
        if received < self.acked() || received > self.sent {
            return Err(BadCount);
        }
        let freed: usize = self.lengths.drain(..(received - self.acked()) as usize).sum();
        self.bytes.drain(..freed);
        if self.bytes.is_empty() && self.bytes.capacity() > KEEP_CAPACITY {
            self.bytes = VecDeque::new();
        }
        Ok(())
    }

    /// After `ack`: every kept byte, complete messages then the frames of the one arriving, and
    /// how many complete messages that is.
    pub fn copy_kept(&self, out: &mut Vec<u8>) -> u64 {
        let (a, b) = self.bytes.as_slices();
        out.reserve(a.len() + b.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        self.lengths.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_until_acknowledged_and_copies_what_is_left() {
        let mut r = Replay::default();
        r.push_frame(b"one", true);
        r.push_frame(b"tw", false);
        r.push_frame(b"o", true);
        r.push_frame(b"thr", false);
        assert_eq!((r.sent(), r.acked(), r.len(), r.complete_len()), (2, 0, 9, 6));
        assert_eq!(r.ack(3), Err(BadCount), "above what was sent");
        r.ack(1).unwrap();
        assert_eq!(r.ack(0), Err(BadCount), "below an earlier acknowledgement");
        let mut out = Vec::new();
        assert_eq!(r.copy_kept(&mut out), 1);
        assert_eq!(out, b"twothr");
        r.push_frame(b"ee", true);
        r.ack(3).unwrap();
        assert!(r.is_empty());
        assert_eq!((r.sent(), r.acked()), (3, 3));
    }

    #[test]
    fn an_emptied_large_buffer_is_released() {
        let mut r = Replay::default();
        r.push_frame(&[7; 64 * 1024], true);
        r.ack(1).unwrap();
        assert_eq!(r.bytes.capacity(), 0);
    }
}
