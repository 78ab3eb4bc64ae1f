//! A leg whose partner never upgraded: the client went away before its 101 was written, or the
//! drain cut it. The leg that did upgrade still gets a close frame and a closing handshake
//! bounded by `CLOSE_BOUND`, never a bare TCP drop, and the ending is recorded (metrics and the
//! closing log line) like that of a relayed connection.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::task::{ready, Poll};

use bytes::BytesMut;

use crate::frame::{self, Control, FrameReader, Step};
use crate::legstream::LegStream;
use crate::shutdown::CLOSE_BOUND;
use crate::vocab::Side;

/// Sends `code` and `reason` on `leg` (the `side` it is), waits for the peer's close, and ends
/// the transport; returns the codes (received, sent) as the relay reports them: 1006 received
/// when no close came back, nothing sent when the close could not be written.
pub async fn close(mut leg: LegStream, side: Side, code: u16, reason: &str) -> (Option<u16>, Option<u16>) {
    let mut out = BytesMut::with_capacity(frame::MAX_HEAD + 2 + reason.len());
    // On the upstream leg wskeep is the client: its frames are masked, with unpredictable keys.
    let mask = (side == Side::Upstream).then(rand::random);
    frame::write_frame(&mut out, true, frame::OP_CLOSE, &frame::close_payload(Some(code), reason), mask);
    let mut written = false;
    let handshake = async {
        written = write_all(&mut leg, &out).await.is_ok();
        let answer = if written { await_close(&mut leg, side).await } else { None };
        let _ = poll_fn(|cx| leg.poll_shutdown(cx)).await;
        answer
    };
    let answer = tokio::time::timeout(CLOSE_BOUND, handshake).await.ok().flatten();
    (Some(answer.unwrap_or(1006)), written.then_some(code))
}

async fn write_all(leg: &mut LegStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| leg.poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    poll_fn(|cx| leg.poll_flush(cx)).await
}

/// Reads until the peer's close frame; its code (1005 without one), or `None` if the leg ended.
async fn await_close(leg: &mut LegStream, side: Side) -> Option<u16> {
    // A client masks its frames. The frames before the close are only skipped (never held), so
    // the size limit is just below what the frame layer refuses as a protocol error.
    let mut reader = FrameReader::new(side == Side::Client, 1 << 62);
    let mut scratch = vec![MaybeUninit::<u8>::uninit(); 4096];
    poll_fn(|cx| loop {
        let found = ready!(leg.poll_read_with(cx, &mut scratch, |mut bytes| {
            if bytes.is_empty() {
                return Some(None);
            }
            loop {
                match reader.next(&mut bytes) {
                    Ok(Some(Step::Control(Control::Close))) => {
                        let close = frame::parse_close(reader.control_payload());
                        return Some(close.ok().map(|c| c.map_or(1005, |(code, _)| code)));
                    }
                    Ok(Some(_)) | Err(_) => {}
                    Ok(None) => return None,
                }
            }
        }));
        match found {
            Ok(Some(code)) => return Poll::Ready(code),
            Ok(None) => {}
            Err(_) => return Poll::Ready(None),
        }
    })
    .await
}
