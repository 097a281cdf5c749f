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

#[cfg(feature = "conformance")]
pub mod conformance;
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
mod remote;
#[cfg(feature = "redis")]
pub use redis::{RedisContextStorage, RedisContextStorageBuilder};
mod snapshot;
mod storage;
mod sync;
mod util;
mod watch;

pub use context::{Context, ContextType};
pub use error::{BoxError, ContextError, ContextKey, Result};
pub use global::{
    context_storage, set_context_storage, with_context_storage, with_context_storage_blocking,
};
pub use guard::ContextGuard;
pub use memory::InMemoryContextStorage;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresContextStorage, PostgresContextStorageBuilder};
pub use snapshot::Snapshot;
pub use storage::{
    BoxFuture, ContextStorage, ContextStorageExt, ErasedValue, Lease, RawGuard, RawSnapshot, Wait,
};
pub use uuid::Uuid;
pub use watch::{ContextWatch, RawWatch, RawWatchStart};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Internals exposed only for the loom models in `loom-tests/`.
#[cfg(ctxstore_loom)]
#[doc(hidden)]
pub use memory::loom_api as __loom;
