//! The relay's read, transcode and outbox path on arbitrary scripts (`wskeep::relay::harness`):
//! bytes from either peer in arbitrary pieces, timer pings and pongs, partial writes. What
//! wskeep writes to each peer must parse as well-formed frames, masked only towards the
//! upstream, with nothing of wskeep's own inside a frame or a JSON pong inside a fragmented
//! message, and carry the messages the other peer sent, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| wskeep::relay::harness::run(input));
