//! # Internals of the in-memory engine
//!
//! ```text
//! InMemoryContextStorage
//!   papaya::HashMap<(TypeId, Uuid), Arc<dyn Any>>   lock-free table, seize collector (shared)
//!     └─ Arc<Slot<T>>
//!          current: AtomicPtr<Inner<T>>     committed version (readers)
//!          lock:    AtomicU64               LOCKED | QUEUED | DEAD | ORPHAN | WATCHED
//!                   Mutex<List>             intrusive wait queue, used only under contention
//!                   Mutex<List>             intrusive watch list, used only while somebody watches
//!          held:    spare, limbo            lock holder only
//!   Inner<T>: refs (count | DRAFT) · version · value     one allocation per version
//! ```
//!
//! * **Snapshot** = table lookup (a papaya pin) + load `current` + one
//!   `fetch_add` on the version's count + a second load of `current` that
//!   validates it. No lock is touched, so a snapshot costs the same whether a
//!   writer holds the lock for 1 ns or 10 s. The increment returns the
//!   version's `DRAFT` bit atomically with it: a reader never takes a
//!   reference to an allocation that is being rewritten. The second load
//!   catches an allocation that was recycled and republished at the same
//!   address between the first load and the increment; then the reader
//!   retries with the newer pointer (so a snapshot is lock-free: it retries
//!   only when a commit lands inside its own few-instruction window).
//! * **Lock** = one CAS setting `LOCKED` (also while others wait: a free lock
//!   can be taken by anybody). After a short spin, a waiter (a task `Waker`
//!   or a `Thread`) links itself into the queue under the queue mutex,
//!   setting `QUEUED`. The waiter node lives in the waiting future or on the
//!   waiting thread's stack: a wait allocates nothing. A release
//!   that finds waiters frees the lock and wakes the oldest to compete for it;
//!   once the oldest has waited the store's fairness bound (0.5 ms by
//!   default), releases hand the lock to it directly instead. A woken waiter
//!   that loses re-queues at the front with its arrival time, so it reaches
//!   the bound; no waiter starves.
//! * **Commit** = write the version number into the draft, clear its `DRAFT`
//!   bit (`Release`), store the pointer into `current` (`Release`). The lock
//!   holder is the only writer, so there is no compare-and-swap and no
//!   bookkeeping for readers. The superseded version becomes the spare.
//! * **Draft** (first `DerefMut`, or `update_context`) = a CAS `1 ->
//!   DRAFT|1` on the spare's count: when it succeeds nobody holds the spare,
//!   and it is rewritten in place by `clone_from` (reusing the value's own
//!   buffers when `Clone` forwards `clone_from` field by field). When a
//!   snapshot still holds the spare, the slot moves it to the limbo list and
//!   allocates a fresh draft.
//! * **Limbo** = superseded versions whose slot reference must outlive every
//!   reader that may still be between loading the pointer and incrementing
//!   the count. The next acquisition through the store hands them to the
//!   table's `seize` collector, which drops them after the grace period of
//!   the lookups that pinned it. A slot's own drop happens after papaya's
//!   grace period, so it releases its versions directly.
//! * **`update_context`** = lookup, CAS, draft, run the closure, publish,
//!   release, all inside one table pin: no `Arc` of the slot and no guard
//!   object. A busy lock falls back to the waiting path.
//! * **Delete** = lock, raise the version floor of the key's stripe (one of
//!   64, each on its own cache line) to the context's
//!   version, unlink from the table, mark the lock `DEAD` and wake every
//!   waiter; they re-resolve the key (`NotFound`, or the re-created context).
//!   A re-created context starts at `floor + 1`, so versions are never
//!   reused for a key.
//! * **Watch** = a boxed waiter node linked in the slot's watch list while a
//!   `changed()` waits; the first sets `WATCHED` in the lock word (an
//!   `AcqRel` CAS), then re-reads `current`. With `WATCHED` set the release
//!   CAS `LOCKED -> 0` fails and the slow path wakes the parked watchers
//!   (before it frees the lock). A key nobody watches pays nothing; a
//!   watched key pays one wake-up per parked watcher. Delete (and the
//!   store's drop) wake every watcher, which then reads `DEAD` and ends
//!   with `NotFound`. The watch holds the slot's
//!   `Arc`, so it outlives a delete.
//!
//! ## Deferred reclamation
//!
//! A deleted slot is freed once papaya's collector reclaims the table entry
//! and the last guard of it is dropped; a value's `Drop` can run some time
//! after `delete_context` returns (papaya#31). A context costs up to two
//! values of memory (committed + spare), plus the versions snapshots hold.
//!
//! ## Why an intrusive list under a `Mutex` for the queue
//!
//! Version 1 queued an `Arc<Waiter>` (one allocation per contended wait,
//! with its own mutex around the waker) in a `VecDeque`. Now one state
//! machine (`memory::acquire::Acquire`) serves every waiting call, tasks and
//! threads alike, and carries its waiter node inline; the queue is a doubly
//! linked list of pointers to those nodes, as in tokio's `batch_semaphore`.
//! One mutex guards the list *and* every queued node's links and waker, so
//! a contended wait costs no allocation and one uncontended mutex operation
//! per enqueue and per wake-up, and every waiter state change happens under
//! that one lock, which is what makes cancellation exact (a dropped waiter
//! knows whether it was granted the lock or woken, and passes either on).
//! The loom models in `loom-tests/` check the protocol under both release
//! policies, with the nodes in loom `UnsafeCell`s (every access to a link
//! or a waker must be ordered).
