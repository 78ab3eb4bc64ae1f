//! Where the keepalive timers of every connection wait. Deadlines are rounded to a shared grid
//! (`coalescing`), so thousands of connections wait for the same few instants: each instant is
//! one slot, with one tokio timer and a list of the wakers to wake when it passes.
//!
//! Against a tokio `Sleep` per connection, a connection keeps no timer entry of its own, and
//! firing a slot walks one contiguous list instead of wheel entries spread over the memory of
//! every connection. With 10,000 idle connections, that memory is cold at every tick.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use tokio::time::Instant;

/// The slots of one server (one runtime: a slot's timer is a task on it).
#[derive(Clone, Default)]
pub struct TimerSlots {
    slots: Arc<Mutex<BTreeMap<Instant, Slot>>>,
}

struct Slot {
    fired: Arc<AtomicBool>,
    /// `None`: given up by a connection that ended first.
    wakers: Vec<Option<Waker>>,
}

/// A connection's place in a slot.
pub struct Ticket {
    at: Instant,
    index: usize,
    fired: Arc<AtomicBool>,
}

impl Ticket {
    /// The slot's instant has passed and its wakers were woken.
    pub fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl TimerSlots {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Instant, Slot>> {
        // Nothing panics while the lock is held; a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes `waker` once `at` has passed. Called within the runtime: a new slot spawns its timer.
    pub fn wait(&self, at: Instant, waker: &Waker) -> Ticket {
        let mut slots = self.lock();
        let slot = slots.entry(at).or_insert_with(|| {
            tokio::spawn(fire(self.clone(), at));
            Slot { fired: Arc::default(), wakers: Vec::new() }
        });
        slot.wakers.push(Some(waker.clone()));
        Ticket { at, index: slot.wakers.len() - 1, fired: slot.fired.clone() }
    }

    /// Gives up a place that has not fired, so that the waker of a connection that has ended
    /// does not keep its task's memory until the slot comes.
    pub fn cancel(&self, ticket: &Ticket) {
        if ticket.has_fired() {
            return;
        }
        let mut slots = self.lock();
        // The slot at that instant may be a newer one, after ours fired.
        if let Some(slot) = slots.get_mut(&ticket.at).filter(|slot| Arc::ptr_eq(&slot.fired, &ticket.fired)) {
            if let Some(place) = slot.wakers.get_mut(ticket.index) {
                *place = None;
            }
        }
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.lock().values().map(|slot| slot.wakers.iter().flatten().count()).sum()
    }
}

async fn fire(slots: TimerSlots, at: Instant) {
    tokio::time::sleep_until(at).await;
    let Some(slot) = slots.lock().remove(&at) else { return };
    slot.fired.store(true, Ordering::Release);
    for waker in slot.wakers.into_iter().flatten() {
        waker.wake();
    }
}
