//! The drive loop on in-memory legs, with the clock under the test's control.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, DuplexStream};

use super::*;
use crate::connections::Connections;
use crate::frame::OP_TEXT;

const OFF: LegTimers =
    LegTimers { ping_interval: Duration::ZERO, pong_interval: Duration::ZERO, timeout: Duration::ZERO };

fn settings(client: LegTimers) -> RelaySettings {
    RelaySettings {
        timers: [client, OFF],
        json_ping: None,
        max_message_size: 1 << 20,
        timer_slots: TimerSlots::default(),
    }
}

/// A masked text frame, as a client sends it.
fn client_text(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_frame(&mut out, true, OP_TEXT, payload, Some([1, 2, 3, 4]));
    out
}

/// Polls the relay once, as its task would be on a wake-up.
async fn poll_once(relay: &mut Relay<'_>) -> Poll<Ending> {
    poll_fn(|cx| Poll::Ready(relay.poll_ending(cx))).await
}

#[tokio::test(start_paused = true)]
async fn a_frame_that_arrived_is_read_before_the_idle_deadline_is_judged() {
    let timeout = Duration::from_millis(100);
    let settings = settings(LegTimers { timeout, ..OFF });
    let (metrics, connections) = (Metrics::new(), Arc::new(Connections::default()));
    let guard = connections.open(([127, 0, 0, 1], 1).into(), "/".into());
    let (client_near, mut client_far): (DuplexStream, DuplexStream) = tokio::io::duplex(4096);
    let (upstream_near, _upstream_far) = tokio::io::duplex(4096);
    let closing = CancellationToken::new();
    let signal = std::pin::pin!(closing.clone().cancelled_owned());
    let [client_timers, upstream_timers] = settings.timers;
    let mut relay = Relay {
        legs: [
            Leg::new(Side::Client, LegStream::new(client_near), settings.max_message_size, false),
            Leg::new(Side::Upstream, LegStream::new(upstream_near), settings.max_message_size, false),
        ],
        keepalive: Keepalive::new(client_timers, upstream_timers, Duration::ZERO, settings.timer_slots.clone()),
        env: ConnEnv { settings: &settings, metrics: &metrics, conn: &guard.info },
        shutdown: ShutdownWatch { token: &closing, signal, registered: None },
        client_first: true,
    };
    assert!(poll_once(&mut relay).await.is_pending(), "nothing has happened yet");
    // The wake-up comes late: the deadline has passed and the client's frame is waiting. The
    // frame is a sign of life.
    tokio::time::sleep(timeout + Duration::from_millis(20)).await;
    client_far.write_all(&client_text(b"late but alive")).await.unwrap();
    assert!(poll_once(&mut relay).await.is_pending(), "a frame that arrived counts before the timer is judged");
    // Silence from then on is judged as before.
    tokio::time::sleep(timeout + Duration::from_millis(20)).await;
    assert!(matches!(poll_once(&mut relay).await, Poll::Ready(Ending::TimedOut(Side::Client))));
}
