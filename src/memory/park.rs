//! The slot's lock word and its parking queue.
//!
//! # Implementation details
//!
//! The lock is one `AtomicU64` with these bits:
//!
//! * `LOCKED`: somebody owns the slot (a guard, a store or a delete);
//! * `QUEUED`: the wait queue is not empty (changed only under the queue
//!   mutex, together with the queue);
//! * `DEAD`: the context was deleted; every acquisition fails from now on;
//! * `ORPHAN`: the store was dropped while the lock was held;
//! * `WATCHED`: somebody waits for a newer version (see "Watchers").
//!
//! Uncontended acquire is one CAS setting `LOCKED`; uncontended release is
//! one CAS `LOCKED -> 0`. Neither touches the queue. The queue is touched
//! only by waiters, by a release that sees `QUEUED`, by cancellation and by
//! delete.
//!
//! ## The queue is intrusive
//!
//! A [`Waiter`] is not allocated: it lives inside the acquisition that
//! waits (the pinned future of a task, the stack frame of a thread; see
//! `acquire`), and the queue is a doubly linked list of pointers to them
//! behind one mutex, as in tokio's `batch_semaphore`. Everything about a
//! queued waiter except its `state` (its links, how to wake it, its arrival
//! time) is read and written only under that mutex, so a wait costs no
//! allocation and takes no lock but the queue's. Two rules keep the
//! pointers valid:
//!
//! * a waiter leaves the list before its memory can go: whoever completes
//!   it (a release, a delete, a cancelling waiter passing a wake-up on)
//!   unlinks it and takes its waker under the mutex, and the `Release`
//!   store of its new state is the completer's *last* access to it; its
//!   owner frees it only after reading a completed state with `Acquire`, or
//!   after unlinking it itself under the mutex (cancellation);
//! * a waiter never moves while linked (it is pinned).
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
//!   loses it goes back to its place by arrival (ahead of everyone who
//!   queued after it, [`Place::Arrival`]), keeping its arrival time, so the
//!   head is always the oldest waiter;
//! * it has waited the bound or more: the release *hands the lock over*
//!   (`GRANTED`, `LOCKED` never cleared), so nobody can barge past it. It
//!   also marks the lock [`HANDED`]: the new holder may be a task that waits
//!   for the very worker thread a newcomer runs on, so newcomers queue at
//!   once instead of spinning (the spin is ≈ 2 µs; with every release a
//!   hand-over, spinning cut W1's throughput to a quarter of tokio's mutex).
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
//! ## Watchers
//!
//! A second list behind a second mutex links the watchers of the slot
//! (`memory::watch`): waiters for a *newer version*, not for the lock.
//! `WATCHED` in the lock word says the list is not empty. The uncontended
//! release CAS (`LOCKED -> 0`) fails when it is set, so a commit on a key
//! nobody watches costs nothing more. A release that finds `WATCHED`
//! wakes the watchers linked at that moment (in batches of 16 outside the
//! list's mutex), **before** it frees the lock: a guard holds no reference
//! to its slot, and once the lock is free a delete (and the collector) or
//! the store's drop may free the slot under the releasing thread.
//!
//! No wake-up is lost: a watcher links itself and, if it is the first,
//! sets `WATCHED` with an `AcqRel` CAS under the list's mutex, and only
//! then re-reads the committed version. A release reads the word with one
//! `AcqRel` RMW that keeps `LOCKED`, after publishing. The two RMWs are
//! ordered in the word's modification order: either the release's reads
//! `WATCHED` (and the watcher is linked, so it is woken), or the watcher's
//! CAS reads the release's RMW or a later one of its release sequence
//! (`Acquire` on `Release`) and then sees the version published before it.
//! A watcher joining a non-empty list relies on the one that set the bit,
//! through the mutex. Setting `DEAD` is an RMW everywhere (`kill`, `close`,
//! an orphaned release): a plain store could be ordered before a watcher's
//! CAS and lose the bit (the loom model `watch_racing_delete_ends_not_found`
//! caught that in a first version); each then wakes every watcher.
//!
//! A first version woke one watcher per release and let it wake the others
//! when it ran; a watch that was polled once and then kept but not polled
//! (a `Stream` whose `next()` lost a `select!`) swallowed the wake-up of
//! every other watcher. Now no watcher depends on another being polled.
//!
//! The loom models `watcher_never_misses_the_last_commit`,
//! `a_release_wakes_every_watcher_while_one_cancels`,
//! `an_idle_watch_does_not_starve_another`,
//! `a_repoll_with_a_new_waker_races_a_commit`,
//! `the_last_commit_released_through_the_queue_wakes_the_watcher`,
//! `store_drop_racing_a_watched_release` and
//! `watch_racing_delete_ends_not_found` check this.
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
//!
//! The same `Release`/`Acquire` pair on `state` (for every completed state)
//! orders the completer's last access to the waiter before its owner reuses
//! or frees it.

use std::marker::PhantomPinned;
use std::ptr;
use std::task::Waker;
use std::time::Duration;

use crate::sync::{
    handoff_due, spin_hint, spin_rounds, AtomicU64, AtomicU8, Mutex, MutexGuard, Ordering, Since,
    Thread, UnsafeCell,
};

pub(crate) const LOCKED: u64 = 1;
pub(crate) const QUEUED: u64 = 2;
pub(crate) const DEAD: u64 = 4;
/// The store was dropped while this lock was held: the holder's release
/// must drop the reference the store left for it (see `RawLock::orphan`).
pub(crate) const ORPHAN: u64 = 8;
/// The watch list is not empty (changed only under the watch mutex,
/// together with the list): a release must wake a watcher.
pub(crate) const WATCHED: u64 = 16;
/// The lock was handed to a queued waiter (and not freed since): its holder
/// may not be running yet (a woken task waits for its worker, a thread for
/// the scheduler), so a newcomer does not spin for it but queues at once.
/// Only a release changes it (set when it hands over, cleared when it frees
/// the lock), and only the holder releases, so it changes one holder at a
/// time. A hint: nothing but the spin reads it.
pub(crate) const HANDED: u64 = 32;

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
/// must try to take the lock and re-queue (by arrival) if it loses.
pub(crate) const WOKEN: u8 = 4;
/// Never queued yet (or, for a watcher: not linked).
pub(crate) const IDLE: u8 = 5;

/// How long a queued waiter may be passed by newcomers before a release
/// hands the lock to it directly (see the module docs); the default of
/// `InMemoryContextStorage::with_fairness_bound`.
pub(crate) const FAIR_AFTER: Duration = Duration::from_micros(500);

/// How a waiter is woken.
pub(crate) enum Notify {
    None,
    Waker(Waker),
    /// Registered once: a thread waiter keeps it across re-queueing.
    Thread(Thread),
}

/// One acquirer's place in a lock's queue: a task (by `Waker`) or a thread
/// (by `Thread`). It lives inside the acquisition that waits (see
/// `acquire::Acquire`), pinned while it is linked.
pub(crate) struct Waiter {
    /// Read by the owner without the mutex; written under it.
    state: AtomicU8,
    /// Under the queue mutex while linked; the owner's alone otherwise.
    node: UnsafeCell<Node>,
    _pinned: PhantomPinned,
}

pub(crate) struct Node {
    prev: *const Waiter,
    next: *const Waiter,
    pub(crate) notify: Notify,
    /// When it is owed a hand-off: the start of its acquisition's waiting
    /// path plus the store's fairness bound (kept when it re-queues after a
    /// wake-up).
    since: Since,
    /// Its arrival order in the queue (given when it first queues, kept when
    /// it re-queues after a wake-up; see [`Place::Arrival`]).
    ticket: u64,
}

// SAFETY: `node` is accessed by the owner only while the waiter is not
// linked, and by anybody else only under the mutex of the queue it is
// linked in (see the module docs); `state` is atomic. What it holds (a
// `Waker`, a `Thread`) is `Send + Sync`.
unsafe impl Send for Waiter {}
// SAFETY: as above.
unsafe impl Sync for Waiter {}

impl Waiter {
    /// A waiter that arrived at `since` (see [`Node::since`]).
    pub(crate) fn new(since: Since) -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            node: UnsafeCell::new(Node {
                prev: ptr::null(),
                next: ptr::null(),
                notify: Notify::None,
                since,
                ticket: 0,
            }),
            _pinned: PhantomPinned,
        }
    }

    /// The waiter's state. `Acquire` pairs with the `Release` store in
    /// [`complete`], so a `GRANTED` reader sees the previous holder's
    /// writes, and any completed state orders the completer's last access
    /// to the waiter before the owner reuses it.
    #[inline]
    pub(crate) fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// The owner's access to the node.
    ///
    /// # Safety
    /// The waiter is not linked (never queued, or its owner has read a
    /// completed state with [`state`](Self::state)), so nobody else touches
    /// the node; or the caller holds the mutex of the queue it is linked in.
    #[inline]
    pub(crate) unsafe fn with_node<R>(&self, f: impl FnOnce(&mut Node) -> R) -> R {
        // SAFETY: exclusive access, by the caller's contract.
        self.node.with_mut(|n| f(unsafe { &mut *n }))
    }
}

/// Completes a waiter that the caller (holding the queue mutex) has just
/// unlinked, and returns who to wake; the caller wakes outside the mutex.
///
/// # Safety
/// `w` was linked in the queue whose mutex the caller holds, and has been
/// unlinked. After this returns, the caller must not touch `w` again.
unsafe fn complete(w: *const Waiter, to: u8) -> Wake {
    // SAFETY: still alive (its owner frees it only after seeing a completed
    // state, which is stored last, below); we hold the queue mutex.
    let wake = unsafe {
        (*w).with_node(|n| match &n.notify {
            // A thread is registered once and for all: keep it, since a
            // woken waiter may re-queue and need waking again.
            Notify::Thread(t) => Wake::Thread(t.clone()),
            _ => match std::mem::replace(&mut n.notify, Notify::None) {
                Notify::Waker(w) => Wake::Task(w),
                _ => Wake::Nobody,
            },
        })
    };
    // Release: pairs with the Acquire in `Waiter::state`; publishes the
    // previous holder's writes to a `GRANTED` waiter, and orders the access
    // above before the owner frees the waiter. The last access to `w`.
    unsafe { &(*w).state }.store(to, Ordering::Release);
    wake
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

/// How many watchers a wake-up pass may complete (see
/// [`RawLock::wake_watchers`]).
#[derive(Debug, Clone, Copy)]
enum Budget {
    LinkedNow,
    All,
}

/// The outcome of every acquisition attempt, immediate or waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The caller owns the lock.
    Locked,
    /// Somebody else holds it: `try_lock` gave up, `enqueue` queued the
    /// waiter, a timed wait timed out.
    Busy,
    /// The slot was killed (its context deleted).
    Dead,
}

/// Where a waiter joins the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// A new waiter: at the back, with the next arrival ticket.
    Back,
    /// A woken waiter that lost the race for the lock: back to its place by
    /// arrival, ahead of every waiter that queued after it. Not simply the
    /// front: several waiters can be woken before any of them runs, and if
    /// each went to the front when it lost, the last to lose (not the
    /// oldest) would head the queue, and the fairness bound, which a
    /// release checks on the head, would let the oldest wait longer than
    /// the bound.
    Arrival,
}

/// The wait queue: a doubly linked list through the waiters' nodes. Only
/// touched under `RawLock::queue`'s mutex.
struct List {
    head: *const Waiter,
    tail: *const Waiter,
    /// How many waiters are linked (bounds a release's watcher wake-ups).
    len: usize,
    /// The next arrival ticket ([`Node::ticket`]).
    tickets: u64,
}

// SAFETY: the pointers are dereferenced only under the mutex that owns the
// list, and the waiters they point to are `Sync`.
unsafe impl Send for List {}

impl List {
    const fn new() -> Self {
        Self {
            head: ptr::null(),
            tail: ptr::null(),
            len: 0,
            tickets: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    fn front(&self) -> Option<*const Waiter> {
        (!self.head.is_null()).then_some(self.head)
    }

    /// # Safety (for every method below)
    /// The caller holds the list's mutex; `w` is alive, pinned, and (for
    /// `push_*`) not linked, (for `remove`) linked in this list.
    unsafe fn push_back(&mut self, w: *const Waiter) {
        let tail = self.tail;
        // SAFETY: see above.
        unsafe {
            (*w).with_node(|n| {
                n.prev = tail;
                n.next = ptr::null();
            });
            match tail.is_null() {
                true => self.head = w,
                false => (*tail).with_node(|n| n.next = w),
            }
        }
        self.tail = w;
        self.len += 1;
    }

    /// [`push_back`](Self::push_back) with the next arrival ticket.
    unsafe fn push_new(&mut self, w: *const Waiter) {
        let ticket = self.tickets;
        self.tickets += 1;
        // SAFETY: see `push_back`.
        unsafe {
            (*w).with_node(|n| n.ticket = ticket);
            self.push_back(w);
        }
    }

    /// Links `w` before the first waiter that arrived after it (see
    /// [`Place::Arrival`]). The walk passes only waiters that arrived
    /// before `w` and were woken and re-queued too, since new waiters join
    /// at the back: usually none.
    unsafe fn push_by_arrival(&mut self, w: *const Waiter) {
        // SAFETY: see `push_back`; linked waiters are alive.
        unsafe {
            let ticket = (*w).with_node(|n| n.ticket);
            let mut next = self.head;
            while !next.is_null() && (*next).with_node(|n| n.ticket) < ticket {
                next = (*next).with_node(|n| n.next);
            }
            if next.is_null() {
                return self.push_back(w);
            }
            let prev = (*next).with_node(|n| {
                let prev = n.prev;
                n.prev = w;
                prev
            });
            (*w).with_node(|n| {
                n.prev = prev;
                n.next = next;
            });
            match prev.is_null() {
                true => self.head = w,
                false => (*prev).with_node(|n| n.next = w),
            }
        }
        self.len += 1;
    }

    unsafe fn remove(&mut self, w: *const Waiter) {
        // SAFETY: see `push_back`.
        unsafe {
            let (prev, next) = (*w).with_node(|n| {
                let links = (n.prev, n.next);
                n.prev = ptr::null();
                n.next = ptr::null();
                links
            });
            match prev.is_null() {
                true => self.head = next,
                false => (*prev).with_node(|n| n.next = next),
            }
            match next.is_null() {
                true => self.tail = prev,
                false => (*next).with_node(|n| n.prev = prev),
            }
        }
        self.len -= 1;
    }

    /// Whether `w` is linked here (a walk of the list; for assertions).
    #[cfg(any(debug_assertions, ctxstore_loom))]
    fn links(&self, w: *const Waiter) -> bool {
        let mut p = self.head;
        while !p.is_null() {
            if p == w {
                return true;
            }
            // SAFETY: linked waiters are alive; the caller holds the mutex.
            p = unsafe { (*p).with_node(|n| n.next) };
        }
        false
    }

    unsafe fn pop_front(&mut self) -> Option<*const Waiter> {
        let head = self.front()?;
        // SAFETY: see `push_back`; the head is linked here.
        unsafe { self.remove(head) };
        Some(head)
    }
}

/// The lock word plus its wait queue (and the watch list, last: see
/// `Slot` for why the order is fixed).
#[repr(C)]
pub(crate) struct RawLock {
    state: AtomicU64,
    // Invariant: links exactly the `WAITING` waiters of this lock, in
    // arrival order (a woken waiter that re-queues goes back to its place
    // by arrival); non-empty exactly when `QUEUED` is set (both changed
    // under this mutex).
    queue: Mutex<List>,
    // Invariant: links exactly the `WAITING` watchers (see the module docs,
    // "Watchers"); non-empty exactly when `WATCHED` is set (both changed
    // under this mutex).
    watchers: Mutex<List>,
}

impl RawLock {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            queue: Mutex::new(List::new()),
            watchers: Mutex::new(List::new()),
        }
    }

    /// One CAS when the lock is free (also while others wait: barging is
    /// allowed, see the module docs); never queues. `Busy`: held.
    #[inline]
    pub(crate) fn try_lock(&self) -> Outcome {
        let mut s = 0;
        loop {
            // Acquire: pairs with the Release in `unlock` / `unlock_slow`,
            // so this holder sees the previous one's writes.
            match self
                .state
                .compare_exchange(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Outcome::Locked,
                Err(actual) if actual & DEAD != 0 => return Outcome::Dead,
                Err(actual) if actual & LOCKED != 0 => return Outcome::Busy,
                // Free but QUEUED: take it anyway (bounded fairness).
                Err(actual) => s = actual,
            }
        }
    }

    /// [`try_lock`](Self::try_lock), then a short spin while the lock is
    /// held (a critical section without `.await` is shorter than a park),
    /// unless it was handed to a waiter ([`HANDED`]): then its holder may be
    /// a task waiting for this very worker thread, and spinning only delays
    /// it (with strict hand-off, every acquisition spun ≈ 2 µs for nothing).
    #[inline]
    pub(crate) fn try_lock_spin(&self) -> Outcome {
        let mut outcome = self.try_lock();
        let mut round = 0;
        while outcome == Outcome::Busy && round < spin_rounds() && !self.handed() {
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

    /// Whether the lock is held by a waiter it was handed to (a hint for
    /// spinning, see [`HANDED`]).
    #[inline]
    pub(crate) fn handed(&self) -> bool {
        // Relaxed: a hint; every decision that matters is a CAS.
        self.state.load(Ordering::Relaxed) & HANDED != 0
    }

    /// Takes the lock if it is free, else links `waiter` (at `place`) and
    /// sets it `WAITING` (`Busy`).
    ///
    /// # Safety
    /// `waiter` is pinned, not linked, and stays alive until it has been
    /// completed or [`cancel`](Self::cancel)led; the caller has written its
    /// node's `notify` and `since` (it owns the node while unlinked).
    pub(crate) unsafe fn enqueue(&self, waiter: &Waiter, place: Place) -> Outcome {
        let mut queue = self.queue.lock();
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & DEAD != 0 {
                return Outcome::Dead;
            }
            if s & LOCKED == 0 {
                // Acquire: as in `try_lock`.
                match self.state.compare_exchange(
                    s,
                    s | LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Outcome::Locked,
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
                        // SAFETY: by the caller's contract; we hold the
                        // queue mutex.
                        unsafe {
                            match place {
                                Place::Back => queue.push_new(waiter),
                                Place::Arrival => queue.push_by_arrival(waiter),
                            }
                        }
                        return Outcome::Busy;
                    }
                    Err(actual) => {
                        s = actual;
                        spin_hint();
                    }
                }
            }
        }
    }

    /// Replaces the waker of a linked task waiter if it is still `WAITING`
    /// (a re-poll), and returns its state as of that decision. The state is
    /// read under the queue mutex, so a completion either happened before
    /// (the caller sees it) or will find the new waker.
    pub(crate) fn register(&self, waiter: &Waiter, waker: &Waker) -> u8 {
        let _queue = self.queue.lock();
        // Acquire: as in `Waiter::state`.
        let s = waiter.state.load(Ordering::Acquire);
        if s == WAITING {
            // SAFETY: linked in our queue, whose mutex we hold.
            unsafe {
                waiter.with_node(|n| match &n.notify {
                    Notify::Waker(w) if w.will_wake(waker) => {}
                    _ => n.notify = Notify::Waker(waker.clone()),
                })
            }
        }
        s
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
        // One RMW that keeps LOCKED, so the slot is still ours (a guard
        // holds no reference to it: once the lock is free, a delete and the
        // collector, or the store's drop, may free it under us). AcqRel.
        // Acquire: pairs with the Release CAS in `orphan`. Release: a
        // watcher whose CAS setting WATCHED comes after this RMW in the
        // word's modification order reads it (or a later RMW of its release
        // sequence) and sees the version published before this release;
        // one whose CAS came before is linked, and this RMW reads WATCHED.
        let mut s = self.state.fetch_or(0, Ordering::AcqRel);
        if s & (WATCHED | ORPHAN) == WATCHED {
            // While we still hold the lock (see above).
            self.wake_watchers(Budget::LinkedNow);
        }
        loop {
            if s & ORPHAN != 0 {
                // The store is gone, and with it every way to wait for this
                // lock: nobody else will take it. End the slot (`close`),
                // whose watchers hold the slot, not the store.
                self.close();
                return true;
            }
            if s & QUEUED != 0 {
                break;
            }
            // Nobody queued (the fast path failed on WATCHED, or on ORPHAN
            // set since): free the lock without the queue mutex. A waiter
            // queueing meanwhile sets QUEUED, and the store's drop sets
            // ORPHAN, each with a CAS that makes this one fail and look
            // again. Release: pairs with the next acquirer's Acquire CAS.
            // Acquire on failure: a word with ORPHAN, as in `orphan`.
            match self.state.compare_exchange(
                s,
                s & !(LOCKED | HANDED),
                Ordering::Release,
                Ordering::Acquire,
            ) {
                Ok(_) => return false,
                Err(actual) => s = actual,
            }
        }
        let mut queue = self.queue.lock();
        let wake = match queue.front() {
            None => {
                // Nobody is left (they cancelled): free the lock, keeping
                // DEAD if set. Release: pairs with the next acquirer's
                // Acquire CAS. Acquire: the last waiter may have cancelled
                // after we read QUEUED, and then the store may have been
                // dropped, setting ORPHAN (pairs with `orphan`'s Release).
                let before = self
                    .state
                    .fetch_and(!(LOCKED | QUEUED | HANDED), Ordering::AcqRel);
                if before & ORPHAN != 0 {
                    drop(queue);
                    // The store left us a reference, which keeps the slot
                    // alive until our caller drops it: end it as above.
                    self.close();
                    return true;
                }
                Wake::Nobody
            }
            Some(head) => {
                // SAFETY: linked in our queue, whose mutex we hold.
                let due = unsafe { (*head).with_node(|n| handoff_due(&n.since)) };
                // SAFETY: as above; `complete` is the last access.
                unsafe { queue.remove(head) };
                let last = queue.is_empty();
                if due {
                    // Set HANDED unless our own hand-over left it set, and
                    // clear QUEUED if the queue is now empty: one XOR, since
                    // both bits are known (QUEUED is set: the queue was not
                    // empty, and it changes only under the mutex we hold;
                    // HANDED changes only in the holder's release, ours).
                    // Relaxed: QUEUED is only read by CASes that are ordered
                    // with this one by the queue mutex or by coherence of
                    // the lock word; HANDED is a hint.
                    let flip = (if s & HANDED == 0 { HANDED } else { 0 })
                        | (if last { QUEUED } else { 0 });
                    if flip != 0 {
                        self.state.fetch_xor(flip, Ordering::Relaxed);
                    }
                    // LOCKED stays set: ownership moves to the head.
                    // SAFETY: unlinked just now, under the mutex.
                    unsafe { complete(head, GRANTED) }
                } else {
                    let clear = if last {
                        LOCKED | QUEUED | HANDED
                    } else {
                        LOCKED | HANDED
                    };
                    // Free the lock; the head competes for it. Release:
                    // pairs with the Acquire CAS of whoever takes it next.
                    self.state.fetch_and(!clear, Ordering::Release);
                    // SAFETY: unlinked just now, under the mutex.
                    unsafe { complete(head, WOKEN) }
                }
            }
        };
        drop(queue);
        wake.wake();
        false
    }

    /// Takes a waiter out of the queue. Returns `true` if the lock had
    /// already been handed to it: the caller owns the lock and must use or
    /// release it. A waiter that had been woken passes the wake-up on.
    /// Afterwards the waiter is unlinked and not `WAITING`.
    ///
    /// # Safety
    /// `waiter` was queued on this lock by [`enqueue`](Self::enqueue).
    pub(crate) unsafe fn cancel(&self, waiter: &Waiter) -> bool {
        let mut queue = self.queue.lock();
        // Acquire: as in `Waiter::state`; under the mutex the value is
        // final for this decision (all transitions happen under it).
        let wake = match waiter.state.load(Ordering::Acquire) {
            WAITING => {
                // SAFETY: a WAITING waiter of this lock is linked in its
                // queue (the invariant), and we hold the mutex.
                unsafe { queue.remove(waiter) };
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
                    // SAFETY: we hold the mutex.
                    match unsafe { queue.pop_front() } {
                        Some(next) => {
                            if queue.is_empty() {
                                // Relaxed: see `unlock_slow`.
                                self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                            }
                            // SAFETY: unlinked just now, under the mutex.
                            unsafe { complete(next, WOKEN) }
                        }
                        None => Wake::Nobody,
                    }
                } else {
                    Wake::Nobody
                }
            }
            _ => Wake::Nobody,
        };
        // The waiter's memory may go right after this returns: it must not
        // be linked any more. Checked in debug builds and in the loom
        // models (loom sees accesses, not frees, so a stale link would
        // otherwise only show up once the freed node is read).
        #[cfg(any(debug_assertions, ctxstore_loom))]
        assert!(!queue.links(waiter), "a cancelled waiter is still queued");
        drop(queue);
        wake.wake();
        false
    }

    /// Marks the lock dead (the caller holds it) and fails every waiter.
    /// The lock is never released afterwards. No waiter can join once
    /// `DEAD` is set.
    pub(crate) fn kill(&self) {
        let queue = self.queue.lock();
        // Release: a later acquirer or watcher that reads DEAD (with
        // Acquire or under a mutex) sees everything the deleting holder
        // did. An RMW, not a store: a watcher's CAS setting WATCHED may
        // land just before it, and must not be overwritten (the loom model
        // `watch_racing_delete_ends_not_found` caught exactly that).
        let before = self.state.fetch_or(DEAD, Ordering::Release);
        // The common case (nobody waits) wakes nobody and builds no batch.
        self.drain(&self.queue, queue, KILLED, usize::MAX, QUEUED);
        // Every watcher must now learn that the context is gone (nobody can
        // link any more: `watch` reads DEAD first). A watcher links only
        // after setting WATCHED (or finding it set), so without it nobody is
        // linked and the watch mutex is not needed.
        if before & WATCHED != 0 {
            self.wake_watchers(Budget::All);
        }
    }

    /// Completes the waiters of `list` (`mutex`'s, locked) with `outcome`,
    /// at most `left` of them, and wakes them in batches of 16 outside the
    /// mutex, without allocating. `non_empty` is the lock word's bit that
    /// says the list has someone (`QUEUED` or `WATCHED`): cleared, under
    /// the mutex, once the list is empty. Used by `kill` (every queued
    /// waiter, `KILLED`) and `wake_watchers` (`WOKEN`).
    fn drain<'a>(
        &self,
        mutex: &'a Mutex<List>,
        mut list: MutexGuard<'a, List>,
        outcome: u8,
        mut left: usize,
        non_empty: u64,
    ) {
        const BATCH: usize = 16;
        while left > 0 && !list.is_empty() {
            let mut wakes: [Wake; BATCH] = std::array::from_fn(|_| Wake::Nobody);
            for wake in &mut wakes {
                if left == 0 {
                    break;
                }
                // SAFETY: we hold the mutex.
                let Some(w) = (unsafe { list.pop_front() }) else {
                    break;
                };
                left -= 1;
                // SAFETY: unlinked just now, under the mutex.
                *wake = unsafe { complete(w, outcome) };
            }
            if list.is_empty() {
                // Relaxed: QUEUED and WATCHED are only read by RMWs (and
                // under this mutex) ordered with this one by coherence of
                // the lock word and by the mutex; a releaser that still
                // sees the bit finds an empty list under the mutex and
                // wakes nobody. No waiter joins a dead lock's queue.
                self.state.fetch_and(!non_empty, Ordering::Relaxed);
            }
            drop(list);
            for wake in wakes {
                wake.wake();
            }
            list = mutex.lock();
        }
    }

    // ------------------------------------------------------------ watchers

    /// Links `w` in the watch list with `waker` (or, if it is still linked,
    /// replaces its waker). `Dead`: the context is gone (`w` not linked).
    /// Otherwise `Busy` (linked): the caller must re-read the committed
    /// version *after* this returns, and a release that publishes later
    /// will wake it (or a watcher it woke will).
    ///
    /// # Safety
    /// `w` is pinned, linked in no other list (only ever by this method on
    /// this lock), and stays alive until it is unlinked (by
    /// [`unwatch`](Self::unwatch) or a completion).
    pub(crate) unsafe fn watch(&self, w: &Waiter, waker: &Waker) -> Outcome {
        let mut list = self.watchers.lock();
        // Relaxed: every state change of a watcher happens under this mutex.
        // Not WAITING: woken since the caller looked, or never linked: link.
        if w.state.load(Ordering::Relaxed) == WAITING {
            // Still linked (a re-poll): refresh the waker.
            // SAFETY: linked in our list, whose mutex we hold.
            unsafe {
                w.with_node(|n| match &n.notify {
                    Notify::Waker(old) if old.will_wake(waker) => {}
                    _ => n.notify = Notify::Waker(waker.clone()),
                })
            };
            return Outcome::Busy;
        }
        // Acquire: pairs with the Release RMW that set DEAD (`kill`,
        // `close`, an orphaned release), each of which then drains the list
        // under this mutex.
        let mut s = self.state.load(Ordering::Acquire);
        if s & DEAD != 0 {
            // Relaxed: unlinked; the owner's alone.
            w.state.store(IDLE, Ordering::Relaxed);
            return Outcome::Dead;
        }
        if list.is_empty() {
            loop {
                // AcqRel. Acquire: if this CAS comes after a release's RMW
                // in the word's modification order, it reads that release
                // (or a later RMW of its release sequence) and the caller's
                // next read sees the version it published. Release: orders
                // nothing the releasers need; kept so that the CAS is one
                // RMW in the order every release reads. The other case (a
                // release's RMW after this CAS) reads WATCHED and wakes.
                match self.state.compare_exchange(
                    s,
                    s | WATCHED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(actual) if actual & DEAD != 0 => {
                        // Relaxed: as above.
                        w.state.store(IDLE, Ordering::Relaxed);
                        return Outcome::Dead;
                    }
                    Err(actual) => s = actual,
                }
            }
        }
        // SAFETY: by the caller's contract; we hold the mutex.
        unsafe {
            w.with_node(|n| n.notify = Notify::Waker(waker.clone()));
            list.push_back(w);
        }
        // Relaxed: read by the owner under this mutex, or after the Release
        // store of the completion that ends this wait.
        w.state.store(WAITING, Ordering::Relaxed);
        Outcome::Busy
    }

    /// Takes `w` out of the watch list if it is linked. Afterwards `w` is
    /// unlinked and `IDLE`.
    ///
    /// # Safety
    /// `w` was only ever linked by [`watch`](Self::watch) on this lock.
    pub(crate) unsafe fn unwatch(&self, w: &Waiter) {
        // Acquire: pairs with the Release store in `complete`, so a
        // completed state is final and the completer is done with `w`.
        if w.state.load(Ordering::Acquire) == WAITING {
            let mut list = self.watchers.lock();
            // Relaxed: under the mutex, where every transition happens.
            if w.state.load(Ordering::Relaxed) == WAITING {
                // SAFETY: a WAITING watcher is linked in this list.
                unsafe { list.remove(w) };
                if list.is_empty() {
                    // Relaxed: WATCHED is only read by RMWs ordered with
                    // this one by coherence of the lock word; a release that
                    // still sees it finds an empty list under the mutex and
                    // wakes nobody.
                    self.state.fetch_and(!WATCHED, Ordering::Relaxed);
                }
            }
        }
        // Relaxed: unlinked; the owner's alone.
        w.state.store(IDLE, Ordering::Relaxed);
        #[cfg(any(debug_assertions, ctxstore_loom))]
        assert!(
            !self.watchers.lock().links(w),
            "an unwatched watcher is still linked"
        );
    }

    /// Completes the linked watchers (`WOKEN`) and wakes them (`drain`).
    /// `LinkedNow`: at most as many as are linked when it starts (a
    /// watcher that links again after its wake-up waits for a newer
    /// version, and is not woken twice by one release, so the work is
    /// bounded); `All`: until the list is empty (a dead lock, which nobody
    /// can link to any more).
    fn wake_watchers(&self, budget: Budget) {
        let list = self.watchers.lock();
        let left = match budget {
            Budget::LinkedNow => list.len,
            Budget::All => usize::MAX,
        };
        self.drain(&self.watchers, list, WOKEN, left, WATCHED);
    }

    /// Ends the slot once the store is gone: marks the lock dead (nobody
    /// can take it any more) and ends its watchers. Called by the store's
    /// drop for a lock nobody holds, and by the release of an orphaned
    /// holder (`unlock_slow`).
    pub(crate) fn close(&self) {
        // An RMW, not a store: a watcher's CAS setting WATCHED must not be
        // overwritten (see `kill`). Release: pairs with the Acquire load in
        // `watch`. A watcher links only after setting WATCHED (or finding
        // it set), so without it nobody is linked, and nobody can link once
        // DEAD is set (its CAS fails on DEAD, or its load reads it).
        if self.state.fetch_or(DEAD, Ordering::Release) & WATCHED != 0 {
            self.wake_watchers(Budget::All);
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
