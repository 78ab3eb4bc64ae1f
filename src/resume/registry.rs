//! The resumable sessions of this process, by token id: how a resuming handshake finds the
//! task that holds the session's upstream leg and hands it the new client leg. Each id works
//! once: a claim takes the entry out whether or not the rest of the resume succeeds, and the
//! session issues a new token when it splices the new leg in.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use ring::hmac;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::token::{Id, Token};
use super::Failure;
use crate::legstream::LegStream;

/// Ended sessions' ids are remembered this long (and at most `SPENT_MAX` of them), so a client
/// that comes back late learns why (`expired`, `overflow`, `upstream_gone`) rather than
/// `bad_token`.
const SPENT_FOR: Duration = Duration::from_secs(600);
const SPENT_MAX: usize = 10_000;

/// What a resuming handshake must match, and answers with, fixed by the first handshake.
#[derive(Debug)]
pub struct Facts {
    /// The keyed hash of the bound credentials (`request::bound_values`).
    pub binding: [u8; 32],
    /// The subprotocol the upstream chose.
    pub protocol: Option<HeaderValue>,
    /// The upstream's `Sec-WebSocket-Extensions` answer.
    pub extensions: Option<HeaderValue>,
}

/// What keeps a client connection's place while a leg of it is in use (`proxy::ConnMeta`).
/// Released when dropped.
pub struct Hold {
    /// Its `listen.max_connections` slot.
    pub permit: Arc<tokio::sync::OwnedSemaphorePermit>,
    /// On HTTP/2, its stream's drain-tracking token: while held, the connection sends no GOAWAY.
    pub stream: Option<tokio_util::task::task_tracker::TaskTrackerToken>,
}

/// A resuming client's leg, on its way to the session's task.
pub struct Resumption {
    pub leg: LegStream,
    /// The new connection's place: the session holds it instead of the old one's.
    pub hold: Hold,
    /// Messages the client says it received from wskeep on this session.
    pub received: u64,
    /// When the handshake claimed the session (the gap ends here).
    pub claimed: Instant,
}

/// A claimed session: the resuming handshake answers with its facts and sends the new leg down
/// `handoff`.
pub struct Claim {
    pub facts: Arc<Facts>,
    pub handoff: oneshot::Sender<Resumption>,
}

struct Entry {
    secret: super::token::Secret,
    facts: Arc<Facts>,
    handoff: oneshot::Sender<Resumption>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<Id, Entry>,
    spent: HashMap<Id, Failure>,
    spent_order: VecDeque<(Id, Instant)>,
}

pub struct Registry {
    /// Keys the hash of bound credentials: random per process, so the hashes kept in memory
    /// cannot be tested against guesses offline.
    key: hmac::Key,
    inner: Mutex<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        let rng = ring::rand::SystemRandom::new();
        // At start-up, not on input: a system without randomness cannot run wskeep's TLS either.
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the OS provides randomness");
        Registry { key, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data: a panic while holding the lock cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keyed hash of `request::bound_values`.
    pub fn binding(&self, bound_values: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.key, bound_values);
        let mut out = [0; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// A new token for the session with these facts, and where its resumption will arrive;
    /// `None` if the OS gave no randomness.
    pub fn issue(&self, facts: Arc<Facts>) -> Option<(Token, oneshot::Receiver<Resumption>)> {
        let token = Token::generate()?;
        let (handoff, arrival) = oneshot::channel();
        self.lock().live.insert(token.id, Entry { secret: token.secret, facts, handoff });
        Some((token, arrival))
    }

    /// Takes the session `token` names, if the secret, the credentials and the subprotocol offer
    /// match. The id is spent in any case.
    pub fn claim(&self, token: &Token, binding: &[u8; 32], offered: &[String]) -> Result<Claim, Failure> {
        let entry = {
            let mut inner = self.lock();
            match inner.live.remove(&token.id) {
                Some(entry) => entry,
                None => return Err(inner.spent.get(&token.id).copied().unwrap_or(Failure::BadToken)),
            }
        };
        if !token.secret_matches(&entry.secret) {
            return Err(Failure::BadToken);
        }
        let protocol_offered =
            entry.facts.protocol.as_ref().is_none_or(|p| offered.iter().any(|o| o.as_bytes() == p.as_bytes()));
        if !bool::from(entry.facts.binding.ct_eq(binding)) || !protocol_offered {
            return Err(Failure::CredentialMismatch);
        }
        Ok(Claim { facts: entry.facts, handoff: entry.handoff })
    }

    /// The session of `id` ended (or its token was replaced): the id no longer resumes, and a
    /// late claim learns `why`.
    pub fn ended(&self, id: &Id, why: Failure) {
        let mut inner = self.lock();
        inner.live.remove(id);
        let now = Instant::now();
        while let Some(&(old, at)) = inner.spent_order.front() {
            if inner.spent_order.len() < SPENT_MAX && now.duration_since(at) < SPENT_FOR {
                break;
            }
            inner.spent_order.pop_front();
            inner.spent.remove(&old);
        }
        inner.spent.insert(*id, why);
        inner.spent_order.push_back((*id, now));
    }

    /// Drops a token that was never claimed (the session moved on to a new one).
    pub fn forget(&self, id: &Id) {
        self.lock().live.remove(id);
    }

    /// Sessions waiting for a resumption (attached or detached).
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(registry: &Registry) -> Arc<Facts> {
        Arc::new(Facts {
            binding: registry.binding(b"creds"),
            protocol: Some(HeaderValue::from_static("chat")),
            extensions: None,
        })
    }

    #[test]
    fn a_token_is_claimed_once_and_only_with_its_secret_and_credentials() {
        let r = Registry::new();
        let good = r.binding(b"creds");
        let offered = vec!["other".to_string(), "chat".to_string()];
        let (token, _arrival) = r.issue(facts(&r)).unwrap();
        assert!(r.claim(&token, &good, &offered).is_ok());
        assert_eq!(r.claim(&token, &good, &offered).err(), Some(Failure::BadToken), "spent");

        let (token, _arrival) = r.issue(facts(&r)).unwrap();
        let mut wrong = token.clone();
        wrong.secret[0] ^= 1;
        assert_eq!(r.claim(&wrong, &good, &offered).err(), Some(Failure::BadToken));
        assert_eq!(r.claim(&token, &good, &offered).err(), Some(Failure::BadToken), "spent by the wrong secret");

        let (token, _arrival) = r.issue(facts(&r)).unwrap();
        assert_eq!(r.claim(&token, &r.binding(b"other"), &offered).err(), Some(Failure::CredentialMismatch));
        let (token, _arrival) = r.issue(facts(&r)).unwrap();
        assert_eq!(r.claim(&token, &good, &["other".into()]).err(), Some(Failure::CredentialMismatch));
        assert_eq!(r.live(), 0);
    }

    #[test]
    fn an_ended_session_says_why() {
        let r = Registry::new();
        let (token, _arrival) = r.issue(facts(&r)).unwrap();
        r.ended(&token.id, Failure::Expired);
        assert_eq!(r.claim(&token, &r.binding(b"creds"), &["chat".into()]).err(), Some(Failure::Expired));
    }
}
