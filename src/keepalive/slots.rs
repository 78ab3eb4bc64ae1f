//! Where the keepalive timers of every connection wait. Deadlines are rounded to a shared grid
//! (`coalescing`), so thousands of connections wait for the same few instants: each instant is
//! one slot, with one task sleeping until it and the wakers to wake then.
//!
//! Against a tokio `Sleep` per connection, a connection keeps no timer entry of its own: the
//! timer wheel holds one entry per slot instead of one per connection, and waiting costs a
//! connection a place in its slot's list.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The slots of one server. Its connections and the slots' tasks run on one runtime.
#[derive(Clone, Default)]
pub struct TimerSlots {
    slots: Arc<Mutex<BTreeMap<Instant, Slot>>>,
}

struct Slot {
    fired: Arc<AtomicBool>,
    /// Places, reused once given up (`free`): a slot far ahead (an hour's idle timeout) sees
    /// connections come and go, and keeps only as many places as wait at once.
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
    task: AbortHandle,
}

impl Slot {
    fn waiting(&self) -> usize {
        self.wakers.len() - self.free.len()
    }
}

/// A connection's place in a slot, given up when dropped before the slot fires: the waker of a
/// connection that has ended does not keep its task's memory until the slot comes.
pub struct Ticket {
    slots: TimerSlots,
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
        // The code under this lock does not panic (`tokio::spawn` aside, and the relay always
        // runs in a runtime), so a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place in the slot of `at`, to have `waker` woken once `at` has passed. The waker
    /// is kept until then: call from the task that will poll the ticket, whose waker does not
    /// change (a tokio task's never does).
    pub fn join(&self, at: Instant, waker: &Waker) -> Ticket {
        let mut slots = self.lock();
        let slot = slots.entry(at).or_insert_with(|| Slot {
            fired: Arc::default(),
            wakers: Vec::new(),
            free: Vec::new(),
            task: tokio::spawn(fire(self.clone(), at)).abort_handle(),
        });
        let index = match slot.free.pop() {
            Some(index) => {
                slot.wakers[index] = Some(waker.clone());
                index
            }
            None => {
                slot.wakers.push(Some(waker.clone()));
                slot.wakers.len() - 1
            }
        };
        Ticket { slots: self.clone(), at, index, fired: slot.fired.clone() }
    }

    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.lock().values().map(Slot::waiting).sum()
    }

    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.lock().len()
    }

    /// Places taken or given up and free, in every slot.
    #[cfg(test)]
    pub fn places(&self) -> usize {
        self.lock().values().map(|slot| slot.wakers.len()).sum()
    }
}

impl Drop for Ticket {
    /// The last place to go takes the slot and its task with it.
    fn drop(&mut self) {
        if self.has_fired() {
            return;
        }
        let mut slots = self.slots.lock();
        // Not fired, so the slot is there (`fire` marks and removes it under this lock), but it
        // may be a newer one at the same instant only if ours fired: check it is ours anyway.
        let Some(slot) = slots.get_mut(&self.at).filter(|slot| Arc::ptr_eq(&slot.fired, &self.fired)) else {
            return;
        };
        if let Some(place) = slot.wakers.get_mut(self.index) {
            *place = None;
            slot.free.push(self.index);
        }
        if slot.waiting() == 0 {
            if let Some(slot) = slots.remove(&self.at) {
                slot.task.abort();
            }
        }
    }
}

async fn fire(slots: TimerSlots, at: Instant) {
    tokio::time::sleep_until(at).await;
    let slot = {
        let mut map = slots.lock();
        // A slot whose places were all given up is removed and its task aborted; should the
        // abort come too late, there is nothing left to wake.
        let Some(slot) = map.remove(&at) else { return };
        slot.fired.store(true, Ordering::Release);
        slot
    };
    for waker in slot.wakers.into_iter().flatten() {
        waker.wake();
    }
}
