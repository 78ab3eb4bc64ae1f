//! permessage-deflate passed through the real binary to a real compressing upstream (Python
//! `websockets` with its default compression, tests/networks/install.sh): negotiated end to end,
//! compressed frames relayed unchanged, JSON pings still answered, and off when configured off.

mod common;

use std::process::Command;
use std::time::Duration;

use common::binary::Wskeep;
use common::python::{peers_script, python, PythonUpstream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wskeep::frame::{self, FrameReader, Step, OP_TEXT, RSV1};

const LIMIT: Duration = Duration::from_secs(20);

async fn sidecar(upstream: &PythonUpstream, compression: bool) -> Wskeep {
    sidecar_with(upstream, &format!("[compression]\nenabled = {compression}\n")).await
}

async fn sidecar_with(upstream: &PythonUpstream, extra: &str) -> Wskeep {
    let (up, extra) = (upstream.port, extra.to_string());
    Wskeep::start_with(move |port, admin| {
        format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"ws://127.0.0.1:{up}\"\n\
             [admin]\naddr = \"127.0.0.1:{admin}\"\n[log]\nformat = \"text\"\n{extra}"
        )
    })
    .await
}

/// Runs the Python client through wskeep; its report.
async fn python_client(wskeep: &Wskeep) -> Value {
    python_peer(wskeep, "client").await
}

/// Runs `peers.py MODE` against wskeep; the JSON line it prints.
async fn python_peer(wskeep: &Wskeep, mode: &'static str) -> Value {
    let url = format!("ws://{}/voice", wskeep.addr);
    let run =
        tokio::task::spawn_blocking(move || Command::new(python()).arg(peers_script()).arg(mode).arg(url).output());
    let out = tokio::time::timeout(LIMIT, run).await.expect("the client finishes in time").unwrap().unwrap();
    assert!(out.status.success(), "{mode} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), wskeep.log());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn compression_is_negotiated_end_to_end_and_json_pings_are_still_answered() {
    let upstream = PythonUpstream::start().await;
    let wskeep = sidecar(&upstream, true).await;
    let report = python_client(&wskeep).await;

    let client_agreed = report["client_agreed"].as_str().unwrap_or_else(|| panic!("no extension agreed: {report}"));
    assert!(client_agreed.starts_with("permessage-deflate"), "{report}");
    assert!(client_agreed.contains("client_no_context_takeover"), "{report}");
    assert!(report["upstream"]["offer"].as_str().is_some_and(|o| o.contains("permessage-deflate")), "{report}");
    assert!(report["upstream"]["agreed"].as_str().is_some_and(|a| a.starts_with("permessage-deflate")), "{report}");
    assert_eq!(report["pong"], serde_json::json!({"type": "pong", "id": 7}), "{report}");
    assert_eq!(report["echo_ok"], true, "{report}");
    assert_eq!(report["streamed"], 100, "{report}");

    let metrics = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&metrics, "wskeep_compressed_connections_total"), 1.0);
    assert_eq!(common::metric(&metrics, "wskeep_json_pings_answered_total"), 1.0);
    // The payload bytes wskeep read from the upstream, and wrote to the client, are the compressed
    // ones: a fraction of the 100 KiB streamed.
    let streamed = report["streamed_bytes"].as_f64().unwrap();
    let wire = common::metric(&metrics, "wskeep_message_bytes_total{direction=\"upstream_to_client\"}");
    assert!(streamed >= 100.0 * 1024.0 && wire < streamed / 5.0, "{wire} bytes on the wire for {streamed}");
    // The ended connection, as the status page lists it.
    let (_, listing) = common::http_get(wskeep.admin, "/connections?ended=1").await.unwrap();
    assert!(listing.contains("\"compression\":\"permessage-deflate\""), "{listing}");
}

#[tokio::test]
async fn with_compression_off_the_offer_is_stripped() {
    let upstream = PythonUpstream::start().await;
    let wskeep = sidecar(&upstream, false).await;
    let report = python_client(&wskeep).await;
    assert_eq!(report["client_agreed"], Value::Null, "{report}");
    assert_eq!(report["upstream"]["offer"], Value::Null, "{report}");
    assert_eq!(report["pong"], serde_json::json!({"type": "pong", "id": 7}), "{report}");
    let metrics = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&metrics, "wskeep_compressed_connections_total"), 0.0);
    let wire = common::metric(&metrics, "wskeep_message_bytes_total{direction=\"upstream_to_client\"}");
    assert!(wire >= 100.0 * 1024.0, "{wire}");
}

#[tokio::test]
async fn compressed_frames_cross_unchanged_and_wskeeps_own_frames_are_not_compressed() {
    let upstream = PythonUpstream::start().await;
    let wskeep = sidecar(&upstream, true).await;
    let mut tcp = TcpStream::connect(wskeep.addr).await.unwrap();
    let request = format!(
        "GET /voice HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate, x-webkit-deflate-frame\r\n\r\n",
        wskeep.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-extensions: permessage-deflate"), "{head}");
    assert!(head.contains("client_no_context_takeover"), "{head}");

    // A compressed JSON ping, then a compressed message for the upstream to echo.
    let mut frames = Vec::new();
    frame::write_frame(
        &mut frames,
        true,
        OP_TEXT | RSV1,
        &wskeep::inflate::stored(br#"{"type":"ping","id":1}"#),
        Some([1, 2, 3, 4]),
    );
    frame::write_frame(&mut frames, true, OP_TEXT | RSV1, &wskeep::inflate::stored(b"echo me"), Some([5, 6, 7, 8]));
    tcp.write_all(&frames).await.unwrap();

    // wskeep's pong is plain text; the upstream's echo comes back compressed (RSV1 set).
    let mut reader = FrameReader::new(false, 1 << 20).with_deflate(true);
    let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut buf = vec![0u8; 4096];
    while got.len() < 2 {
        let n = tokio::time::timeout(LIMIT, tcp.read(&mut buf)).await.expect("frames in time").unwrap();
        assert!(n > 0, "wskeep closed: {got:?}\n{}", wskeep.log());
        let mut bytes = &buf[..n];
        while let Some(step) = reader.next(&mut bytes).unwrap() {
            if let Step::Data { frame, bytes, offset } = step {
                if offset == 0 {
                    got.push((frame.opcode(), Vec::new()));
                }
                got.last_mut().unwrap().1.extend_from_slice(bytes);
            }
        }
    }
    assert_eq!(got[0], (OP_TEXT, br#"{"type":"pong","id":1}"#.to_vec()));
    assert_eq!(got[1].0, OP_TEXT | RSV1, "the upstream's compressed echo keeps its RSV1");
    let echoed = wskeep::inflate::small_text(&got[1].1, |t| Some(t.to_owned()));
    assert_eq!(echoed.as_deref(), Some("echo me"));
}

/// A resumable session with compression (docs/resume.md): the upstream is asked to compress each
/// message on its own, so the messages wskeep replays after the client's connection died decode
/// on the new connection; the client's compressed acks are read as control messages, not
/// relayed; and the upstream sees one connection.
#[tokio::test]
async fn a_resumed_compressed_session_replays_messages_that_decode_on_the_new_connection() {
    let upstream = PythonUpstream::start().await;
    let wskeep = sidecar_with(&upstream, "[resume]\nenabled = true\ngrace = \"5s\"\n").await;
    let report = python_peer(&wskeep, "resume-client").await;
    let numbers: Vec<u64> = serde_json::from_value(report["numbers"].clone()).unwrap();
    assert_eq!(numbers, (1..=50).collect::<Vec<_>>(), "every message exactly once, in order: {report}");
    let agreed = report["upstream"]["agreed"].as_str().unwrap_or_default();
    assert!(agreed.contains("server_no_context_takeover"), "{report}");
    assert!(report["extensions"].as_str().is_some_and(|e| e.starts_with("permessage-deflate")), "{report}");
    assert_eq!(report["upstream"]["connections"], 1, "{report}");
    assert_eq!(report["upstream"]["control_seen"], 0, "a compressed ack reached the upstream: {report}");
    let metrics = common::scrape(wskeep.admin).await;
    assert_eq!(common::metric(&metrics, "wskeep_resume_sessions_resumed_total"), 1.0, "{metrics}");
}
