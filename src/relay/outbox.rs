//! One leg's outgoing bytes: the frames forwarded from the other leg and wskeep's own (pongs,
//! timer pings, JSON pongs, the close), written in an order the peer can parse.
//!
//! A forwarded data frame is copied in as it arrives but written only once it is whole and
//! checked, so nothing wskeep writes ever lands inside it; wskeep's own frames wait for it
//! ("held"), and a JSON pong also waits for the end of a fragmented message.

use std::io;
use std::task::{ready, Context, Poll};

use crate::frame::{self, ControlFrame};
use crate::legstream::LegStream;

/// A leg is read only while neither leg has this much waiting to be written: a peer that
/// cannot keep up slows down the one that sends.
pub const HIGH_WATER: usize = 64 * 1024;
/// A write buffer larger than this is released whenever it has been written out: a connection
/// that carried a large message does not keep that memory while idle, and a busy one pays an
/// allocation per batch of large messages (small batches reuse their buffer).
const KEEP_CAPACITY: usize = 4 * 1024;
/// A peer is not read while this much of wskeep's answers to it (pongs, JSON pongs) waits to be
/// written: a peer that sends pings and reads nothing stops being read, while one that only
/// reads slowly still gets its messages forwarded.
pub const OWN_BUDGET: usize = 16 * 1024;

/// One leg's outgoing bytes: complete frames (`..committed`, of which `..written` are written),
/// then the start of a data frame still arriving from the other leg, which is never written
/// before it is whole and checked.
pub struct Outbox {
    pub(super) buf: Vec<u8>,
    pub(super) committed: usize,
    written: usize,
    /// Bytes went to the transport since its last flush.
    unflushed: bool,
    /// Frames to this peer are masked: it is a server.
    masked: bool,
    /// The last frame forwarded did not end its message: a data frame of wskeep's own (a JSON
    /// pong) must wait for the message's end (RFC 6455 §5.4).
    open_message: bool,
    /// wskeep's own control frames waiting for the frame still arriving: at most one ping (a
    /// timer's) and one pong (for the latest ping only, as RFC 6455 §5.5.3 allows). Empty, and
    /// unallocated, nearly always.
    held_ping: Vec<u8>,
    pub(super) held_pong: Vec<u8>,
    /// JSON pongs waiting for the open message to end, up to `OWN_BUDGET` (more are dropped).
    held_data: Vec<u8>,
    /// wskeep's own bytes among the complete frames not yet written: past `OWN_BUDGET`, the
    /// peer they answer is not read.
    own_unwritten: usize,
}

impl Outbox {
    pub fn new(masked: bool) -> Outbox {
        Outbox {
            buf: Vec::new(),
            committed: 0,
            written: 0,
            unflushed: false,
            masked,
            open_message: false,
            held_ping: Vec::new(),
            held_pong: Vec::new(),
            held_data: Vec::new(),
            own_unwritten: 0,
        }
    }

    /// Frames waiting to be written are under the high-water mark.
    pub fn has_room(&self) -> bool {
        self.committed - self.written < HIGH_WATER
    }

    /// wskeep's answers to this peer wait to be written past their budget: the peer they answer
    /// is not read until they are.
    pub fn own_over_budget(&self) -> bool {
        self.own_unwritten >= OWN_BUDGET
    }

    /// Complete frames not yet taken by the transport.
    pub fn unwritten(&self) -> usize {
        self.committed - self.written
    }

    pub fn mask(&self) -> Option<[u8; 4]> {
        // RFC 6455 §5.3: a fresh, unpredictable key per frame.
        self.masked.then(rand::random)
    }

    /// The last frame forwarded did not end its message.
    pub fn message_open(&self) -> bool {
        self.open_message
    }

    /// A data frame of wskeep's own pushed now would be written next, not held behind a frame
    /// or message still arriving.
    pub fn data_goes_now(&self) -> bool {
        self.committed == self.buf.len() && !self.open_message
    }

    /// The peer is a new connection (a resumed session's client): what was queued for the old
    /// one goes, `preface` is written first, and a frame still arriving from the other leg (with
    /// the data frames of wskeep's own held behind it) carries on after it.
    pub fn restart(&mut self, preface: Vec<u8>) {
        let arriving = self.buf.split_off(self.committed);
        self.buf = preface;
        self.committed = 0;
        self.written = 0;
        self.unflushed = false;
        self.held_ping = Vec::new();
        self.held_pong = Vec::new();
        self.own_unwritten = 0;
        self.commit_own(0);
        self.buf.extend_from_slice(&arriving);
    }

    /// Queues a whole frame of wskeep's own: at once if it may go next, else held until it may.
    /// `false`: dropped (a ping while one is held already, a JSON pong past the budget).
    pub fn push_frame(&mut self, opcode: u8, payload: &[u8]) -> bool {
        let mask = self.mask();
        let control = opcode & 0x8 != 0;
        let at_boundary = self.committed == self.buf.len();
        let out = match opcode {
            _ if at_boundary && (control || !self.open_message) => &mut self.buf,
            frame::OP_PONG => {
                self.held_pong.clear();
                &mut self.held_pong
            }
            frame::OP_PING if !self.held_ping.is_empty() => return false,
            // A ping; a close is only ever pushed at a boundary (after `drop_partial`).
            _ if control => &mut self.held_ping,
            _ if self.held_data.len() >= OWN_BUDGET => return false,
            _ => &mut self.held_data,
        };
        frame::write_frame(out, true, opcode, payload, mask);
        if at_boundary {
            self.commit_own(self.committed);
        }
        true
    }

    /// Everything in the buffer may be written; what is past `start` is wskeep's own.
    fn commit_own(&mut self, start: usize) {
        self.own_unwritten += self.buf.len() - start;
        self.committed = self.buf.len();
    }

    /// Sends a control frame of wskeep's own. With nothing waiting before it, it is written
    /// straight from the stack, so an idle connection's pings never need a buffer; otherwise,
    /// or for what the transport did not take, it is queued as `push_frame` does.
    pub fn send_control(&mut self, io: &mut LegStream, cx: &mut Context<'_>, opcode: u8, payload: &[u8]) -> bool {
        if !self.buf.is_empty() {
            return self.push_frame(opcode, payload);
        }
        let frame = ControlFrame::new(opcode, payload, self.mask());
        let frame = frame.as_bytes();
        // An error is not handled here: the queued frame meets it again in `poll_write`.
        let n = match io.poll_write(cx, frame) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(_)) | Poll::Pending => 0,
        };
        self.unflushed |= n > 0;
        if n < frame.len() {
            self.buf.extend_from_slice(&frame[n..]);
            self.commit_own(0);
        }
        true
    }

    /// The frame that was arriving is whole and checked: it may be written, and so may the
    /// frames held behind it.
    pub fn commit_forwarded(&mut self, fin: bool) {
        self.open_message = !fin;
        self.release_held();
    }

    /// Drops the frame still arriving (it will never be written), releasing what waited for it.
    pub fn drop_partial(&mut self) {
        self.buf.truncate(self.committed);
        self.release_held();
    }

    fn release_held(&mut self) {
        let before = self.buf.len();
        // `take`, not `append`: a held buffer's allocation goes too.
        for held in [&mut self.held_ping, &mut self.held_pong] {
            if !held.is_empty() {
                self.buf.extend_from_slice(&std::mem::take(held));
            }
        }
        if !self.open_message && !self.held_data.is_empty() {
            self.buf.extend_from_slice(&std::mem::take(&mut self.held_data));
        }
        self.commit_own(before);
    }

    /// Writes the complete frames and flushes the transport.
    pub fn poll_write(&mut self, io: &mut LegStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.committed {
            let n = ready!(io.poll_write(cx, &self.buf[self.written..self.committed]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.unflushed = true;
        }
        // Every complete frame is written, wskeep's own among them.
        self.own_unwritten = 0;
        if self.written > 0 {
            if self.committed == self.buf.len() {
                if self.buf.capacity() > KEEP_CAPACITY {
                    self.buf = Vec::new();
                } else {
                    self.buf.clear();
                }
            } else {
                self.buf.drain(..self.written);
            }
            self.committed -= self.written;
            self.written = 0;
        }
        if self.unflushed {
            ready!(io.poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
