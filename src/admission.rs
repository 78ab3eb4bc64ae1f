//! Admission to the listener, in two stages, so that neither a flood of silent connections nor a
//! shortage of descriptors hides behind the wrong answer:
//! - a connection in its handshake (first byte, TLS, first request head) holds one of
//!   `listen.max_handshakes` places (`Handshakes`); when all are taken, a new arrival takes the
//!   place of the oldest, which is dropped and counted (`handshake_limit`), so silent
//!   connections cannot lock legitimate clients out, whose handshakes take milliseconds;
//! - a connection whose first request arrives takes one of `listen.max_connections` slots for
//!   the rest of its life, or is answered 503 (`limit`); `server` does that part.
//!
//! When descriptors run out anyway (the upstream legs and anything else share the process's
//! limit), one descriptor held in reserve lets the accept loop take a waiting client and answer
//! it 503 (`local_limit`) instead of leaving it in the kernel's backlog (`spend_reserve`). A
//! freed descriptor goes to whoever creates one next, so the reserve has priority: upstream
//! sockets are created under the reserve's lock (`upstream_socket`), after taking the reserve
//! back if it is empty, and the descriptor the reserve frees for a client is accepted on under
//! that lock too.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpSocket;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Whether an I/O error means wskeep itself is out of resources (descriptors, buffers, memory)
/// rather than that the peer failed: EMFILE, ENFILE, ENOBUFS, ENOMEM.
pub fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// The descriptor kept in reserve (of `/dev/null`), one per process like the descriptor limit.
struct Reserve {
    file: Option<std::fs::File>,
    /// A connection accepted on it is still open.
    in_use: bool,
}

static RESERVE: Mutex<Reserve> = Mutex::new(Reserve { file: None, in_use: false });

fn reserve() -> std::sync::MutexGuard<'static, Reserve> {
    // Plain data: a panic while holding the lock cannot leave it inconsistent.
    RESERVE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reserve {
    fn refill(&mut self) {
        if self.file.is_none() && !self.in_use {
            self.file = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// Takes the reserved descriptor (back) if it is free and one is to be had.
pub fn refill_reserve() {
    reserve().refill();
}

/// Whether the reserved descriptor is held and free to spend.
pub fn reserve_ready() -> bool {
    let r = reserve();
    r.file.is_some() && !r.in_use
}

/// Frees the reserved descriptor and calls `take` at once, under the reserve's lock; what `take`
/// got comes back with the ticket its connection holds while it lives. If `take` got nothing,
/// the descriptor is taken back in the same breath.
pub fn spend_reserve<T>(take: impl FnOnce() -> Option<T>) -> Option<(T, ReserveTicket)> {
    let mut r = reserve();
    if r.file.is_none() || r.in_use {
        return None;
    }
    r.file = None;
    match take() {
        Some(taken) => {
            r.in_use = true;
            Some((taken, ReserveTicket(())))
        }
        None => {
            r.refill();
            None
        }
    }
}

/// Held by the connection accepted on the reserved descriptor; when it ends, the reserve is
/// taken back (or, if its socket is not closed yet, by the next `upstream_socket` or accept).
pub struct ReserveTicket(());

impl Drop for ReserveTicket {
    fn drop(&mut self) {
        let mut r = reserve();
        r.in_use = false;
        r.refill();
    }
}

/// A socket for an upstream connection to `addr`, created after the reserve is taken back if
/// it is empty: a freed descriptor goes to the reserve first.
pub fn upstream_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let mut r = reserve();
    r.refill();
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// The connections in their handshake, oldest first.
pub struct Handshakes {
    cap: usize,
    state: Mutex<List>,
}

struct List {
    next_id: u64,
    /// By arrival; each one's token drops it.
    live: BTreeMap<u64, CancellationToken>,
}

impl Handshakes {
    pub fn new(cap: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes { cap: cap.max(1), state: Mutex::new(List { next_id: 0, live: BTreeMap::new() }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, List> {
        // Plain data: a panic while holding the lock cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection, and whether the oldest connection in its handshake was
    /// dropped to make room for it.
    pub fn enter(self: &Arc<Self>) -> (HandshakePlace, bool) {
        let token = CancellationToken::new();
        let mut list = self.lock();
        let evicted = if list.live.len() >= self.cap {
            list.live.pop_first().map(|(_, oldest)| oldest.cancel()).is_some()
        } else {
            false
        };
        list.next_id += 1;
        let id = list.next_id;
        list.live.insert(id, token.clone());
        (HandshakePlace { id, list: self.clone(), dropped: token }, evicted)
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's place among those in their handshake; given up when its first request
/// arrives (`leave`) or when it ends.
pub struct HandshakePlace {
    id: u64,
    list: Arc<Handshakes>,
    dropped: CancellationToken,
}

impl HandshakePlace {
    /// Resolves when a newer connection took this place: the connection must end.
    pub fn dropped(&self) -> WaitForCancellationFuture<'_> {
        self.dropped.cancelled()
    }

    /// The handshake is over: the place is free for another connection.
    pub fn leave(&self) {
        self.list.lock().live.remove(&self.id);
    }
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_list_drops_its_oldest_member() {
        let list = Handshakes::new(2);
        let (a, evicted) = list.enter();
        assert!(!evicted);
        let (b, _) = list.enter();
        // `a` has its first request: it leaves, and its place goes to the next arrival.
        a.leave();
        let (c, evicted) = list.enter();
        assert!(!evicted);
        assert_eq!(list.len(), 2);
        // Full: the oldest still in its handshake (`b`) is dropped for `d`.
        let (d, evicted) = list.enter();
        assert!(evicted);
        assert!(b.dropped.is_cancelled());
        assert!(!c.dropped.is_cancelled() && !d.dropped.is_cancelled() && !a.dropped.is_cancelled());
        drop((b, c));
        assert_eq!(list.len(), 1);
        drop(d);
        assert!(list.is_empty());
    }

    #[test]
    fn the_reserve_serves_one_connection_at_a_time() {
        refill_reserve();
        assert!(reserve_ready());
        // Nothing taken: the descriptor is back at once.
        assert!(spend_reserve(|| None::<()>).is_none());
        assert!(reserve_ready());
        let (_, ticket) = spend_reserve(|| Some(())).expect("a reserve");
        assert!(!reserve_ready());
        assert!(spend_reserve(|| Some(())).is_none(), "one connection at a time");
        refill_reserve();
        assert!(!reserve_ready(), "still in use");
        // The connection ends: the descriptor is taken back.
        drop(ticket);
        assert!(reserve_ready());
    }
}
