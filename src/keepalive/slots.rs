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
    /// The task that fires the slot; `None` for the moment between the slot's creation and the
    /// spawn, which happens outside the lock.
    task: Option<AbortHandle>,
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
    /// The waker in the ticket's place, to tell cheaply whether a poll brings another one.
    waker: Waker,
}

impl Ticket {
    /// The slot's instant has passed and its wakers were woken.
    pub fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Makes `waker` the one woken when the slot fires, if it would not wake the same task as
    /// the one in place (the `Future` contract lets a task's waker change between polls).
    pub fn update_waker(&mut self, waker: &Waker) {
        if self.waker.will_wake(waker) {
            return;
        }
        self.waker = waker.clone();
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(&self.at).filter(|slot| Arc::ptr_eq(&slot.fired, &self.fired)) {
            slot.wakers[self.index] = Some(waker.clone());
        }
    }
}

impl TimerSlots {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Instant, Slot>> {
        // The code under this lock does not panic, so a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place in the slot of `at`, to have `waker` woken once `at` has passed (or the
    /// waker the ticket is given later, `Ticket::update_waker`).
    pub fn join(&self, at: Instant, waker: &Waker) -> Ticket {
        let (index, fired, created) = {
            let mut slots = self.lock();
            let mut created = false;
            let slot = slots.entry(at).or_insert_with(|| {
                created = true;
                Slot { fired: Arc::default(), wakers: Vec::new(), free: Vec::new(), task: None }
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
            (index, slot.fired.clone(), created)
        };
        if created {
            // Spawned with the lock released (a spawn may run code of the runtime's own), then
            // recorded so the last place to go can abort it. Our place keeps the slot until
            // then, unless the task already fired it: then there is nothing to abort.
            let task = tokio::spawn(fire(self.clone(), at)).abort_handle();
            if let Some(slot) = self.lock().get_mut(&at).filter(|slot| Arc::ptr_eq(&slot.fired, &fired)) {
                slot.task = Some(task);
            }
        }
        Ticket { slots: self.clone(), at, index, fired, waker: waker.clone() }
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
            if let Some(task) = slots.remove(&self.at).and_then(|slot| slot.task) {
                task.abort();
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
