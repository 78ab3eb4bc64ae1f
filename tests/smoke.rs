mod common;

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn echo_through_tls() {
    let cert = common::test_cert();
    let upstream = common::TestUpstream::start().await;
    let sidecar = common::start_sidecar(common::test_config(upstream.addr, Some(&cert), "")).await;
    let mut ws = common::wss(sidecar.addr, &cert, "/chat?token=s3cret", &[]).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(common::next_message(&mut ws, Duration::from_secs(5)).await, Some(Message::text("hello")));
    assert_eq!(upstream.last_request().uri, "/chat?token=s3cret");
}
