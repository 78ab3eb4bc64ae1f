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
//! limit), one descriptor held in reserve (`FdReserve`) lets the accept loop take a waiting
//! client and answer it 503 (`local_limit`) instead of leaving it in the kernel's backlog. The
//! descriptor it frees goes to the lowest free number, so whatever creates a socket next gets
//! it: the upstream connections are created under the same lock (`upstream_socket`), so that
//! only the waiting client can.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Whether an I/O error means wskeep itself is out of resources (descriptors, buffers, memory)
/// rather than that the peer failed: EMFILE, ENFILE, ENOBUFS, ENOMEM.
pub fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Held while the reserve's descriptor is traded for a client, and while an upstream socket is
/// created: between the two, no socket of wskeep's takes the descriptor meant for the client.
static DESCRIPTORS: Mutex<()> = Mutex::new(());

fn descriptors() -> std::sync::MutexGuard<'static, ()> {
    // Guards no data: a panic while it was held leaves nothing inconsistent.
    DESCRIPTORS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A socket for an upstream connection to `addr`.
pub fn upstream_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let _lock = descriptors();
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

/// One descriptor (of `/dev/null`) kept for the moment `accept` fails for want of descriptors.
pub struct FdReserve {
    file: Option<std::fs::File>,
    /// Held by the connection accepted on the reserve, until it ends.
    in_use: Arc<Semaphore>,
}

fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

impl Default for FdReserve {
    fn default() -> Self {
        FdReserve { file: open_reserve(), in_use: Arc::new(Semaphore::new(1)) }
    }
}

impl FdReserve {
    /// Whether the descriptor is held and free to spend.
    pub fn is_ready(&self) -> bool {
        self.file.is_some() && self.in_use.available_permits() == 1
    }

    /// Frees the reserved descriptor and calls `take` at once, under the descriptor lock; what
    /// `take` got comes back with the permit its connection holds while it lives. If `take` got
    /// nothing, the descriptor is taken back in the same breath.
    pub fn spend<T>(&mut self, take: impl FnOnce() -> Option<T>) -> Option<(T, OwnedSemaphorePermit)> {
        let _lock = descriptors();
        self.file.as_ref()?;
        let permit = self.in_use.clone().try_acquire_owned().ok()?;
        self.file = None;
        let taken = take();
        if taken.is_none() {
            self.file = open_reserve();
        }
        taken.map(|t| (t, permit))
    }

    /// Takes the descriptor back once the connection that used it has ended (if one is free).
    pub fn refill(&mut self) {
        if self.file.is_none() && self.in_use.available_permits() == 1 {
            let _lock = descriptors();
            self.file = open_reserve();
        }
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
        let mut reserve = FdReserve::default();
        assert!(reserve.is_ready());
        // Nothing taken: the descriptor is back at once.
        assert!(reserve.spend(|| None::<()>).is_none());
        assert!(reserve.is_ready());
        let (_, permit) = reserve.spend(|| Some(())).expect("a reserve at start");
        assert!(!reserve.is_ready());
        assert!(reserve.spend(|| Some(())).is_none());
        reserve.refill();
        assert!(!reserve.is_ready(), "still in use");
        drop(permit);
        reserve.refill();
        assert!(reserve.is_ready());
    }
}
