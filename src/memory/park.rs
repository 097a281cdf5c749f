//! The slot's lock word and its FIFO parking queue.
//!
//! # Implementation details
//!
//! The lock is one `AtomicU64` with three bits:
//!
//! * `LOCKED`: somebody owns the slot (a guard, a store or a delete);
//! * `QUEUED`: the wait queue is not empty. Invariant: `QUEUED` implies
//!   `LOCKED`, because a release with waiters *hands the lock over* to the
//!   head of the queue instead of clearing `LOCKED`;
//! * `DEAD`: the context was deleted; every acquisition fails from now on.
//!
//! Uncontended acquire is one CAS `0 -> LOCKED`; uncontended release is one
//! CAS `LOCKED -> 0`. Neither touches the queue. The queue (a `Mutex` around
//! a `VecDeque`, which allocates only when the first waiter arrives) is
//! touched only by waiters, by a release that sees `QUEUED`, by cancellation
//! and by delete.
//!
//! ## Fairness
//!
//! Waiters are served in arrival order and a newcomer can never barge past a
//! queued waiter: while anybody waits, `LOCKED` stays set and ownership is
//! handed from holder to head of queue directly. No waiter starves.
//!
//! ## Cancel safety
//!
//! Every state change of a [`Waiter`] (`WAITING -> GRANTED | DEAD |
//! CANCELLED`) happens under the queue mutex, so a cancelling waiter can tell
//! exactly whether it was granted the lock. One that was granted but is being
//! dropped passes the lock on ([`RawLock::cancel`] reports it, the caller
//! releases), so a wake-up is never lost and the lock never leaks.
//!
//! ## Orderings
//!
//! Data written by a holder must be visible to the next holder. Two paths
//! carry that happens-before edge:
//!
//! * free lock: the releasing `Release` CAS/store on `state` pairs with the
//!   next acquirer's `Acquire` CAS on `state`;
//! * hand-off: the releaser's `Release` store of `GRANTED` to the waiter's
//!   `state` pairs with the waiter's `Acquire` load of it.

use std::collections::VecDeque;
use std::task::Waker;

use crate::sync::{current_thread, spin_hint, Arc, AtomicU64, AtomicU8, Mutex, Ordering, Thread};

pub(crate) const LOCKED: u64 = 1;
pub(crate) const QUEUED: u64 = 2;
pub(crate) const DEAD: u64 = 4;

/// A waiter's state. Transitions out of `WAITING` happen exactly once, under
/// the queue mutex.
pub(crate) const WAITING: u8 = 0;
/// The lock was handed to this waiter: it owns it now.
pub(crate) const GRANTED: u8 = 1;
/// The context was deleted while this waiter queued.
pub(crate) const KILLED: u8 = 2;
/// The waiter gave up (dropped future, timeout) and left the queue.
pub(crate) const CANCELLED: u8 = 3;

/// How a waiter is woken.
enum Notify {
    None,
    Waker(Waker),
    Thread(Thread),
}

/// One queued acquirer: a task (by `Waker`) or a thread (by `Thread`).
pub(crate) struct Waiter {
    state: AtomicU8,
    notify: Mutex<Notify>,
}

impl Waiter {
    pub(crate) fn for_task() -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(WAITING),
            notify: Mutex::new(Notify::None),
        })
    }

    pub(crate) fn for_thread() -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(WAITING),
            notify: Mutex::new(Notify::Thread(current_thread())),
        })
    }

    /// The waiter's state. `Acquire` pairs with the `Release` store in
    /// [`Waiter::complete`], so a `GRANTED` reader sees the previous holder's
    /// writes.
    #[inline]
    pub(crate) fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Registers the task to wake. The caller re-checks [`Waiter::state`]
    /// afterwards: `complete` stores the state before it takes the waker
    /// under the same mutex, so either it sees this waker or the re-check
    /// sees the new state.
    pub(crate) fn register(&self, waker: &Waker) {
        let mut notify = self.notify.lock();
        match &*notify {
            Notify::Waker(w) if w.will_wake(waker) => {}
            _ => *notify = Notify::Waker(waker.clone()),
        }
    }

    /// Moves the waiter out of `WAITING` (caller holds the queue mutex) and
    /// returns who to wake; the caller wakes outside the queue mutex.
    fn complete(&self, to: u8) -> Wake {
        // Release: pairs with the Acquire in `state()`; publishes the
        // previous holder's writes to a `GRANTED` waiter.
        self.state.store(to, Ordering::Release);
        match std::mem::replace(&mut *self.notify.lock(), Notify::None) {
            Notify::None => Wake::Nobody,
            Notify::Waker(w) => Wake::Task(w),
            Notify::Thread(t) => Wake::Thread(t),
        }
    }
}

/// A deferred wake-up, performed after the queue mutex is released.
#[must_use]
pub(crate) enum Wake {
    Nobody,
    Task(Waker),
    Thread(Thread),
}

impl Wake {
    pub(crate) fn wake(self) {
        match self {
            Wake::Nobody => {}
            Wake::Task(w) => w.wake(),
            Wake::Thread(t) => t.unpark(),
        }
    }
}

/// Outcome of an immediate acquisition attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryLock {
    Acquired,
    Held,
    Dead,
}

/// Outcome of joining the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueue {
    /// The lock turned out free: taken without queueing.
    Acquired,
    /// Queued; wait for the waiter's state to change.
    Queued,
    Dead,
}

/// The lock word plus its wait queue.
pub(crate) struct RawLock {
    state: AtomicU64,
    // Invariant: holds only `WAITING` waiters, in arrival order; non-empty
    // exactly when `QUEUED` is set (both changed under this mutex).
    queue: Mutex<VecDeque<Arc<Waiter>>>,
}

impl RawLock {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    /// One CAS; never queues.
    #[inline]
    pub(crate) fn try_lock(&self) -> TryLock {
        // Acquire: pairs with the Release in `unlock` (fast path or the
        // empty-queue store), so this holder sees the previous one's writes.
        match self
            .state
            .compare_exchange(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => TryLock::Acquired,
            Err(s) if s & DEAD != 0 => TryLock::Dead,
            Err(_) => TryLock::Held,
        }
    }

    /// Takes the lock if it is free, else appends `waiter` to the queue.
    pub(crate) fn enqueue(&self, waiter: &Arc<Waiter>) -> Enqueue {
        let mut queue = self.queue.lock();
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & DEAD != 0 {
                return Enqueue::Dead;
            }
            if s & LOCKED == 0 {
                // Acquire: as in `try_lock`.
                match self.state.compare_exchange(
                    s,
                    s | LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Enqueue::Acquired,
                    Err(actual) => s = actual,
                }
            } else {
                // Relaxed: setting QUEUED only has to be ordered against the
                // holder's fast-path release CAS on the same word (coherence
                // does that: the release then fails and takes the slow path,
                // which needs the queue mutex we hold). Visibility of data
                // travels through the waiter's state, not through this bit.
                match self.state.compare_exchange(
                    s,
                    s | QUEUED,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        queue.push_back(waiter.clone());
                        return Enqueue::Queued;
                    }
                    Err(actual) => {
                        s = actual;
                        spin_hint();
                    }
                }
            }
        }
    }

    /// Releases the lock: clears it when nobody waits (one CAS), else hands
    /// it to the oldest waiter.
    #[inline]
    pub(crate) fn unlock(&self) {
        // Release: pairs with the Acquire CAS in `try_lock` / `enqueue`.
        if self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            self.unlock_slow();
        }
    }

    #[cold]
    fn unlock_slow(&self) {
        let mut queue = self.queue.lock();
        let wake = match queue.pop_front() {
            Some(next) => {
                if queue.is_empty() {
                    // Relaxed: QUEUED is only read by CASes that are
                    // ordered with this one by the queue mutex or by
                    // coherence of the lock word.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }
                // LOCKED stays set: ownership moves to `next`.
                next.complete(GRANTED)
            }
            None => {
                // Nobody is left (they cancelled): free the lock, keeping
                // DEAD if set. Release: pairs with the next acquirer's
                // Acquire CAS.
                self.state.fetch_and(!(LOCKED | QUEUED), Ordering::Release);
                Wake::Nobody
            }
        };
        drop(queue);
        wake.wake();
    }

    /// Takes a waiter out of the queue. Returns `true` if the lock had
    /// already been handed to it: the caller owns the lock and must use or
    /// release it.
    pub(crate) fn cancel(&self, waiter: &Arc<Waiter>) -> bool {
        let mut queue = self.queue.lock();
        // Acquire: as in `Waiter::state`; under the mutex the value is
        // final for this decision (all transitions happen under it).
        match waiter.state.load(Ordering::Acquire) {
            WAITING => {
                if let Some(pos) = queue.iter().position(|w| Arc::ptr_eq(w, waiter)) {
                    queue.remove(pos);
                }
                if queue.is_empty() {
                    // Relaxed: see `unlock_slow`.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }
                waiter.state.store(CANCELLED, Ordering::Relaxed);
                false
            }
            GRANTED => true,
            _ => false,
        }
    }

    /// Marks the lock dead (the caller holds it) and fails every waiter.
    /// The lock is never released afterwards.
    pub(crate) fn kill(&self) {
        let mut queue = self.queue.lock();
        // Release: a later acquirer that reads DEAD (with Acquire or under
        // the mutex) sees everything the deleting holder did.
        self.state.store(LOCKED | DEAD, Ordering::Release);
        let waiters = std::mem::take(&mut *queue);
        let wakes: Vec<Wake> = waiters.iter().map(|w| w.complete(KILLED)).collect();
        drop(queue);
        for w in wakes {
            w.wake();
        }
    }

    /// Whether the context was deleted.
    #[allow(dead_code)]
    #[inline]
    pub(crate) fn is_dead(&self) -> bool {
        // Acquire: pairs with the Release store in `kill`.
        self.state.load(Ordering::Acquire) & DEAD != 0
    }

    /// Whether somebody holds the lock (a racy hint for tests and metrics).
    #[allow(dead_code)]
    pub(crate) fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) & LOCKED != 0
    }
}
