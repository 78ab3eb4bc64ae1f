//! `wskeep demo`: the problem of DESIGN.md and its fix, side by side, in about ten seconds.
//!
//! A legacy upstream (read deadline 2 s, reset only by a pong) and a wskeep in front of it run
//! in-process. The same client, which sends JSON pings every 1.6 s and never answers protocol
//! pings, connects twice at once: directly, and through wskeep.

use std::time::Duration;

use crate::config::Config;
use crate::tools::client::ClientOptions;
use crate::tools::legacy_upstream::{self, LegacyOptions};
use crate::tools::probe::{self, ProbeOptions, ProbeReport};

const DEADLINE: Duration = Duration::from_secs(2);
const RUN_FOR: Duration = Duration::from_secs(10);

pub async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let (upstream, stats) =
        legacy_upstream::start(([127, 0, 0, 1], 0).into(), LegacyOptions::with_deadline(DEADLINE)).await?;
    let config = Config::from_toml(&format!(
        r#"
        [listen]
        addr = "127.0.0.1:0"
        [admin]
        addr = "127.0.0.1:0"
        [upstream]
        url = "ws://{upstream}"
        [client_keepalive]
        ping_interval = "1s"
        timeout = "5s"
        [log]
        level = "warn"
        "#
    ))?;
    let server = crate::Server::bind(config).await?;
    let sidecar = server.local_addr();
    let metrics = server.metrics();
    let drain = server.drain();
    let serving = tokio::spawn(server.run());

    println!("A legacy upstream at {upstream}: read deadline {DEADLINE:?}, reset only by a protocol pong;");
    println!("pings every {:?}; answers {{\"type\":\"ping\"}} with {{\"type\":\"pong\"}}.", DEADLINE / 2);
    println!("wskeep at {sidecar} in front of it. The client sends a JSON ping every {:?} and never", DEADLINE * 4 / 5);
    println!("answers protocol pings (like a browser app behind a proxy that drops them). Running {RUN_FOR:?}...\n");

    let probe = |url: String| ProbeOptions {
        url,
        client: ClientOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() },
        json_ping: Some(DEADLINE * 4 / 5),
        auto_pong: false,
        duration: Some(RUN_FOR),
        progress: false,
    };
    let direct = probe(format!("ws://{upstream}/"));
    let through = probe(format!("ws://{sidecar}/"));
    let (direct, through) = tokio::join!(probe::run(&direct), probe::run(&through));
    let (direct, through) = (direct?, through?);
    print_side_by_side(&direct, &through);

    println!(
        "\nThe upstream's read deadline fired {} time(s); it received {} pong(s), all from wskeep.",
        stats.deadlines_fired.load(std::sync::atomic::Ordering::Relaxed),
        stats.pongs_received.load(std::sync::atomic::Ordering::Relaxed)
    );
    drain.shutdown();
    drain.close_now();
    let _ = serving.await;

    println!("\nwskeep's metrics tell the story (from /metrics):");
    let text = String::from_utf8_lossy(&metrics.encode()).into_owned();
    for line in text.lines() {
        let interesting = [
            "wskeep_connections_total ",
            "wskeep_pings_answered_total{side=\"upstream\"}",
            "wskeep_pings_sent_total{side=\"client\"}",
            "wskeep_json_pings_answered_total ",
            "wskeep_close_codes_total{",
            "wskeep_connection_duration_seconds_count{end=\"client_close\"}",
        ];
        if interesting.iter().any(|p| line.starts_with(p)) {
            println!("  {line}");
        }
    }
    Ok(())
}

fn print_side_by_side(direct: &ProbeReport, through: &ProbeReport) {
    let close = |r: &ProbeReport| match (&r.close, r.completed) {
        (_, true) => "1000 (client closed at the end)".to_string(),
        (Some((code, reason)), _) => format!("{} {reason}", code.map_or("1005".into(), |c| c.to_string())),
        (None, _) => "1006 (no close frame)".to_string(),
    };
    let rows = [
        (
            "lifetime",
            format!("{:.1}s", direct.lifetime.as_secs_f64()),
            format!("{:.1}s", through.lifetime.as_secs_f64()),
        ),
        ("close code", close(direct), close(through)),
        (
            "JSON pongs received",
            format!("{}/{}", direct.json_pongs_received, direct.json_pings_sent),
            format!("{}/{}", through.json_pongs_received, through.json_pings_sent),
        ),
        ("protocol pings seen", direct.pings_received.to_string(), through.pings_received.to_string()),
        ("protocol pongs sent", direct.pongs_sent.to_string(), through.pongs_sent.to_string()),
    ];
    println!("{:<22}{:<34}through wskeep", "", "direct");
    for (name, a, b) in rows {
        println!("{name:<22}{a:<34}{b}");
    }
}
