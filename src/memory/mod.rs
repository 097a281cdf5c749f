//! The in-memory engine: a `papaya` table of versioned slots.
//!
//! See the crate docs for the guarantees and `docs::internals` for the
//! protocol. All `unsafe` of the crate lives in this module.

mod acquire;
mod conditional;
mod erased;
mod guard;
#[cfg(ctxstore_loom)]
#[allow(missing_docs)]
pub mod loom_api;
pub(crate) mod park;
pub(crate) mod slot;
mod table;
pub(crate) mod version;
mod watch;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc as StdArc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use uuid::Uuid;

pub(crate) use self::acquire::{lock_slot_blocking, LockSlot};
use self::acquire::{now, Park, Task, Thread};
pub(crate) use self::guard::MemGuard;
use self::park::Outcome;
use self::slot::Slot;
use self::table::Table;
pub(crate) use self::version::Shared;
pub(crate) use self::watch::MemWatch;
use crate::context::{Context, ContextType};
use crate::guard::ContextGuard;
use crate::snapshot::Snapshot;
use crate::storage::Wait;
use crate::util::Finally;
use crate::Result;

/// The in-process context store: lock-free table, async-aware per-context
/// locks, snapshots that never wait.
///
/// Use it directly (its inherent methods are monomorphized: no boxing on the
/// hot path) or through `Arc<dyn ContextStorage>`. It is `Send + Sync`;
/// share it by reference or in an `Arc`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ctxstore::ContextError> {
/// use ctxstore::{Context, InMemoryContextStorage, Uuid};
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Progress { done: u64 }
/// impl Context for Progress {}
///
/// let store = InMemoryContextStorage::new();
/// let id = Uuid::new_v4();
/// store.store_context(id, Progress { done: 0 }).await?;
///
/// let mut p = store.get_context::<Progress>(id).await?;
/// p.done += 1;
/// let v = p.commit().await?;
///
/// let snap = store.snapshot::<Progress>(id)?; // never waits, no clone
/// assert_eq!((snap.done, snap.version()), (1, v));
/// # Ok(()) }
/// ```
pub struct InMemoryContextStorage {
    table: Table,
    // Creating and deleting contexts serialize per stripe of ids, and each
    // stripe keeps its own version floor: every version a deleted context
    // of the stripe ever reached is <= it, so a context re-created under
    // the same key starts above all its old versions. The stripe's mutex
    // makes a creator's read of the floor and its insert one step with
    // respect to a delete of the same key (see `insert_new`). Only create
    // and delete take it; locks, commits and snapshots never do. One cache
    // line per stripe: creates and deletes of different stripes on
    // different cores share no line (a store-wide floor was one line that
    // every delete wrote).
    create_delete: Box<[CachePadded<std::sync::Mutex<u64>>; STRIPES]>,
    // How long a queued waiter may be passed by newcomers (see
    // `with_fairness_bound`).
    fair_after: Duration,
}

/// Number of create/delete stripes.
const STRIPES: usize = 64;

impl Drop for InMemoryContextStorage {
    fn drop(&mut self) {
        // A guard holds no reference to its slot: the table's keeps it
        // alive. For each slot a guard still holds, leave one reference for
        // that guard's release to drop (`RawLock::orphan`); every other slot
        // goes with the table.
        self.table.for_each_entry(|entry| {
            // Taken before marking the lock, so the holder can never drop
            // it first.
            let keep = entry.clone();
            if entry.raw_lock().orphan() {
                std::mem::forget(keep);
            } else {
                // Nobody holds it, and nobody can take it any more: end
                // its watchers (they hold the slot, not the store).
                entry.raw_lock().close();
            }
        });
    }
}

impl Default for InMemoryContextStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryContextStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryContextStorage")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

fn not_found<T: Context>(id: Uuid) -> crate::ContextError {
    ContextType::of::<T>().not_found(id)
}

impl InMemoryContextStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty store with room for `capacity` contexts before it resizes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: Table::with_capacity(capacity),
            create_delete: Box::new(std::array::from_fn(|_| {
                CachePadded::new(std::sync::Mutex::new(0))
            })),
            fair_after: self::park::FAIR_AFTER,
        }
    }

    /// Sets the fairness bound: how long a queued waiter may be passed by
    /// callers that find the lock free (0.5 ms by default). Until then a
    /// release frees the lock and wakes the oldest waiter to compete for it
    /// (no convoy behind a hot key); once the oldest waiter has waited the
    /// bound, releases hand the lock to it directly, so no waiter starves.
    /// `Duration::ZERO` gives strict FIFO hand-off at every release (the
    /// most predictable order, the lowest throughput under contention).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let strict_fifo = ctxstore::InMemoryContextStorage::new().with_fairness_bound(Duration::ZERO);
    /// # drop(strict_fifo);
    /// ```
    pub fn with_fairness_bound(mut self, bound: Duration) -> Self {
        self.fair_after = bound;
        self
    }

    /// The number of stored contexts, of all types.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no context is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // ---------------------------------------------------------------- reads

    /// A snapshot of the committed value: never blocked by a lock
    /// holder, no clone of the value (it shares the committed version).
    #[inline]
    pub fn snapshot<T: Context>(&self, id: Uuid) -> Result<Snapshot<T>> {
        self.table
            // SAFETY: `with` pins the collector that `drain_limbo` retires
            // into for the whole closure.
            .with::<T, _>(id, |slot| Snapshot::from_shared(unsafe { slot.load() }))
            .ok_or_else(|| not_found::<T>(id))
    }

    /// The async form of [`snapshot`](Self::snapshot) (completes at once).
    ///
    /// # Cancel safety
    /// Reads only.
    pub async fn get_context_snapshot<T: Context>(&self, id: Uuid) -> Result<Snapshot<T>> {
        self.snapshot(id)
    }

    /// Whether a context of type `T` is stored under `id`.
    pub async fn contains_context<T: Context>(&self, id: Uuid) -> Result<bool> {
        Ok(self.contains::<T>(id))
    }

    /// The ids of every context of type `T` (scans the table).
    pub async fn context_ids<T: Context>(&self) -> Result<Vec<Uuid>> {
        Ok(self.ids::<T>())
    }

    pub(crate) fn contains<T: Context>(&self, id: Uuid) -> bool {
        self.table.contains::<T>(id)
    }

    pub(crate) fn ids<T: Context>(&self) -> Vec<Uuid> {
        self.table.ids::<T>()
    }

    // --------------------------------------------------------------- writes

    /// Stores `value` under `id` (creating or replacing it) and returns the
    /// new version. Waits for a current holder of the key.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes stores nothing and leaves no
    /// waiter behind.
    pub fn store_context<T: Context>(
        &self,
        id: Uuid,
        value: T,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        self.store_with(Task, id, value)
    }

    /// Locks the context for exclusive mutation; after a short spin, parks
    /// the task while another holder has it. Waiters are served in arrival
    /// order among themselves; a newcomer may take a free lock until the
    /// oldest waiter has waited the fairness bound
    /// ([`with_fairness_bound`](Self::with_fairness_bound)).
    ///
    /// # Cancel safety
    /// Dropping the future at any point neither leaks the lock nor loses a
    /// wake-up: a waiter that had just been handed the lock passes it on.
    pub fn get_context<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<ContextGuard<T>>> + Send + '_ {
        GetContext(self.lock_wait::<T>(id))
    }

    /// [`get_context`](Self::get_context) bounded by `timeout` (`Timeout`
    /// after it). A zero timeout never waits. Needs a Tokio runtime with its
    /// time driver for non-zero timeouts.
    ///
    /// # Cancel safety
    /// As for `get_context`.
    pub async fn get_context_timeout<T: Context>(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<ContextGuard<T>> {
        self.lock_async::<T>(id, Wait::timeout(timeout))
            .await
            .map(ContextGuard::from_memory)
    }

    /// Locks the context only if it is free at once (`WouldBlock` if held).
    ///
    /// # Cancel safety
    /// Completes at its first poll.
    pub async fn try_get_context<T: Context>(&self, id: Uuid) -> Result<ContextGuard<T>> {
        self.try_lock_now::<T>(id).map(ContextGuard::from_memory)
    }

    /// Locks, applies `f`, commits; returns `f`'s result. A panic in `f`
    /// commits nothing and releases the lock (the panic propagates).
    ///
    /// The shortest write path: when the lock is free, lookup, lock, copy,
    /// `f`, publish and release happen in one step, with no guard object.
    /// `f` runs while the lock is held and (on that path) while the thread
    /// is pinned in the table's reclamation collector, so keep it short:
    /// do slow work before or after, or hold a guard across `.await`.
    ///
    /// # Cancel safety
    /// As for `get_context`; once `f` has run the commit cannot be cut.
    ///
    /// The bounds (`f` and its result `Send`) are those of
    /// [`ContextStorageExt::update_context`](crate::ContextStorageExt::update_context),
    /// so code moves between the two unchanged.
    pub fn update_context<'a, T: Context, R: Send>(
        &'a self,
        id: Uuid,
        f: impl FnOnce(&mut T) -> R + Send + 'a,
    ) -> impl Future<Output = Result<R>> + Send + 'a {
        UpdateContext {
            store: self,
            id,
            f: Some(f),
            waiting: None,
        }
    }

    /// Deletes the context, after waiting for a current holder. `NotFound`
    /// for an unknown id. Tasks queued on the context then re-resolve the key:
    /// they get `NotFound`, or queue on a context re-created meanwhile.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes deletes nothing.
    pub fn delete_context<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        self.delete_with::<T, _>(Task, id)
    }

    // ------------------------------------------------------- plain threads

    /// [`get_context`](Self::get_context) for plain threads: parks the thread.
    /// Do not call from inside an async task (use `get_context`).
    pub fn get_context_blocking<T: Context>(&self, id: Uuid) -> Result<ContextGuard<T>> {
        self.lock_blocking::<T>(id, None)
            .map(ContextGuard::from_memory)
    }

    /// [`get_context_blocking`](Self::get_context_blocking) bounded by
    /// `timeout` (`Timeout` after it).
    pub fn get_context_timeout_blocking<T: Context>(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> Result<ContextGuard<T>> {
        let deadline = Instant::now().checked_add(timeout).map(|d| (d, timeout));
        self.lock_blocking::<T>(id, deadline)
            .map(ContextGuard::from_memory)
    }

    /// [`try_get_context`](Self::try_get_context) without a future.
    pub fn try_get_context_blocking<T: Context>(&self, id: Uuid) -> Result<ContextGuard<T>> {
        self.try_lock_now::<T>(id).map(ContextGuard::from_memory)
    }

    /// [`store_context`](Self::store_context) for plain threads.
    pub fn store_context_blocking<T: Context>(&self, id: Uuid, value: T) -> Result<u64> {
        now(self.store_with(Thread, id, value))
    }

    /// [`update_context`](Self::update_context) for plain threads.
    pub fn update_context_blocking<T: Context, R>(
        &self,
        id: Uuid,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R> {
        let mut f = Some(f);
        loop {
            if let Some(done) = self.update_now(id, &mut f) {
                return done;
            }
            let slot = self.table.get::<T>(id).ok_or_else(|| not_found::<T>(id))?;
            if lock_slot_blocking(&slot, None, self.fair_after) == Outcome::Locked {
                let f = f.take().expect("not run when the lock was busy");
                return Ok(self.update_acquired(&slot, id, f));
            }
            // The slot died (its context was deleted) first: re-resolve.
        }
    }

    /// [`delete_context`](Self::delete_context) for plain threads.
    pub fn delete_context_blocking<T: Context>(&self, id: Uuid) -> Result<()> {
        now(self.delete_with::<T, _>(Thread, id))
    }

    // ------------------------------------------------- writers, written once

    /// `store_context` and `store_context_blocking`, waiting as `park` does.
    async fn store_with<T: Context, P: Park>(&self, park: P, id: Uuid, value: T) -> Result<u64> {
        let mut value = value;
        loop {
            let busy = match self.store_now(id, value) {
                Stored::Done(version) => return Ok(version),
                Stored::Busy(back) => back,
                Stored::Raced(back) => {
                    value = back;
                    continue;
                }
            };
            // (If it was deleted meanwhile, the next round creates it.)
            if let Some(slot) = self.table.get::<T>(id) {
                if let Some(slot) = park.lock(slot, self.fair_after).await {
                    return Ok(self.replace_locked(&slot, busy));
                }
            }
            value = busy;
        }
    }

    /// `delete_context` and `delete_context_blocking`, waiting as `park`
    /// does.
    async fn delete_with<T: Context, P: Park>(&self, park: P, id: Uuid) -> Result<()> {
        loop {
            if let Some(done) = self.delete_now::<T>(id) {
                return done;
            }
            let slot = self.table.get::<T>(id).ok_or_else(|| not_found::<T>(id))?;
            if let Some(slot) = park.lock(slot, self.fair_after).await {
                self.unlink_locked(id, &slot);
                return Ok(());
            }
        }
    }

    // ------------------------------------------------------------ internals

    /// Called right after every acquisition through the store: hands the
    /// versions the previous holders could not recycle to the collector.
    #[inline]
    fn acquired<T: Context>(&self, slot: &Slot<T>, id: Uuid) -> MemGuard<T> {
        // SAFETY: we have just acquired the lock (so the slot is linked in
        // our table, which keeps it alive for the guard); the table's
        // collector is the one every reader pins.
        unsafe {
            slot.drain_limbo(self.table.collector());
            MemGuard::new(slot, id)
        }
    }

    /// The uncontended path every writer tries first: inside one table pin,
    /// lookup, one CAS, and `op` on the slot just locked (no reference count,
    /// no waiter). `op` takes over the lock (it keeps or releases it).
    #[inline]
    fn on_free_slot<T: Context, R>(&self, id: Uuid, op: impl FnOnce(&Slot<T>) -> R) -> Free<R> {
        let found = self.table.with::<T, _>(id, |slot| {
            (slot.lock.try_lock() == Outcome::Locked).then(|| op(slot))
        });
        match found {
            None => Free::Absent,
            Some(None) => Free::Busy,
            Some(Some(out)) => Free::Done(out),
        }
    }

    /// The uncontended acquisition. `None` if the lock is busy or the slot
    /// died (the caller takes the waiting path).
    #[inline]
    fn lock_fast<T: Context>(&self, id: Uuid) -> Option<Result<MemGuard<T>>> {
        match self.on_free_slot(id, |slot| self.acquired(slot, id)) {
            Free::Done(guard) => Some(Ok(guard)),
            Free::Busy => None,
            Free::Absent => Some(Err(not_found::<T>(id))),
        }
    }

    /// The uncontended `update_context`: run `f` on a draft, publish and
    /// unlock inside the pin (no `Arc` of the slot, no guard). `None` (with
    /// `f` untouched) when the lock is busy or the slot died: the caller
    /// waits on the slow path.
    #[inline]
    fn update_now<T: Context, R, F: FnOnce(&mut T) -> R>(
        &self,
        id: Uuid,
        f: &mut Option<F>,
    ) -> Option<Result<R>> {
        let done = self.on_free_slot(id, |slot| {
            let f = f.take().expect("taken once");
            // SAFETY: we just acquired the lock; `update_locked` releases it.
            // The table's pin keeps the slot alive for the call.
            unsafe {
                slot.drain_limbo(self.table.collector());
                self::guard::update_locked(slot, id, f)
            }
        });
        match done {
            Free::Done(out) => Some(Ok(out)),
            Free::Busy => None,
            Free::Absent => Some(Err(not_found::<T>(id))),
        }
    }

    /// `update_context`'s step once the waiting path has acquired `slot`:
    /// the same one-step update as the uncontended path (no guard object).
    fn update_acquired<T: Context, R>(
        &self,
        slot: &Slot<T>,
        id: Uuid,
        f: impl FnOnce(&mut T) -> R,
    ) -> R {
        // SAFETY: the caller has just acquired the lock, which
        // `update_locked` releases; the caller's `Arc` keeps the slot alive
        // and the table's collector is the one every reader pins.
        unsafe {
            slot.drain_limbo(self.table.collector());
            self::guard::update_locked(slot, id, f)
        }
    }

    /// The uncontended `store_context`: publish into the slot just locked,
    /// or create the context.
    #[inline]
    fn store_now<T: Context>(&self, id: Uuid, value: T) -> Stored<T> {
        let mut value = Some(value);
        let done = self.on_free_slot(id, |slot| {
            self.replace_locked(slot, value.take().expect("stored once"))
        });
        match (done, value) {
            (Free::Done(version), _) => Stored::Done(version),
            (Free::Busy, Some(back)) => Stored::Busy(back),
            (Free::Absent, Some(value)) => match self.insert_new(id, value) {
                Ok(version) => Stored::Done(version),
                Err(back) => Stored::Raced(back),
            },
            (_, None) => unreachable!("the value is taken only when stored"),
        }
    }

    /// The uncontended `delete_context`: the unlink inside the pin. `None`
    /// if the lock is busy or the slot died.
    #[inline]
    fn delete_now<T: Context>(&self, id: Uuid) -> Option<Result<()>> {
        match self.on_free_slot(id, |slot: &Slot<T>| self.unlink_locked(id, slot)) {
            Free::Done(()) => Some(Ok(())),
            Free::Busy => None,
            Free::Absent => Some(Err(not_found::<T>(id))),
        }
    }

    /// Publishes `value` into a slot the caller has locked, then unlocks it.
    fn replace_locked<T: Context>(&self, slot: &Slot<T>, value: T) -> u64 {
        // SAFETY: the caller holds the lock (this releases it); the table's
        // collector is the one every reader pins.
        unsafe {
            slot.drain_limbo(self.table.collector());
            slot.replace_and_unlock(value)
        }
    }

    /// The create/delete stripe of `id`, holding the stripe's version floor.
    /// Nothing panics while it is held except a user `Drop` run by papaya's
    /// reclamation inside `remove`, after the floor was raised, so a
    /// poisoned stripe is still consistent and poisoning is ignored.
    fn stripe(&self, id: Uuid) -> std::sync::MutexGuard<'_, u64> {
        let (hi, lo) = id.as_u64_pair();
        self.create_delete[((hi ^ lo) % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert_new<T: Context>(&self, id: Uuid, value: T) -> std::result::Result<u64, T> {
        // Reading the floor and inserting must not be split by a delete of
        // this key: one landing in between (after a racing creator made the
        // key live again) would raise the floor past `version` and unlink
        // the key, so the insert would succeed at a version that deleted
        // incarnation already used. The stripe lock makes them one step.
        let floor = self.stripe(id);
        let version = *floor + 1;
        let slot = StdArc::new(Slot::new(value, version));
        match self.table.try_insert(id, slot) {
            Ok(()) => Ok(version),
            Err(slot) => Err(StdArc::try_unwrap(slot)
                .ok()
                .and_then(Slot::into_value)
                .expect("a slot that was never inserted is unshared")),
        }
    }

    fn unlink_locked<T: Context>(&self, id: Uuid, slot: &Slot<T>) {
        // Never waited on while holding a slot lock by a creator (creators
        // take only the stripe), so holding both here cannot deadlock.
        let mut floor = self.stripe(id);
        // SAFETY: the caller holds the slot's lock.
        let version = unsafe { slot.version_locked() };
        *floor = (*floor).max(version);
        // Kill even if `remove` unwinds: papaya may reclaim an earlier
        // deleted value in there (after unlinking this entry), running a
        // user `Drop` that can panic. Queued waiters must still be failed.
        let _kill = Finally(|| slot.lock.kill());
        self.table.remove(id, slot);
    }

    pub(crate) fn try_lock_now<T: Context>(&self, id: Uuid) -> Result<MemGuard<T>> {
        loop {
            let attempt = self
                .table
                .with::<T, _>(id, |slot| match slot.lock.try_lock() {
                    Outcome::Locked => Some(Ok(self.acquired(slot, id))),
                    Outcome::Busy => Some(Err(ContextType::of::<T>().would_block(id))),
                    // Deleted under us: re-resolve the key.
                    Outcome::Dead => None,
                });
            match attempt {
                None => return Err(not_found::<T>(id)),
                Some(Some(done)) => return done,
                Some(None) => continue,
            }
        }
    }

    /// Locks the context, waiting as long as it takes (see [`LockWait`]).
    #[inline]
    pub(crate) fn lock_wait<T: Context>(&self, id: Uuid) -> LockWait<'_, T> {
        LockWait {
            store: self,
            id,
            waiting: None,
        }
    }

    pub(crate) async fn lock_async<T: Context>(&self, id: Uuid, wait: Wait) -> Result<MemGuard<T>> {
        match wait {
            Wait::Forever => self.lock_wait(id).await,
            Wait::Never => self.try_lock_now(id),
            Wait::Until(deadline, waited) => {
                let timed_out = || ContextType::of::<T>().timeout(id, waited);
                // Try first: a free lock needs no timer (and no runtime with
                // a time driver); a zero or past deadline never waits.
                match self.try_lock_now(id) {
                    Err(e) if e.is_would_block() => {
                        if waited.is_zero() || Instant::now() >= deadline {
                            return Err(timed_out());
                        }
                    }
                    done => return done,
                }
                match tokio::time::timeout_at(deadline.into(), self.lock_wait(id)).await {
                    Ok(locked) => locked,
                    Err(_) => Err(timed_out()),
                }
            }
        }
    }

    fn lock_blocking<T: Context>(
        &self,
        id: Uuid,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<MemGuard<T>> {
        loop {
            let slot = self.table.get::<T>(id).ok_or_else(|| not_found::<T>(id))?;
            match lock_slot_blocking(&slot, deadline.map(|d| d.0), self.fair_after) {
                Outcome::Locked => return Ok(self.acquired(&slot, id)),
                Outcome::Dead => continue,
                Outcome::Busy => {
                    return Err(ContextType::of::<T>()
                        .timeout(id, deadline.map_or(Duration::ZERO, |d| d.1)))
                }
            }
        }
    }
}

/// The future of `get_context` and every waiting acquisition: its first
/// poll takes the uncontended path (lookup and one CAS inside one table pin,
/// no reference count, no waiter); only a busy lock makes it wait in a
/// [`LockSlot`]. Hand-written rather than an `async fn` so that the common
/// case moves no nested future state around.
///
/// # Cancel safety
/// As `LockSlot`'s: dropping it while waiting leaves the queue, passing on
/// a lock or a wake-up it had been given.
pub(crate) struct LockWait<'a, T> {
    store: &'a InMemoryContextStorage,
    id: Uuid,
    waiting: Option<LockSlot<T>>,
}

impl<T: Context> Future for LockWait<'_, T> {
    type Output = Result<MemGuard<T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        // SAFETY: `waiting` is structurally pinned: it is only polled in
        // place and replaced by dropping it in place (`set`), never moved
        // out; `store` and `id` are plain data.
        let this = unsafe { self.get_unchecked_mut() };
        loop {
            // SAFETY: as above.
            let waiting = unsafe { Pin::new_unchecked(&mut this.waiting) };
            match waiting.as_pin_mut() {
                None => {
                    if let Some(done) = this.store.lock_fast(this.id) {
                        return Poll::Ready(done);
                    }
                    let Some(slot) = this.store.table.get::<T>(this.id) else {
                        return Poll::Ready(Err(not_found::<T>(this.id)));
                    };
                    // Not linked yet, so moving it into place is fine.
                    this.waiting = Some(LockSlot::new(slot, this.store.fair_after));
                }
                Some(waiting) => match waiting.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(locked) => {
                        // The acquisition has finished (unlinked): drop it.
                        this.waiting = None;
                        if let Some(slot) = locked {
                            return Poll::Ready(Ok(this.store.acquired(&slot, this.id)));
                        }
                        // The slot died (its context was deleted) first:
                        // re-resolve the key.
                    }
                },
            }
        }
    }
}

/// `get_context`'s future: a [`LockWait`] whose guard is wrapped for users.
struct GetContext<'a, T>(LockWait<'a, T>);

impl<T: Context> Future for GetContext<'_, T> {
    type Output = Result<ContextGuard<T>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the only field.
        unsafe { self.map_unchecked_mut(|s| &mut s.0) }
            .poll(cx)
            .map(|locked| locked.map(ContextGuard::from_memory))
    }
}

/// `update_context`'s future: the uncontended one-step update at its first
/// poll; only a busy lock makes it wait in a [`LockSlot`], after which the
/// same one-step update runs. Hand-written so that its state is just the
/// arguments and the one waiting acquisition (an `async fn` kept a second
/// copy of the waiting path's state and made every call move a larger
/// future).
///
/// # Cancel safety
/// As `LockSlot`'s; once `f` has run the commit cannot be cut.
struct UpdateContext<'a, T, F> {
    store: &'a InMemoryContextStorage,
    id: Uuid,
    f: Option<F>,
    waiting: Option<LockSlot<T>>,
}

impl<T: Context, R, F: FnOnce(&mut T) -> R> Future for UpdateContext<'_, T, F> {
    type Output = Result<R>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        // SAFETY: `waiting` is structurally pinned (polled in place, dropped
        // in place by assignment, never moved out); the other fields are not
        // pinned.
        let this = unsafe { self.get_unchecked_mut() };
        loop {
            // SAFETY: as above.
            let waiting = unsafe { Pin::new_unchecked(&mut this.waiting) };
            match waiting.as_pin_mut() {
                None => {
                    if let Some(done) = this.store.update_now(this.id, &mut this.f) {
                        return Poll::Ready(done);
                    }
                    let Some(slot) = this.store.table.get::<T>(this.id) else {
                        return Poll::Ready(Err(not_found::<T>(this.id)));
                    };
                    // Not linked yet, so moving it into place is fine.
                    this.waiting = Some(LockSlot::new(slot, this.store.fair_after));
                }
                Some(waiting) => match waiting.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(locked) => {
                        // The acquisition has finished (unlinked): drop it.
                        this.waiting = None;
                        if let Some(slot) = locked {
                            let f = this
                                .f
                                .take()
                                .expect("UpdateContext polled after completion");
                            return Poll::Ready(Ok(this.store.update_acquired(&slot, this.id, f)));
                        }
                        // The slot died (its context was deleted) first:
                        // re-resolve the key.
                    }
                },
            }
        }
    }
}

/// What [`InMemoryContextStorage::on_free_slot`] found.
enum Free<R> {
    /// The lock was free: this is what the operation returned.
    Done(R),
    /// Held by somebody (or the slot died under us): take the waiting path.
    Busy,
    /// No context of this type under the key.
    Absent,
}

/// What the uncontended `store_context` step did.
enum Stored<T> {
    Done(u64),
    /// The key is locked (or its slot died): wait, then store this.
    Busy(T),
    /// A concurrent create won the insert: try again.
    Raced(T),
}
