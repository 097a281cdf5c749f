//! # Internals of the in-memory engine
//!
//! ```text
//! InMemoryContextStorage
//!   papaya::HashMap<(TypeId, Uuid), Arc<dyn Any>>   lock-free table
//!     └─ Arc<Slot<T>>
//!          current: ArcSwap<Versioned<T>>   committed version (readers)
//!          lock:    AtomicU64               LOCKED | QUEUED | DEAD
//!                   Mutex<VecDeque<Waiter>> FIFO queue, used only under contention
//!          spare:   Option<Arc<Versioned<T>>>  recycled allocation (lock holder only)
//! ```
//!
//! * **Snapshot** = table lookup + `ArcSwap::load_full`. No lock is touched,
//!   so a snapshot costs the same whether a writer holds the lock for 1 ns or
//!   10 s.
//! * **Lock** = one CAS `0 -> LOCKED`. On contention the acquirer appends a
//!   waiter (a task `Waker` or a `Thread`) under the queue mutex, setting
//!   `QUEUED`; the holder's release then hands the lock to the head waiter
//!   directly (strict FIFO, no barging, no starvation).
//! * **Commit** = compare-and-swap of `current` from the version the guard
//!   read to the new version. The guard's draft was made lazily, at the
//!   first `DerefMut`, by `clone_from` into `spare` when available.
//! * **Delete** = lock, raise the store's version floor to the context's
//!   version, unlink from the table, mark the lock `DEAD` and wake every
//!   waiter; they re-resolve the key (`NotFound`, or the re-created context).
//!   A re-created context starts at `floor + 1`, so versions are never
//!   reused for a key.
//!
//! ## Deferred reclamation
//!
//! A deleted slot is freed once papaya's collector reclaims the table entry
//! and the last guard or snapshot of it is dropped; a value's `Drop` can run
//! some time after `delete_context` returns (papaya#31). The spare
//! allocation keeps one superseded value alive per slot until the next
//! commit reuses it: a context costs up to two values of memory.
//!
//! ## Why `VecDeque` under a `Mutex` for the queue
//!
//! It allocates only when the first waiter arrives, costs one uncontended
//! mutex operation per enqueue and per hand-off, and makes every waiter
//! state change happen under one lock, which is what makes cancellation
//! exact (a dropped waiter knows whether it was granted the lock). The
//! loom models in `loom-tests/` check the protocol.
