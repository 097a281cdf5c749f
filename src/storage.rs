//! [`ContextStorage`], the object-safe interface every backend implements,
//! and [`ContextStorageExt`], the typed methods users call.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::context::{Context, ContextType};
use crate::guard::{ContextGuard, RemoteGuard};
use crate::memory::Shared;
use crate::snapshot::{Snapshot, Versioned};
use crate::watch::{ContextWatch, RawWatchStart};
use crate::{InMemoryContextStorage, Result};

/// A boxed, `Send` future: what the object-safe interface returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A context value with its type erased (`Box<T>` for some `T: Context`).
pub type ErasedValue = Box<dyn Any + Send + Sync>;

/// How long an acquisition may wait for the current holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait as long as it takes.
    Forever,
    /// Do not wait: fail with `WouldBlock` if the context is held.
    Never,
    /// Wait until this instant, then fail with `Timeout` (carrying the
    /// duration the caller asked for).
    Until(Instant, Duration),
}

impl Wait {
    /// A bounded wait of `timeout` from now.
    pub fn timeout(timeout: Duration) -> Self {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => Wait::Until(deadline, timeout),
            // Too far in the future to represent: the same as forever.
            None => Wait::Forever,
        }
    }
}

/// A committed value with its type erased: the shared version and value
/// that [`Snapshot`] holds (build one with [`ContextType::decode_snapshot`]).
pub struct RawSnapshot(pub(crate) Box<dyn Any + Send + Sync>);

impl RawSnapshot {
    pub(crate) fn new<T: Context>(v: Versioned<T>) -> Self {
        RawSnapshot(Box::new(Shared::new(v.version, v.value)))
    }

    pub(crate) fn from_shared<T: Context>(shared: Shared<T>) -> Self {
        RawSnapshot(Box::new(shared))
    }
}

/// What a backend's `lock_raw` hands back. A backend outside this crate
/// returns [`Remote`](Self::Remote); see
/// [`docs::backend`](crate::docs::backend#rawguard-and-lease).
pub enum RawGuard {
    /// An in-process guard, already typed: a boxed `ContextGuard<T>`.
    Local(Box<dyn Any + Send>),
    /// A remote lock: the value as read, its version, and the lease that
    /// commits or releases it.
    Remote {
        /// The committed value at acquisition (a `Box<T>`).
        value: ErasedValue,
        /// Its version.
        version: u64,
        /// Commits or releases the lock.
        lease: Box<dyn Lease>,
    },
}

/// A held remote lock: what a backend's [`RawGuard::Remote`] carries.
///
/// # Releasing
///
/// * **Dropping a lease is the release.** `Drop` must start giving the
///   server-side lock back at once and must never block: spawn the I/O (a
///   release script, a `ROLLBACK`) and return. Never rely on the lock
///   expiring by itself while the server is reachable.
/// * [`release`](Self::release) is a rollback and may simply be
///   `drop(self)` (its default); a lease dropped without `release` (a guard
///   that was never built, an acquisition that failed after the lock was
///   taken) is released the same way.
/// * [`commit`](Self::commit) takes what the lease holds before it starts,
///   so nothing is released twice; the commit itself ends the lock. A
///   commit whose outcome is unknown (its reply was lost) gives the lock up
///   as a drop does.
/// * If the release cannot run at all (the runtime is gone, the server
///   unreachable), the server-side lock must still end on its own (a lease
///   expiry, a connection close).
///
/// # Committing
///
/// [`commit`](Self::commit) is fenced by the lock: it writes only if the
/// lock is still this lease's, checked in the same atomic step as the
/// write; otherwise it is `LeaseLost` and writes nothing.
///
/// This crate's Redis and PostgreSQL backends follow these rules (see
/// `src/remote/mod.rs` for how); the whole contract is in
/// [`docs::backend`](crate::docs::backend#rawguard-and-lease).
pub trait Lease: Send + 'static {
    /// Publishes `value` (a `&T` of the guard's type) as the next version if
    /// the lock is still ours, then releases it. Returns the new version.
    /// The backend encodes `value` before this returns; the future owns
    /// everything it needs.
    fn commit(self: Box<Self>, value: &(dyn Any + Send + Sync)) -> BoxFuture<'static, Result<u64>>;

    /// Releases the lock without writing (rollback). The default drops the
    /// lease, which is the release (see [Releasing](Self#releasing)).
    fn release(self: Box<Self>) {
        drop(self);
    }

    /// Resolves once the backend knows the lock is lost (a lease that
    /// expired or was taken over), so that a holder can stop early instead
    /// of learning it at commit. Never resolves by default: for a lock that
    /// cannot be lost, or a backend that cannot tell.
    fn lost(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }
}

/// The object-safe storage interface (`Arc<dyn ContextStorage>` works).
///
/// Backends implement these type-erased methods; users call the typed
/// methods of [`ContextStorageExt`], which every `ContextStorage` (sized or
/// not) has. Each method takes the type's [`ContextType`] descriptor, whose
/// `encode`/`decode` let a remote backend serialize without generics.
///
/// # Writing a backend
///
/// Implementing this trait is a supported path. The rules each method
/// must follow (and must never break), what [`RawGuard`] and [`Lease`]
/// promise, how to use [`ContextType`]'s codecs and error constructors,
/// the rules for versions, and which guarantees a backend may weaken (and
/// must then document) are in
/// [`docs::backend`](crate::docs::backend). The template is
/// `examples/custom_backend.rs`; the conformance kit (cargo feature
/// `conformance`: `ctxstore::conformance_tests!(make)`) checks a backend
/// against the contract.
pub trait ContextStorage: Send + Sync + 'static {
    /// Stores `value` (a `Box<T>`), waiting for a holder of the key if there
    /// is one; returns the new version.
    ///
    /// What must hold: `value` is encoded (`ty.encode`) before anything is
    /// written, and a value that does not encode writes nothing; the write
    /// never lands while a guard holds the key; it creates an absent
    /// context; the version it returns is above every version the key ever
    /// had (see [versions](crate::docs::backend#versions)).
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>>;

    /// Acquires the key's lock, waiting as `wait` allows.
    ///
    /// What must hold: `NotFound` for an absent key; on a held key,
    /// [`Wait::Forever`] waits (parked, not spinning) until the lock is
    /// released or the context deleted (then it re-resolves the key),
    /// [`Wait::Never`] fails at once with `WouldBlock`, and
    /// [`Wait::Until`] fails with `Timeout` carrying the asked duration
    /// once the deadline passes (a deadline already passed still takes a
    /// free lock). A remote backend returns [`RawGuard::Remote`] with the
    /// value and version as committed and a [`Lease`]. Never two holders;
    /// never a lock left behind by an error or a cancelled call.
    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>>;

    /// Reads the committed value without waiting for a holder.
    ///
    /// What must hold: `NotFound` for an absent key; only committed values
    /// (never a holder's draft, never half a write), with their version;
    /// it never waits for the lock holder.
    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>>;

    /// Deletes the context, waiting for a holder first.
    ///
    /// What must hold: `NotFound` for an absent key; afterwards reads are
    /// `NotFound`, [`ids_raw`](Self::ids_raw) no longer lists it, waiters
    /// on the key re-resolve it, watches of it end, and a later create gets
    /// a higher version.
    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>>;

    /// Stores `value` (a `Box<T>`) as the next version only if the committed
    /// version is `expected`; returns the new version.
    ///
    /// What must hold:
    /// * It is a writer: while a guard holds the key it waits for the holder
    ///   (like [`store_raw`](Self::store_raw)), then compares.
    /// * `expected == 0` means "only if no context exists" (create-once);
    ///   under concurrent creates exactly one succeeds, and a recreated
    ///   context's version stays above any version it had before.
    /// * A mismatch is `ty.conflict(id, expected, found)` with `found` the
    ///   committed version; `expected != 0` on an absent key is `NotFound`.
    /// * A refused write changes nothing (value, version, or holders).
    /// * The comparison and the write are one atomic step on the backend.
    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>>;

    /// Deletes the context only if its committed version is `expected`.
    ///
    /// What must hold: as for [`store_if_raw`](Self::store_if_raw) (waits
    /// for a holder, then compares; a refused delete changes nothing), and
    /// an absent key is `NotFound` whatever `expected` is (also for `0`);
    /// an existing one with another version (or `expected == 0`) is
    /// `ty.conflict(id, expected, found)`. A successful delete moves the
    /// version floor like [`delete_raw`](Self::delete_raw), so a later
    /// create gets a higher version.
    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>>;

    /// Whether a context of this type is stored under `id`. Does not wait
    /// for a holder.
    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>>;

    /// The ids of every context of this type (and no other type), each
    /// once, in any order. Does not wait for a holder.
    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>>;

    /// Starts watching the context: returns its committed version now and
    /// a [`RawWatch`](crate::RawWatch) that reports newer ones (see
    /// [`RawWatch`](crate::RawWatch) for what must hold). `NotFound` for an
    /// unknown id.
    ///
    /// Register for change notifications *before* reading the first
    /// version, so that a commit between the two is not missed.
    ///
    /// The default fails with a `Backend` error saying that the backend
    /// cannot watch; a backend that can implements it.
    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        let name = self.backend_name();
        Box::pin(async move {
            Err(ty.backend_message(
                Some(id),
                format!("the {name} backend cannot watch contexts"),
            ))
        })
    }

    /// A short, constant name of the backend, for logs and messages
    /// (`"memory"`, `"redis"`...).
    fn backend_name(&self) -> &'static str;

    /// The in-memory engine behind this storage, if it is one. The typed
    /// methods use it to skip type erasure and boxing entirely. A backend
    /// (or a decorator around the engine) keeps the default, `None`.
    #[doc(hidden)]
    fn as_in_memory(&self) -> Option<&InMemoryContextStorage> {
        None
    }
}

/// The typed API, for every [`ContextStorage`] (including
/// `dyn ContextStorage`). Every returned future is `Send`.
///
/// [`InMemoryContextStorage`] has inherent methods of the same names, which
/// take precedence when it is used directly; through `dyn ContextStorage`
/// these methods reach the same engine without boxing any value.
pub trait ContextStorageExt: ContextStorage {
    /// Stores `value` under `id`, creating or replacing the context, and
    /// returns its new version. Waits for a current holder of the key.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes stores nothing.
    fn store_context<T: Context>(
        &self,
        id: Uuid,
        value: T,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.store_context(id, value).await;
            }
            self.store_raw(ContextType::of::<T>(), id, Box::new(value))
                .await
        }
    }

    /// Locks the context for exclusive mutation, waiting (parked, not
    /// spinning) for a current holder.
    ///
    /// # Cancel safety
    /// Dropping the future never leaks the lock or loses a wake-up: a
    /// waiter that was handed the lock passes it on.
    fn get_context<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<ContextGuard<T>>> + Send + '_ {
        lock_typed(self, id, Wait::Forever)
    }

    /// Like [`get_context`](Self::get_context), failing with `Timeout` after
    /// `timeout`. A zero timeout fails at once if the context is held.
    ///
    /// # Cancel safety
    /// As for `get_context`.
    fn get_context_timeout<T: Context>(
        &self,
        id: Uuid,
        timeout: Duration,
    ) -> impl Future<Output = Result<ContextGuard<T>>> + Send + '_ {
        lock_typed(self, id, Wait::timeout(timeout))
    }

    /// Locks the context only if nobody holds it (`WouldBlock` otherwise).
    ///
    /// # Cancel safety
    /// As for `get_context`.
    fn try_get_context<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<ContextGuard<T>>> + Send + '_ {
        lock_typed(self, id, Wait::Never)
    }

    /// A read-only view of the committed value. Never waits for a holder.
    ///
    /// # Cancel safety
    /// Reads only; safe to drop at any point.
    fn get_context_snapshot<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<Snapshot<T>>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.snapshot(id);
            }
            let ty = ContextType::of::<T>();
            let raw = self.snapshot_raw(ty, id).await?;
            Snapshot::from_raw(ty, id, raw)
        }
    }

    /// Locks the context, applies `f` to it and commits; returns what `f`
    /// returned. A panic in `f` commits nothing and releases the lock.
    ///
    /// # Cancel safety
    /// Dropping the future before `f` ran changes nothing; `f` runs
    /// synchronously, so once it runs the commit is not interrupted by the
    /// caller (a remote commit may still be cut short, in which case it is
    /// either applied whole or not at all).
    ///
    /// The bounds are the inherent
    /// [`InMemoryContextStorage::update_context`]'s, so code moves between
    /// the two unchanged.
    fn update_context<'a, T, R, F>(
        &'a self,
        id: Uuid,
        f: F,
    ) -> impl Future<Output = Result<R>> + Send + 'a
    where
        T: Context,
        R: Send + 'a,
        F: FnOnce(&mut T) -> R + Send + 'a,
    {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.update_context(id, f).await;
            }
            let mut guard = self.get_context::<T>(id).await?;
            let out = f(&mut guard);
            guard.commit().await?;
            Ok(out)
        }
    }

    /// Deletes the context, waiting for a current holder first. `NotFound`
    /// for an unknown id.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes deletes nothing.
    fn delete_context<T: Context>(&self, id: Uuid) -> impl Future<Output = Result<()>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.delete_context::<T>(id).await;
            }
            self.delete_raw(ContextType::of::<T>(), id).await
        }
    }

    /// Stores `value` as the next version only if the committed version is
    /// `expected_version`, and returns the new version. `0` means "only if
    /// no context exists" (create-once). Waits for a guard holder, then
    /// compares.
    ///
    /// Errors: `Conflict { expected, found }` when the committed version
    /// differs (creating over an existing context gives `expected == 0`);
    /// `NotFound` when `expected_version != 0` and no context exists. A
    /// refused write changes nothing.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes writes nothing, except that
    /// a remote call already sent may still be applied whole.
    fn store_context_if<T: Context>(
        &self,
        id: Uuid,
        expected_version: u64,
        value: T,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.store_context_if(id, expected_version, value).await;
            }
            self.store_if_raw(
                ContextType::of::<T>(),
                id,
                expected_version,
                Box::new(value),
            )
            .await
        }
    }

    /// Deletes the context only if its committed version is
    /// `expected_version`. `Conflict { expected, found }` if it differs (or
    /// `expected_version == 0` and a context exists); `NotFound` if no
    /// context exists. Waits for a guard holder first.
    ///
    /// # Cancel safety
    /// As for [`store_context_if`](Self::store_context_if).
    fn delete_context_if<T: Context>(
        &self,
        id: Uuid,
        expected_version: u64,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.delete_context_if::<T>(id, expected_version).await;
            }
            self.delete_if_raw(ContextType::of::<T>(), id, expected_version)
                .await
        }
    }

    /// Applies `f` optimistically: reads the committed value, runs `f` on a
    /// private copy **without holding the lock**, then writes the copy with
    /// [`store_context_if`](Self::store_context_if) at the version it read;
    /// on `Conflict` it starts over from the newer version. Returns the
    /// result of the run of `f` whose copy was written.
    ///
    /// `f` may run more than once, so it should only change the copy it is
    /// given. A panic in `f` writes nothing. On a remote backend each
    /// attempt is one read plus one conditional write. Under heavy
    /// contention on one key, [`update_context`](Self::update_context)
    /// (which waits instead of retrying) does less work.
    ///
    /// # Cancel safety
    /// Dropping the future writes nothing that `f` computed in the attempt
    /// it interrupts, except that a conditional write already sent may
    /// still be applied whole.
    fn update_context_optimistic<'a, T, R, F>(
        &'a self,
        id: Uuid,
        f: F,
    ) -> impl Future<Output = Result<R>> + Send + 'a
    where
        T: Context,
        R: Send + 'a,
        F: FnMut(&mut T) -> R + Send + 'a,
    {
        async move {
            let mut f = f;
            if let Some(memory) = self.as_in_memory() {
                return memory.update_context_optimistic(id, f).await;
            }
            let ty = ContextType::of::<T>();
            loop {
                let raw = self.snapshot_raw(ty, id).await?;
                let snap = Snapshot::<T>::from_raw(ty, id, raw)?;
                let expected = snap.version();
                let mut copy = snap.into_owned();
                let out = f(&mut copy);
                match self.store_if_raw(ty, id, expected, Box::new(copy)).await {
                    Ok(_) => return Ok(out),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Watches the context: a [`ContextWatch`] whose
    /// [`changed`](ContextWatch::changed) returns the current version at
    /// once, then waits for each newer one (returning the newest), and
    /// `NotFound` once the context is deleted. `NotFound` for an unknown id.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes leaves nothing registered.
    fn watch_context<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<ContextWatch<T>>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return memory.watch_context::<T>(id).await;
            }
            let (first, watch) = self.watch_raw(ContextType::of::<T>(), id).await?;
            ContextWatch::from_raw(id, first, watch)
        }
    }

    /// Whether a context of type `T` is stored under `id`.
    fn contains_context<T: Context>(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<bool>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return Ok(memory.contains::<T>(id));
            }
            self.contains_raw(ContextType::of::<T>(), id).await
        }
    }

    /// The ids of every stored context of type `T`, in no particular order.
    fn context_ids<T: Context>(&self) -> impl Future<Output = Result<Vec<Uuid>>> + Send + '_ {
        async move {
            if let Some(memory) = self.as_in_memory() {
                return Ok(memory.ids::<T>());
            }
            self.ids_raw(ContextType::of::<T>()).await
        }
    }
}

impl<S: ContextStorage + ?Sized> ContextStorageExt for S {}

async fn lock_typed<S, T>(storage: &S, id: Uuid, wait: Wait) -> Result<ContextGuard<T>>
where
    S: ContextStorage + ?Sized,
    T: Context,
{
    if let Some(memory) = storage.as_in_memory() {
        return memory
            .lock_async::<T>(id, wait)
            .await
            .map(ContextGuard::from_memory);
    }
    let ty = ContextType::of::<T>();
    match storage.lock_raw(ty, id, wait).await? {
        RawGuard::Local(boxed) => match boxed.downcast::<ContextGuard<T>>() {
            Ok(guard) => Ok(*guard),
            Err(_) => Err(ty.backend_message(Some(id), "backend returned a guard of another type")),
        },
        RawGuard::Remote {
            value,
            version,
            lease,
        } => match value.downcast::<T>() {
            Ok(value) => Ok(ContextGuard::from_remote(RemoteGuard::new(
                ty, id, *value, version, lease,
            ))),
            Err(_) => Err(ty.backend_message(Some(id), "backend returned a value of another type")),
        },
    }
}

/// The in-memory engine's entry points for one type, kept in its
/// [`ContextType`] so that the engine can be driven through
/// `dyn ContextStorage` (its raw methods) without boxing values. Built by
/// `MemOps::of` in `memory/erased.rs`; with [`ContextStorage::as_in_memory`]
/// the only places outside the engine that name it.
pub(crate) struct MemOps {
    pub(crate) store: for<'a> fn(
        &'a InMemoryContextStorage,
        Uuid,
        ErasedValue,
    ) -> BoxFuture<'a, crate::Result<u64>>,
    pub(crate) lock: for<'a> fn(
        &'a InMemoryContextStorage,
        Uuid,
        Wait,
    ) -> BoxFuture<'a, crate::Result<RawGuard>>,
    pub(crate) snapshot: fn(&InMemoryContextStorage, Uuid) -> crate::Result<RawSnapshot>,
    pub(crate) delete:
        for<'a> fn(&'a InMemoryContextStorage, Uuid) -> BoxFuture<'a, crate::Result<()>>,
    pub(crate) store_if: for<'a> fn(
        &'a InMemoryContextStorage,
        Uuid,
        u64,
        ErasedValue,
    ) -> BoxFuture<'a, crate::Result<u64>>,
    pub(crate) delete_if:
        for<'a> fn(&'a InMemoryContextStorage, Uuid, u64) -> BoxFuture<'a, crate::Result<()>>,
    pub(crate) watch: fn(&InMemoryContextStorage, Uuid) -> crate::Result<RawWatchStart>,
    pub(crate) contains: fn(&InMemoryContextStorage, Uuid) -> bool,
    pub(crate) ids: fn(&InMemoryContextStorage) -> Vec<Uuid>,
}
