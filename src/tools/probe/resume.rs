//! `wskeep probe --resume`: the resume protocol of docs/resume.md from the command line.
//!
//! The probe opens a resumable session and sends numbered messages (`probe:N`) at a steady
//! pace, for an echo upstream to send back. It keeps each until wskeep's ack covers it and acks
//! what it receives, as the shim does. Its connection ends without a close frame when it drops
//! it on purpose (`drop_after`), when the peer goes silent for `dead_after`, or when the network
//! cuts it; it then reconnects with its token and resends what wskeep did not get. At the end it
//! reports the resumes, the longest gap, and whether every echo came back once and in order.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::resume::control;
use crate::tools::client::{self, ClientError, Connection, Incoming, OP_PONG, OP_TEXT};

#[derive(Debug, Clone)]
pub struct ResumeOptions {
    /// Send `probe:N` this often.
    pub send_every: Duration,
    /// Drop the TCP connection (no close frame) this long after each (re)connect.
    pub drop_after: Option<Duration>,
    /// Nothing received for this long: the connection is dead (drop it and resume).
    pub dead_after: Option<Duration>,
    /// Give up reconnecting after this long without a connection.
    pub give_up_after: Duration,
}

/// What the resume probe saw.
#[derive(Debug, Clone, Default)]
pub struct ResumeReport {
    pub resumes: u64,
    /// The longest time from losing a connection to the session message of the next one.
    pub longest_gap: Duration,
    pub sent: u64,
    /// Sends repeated after a resume (wskeep had not received them).
    pub resent: u64,
    /// Data messages received on the session (control messages excluded).
    pub received: u64,
    /// `probe:N` echoes that came back in order, and those missing or repeated.
    pub echoes: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// How the session ended: a close code and reason from wskeep, or why the probe stopped.
    pub ended: Option<String>,
    /// The probe ran its full duration and closed the session itself.
    pub completed: bool,
}

impl ResumeReport {
    /// Nothing lost, nothing twice, and the session lasted.
    pub fn lossless(&self) -> bool {
        self.completed && self.lost == 0 && self.duplicated == 0
    }
}

impl fmt::Display for ResumeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "session         {}", self.ended.as_deref().unwrap_or("open"))?;
        writeln!(f, "resumes         {} (longest gap {:.0}ms)", self.resumes, self.longest_gap.as_secs_f64() * 1e3)?;
        writeln!(f, "sent            {} ({} resent after a resume)", self.sent, self.resent)?;
        writeln!(f, "received        {}", self.received)?;
        writeln!(f, "echoes          {} in order, {} lost, {} duplicated", self.echoes, self.lost, self.duplicated)?;
        writeln!(f, "result          {}", if self.lossless() { "lossless" } else { "NOT lossless" })
    }
}

/// The session as the client keeps it across connections.
struct Session {
    token: Option<String>,
    /// Data messages received from wskeep.
    received: u64,
    /// The count last acknowledged to wskeep, and when.
    acked: (u64, Instant),
    /// Sent messages wskeep has not acknowledged: (number, text), oldest first.
    unacked: VecDeque<(u64, String)>,
    sent: u64,
    /// The next echo expected.
    next_echo: u64,
}

/// How one connection ended.
enum Ended {
    /// No close frame: resume.
    Lost,
    /// A close frame (4410 among them): the session is over.
    Closed(Option<u16>, String),
    /// The probe's duration is over.
    Done,
}

pub async fn run(
    url: &str,
    options: &super::ProbeOptions,
    resume: &ResumeOptions,
) -> Result<ResumeReport, ClientError> {
    let start = Instant::now();
    let end = start + options.duration.unwrap_or(Duration::from_secs(100 * 365 * 86_400));
    let mut report = ResumeReport::default();
    let mut session =
        Session { token: None, received: 0, acked: (0, start), unacked: VecDeque::new(), sent: 0, next_echo: 1 };
    let mut lost_at: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let query = match &session.token {
            None => "wskeep_resume=1".to_string(),
            Some(token) => format!("wskeep_resume=1&wskeep_token={token}&wskeep_received={}", session.received),
        };
        let joiner = if url.contains('?') { '&' } else { '?' };
        let conn = match client::connect(&format!("{url}{joiner}{query}"), &options.client).await {
            Ok(conn) => conn,
            // The first connection must work; later ones are retried (the network may be down).
            Err(e) if session.token.is_none() => return Err(e),
            Err(e) => {
                if lost_at.is_some_and(|at| at.elapsed() > resume.give_up_after) || Instant::now() >= end {
                    report.ended = Some(format!("could not reconnect: {e}"));
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        match run_connection(conn, &mut session, &mut report, &mut lost_at, options, resume, end).await {
            Ended::Lost => lost_at = Some(Instant::now()),
            Ended::Closed(code, reason) => {
                report.ended = Some(format!("closed {} {reason:?}", code.map_or("1005".into(), |c| c.to_string())));
                break;
            }
            Ended::Done => {
                report.completed = true;
                report.ended = Some("closed 1000 by the probe".into());
                break;
            }
        }
    }
    report.sent = session.sent;
    report.received = session.received;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn run_connection(
    mut conn: Connection,
    session: &mut Session,
    report: &mut ResumeReport,
    lost_at: &mut Option<Instant>,
    options: &super::ProbeOptions,
    resume: &ResumeOptions,
    end: Instant,
) -> Ended {
    let opened = Instant::now();
    let far = opened + Duration::from_secs(100 * 365 * 86_400);
    let drop_at = resume.drop_after.map_or(far, |d| opened + d);
    let mut sending = tokio::time::interval(resume.send_every);
    let mut last_heard = opened;
    let mut greeted = false;
    loop {
        let dead_at = resume.dead_after.map_or(far, |d| last_heard + d);
        tokio::select! {
            incoming = conn.reader.read_message() => {
                last_heard = Instant::now();
                match incoming {
                    Ok(Some(Incoming::Ping(payload))) => {
                        if options.auto_pong && conn.writer.send(OP_PONG, &payload).await.is_err() {
                            return Ended::Lost;
                        }
                    }
                    Ok(Some(Incoming::Text(text))) if text.starts_with(control::PREFIX) => {
                        if let Some((token, has)) = parse_session(&text) {
                            if let Some(at) = lost_at.take() {
                                report.resumes += 1;
                                report.longest_gap = report.longest_gap.max(at.elapsed());
                            }
                            session.token = Some(token);
                            greeted = true;
                            if acknowledge_sends(session, has).is_err() {
                                return Ended::Closed(None, format!("wskeep has {has} messages, more than were sent"));
                            }
                            // What wskeep did not get goes again, first.
                            for (_, text) in &session.unacked {
                                conn.writer.queue(OP_TEXT, true, text.as_bytes());
                                report.resent += 1;
                            }
                            if conn.writer.flush().await.is_err() {
                                return Ended::Lost;
                            }
                        } else if let Some(has) = parse_ack(&text) {
                            let _ = acknowledge_sends(session, has);
                        }
                    }
                    Ok(Some(Incoming::Text(text))) => {
                        session.received += 1;
                        check_echo(&text, session, report);
                        if !ack_if_due(&mut conn, session).await {
                            return Ended::Lost;
                        }
                    }
                    Ok(Some(Incoming::Binary(_))) => {
                        session.received += 1;
                        if !ack_if_due(&mut conn, session).await {
                            return Ended::Lost;
                        }
                    }
                    Ok(Some(Incoming::Pong(_))) => {}
                    Ok(Some(Incoming::Close(code, reason))) => {
                        conn.writer.queue_close(code, &reason);
                        let _ = conn.writer.flush().await;
                        return Ended::Closed(code, reason);
                    }
                    Ok(None) | Err(_) => return Ended::Lost,
                }
            }
            _ = sending.tick(), if greeted => {
                session.sent += 1;
                let text = format!("probe:{}", session.sent);
                let failed = conn.writer.send(OP_TEXT, text.as_bytes()).await.is_err();
                session.unacked.push_back((session.sent, text));
                if failed || !ack_if_due(&mut conn, session).await {
                    return Ended::Lost;
                }
            }
            _ = tokio::time::sleep_until(drop_at) => return Ended::Lost,
            _ = tokio::time::sleep_until(dead_at) => return Ended::Lost,
            _ = tokio::time::sleep_until(end) => {
                conn.writer.queue_close(Some(1000), "probe finished");
                let _ = conn.writer.flush().await;
                return Ended::Done;
            }
        }
    }
}

/// `\0wskeep:session <token> <received>`
fn parse_session(text: &[u8]) -> Option<(String, u64)> {
    let rest = std::str::from_utf8(text.strip_prefix(control::PREFIX)?).ok()?.strip_prefix("session ")?;
    let (token, has) = rest.split_once(' ')?;
    Some((token.to_string(), has.parse().ok()?))
}

/// `\0wskeep:ack <received>` (the same words as the client's ack).
fn parse_ack(text: &[u8]) -> Option<u64> {
    control::parse_client(text)
}

/// wskeep has the first `has` sends: they need not be kept.
fn acknowledge_sends(session: &mut Session, has: u64) -> Result<(), ()> {
    if has > session.sent {
        return Err(());
    }
    while session.unacked.front().is_some_and(|(n, _)| *n <= has) {
        session.unacked.pop_front();
    }
    Ok(())
}

/// Acks what was received, at least every second while it changes and at once after 64.
async fn ack_if_due(conn: &mut Connection, session: &mut Session) -> bool {
    let (acked, at) = session.acked;
    if session.received == acked || (session.received - acked < 64 && at.elapsed() < Duration::from_secs(1)) {
        return true;
    }
    session.acked = (session.received, Instant::now());
    conn.writer.send(OP_TEXT, &control::ack(session.received)).await.is_ok()
}

/// An echo of `probe:N` must be the next one expected.
fn check_echo(text: &[u8], session: &mut Session, report: &mut ResumeReport) {
    let Some(n) =
        std::str::from_utf8(text).ok().and_then(|t| t.strip_prefix("probe:")).and_then(|n| n.parse::<u64>().ok())
    else {
        return;
    };
    if n < session.next_echo {
        report.duplicated += 1;
        return;
    }
    report.lost += n - session.next_echo;
    report.echoes += 1;
    session.next_echo = n + 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_checked_for_order_loss_and_repeats() {
        let mut session = Session {
            token: None,
            received: 0,
            acked: (0, Instant::now()),
            unacked: VecDeque::new(),
            sent: 0,
            next_echo: 1,
        };
        let mut report = ResumeReport::default();
        for n in [1, 2, 2, 4, 5] {
            check_echo(format!("probe:{n}").as_bytes(), &mut session, &mut report);
        }
        check_echo(b"other", &mut session, &mut report);
        assert_eq!((report.echoes, report.lost, report.duplicated), (4, 1, 1));
        assert_eq!(parse_session(b"\0wskeep:session a.b 7"), Some(("a.b".into(), 7)));
    }
}
