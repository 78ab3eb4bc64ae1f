//! Lossless reconnect (docs/resume.md): what the handshake and the relay share about resumable
//! sessions. The wire words (`control`), the session token (`token`), the sessions a resuming
//! handshake can find (`registry`), the messages kept for a replay (`replay`) and what a
//! resuming request carries (`request`). The life of a session's connection (attach, detach,
//! splice) is `relay::session`.

pub mod control;
pub mod registry;
pub mod replay;
pub mod request;
pub mod token;

pub use registry::{Claim, Facts, Hold, Registry, Resumption};
pub use request::{Ask, BindKey};

use crate::config::Resume;

pub use crate::vocab::ResumeFailure as Failure;

/// The close a refused resume gets right after its 101.
pub const NOT_RESUMABLE: (u16, &str) = (4410, "session not resumable");
/// The close an attached (half-open) client leg gets when a resume replaces it.
pub const REPLACED: (u16, &str) = (4001, "replaced by a resumed connection");

/// The `[resume]` section's problems, by key; `max_message_size` is `limits.max_message_size`.
/// The buffer must hold the largest message: attached, a full buffer stops wskeep reading the
/// upstream until the client acknowledges, which it can only do for whole messages.
pub fn config_problems(resume: &Resume, max_message_size: u64) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    for entry in &resume.bind {
        if let Err(e) = BindKey::parse(entry) {
            problems.push(("resume.bind", e));
        }
    }
    if resume.grace.is_zero() {
        problems.push(("resume.grace", "must be above 0s".into()));
    }
    // Only while enabled: a large `limits.max_message_size` must not need a `[resume]` section.
    if resume.enabled && resume.buffer.0 < max_message_size {
        problems.push((
            "resume.buffer",
            format!(
                "\"{}\" must be at least limits.max_message_size (\"{}\"): a message the client has not \
                 acknowledged must fit",
                resume.buffer,
                crate::size::ByteSize(max_message_size)
            ),
        ));
    }
    problems
}
