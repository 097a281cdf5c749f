//! The slot's lock word and its parking queue.
//!
//! # Implementation details
//!
//! The lock is one `AtomicU64` with three bits:
//!
//! * `LOCKED`: somebody owns the slot (a guard, a store or a delete);
//! * `QUEUED`: the wait queue is not empty (changed only under the queue
//!   mutex, together with the queue);
//! * `DEAD`: the context was deleted; every acquisition fails from now on.
//!
//! Uncontended acquire is one CAS setting `LOCKED`; uncontended release is
//! one CAS `LOCKED -> 0`. Neither touches the queue. The queue (a `Mutex`
//! around a `VecDeque`, which allocates only when the first waiter arrives)
//! is touched only by waiters, by a release that sees `QUEUED`, by
//! cancellation and by delete.
//!
//! ## Fairness: bounded, not strict
//!
//! A free lock can be taken by anybody, also while others wait (`QUEUED`
//! without `LOCKED`): a task that releases and re-acquires in a loop keeps
//! running instead of handing off to a parked waiter and waiting for it to
//! be scheduled (the convoy that strict FIFO hand-off causes). A release
//! that finds waiters does one of two things with the head of the queue:
//!
//! * it has waited less than the store's fairness bound ([`FAIR_AFTER`] by
//!   default): the release frees the lock and
//!   wakes it (`WOKEN`); it competes for the lock like a newcomer, and if it
//!   loses it goes back to the *front* of the queue, keeping its arrival
//!   time;
//! * it has waited the bound or more: the release *hands the lock over*
//!   (`GRANTED`, `LOCKED` never cleared), so nobody can barge past it.
//!
//! So no waiter starves: once the head has waited the bound, every release
//! serves the queue in order until it is empty or its head is young again.
//!
//! ## Cancel safety
//!
//! Every state change of a [`Waiter`] (`WAITING -> GRANTED | WOKEN | KILLED
//! | CANCELLED`, and `WOKEN -> WAITING` when it re-queues) happens under the
//! queue mutex, so a cancelling waiter can tell exactly what it was given.
//! One that was granted but is being dropped passes the lock on
//! ([`RawLock::cancel`] reports it, the caller releases); one that was
//! woken but will not retry passes the wake-up on to the next waiter if the
//! lock is free. So a wake-up is never lost and the lock never leaks.
//!
//! ## Orderings
//!
//! Data written by a holder must be visible to the next holder. Two paths
//! carry that happens-before edge:
//!
//! * free lock (also after a wake-up): the releasing `Release` CAS/RMW on
//!   `state` pairs with the next acquirer's `Acquire` CAS on `state`;
//! * hand-off: the releaser's `Release` store of `GRANTED` to the waiter's
//!   `state` pairs with the waiter's `Acquire` load of it.

use std::collections::VecDeque;
use std::task::Waker;
use std::time::Duration;

use crate::sync::{
    current_thread, handoff_due, spin_hint, spin_rounds, Arc, AtomicU64, AtomicU8, Mutex, Ordering,
    Since, Thread,
};

pub(crate) const LOCKED: u64 = 1;
pub(crate) const QUEUED: u64 = 2;
pub(crate) const DEAD: u64 = 4;
/// The store was dropped while this lock was held: the holder's release
/// must drop the reference the store left for it (see `RawLock::orphan`).
pub(crate) const ORPHAN: u64 = 8;

/// A waiter's state. Transitions out of `WAITING` happen exactly once, under
/// the queue mutex.
pub(crate) const WAITING: u8 = 0;
/// The lock was handed to this waiter: it owns it now.
pub(crate) const GRANTED: u8 = 1;
/// The context was deleted while this waiter queued.
pub(crate) const KILLED: u8 = 2;
/// The waiter gave up (dropped future, timeout) and left the queue.
pub(crate) const CANCELLED: u8 = 3;
/// A release freed the lock and woke this waiter, which left the queue: it
/// must try to take the lock and re-queue (at the front) if it loses.
pub(crate) const WOKEN: u8 = 4;

/// How long a queued waiter may be passed by newcomers before a release
/// hands the lock to it directly (see the module docs); the default of
/// `InMemoryContextStorage::with_fairness_bound`.
pub(crate) const FAIR_AFTER: Duration = Duration::from_micros(500);

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
    /// When it is owed a hand-off: its first queueing plus the store's
    /// fairness bound (kept when it re-queues after a wake-up).
    since: Since,
}

impl Waiter {
    pub(crate) fn for_task(fair_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(WAITING),
            notify: Mutex::new(Notify::None),
            since: Since::now(fair_after),
        })
    }

    pub(crate) fn for_thread(fair_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(WAITING),
            notify: Mutex::new(Notify::Thread(current_thread())),
            since: Since::now(fair_after),
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
        let mut notify = self.notify.lock();
        if let Notify::Thread(t) = &*notify {
            // A thread is registered once and for all: keep it, since a
            // woken waiter may re-queue and need waking again.
            return Wake::Thread(t.clone());
        }
        match std::mem::replace(&mut *notify, Notify::None) {
            Notify::Waker(w) => Wake::Task(w),
            _ => Wake::Nobody,
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

/// Where a waiter joins the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// A new waiter.
    Back,
    /// A woken waiter that lost the race for the lock: it is the oldest.
    Front,
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
    // Invariant: holds only `WAITING` waiters, in arrival order (a woken
    // waiter that re-queues goes back to the front); non-empty
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

    /// One CAS when the lock is free (also while others wait: barging is
    /// allowed, see the module docs); never queues.
    #[inline]
    pub(crate) fn try_lock(&self) -> TryLock {
        let mut s = 0;
        loop {
            // Acquire: pairs with the Release in `unlock` / `unlock_slow`,
            // so this holder sees the previous one's writes.
            match self
                .state
                .compare_exchange(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return TryLock::Acquired,
                Err(actual) if actual & DEAD != 0 => return TryLock::Dead,
                Err(actual) if actual & LOCKED != 0 => return TryLock::Held,
                // Free but QUEUED: take it anyway (bounded fairness).
                Err(actual) => s = actual,
            }
        }
    }

    /// [`try_lock`](Self::try_lock), then a short spin while the lock is
    /// held (a critical section without `.await` is shorter than a park).
    #[inline]
    pub(crate) fn try_lock_spin(&self) -> TryLock {
        let mut outcome = self.try_lock();
        let mut round = 0;
        while outcome == TryLock::Held && round < spin_rounds() {
            for _ in 0..(4 << round) {
                spin_hint();
            }
            round += 1;
            // Relaxed: only a hint for when to CAS; `try_lock` orders.
            if self.state.load(Ordering::Relaxed) & LOCKED == 0 {
                outcome = self.try_lock();
            }
        }
        outcome
    }

    /// Takes the lock if it is free, else queues `waiter` (at `place`). A
    /// woken waiter is `WAITING` again afterwards.
    pub(crate) fn enqueue(&self, waiter: &Arc<Waiter>, place: Place) -> Enqueue {
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
                        // Relaxed: the state only changes under the queue
                        // mutex we hold; `state()` readers that see WAITING
                        // simply keep waiting.
                        waiter.state.store(WAITING, Ordering::Relaxed);
                        match place {
                            Place::Back => queue.push_back(waiter.clone()),
                            Place::Front => queue.push_front(waiter.clone()),
                        }
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

    /// Releases the lock: clears it when nobody waits (one CAS), else wakes
    /// the oldest waiter or, once it has waited [`FAIR_AFTER`], hands the
    /// lock to it. For holders that borrow the store (so it cannot have been
    /// dropped); a guard uses [`unlock_owned`](Self::unlock_owned).
    #[inline]
    pub(crate) fn unlock(&self) {
        let orphaned = self.unlock_owned();
        debug_assert!(!orphaned, "only a guard can outlive its store");
    }

    /// [`unlock`](Self::unlock) for a guard, which may outlive its store.
    /// Returns `true` if the store was dropped meanwhile: the caller must
    /// then drop the reference to the slot that the store left for it.
    #[inline]
    #[must_use]
    pub(crate) fn unlock_owned(&self) -> bool {
        // Release: pairs with the Acquire CAS in `try_lock` / `enqueue`.
        match self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => false,
            Err(_) => self.unlock_slow(),
        }
    }

    /// The store is being dropped: if somebody (necessarily a guard, since
    /// every other holder borrows the store) holds the lock, marks it
    /// `ORPHAN` and returns `true`; the caller then leaves one reference to
    /// the slot for that holder's release to drop. `false`: nobody holds it.
    pub(crate) fn orphan(&self) -> bool {
        // Relaxed: the CAS below re-reads the word.
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & LOCKED == 0 {
                return false;
            }
            // Release: pairs with the Acquire load in `unlock_slow`, so the
            // reference the caller took before this is counted before the
            // holder drops it.
            match self
                .state
                .compare_exchange(s, s | ORPHAN, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => s = actual,
            }
        }
    }

    #[cold]
    fn unlock_slow(&self) -> bool {
        // Acquire: pairs with the Release CAS in `orphan`.
        if self.state.load(Ordering::Acquire) & ORPHAN != 0 {
            // The store is gone, and with it every way to wait for this
            // lock: nobody else will touch it. Relaxed: no one reads it.
            self.state.store(LOCKED | DEAD | ORPHAN, Ordering::Relaxed);
            return true;
        }
        let mut queue = self.queue.lock();
        let wake = match queue.front() {
            None => {
                // Nobody is left (they cancelled): free the lock, keeping
                // DEAD if set. Release: pairs with the next acquirer's
                // Acquire CAS.
                self.state.fetch_and(!(LOCKED | QUEUED), Ordering::Release);
                Wake::Nobody
            }
            Some(head) if handoff_due(&head.since) => {
                let next = queue.pop_front().expect("has a head");
                if queue.is_empty() {
                    // Relaxed: QUEUED is only read by CASes that are
                    // ordered with this one by the queue mutex or by
                    // coherence of the lock word.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }
                // LOCKED stays set: ownership moves to `next`.
                next.complete(GRANTED)
            }
            Some(_) => {
                let next = queue.pop_front().expect("has a head");
                let clear = if queue.is_empty() {
                    LOCKED | QUEUED
                } else {
                    LOCKED
                };
                // Free the lock; `next` competes for it. Release: pairs with
                // the Acquire CAS of whoever takes it next.
                self.state.fetch_and(!clear, Ordering::Release);
                next.complete(WOKEN)
            }
        };
        drop(queue);
        wake.wake();
        false
    }

    /// Takes a waiter out of the queue. Returns `true` if the lock had
    /// already been handed to it: the caller owns the lock and must use or
    /// release it. A waiter that had been woken passes the wake-up on.
    pub(crate) fn cancel(&self, waiter: &Arc<Waiter>) -> bool {
        let mut queue = self.queue.lock();
        // Acquire: as in `Waiter::state`; under the mutex the value is
        // final for this decision (all transitions happen under it).
        let wake = match waiter.state.load(Ordering::Acquire) {
            WAITING => {
                if let Some(pos) = queue.iter().position(|w| Arc::ptr_eq(w, waiter)) {
                    queue.remove(pos);
                }
                if queue.is_empty() {
                    // Relaxed: see `unlock_slow`.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }
                waiter.state.store(CANCELLED, Ordering::Relaxed);
                Wake::Nobody
            }
            GRANTED => return true,
            WOKEN => {
                waiter.state.store(CANCELLED, Ordering::Relaxed);
                // The release that woke us freed the lock and counted on us
                // to take it. If it is still free, the next waiter must try
                // instead, or it could sleep with nobody left to wake it.
                // Relaxed: the lock word's QUEUED/queue pair is guarded by
                // the mutex we hold; a LOCKED seen here means its holder's
                // release will find the queue.
                if self.state.load(Ordering::Relaxed) & LOCKED == 0 {
                    match queue.pop_front() {
                        Some(next) => {
                            if queue.is_empty() {
                                // Relaxed: see `unlock_slow`.
                                self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                            }
                            next.complete(WOKEN)
                        }
                        None => Wake::Nobody,
                    }
                } else {
                    Wake::Nobody
                }
            }
            _ => Wake::Nobody,
        };
        drop(queue);
        wake.wake();
        false
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
