//! One acquisition of one slot's lock: the state machine behind every
//! waiting lock call.
//!
//! [`Acquire`] is the only code that waits for a lock. A task polls it (the
//! [`LockSlot`] future, behind `get_context`, `store_context`,
//! `update_context`, `delete_context` and their timeout forms); a plain
//! thread steps it and parks between steps, with an optional deadline
//! ([`lock_slot_blocking`], behind every `_blocking` call). Both drive the
//! same [`Acquire::step`]:
//!
//! ```text
//! Idle --try (spin)--> Locked | Dead
//!   \--busy: enqueue at the back--> Queued
//! Queued --GRANTED--> Locked      --KILLED--> Dead
//!   \--WOKEN: try; lost: re-queue by arrival--> Queued
//!   \--still WAITING: (task) refresh the waker under the queue mutex
//! ```
//!
//! The waiter node lives inside the `Acquire` (intrusive: no allocation per
//! wait, see `park`), so an `Acquire` is pinned once it has queued, and its
//! `Drop` is the cancellation path: it unlinks the waiter, passes on a lock
//! that was handed to it, or passes on a wake-up it will not use.

use std::future::Future;
use std::marker::PhantomPinned;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc as StdArc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use crate::memory::park::{
    Notify, Outcome, Place, RawLock, Waiter, GRANTED, KILLED, WAITING, WOKEN,
};
use crate::memory::slot::Slot;
use crate::sync::{current_thread, Since};

/// How the acquirer is woken while it waits.
#[derive(Clone, Copy)]
pub(crate) enum By<'a> {
    /// A task: the waker of the current poll.
    Task(&'a Waker),
    /// The current thread (parks between steps).
    Thread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not queued yet.
    Idle,
    /// The waiter was linked at least once and the acquisition has not
    /// finished: `Drop` must cancel.
    Queued,
    /// `Locked` or `Dead` was returned (or the wait was cancelled).
    Done,
}

/// One acquisition of `lock` (see the module docs).
pub(crate) struct Acquire {
    lock: NonNull<RawLock>,
    phase: Phase,
    waiter: Waiter,
    _pinned: PhantomPinned,
}

// SAFETY: `lock` points into a slot that is `Sync` and outlives us (the
// constructor's contract); the waiter is `Send + Sync`.
unsafe impl Send for Acquire {}
// SAFETY: `&Acquire` exposes nothing (every method takes `Pin<&mut Self>`).
unsafe impl Sync for Acquire {}

impl Acquire {
    /// An acquisition that starts now: the waiter's arrival time (from
    /// which the store's fairness bound `fair_after` runs) is taken here,
    /// since an acquisition is only created on the waiting path.
    ///
    /// # Safety
    /// `lock` outlives the returned value (it is dropped, or finishes,
    /// before the lock's slot can be freed).
    pub(crate) unsafe fn new(lock: &RawLock, fair_after: Duration) -> Self {
        Self {
            lock: NonNull::from(lock),
            phase: Phase::Idle,
            waiter: Waiter::new(Since::now(fair_after)),
            _pinned: PhantomPinned,
        }
    }

    #[inline]
    fn lock(&self) -> &RawLock {
        // SAFETY: alive for as long as we are (the constructor's contract).
        unsafe { self.lock.as_ref() }
    }

    /// Advances the acquisition: `Locked` (the caller owns the lock) or
    /// `Dead` (the slot was killed) finish it; `Busy` means wait (the task's
    /// waker or the thread is registered) and step again when woken.
    pub(crate) fn step(self: Pin<&mut Self>, by: By<'_>) -> Outcome {
        // SAFETY: nothing below moves the `Acquire` (the waiter may be
        // linked); it is only read and written in place.
        let this = unsafe { self.get_unchecked_mut() };
        let outcome = match this.phase {
            Phase::Idle => this.first(by),
            Phase::Queued => this.again(by),
            Phase::Done => panic!("lock acquisition stepped after it finished"),
        };
        if outcome != Outcome::Busy {
            this.phase = Phase::Done;
        }
        outcome
    }

    /// The first step: try (spinning briefly), then queue at the back.
    fn first(&mut self, by: By<'_>) -> Outcome {
        let tried = match by {
            By::Task(_) => self.lock().try_lock_spin(),
            By::Thread => self.spin_thread(),
        };
        if tried != Outcome::Busy {
            return tried;
        }
        let notify = match by {
            By::Task(waker) => Notify::Waker(waker.clone()),
            By::Thread => Notify::Thread(current_thread()),
        };
        // SAFETY: never linked yet, so the node is ours; written before
        // `enqueue` links it (and publishes it under the queue mutex).
        unsafe { self.waiter.with_node(|n| n.notify = notify) };
        // SAFETY: the waiter is pinned inside `self` (see `step`), and stays
        // alive until completed or cancelled (`Drop`); its node is set.
        let queued = unsafe { self.lock().enqueue(&self.waiter, Place::Back) };
        if queued == Outcome::Busy {
            self.phase = Phase::Queued;
        }
        queued
    }

    /// A step while queued: see what the waiter was given.
    fn again(&mut self, by: By<'_>) -> Outcome {
        let mut state = self.waiter.state();
        loop {
            match state {
                GRANTED => return Outcome::Locked,
                KILLED => return Outcome::Dead,
                WOKEN => {
                    // A release freed the lock for us to compete for: take
                    // it, or go back to our place in the queue (by our
                    // arrival ticket, keeping our arrival time).
                    let tried = self.lock().try_lock();
                    if tried != Outcome::Busy {
                        return tried;
                    }
                    if let By::Task(waker) = by {
                        // SAFETY: a completed (WOKEN) waiter is unlinked and
                        // ours again (`state` read it with Acquire).
                        unsafe {
                            self.waiter
                                .with_node(|n| n.notify = Notify::Waker(waker.clone()))
                        };
                    }
                    // SAFETY: as in `first`.
                    return unsafe { self.lock().enqueue(&self.waiter, Place::Arrival) };
                }
                WAITING => match by {
                    // Make sure the completion wakes this poll's waker: the
                    // state is re-read under the queue mutex, so a
                    // completion either happened first (handled above, on
                    // the next turn) or will find the new waker.
                    By::Task(waker) => match self.lock().register(&self.waiter, waker) {
                        WAITING => return Outcome::Busy,
                        now => state = now,
                    },
                    // A thread stays registered; it re-checks after each
                    // park.
                    By::Thread => return Outcome::Busy,
                },
                other => unreachable!("a queued waiter in state {other}"),
            }
        }
    }

    /// A thread's try: a short spin with backoff (it may yield the thread)
    /// before it queues.
    fn spin_thread(&self) -> Outcome {
        let tried = self.lock().try_lock();
        // No spinning in the models (every spin would have to yield).
        #[cfg(not(ctxstore_loom))]
        let tried = {
            let mut tried = tried;
            let backoff = crossbeam_utils::Backoff::new();
            // As a task's spin: not for a lock handed to a waiter.
            while tried == Outcome::Busy && !backoff.is_completed() && !self.lock().handed() {
                backoff.snooze();
                tried = self.lock().try_lock();
            }
            tried
        };
        tried
    }

    /// Gives up waiting (a timed-out thread). `Locked` if the lock was
    /// handed over before we could leave (the caller owns it), `Dead` if
    /// the slot was killed first, `Busy` otherwise. Finishes the
    /// acquisition.
    pub(crate) fn give_up(self: Pin<&mut Self>) -> Outcome {
        // SAFETY: as in `step`.
        let this = unsafe { self.get_unchecked_mut() };
        match this.cancel() {
            true => Outcome::Locked,
            false if this.waiter.state() == KILLED => Outcome::Dead,
            false => Outcome::Busy,
        }
    }

    /// Leaves the queue if still queued; `true` if the lock had been handed
    /// over (the caller owns it now).
    fn cancel(&mut self) -> bool {
        if self.phase != Phase::Queued {
            return false;
        }
        self.phase = Phase::Done;
        // SAFETY: queued on this lock by `enqueue`.
        unsafe { self.lock().cancel(&self.waiter) }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if self.cancel() {
            // We were handed the lock but will never use it: pass it on.
            self.lock().unlock();
        }
    }
}

/// Locks `slot` from a plain thread: steps an [`Acquire`], parking between
/// steps until `deadline` (if any). `Busy` means it timed out.
pub(crate) fn lock_slot_blocking<T>(
    slot: &Slot<T>,
    deadline: Option<Instant>,
    fair_after: Duration,
) -> Outcome {
    // SAFETY: the caller's borrow of `slot` outlives this frame, and with it
    // the acquisition.
    let acquire = unsafe { Acquire::new(&slot.lock, fair_after) };
    let mut acquire = std::pin::pin!(acquire);
    loop {
        let outcome = acquire.as_mut().step(By::Thread);
        if outcome != Outcome::Busy {
            return outcome;
        }
        match deadline {
            None => crate::sync::park(),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return acquire.as_mut().give_up();
                }
                crate::sync::park_timeout(deadline - now);
            }
        }
    }
}

/// How a writer that found its context's lock busy waits for it: a task
/// parks ([`Task`]: a [`LockSlot`] future), a plain thread blocks
/// ([`Thread`]: [`lock_slot_blocking`], as a future that is ready at its
/// first poll). Every writer (`store_context`, `delete_context`, the
/// conditional writes) is written once, as an `async fn` generic over
/// this: the async form awaits it with `Task`, the `_blocking` form runs it
/// with `Thread` through [`now`].
pub(crate) trait Park: Copy + Send {
    /// Waits for the lock of `slot`: the slot, locked, or `None` if it died
    /// (its context was deleted) first.
    fn lock<T: Send + Sync>(
        self,
        slot: StdArc<Slot<T>>,
        fair_after: Duration,
    ) -> impl Future<Output = Option<StdArc<Slot<T>>>> + Send;
}

/// Waits by parking the task (see [`Park`]).
#[derive(Clone, Copy)]
pub(crate) struct Task;

/// Waits by parking the thread (see [`Park`]).
#[derive(Clone, Copy)]
pub(crate) struct Thread;

impl Park for Task {
    #[inline]
    fn lock<T: Send + Sync>(
        self,
        slot: StdArc<Slot<T>>,
        fair_after: Duration,
    ) -> impl Future<Output = Option<StdArc<Slot<T>>>> + Send {
        LockSlot::new(slot, fair_after)
    }
}

impl Park for Thread {
    #[inline]
    fn lock<T: Send + Sync>(
        self,
        slot: StdArc<Slot<T>>,
        fair_after: Duration,
    ) -> impl Future<Output = Option<StdArc<Slot<T>>>> + Send {
        let locked = lock_slot_blocking(&slot, None, fair_after) == Outcome::Locked;
        std::future::ready(locked.then_some(slot))
    }
}

/// Runs a writer made with [`Thread`] waits to its end: it never returns
/// `Pending` (its only waits are ready at their first poll), so one poll
/// with a no-op waker completes it.
pub(crate) fn now<F: Future>(f: F) -> F::Output {
    let f = std::pin::pin!(f);
    match f.poll(&mut TaskContext::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("a writer that waits with `Thread` never suspends"),
    }
}

/// Locks one slot from a task. Resolves to the slot, locked, or to `None` if
/// the slot died (its context was deleted) first.
///
/// # Cancel safety
/// Dropping it while queued takes the waiter out of the queue; if the lock
/// had already been handed to it, the lock is passed on (see [`Acquire`]).
pub(crate) struct LockSlot<T> {
    // Declared first, so dropped first: it may still touch the slot's lock,
    // which `slot` keeps alive.
    acquire: Acquire,
    slot: Option<StdArc<Slot<T>>>,
}

impl<T> LockSlot<T> {
    pub(crate) fn new(slot: StdArc<Slot<T>>, fair_after: Duration) -> Self {
        Self {
            // SAFETY: the `Arc` beside it keeps the slot (and its lock) alive
            // until after the acquisition is dropped or has finished: it is
            // only taken out once `step` finished the acquisition.
            acquire: unsafe { Acquire::new(&slot.lock, fair_after) },
            slot: Some(slot),
        }
    }
}

impl<T> Future for LockSlot<T> {
    type Output = Option<StdArc<Slot<T>>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of `acquire` (never moved out); `slot`
        // is not pinned (moving the `Arc` does not move the slot).
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: as above; `this` is not moved either.
        let acquire = unsafe { Pin::new_unchecked(&mut this.acquire) };
        match acquire.step(By::Task(cx.waker())) {
            Outcome::Busy => Poll::Pending,
            Outcome::Locked => Poll::Ready(this.slot.take()),
            Outcome::Dead => {
                this.slot = None;
                Poll::Ready(None)
            }
        }
    }
}
