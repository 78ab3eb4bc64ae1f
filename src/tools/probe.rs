//! `wskeep probe`: how long does a connection to this endpoint live, and how does it end?
//!
//! The probe can act like the problem client of DESIGN.md: JSON pings only (`json_ping`) and no
//! answer to protocol pings (`auto_pong = false`). It reports the lifetime, the close code and
//! reason (1006 when no close frame came) and what was exchanged.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

use crate::tools::client::{self, ClientError, ClientOptions, Incoming, OP_PONG, OP_TEXT};

pub mod resume;

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub url: String,
    pub client: ClientOptions,
    /// Send `{"type":"ping","id":N}` this often.
    pub json_ping: Option<Duration>,
    /// Answer protocol pings (what browsers do); off, the probe ignores them.
    pub auto_pong: bool,
    /// End the probe (with close 1000) after this long; `None` waits for the peer.
    pub duration: Option<Duration>,
    /// Print a progress line every second (on stderr).
    pub progress: bool,
}

/// What the probe saw.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    pub lifetime: Duration,
    /// The peer's close code and reason; `None` when the connection ended without a close frame.
    pub close: Option<(Option<u16>, String)>,
    /// The probe itself ended the connection after `duration`.
    pub completed: bool,
    pub messages: u64,
    pub pings_received: u64,
    pub pongs_sent: u64,
    pub pongs_received: u64,
    pub json_pings_sent: u64,
    pub json_pongs_received: u64,
    /// Round-trip time of the last answered JSON ping.
    pub last_rtt: Option<Duration>,
    pub error: Option<String>,
}

impl ProbeReport {
    /// The close code as a user sees it: 1006 when there was no close frame.
    pub fn close_code(&self) -> u16 {
        match &self.close {
            Some((code, _)) => code.unwrap_or(1005),
            None => 1006,
        }
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "lifetime        {:.1}s{}",
            self.lifetime.as_secs_f64(),
            if self.completed { " (probe finished)" } else { "" }
        )?;
        match &self.close {
            Some((code, reason)) => {
                writeln!(f, "close           {} {reason:?}", code.map_or("1005 (no code)".into(), |c| c.to_string()))?
            }
            None => writeln!(f, "close           1006 (no close frame)")?,
        }
        writeln!(f, "messages        {}", self.messages)?;
        writeln!(f, "protocol pings  {} received, {} answered", self.pings_received, self.pongs_sent)?;
        writeln!(f, "JSON pings      {} sent, {} answered", self.json_pings_sent, self.json_pongs_received)?;
        if let Some(rtt) = self.last_rtt {
            writeln!(f, "last JSON RTT   {:.2}ms", rtt.as_secs_f64() * 1000.0)?;
        }
        if let Some(e) = &self.error {
            writeln!(f, "error           {e}")?;
        }
        Ok(())
    }
}

pub async fn run(options: &ProbeOptions) -> Result<ProbeReport, ClientError> {
    let mut conn = client::connect(&options.url, &options.client).await?;
    let start = Instant::now();
    let mut report = ProbeReport::default();
    let far = Duration::from_secs(100 * 365 * 86_400);
    let json_period = options.json_ping.unwrap_or(far);
    let mut json_tick = tokio::time::interval_at(start + json_period, json_period);
    let mut progress = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let end = tokio::time::sleep_until(start + options.duration.unwrap_or(far));
    tokio::pin!(end);
    let mut outstanding: Option<(u64, Instant)> = None;
    let terminal = std::io::stderr().is_terminal();

    loop {
        tokio::select! {
            incoming = conn.reader.read_message() => match incoming {
                Ok(Some(Incoming::Ping(payload))) => {
                    report.pings_received += 1;
                    if options.auto_pong {
                        report.pongs_sent += 1;
                        if conn.writer.send(OP_PONG, &payload).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Some(Incoming::Pong(_))) => report.pongs_received += 1,
                Ok(Some(Incoming::Text(text))) => match json_pong_id(&text) {
                    Some(id) => {
                        report.json_pongs_received += 1;
                        if let Some((sent_id, at)) = outstanding {
                            if id == Some(sent_id) {
                                report.last_rtt = Some(at.elapsed());
                            }
                        }
                    }
                    None => report.messages += 1,
                },
                Ok(Some(Incoming::Binary(_))) => report.messages += 1,
                Ok(Some(Incoming::Close(code, reason))) => {
                    report.close = Some((code, reason.clone()));
                    conn.writer.queue_close(code, &reason);
                    let _ = conn.writer.flush().await;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    report.error = Some(e.to_string());
                    break;
                }
            },
            _ = json_tick.tick(), if options.json_ping.is_some() => {
                report.json_pings_sent += 1;
                let id = report.json_pings_sent;
                outstanding = Some((id, Instant::now()));
                let ping = format!(r#"{{"type":"ping","id":{id}}}"#);
                if conn.writer.send(OP_TEXT, ping.as_bytes()).await.is_err() {
                    break;
                }
            }
            _ = progress.tick(), if options.progress => {
                let line = format!(
                    "elapsed {:>6.1}s  messages {}  pings {}  pongs sent {}  JSON pings {}/{}  last RTT {}",
                    start.elapsed().as_secs_f64(), report.messages, report.pings_received, report.pongs_sent,
                    report.json_pongs_received, report.json_pings_sent,
                    report.last_rtt.map_or("-".into(), |d| format!("{:.2}ms", d.as_secs_f64() * 1000.0)),
                );
                let mut err = std::io::stderr();
                let _ = if terminal { write!(err, "\r{line}") } else { writeln!(err, "{line}") };
            }
            _ = &mut end => {
                report.completed = true;
                conn.writer.queue_close(Some(1000), "probe finished");
                if conn.writer.flush().await.is_ok() {
                    // Wait (bounded) for the peer's answer to complete the closing handshake.
                    let answer = tokio::time::timeout(Duration::from_secs(2), async {
                        loop {
                            match conn.reader.read_message().await {
                                Ok(Some(Incoming::Close(code, reason))) => return Some((code, reason)),
                                Ok(Some(_)) => continue,
                                _ => return None,
                            }
                        }
                    });
                    report.close = answer.await.ok().flatten();
                }
                break;
            }
        }
    }
    if options.progress && terminal {
        eprintln!();
    }
    report.lifetime = start.elapsed();
    Ok(report)
}

/// `Some(id)` when `text` is a JSON pong (`id` when it carries a numeric one).
fn json_pong_id(text: &[u8]) -> Option<Option<u64>> {
    if !text.starts_with(b"{") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(text).ok()?;
    (value.get("type")? == "pong").then(|| value.get("id").and_then(|v| v.as_u64()))
}
