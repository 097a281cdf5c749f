//! # ctxstore
//!
//! A lock-free, typed **context store**. A context is a plain Rust value (a
//! job's progress, a session's state) stored under **(context type, UUID)**.
//! Tasks and threads update contexts exclusively through owned guards that
//! may be held across `.await`, commit atomically and roll back on drop,
//! while monitors read consistent, zero-copy snapshots that never
//! wait behind a lock holder.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ctxstore::ContextError> {
//! use ctxstore::{Context, ContextGuard, InMemoryContextStorage, Snapshot, Uuid};
//!
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! struct JobContext { job_name: String, processed: u64 }
//! impl Context for JobContext {}
//!
//! let store = InMemoryContextStorage::new();
//! let id = Uuid::new_v4();
//! let v0 = store.store_context(id, JobContext { job_name: "nightly".into(), processed: 0 }).await?;
//!
//! let mut ctx: ContextGuard<JobContext> = store.get_context(id).await?; // parks if held
//! ctx.processed += 1;
//! let v1 = ctx.commit().await?;                                         // new version > v0
//! assert!(v1 > v0);
//!
//! let snap: Snapshot<JobContext> = store.get_context_snapshot(id).await?; // never waits
//! assert_eq!((snap.processed, snap.version()), (1, v1));
//!
//! store.update_context(id, |c: &mut JobContext| c.processed += 1).await?;
//! store.delete_context::<JobContext>(id).await?;
//! assert!(store.get_context_snapshot::<JobContext>(id).await.is_err_and(|e| e.is_not_found()));
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! 1. **Typed keys.** `(T, id)` and `(U, id)` are different contexts; a
//!    value is never read back as another type.
//! 2. **Exclusive mutation.** While a [`ContextGuard`] is held, no other
//!    writer (guard, `store_context`, `update_context`, `delete_context`)
//!    commits to that context. Guards are owned, `Send` and `'static`.
//! 3. **All-or-nothing commit.** A guard mutates a private copy;
//!    [`ContextGuard::commit`] publishes it as one new version. Dropping the
//!    guard (early return, `?`, panic, cancelled task) rolls back and
//!    releases the lock, with a `tracing` warning if it had changes.
//! 4. **Consistent, zero-copy snapshots that never wait.** [`Snapshot`]
//!    shares the committed version (reference-counted, like an `Arc`);
//!    reading one never touches the lock, so no lock holder can delay it.
//! 5. **Versions** only increase per key and are never reused, also across
//!    delete and re-create (compare-and-set by version is ABA-free).
//! 6. **Fair, async-aware, cancel-safe waiting.** Waiting tasks park
//!    (`Pending`), waiting threads park the thread. Fairness is bounded: a
//!    free lock can be taken by a newcomer (no convoys), but once the oldest
//!    waiter has waited 0.5 ms (see
//!    [`InMemoryContextStorage::with_fairness_bound`]) releases hand the lock
//!    to the waiters in arrival order, so none starves. Dropping a waiting
//!    future never loses a wake-up or leaks the lock. Bounded
//!    (`get_context_timeout`) and non-waiting (`try_get_context`)
//!    acquisition are available.
//! 7. **Bounded memory.** Deleting a context frees its slot and its lock.
//! 8. **Clear errors, never a panic, for bad input.** See [`ContextError`].
//! 9. **Same semantics on every backend** (shared conformance tests).
//!
//! The lock is not reentrant: a second `get_context` on a key you hold waits.
//! Use the guard you hold, or `try_get_context` / `get_context_timeout`.
//!
//! # Consistency
//!
//! Every operation on one key is linearizable. A snapshot shows exactly one
//! committed version. Operations on different keys are independent: there
//! are no multi-key transactions.
//!
//! # Performance
//!
//! Snapshot: one table lookup, two pointer loads and one reference-count
//! increment. Uncontended lock: one CAS; uncontended release: one CAS, no
//! queue touched. Commit: one `Release` store of a pointer (the holder is
//! the only writer); steady-state commits allocate nothing, because the
//! superseded version's allocation (and its buffers, through `clone_from`)
//! is rewritten in place when no reader still holds it.
//! `update_context` does lock, copy, change, publish and release in one
//! step, without a guard object.
//! See `README.md` for measurements against `dashmap`, `scc`, `papaya`.
//!
//! # Backends
//!
//! [`InMemoryContextStorage`] is the default. Behind the `redis` and
//! `postgres` cargo features the same API runs on shared backends. Code
//! written against `Arc<dyn ContextStorage>` + [`ContextStorageExt`] works
//! with all of them; [`context_storage`] returns the process-wide one.
#![deny(missing_docs, unsafe_op_in_unsafe_fn)]
#![warn(rust_2018_idioms)]

mod context;
pub mod docs;
mod error;
mod global;
mod guard;
mod memory;
mod portable;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use redis::{RedisContextStorage, RedisContextStorageBuilder};
mod storage;
mod sync;
mod util;

pub use context::{Context, ContextType};
pub use error::{BoxError, ContextError, Result};
pub use global::{
    context_storage, set_context_storage, with_context_storage, with_context_storage_blocking,
};
pub use guard::{ContextGuard, Snapshot};
pub use memory::InMemoryContextStorage;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresContextStorage, PostgresContextStorageBuilder};
pub use storage::{
    BoxFuture, ContextStorage, ContextStorageExt, ErasedValue, Lease, RawGuard, RawSnapshot, Wait,
};
pub use uuid::Uuid;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Internals exposed only for the loom models in `loom-tests/`.
///
/// The engine's protocol types are `pub(crate)`, so they cannot be
/// re-exported; this is a thin safe facade over them instead. Every method
/// forwards to the engine's own code path (`RawLock`, `Slot`, `LockSlot`,
/// `lock_slot_blocking`, `MemGuard`) and adds no synchronization of its own.
#[cfg(ctxstore_loom)]
#[doc(hidden)]
#[allow(missing_docs)]
pub mod __loom {
    use std::future::Future;
    use std::ops::{Deref, DerefMut};
    use std::pin::Pin;
    use std::sync::Arc as StdArc;
    use std::task::{Context as TaskContext, Poll};
    use std::time::Instant;

    use crate::memory::park::Outcome;
    use crate::memory::slot::Slot as RawSlot;
    use crate::memory::{lock_slot_blocking, LockSlot, MemGuard};
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

        /// `RawLock::try_lock`: one CAS, never queues.
        pub fn try_lock(&self) -> std::result::Result<Locked<T>, Refused> {
            match self.0.lock.try_lock() {
                Outcome::Locked => Ok(Locked(Some(self.0.clone()))),
                Outcome::Busy => Err(Refused::Held),
                Outcome::Dead => Err(Refused::Dead),
            }
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
}
