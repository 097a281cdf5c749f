//! Internals exposed only for the loom models in `loom-tests/`.
//!
//! The engine's protocol types are `pub(crate)`, so they cannot be
//! re-exported; this is a thin safe facade over them instead. Every method
//! forwards to the engine's own code path (`RawLock`, `Slot`, `LockSlot`,
//! `lock_slot_blocking`, `MemGuard`) and adds no synchronization of its own.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc as StdArc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use super::park::Outcome;
use super::slot::Slot as RawSlot;
use super::{lock_slot_blocking, LockSlot, MemGuard, MemWatch};
use crate::{Context, Result, Uuid};

/// Chooses what a release does for the head waiter in the models run on
/// this OS thread: hand the lock over (`true`, what happens once the
/// head has waited the fairness bound) or wake it to compete with
/// newcomers (`false`, before the bound).
pub fn set_handoff(handoff: bool) {
    crate::sync::HANDOFF.with(|h| h.set(handoff));
}

/// The release policy [`set_handoff`] chose for this OS thread.
pub fn handoff() -> bool {
    crate::sync::HANDOFF.with(|h| h.get())
}

/// Why an acquisition did not get the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `try_lock`: somebody holds it.
    Held,
    /// The slot was killed (its context deleted).
    Dead,
    /// A timed wait gave up.
    TimedOut,
}

/// A shared slot, as the table hands it out.
pub struct Slot<T>(StdArc<RawSlot<T>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Context> Slot<T> {
    /// A free slot holding `value` at `version`.
    pub fn new(value: T, version: u64) -> Self {
        Self(StdArc::new(RawSlot::new(value, version)))
    }

    /// A slot created already locked by the caller.
    pub fn new_locked(value: T, version: u64) -> (Self, Locked<T>) {
        let slot = StdArc::new(RawSlot::new_locked(value, version));
        (Self(slot.clone()), Locked(Some(slot)))
    }

    /// The committed `(version, value)`, as a snapshot reads it.
    pub fn load(&self) -> (u64, T) {
        let v = self.snapshot();
        (v.version(), T::clone(&v))
    }

    /// A snapshot sharing the committed version (the engine's
    /// `Snapshot::from_shared(slot.load())`), held as long as the caller
    /// likes.
    pub fn snapshot(&self) -> crate::Snapshot<T> {
        // SAFETY: the models never drain a slot's limbo (only the
        // store's acquisitions do), so every version it superseded stays
        // allocated until the slot itself is dropped, and we hold it.
        crate::Snapshot::from_shared(unsafe { self.0.load() })
    }

    /// The committed version, as a snapshot reads it.
    pub fn version(&self) -> u64 {
        self.snapshot().version()
    }

    pub fn is_locked(&self) -> bool {
        self.0.lock.is_locked()
    }

    pub fn is_dead(&self) -> bool {
        self.0.lock.is_dead()
    }

    /// Whether the lock is held by a waiter it was handed to (`HANDED`).
    pub fn is_handed(&self) -> bool {
        self.0.lock.handed()
    }

    /// `RawLock::try_lock`: one CAS, never queues.
    pub fn try_lock(&self) -> std::result::Result<Locked<T>, Refused> {
        match self.0.lock.try_lock() {
            Outcome::Locked => Ok(Locked(Some(self.0.clone()))),
            Outcome::Busy => Err(Refused::Held),
            Outcome::Dead => Err(Refused::Dead),
        }
    }

    /// The store's `Drop` for this slot: `orphan()`, else `close()`.
    /// Returns what `orphan()` returned (the caller then owes the holder a
    /// reference, which the models keep anyway).
    pub fn store_dropped(&self) -> bool {
        if self.0.lock.orphan() {
            true
        } else {
            self.0.lock.close();
            false
        }
    }

    /// A watch on this slot (the engine's `MemWatch`, as
    /// `watch_context` builds it).
    pub fn watch(&self) -> Watch<T> {
        // The models never drain a slot's limbo, so any collector will do
        // for the watch's pins.
        Watch(MemWatch::new(
            Uuid::nil(),
            self.0.clone(),
            StdArc::new(seize::Collector::new()),
        ))
    }

    /// The task path: the engine's `LockSlot` future.
    pub fn lock(&self) -> Lock<T> {
        Lock(Box::pin(LockSlot::new(
            self.0.clone(),
            std::time::Duration::ZERO,
        )))
    }

    /// The thread path: `lock_slot_blocking` without a deadline.
    pub fn lock_blocking(&self) -> std::result::Result<Locked<T>, Refused> {
        self.blocking(None)
    }

    /// `lock_slot_blocking` with a deadline that has already passed when
    /// the waiter first checks it: it queues (if the lock is held), then
    /// times out and cancels, racing whatever hand-off is in flight.
    pub fn lock_timeout_expired(&self) -> std::result::Result<Locked<T>, Refused> {
        self.blocking(Some(Instant::now()))
    }

    fn blocking(&self, deadline: Option<Instant>) -> std::result::Result<Locked<T>, Refused> {
        match lock_slot_blocking(&self.0, deadline, std::time::Duration::ZERO) {
            Outcome::Locked => Ok(Locked(Some(self.0.clone()))),
            Outcome::Dead => Err(Refused::Dead),
            Outcome::Busy => Err(Refused::TimedOut),
        }
    }
}

/// The engine's `LockSlot` future (boxed here so that the models can
/// poll it by hand: the engine's is pinned in its caller's future).
/// Dropping it is the engine's cancellation path.
pub struct Lock<T>(Pin<Box<LockSlot<T>>>);

impl<T> Future for Lock<T> {
    /// `None`: the slot died first.
    type Output = Option<Locked<T>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.0
            .as_mut()
            .poll(cx)
            .map(|slot| slot.map(|s| Locked(Some(s))))
    }
}

/// A held lock on a slot, not yet turned into a guard. Dropping it
/// unlocks.
pub struct Locked<T>(Option<StdArc<RawSlot<T>>>);

impl<T: Context> Locked<T> {
    fn take(mut self) -> StdArc<RawSlot<T>> {
        self.0
            .take()
            .expect("a Locked holds its slot until consumed")
    }

    /// The guard path (`get_context`): a `MemGuard` owning this lock.
    pub fn guard(self) -> Guard<T> {
        let slot = self.take();
        // SAFETY: we held the lock and hand it over; the `Arc` kept
        // beside the guard (dropped after it) keeps the slot alive, as
        // the table does in the engine.
        let guard = unsafe { MemGuard::new(&slot, Uuid::nil()) };
        Guard(guard, slot)
    }

    /// The `store_context` path on an existing slot (the engine's own
    /// `Slot::replace_and_unlock`). Returns the new version, or
    /// `Err(found)`.
    pub fn store(self, value: T) -> std::result::Result<u64, u64> {
        let slot = self.take();
        // SAFETY: `self` held the slot's lock; this releases it.
        Ok(unsafe { slot.replace_and_unlock(value) })
    }

    /// The `delete_context` path: kill the lock (never released again).
    pub fn delete(self) {
        self.take().lock.kill();
    }

    /// Releases the lock (the same as dropping it).
    pub fn unlock(self) {}

    /// A guard's release (`RawLock::unlock_owned`): `true` if the store
    /// was dropped meanwhile and left the slot's reference to this release.
    pub fn unlock_owned(self) -> bool {
        self.take().lock.unlock_owned()
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.lock.unlock();
        }
    }
}

/// The engine's guard (`MemGuard`): draft on first write, commit by
/// version compare-and-swap, roll back and unlock on drop.
pub struct Guard<T: Context>(
    MemGuard<T>,
    // Never read: it keeps the slot alive for the guard, as the table
    // does in the engine.
    #[allow(dead_code)] StdArc<RawSlot<T>>,
);

impl<T: Context> Guard<T> {
    /// The version the guard started from.
    pub fn version(&self) -> u64 {
        self.0.version()
    }

    pub fn commit(self) -> Result<u64> {
        self.0.commit()
    }

    pub fn rollback(self) {
        self.0.rollback()
    }
}

impl<T: Context> Deref for Guard<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Context> DerefMut for Guard<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The engine's watch (`MemWatch`).
pub struct Watch<T: Context>(MemWatch<T>);

impl<T: Context> Watch<T> {
    /// `MemWatch::poll_changed`: the version once it is above `after`,
    /// `Err` once the slot is dead.
    pub fn poll(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<u64>> {
        self.0
            .poll_changed(cx, after)
            .map(|r| r.map(|snap| snap.version()))
    }

    /// Waits for a version above `after`; leaves the watch list when the
    /// future is dropped (as `ContextWatch::changed` does).
    pub fn changed(&mut self, after: u64) -> Changed<'_, T> {
        Changed(self, after)
    }

    /// Leaves the watch list (`MemWatch::cancel`).
    pub fn cancel(&mut self) {
        self.0.cancel()
    }
}

/// The future of [`Watch::changed`].
pub struct Changed<'a, T: Context>(&'a mut Watch<T>, u64);

impl<T: Context> Future for Changed<'_, T> {
    type Output = Result<u64>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.0.poll(cx, this.1)
    }
}

impl<T: Context> Drop for Changed<'_, T> {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
