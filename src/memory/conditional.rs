//! Conditional writes and optimistic updates (DESIGN.md §3): writes that
//! compare the committed version first.
//!
//! They are writers like `store_context`: they take the slot's lock (waiting
//! for a guard holder), compare the committed version with the expected
//! one, and publish or refuse while holding it, so the comparison and the
//! write are one step. A refused write changes nothing. The optimistic
//! update runs the caller's closure on a private copy *without* the lock,
//! then commits by comparison, so a hot key's critical section is the
//! compare and the pointer swap.

use std::future::Future;

use uuid::Uuid;

use super::acquire::{now, Park, Task, Thread};
use super::park::Outcome;
use super::slot::Slot;
use super::{not_found, Free, InMemoryContextStorage};
use crate::context::{Context, ContextType};
use crate::Result;

/// What one optimistic attempt on the uncontended path did.
enum Attempt<T, R> {
    Done(R),
    /// The committed version moved on: start over.
    Conflict,
    /// The lock is busy: commit (version, copy) on the waiting path; `R` is
    /// the result to return if that succeeds.
    Busy((u64, T, R)),
}

/// What the uncontended step of a conditional write did.
enum Now<T, R> {
    Done(Result<R>),
    /// The key is locked (or its slot died): wait, then try with this.
    Busy(T),
}

impl InMemoryContextStorage {
    /// Stores `value` as the next version only if the committed version is
    /// `expected_version`, and returns the new version. Versions are always
    /// ≥ 1, so `expected_version == 0` means "only if no context exists"
    /// (create-once, e.g. idempotent job intake).
    ///
    /// Errors: `Conflict { expected, found }` if the committed version
    /// differs (`found` is the committed one; creating over an existing
    /// context gives `expected == 0`); `NotFound` if `expected_version != 0`
    /// and no context exists. A refused write changes nothing.
    ///
    /// Like `store_context`, it waits for a guard holder, then compares.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes writes nothing.
    pub fn store_context_if<T: Context>(
        &self,
        id: Uuid,
        expected_version: u64,
        value: T,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        self.store_if_with(Task, id, expected_version, value)
    }

    /// [`store_context_if`](Self::store_context_if) for plain threads.
    pub fn store_context_if_blocking<T: Context>(
        &self,
        id: Uuid,
        expected_version: u64,
        value: T,
    ) -> Result<u64> {
        now(self.store_if_with(Thread, id, expected_version, value))
    }

    /// Deletes the context only if its committed version is
    /// `expected_version`. `Conflict { expected, found }` if it differs
    /// (`expected_version == 0`, "only if absent", conflicts with any
    /// existing context); `NotFound` if no context exists. A refused delete
    /// changes nothing. Waits for a guard holder first, like
    /// `delete_context`.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes deletes nothing.
    pub fn delete_context_if<T: Context>(
        &self,
        id: Uuid,
        expected_version: u64,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        self.delete_if_with::<T, _>(Task, id, expected_version)
    }

    /// [`delete_context_if`](Self::delete_context_if) for plain threads.
    pub fn delete_context_if_blocking<T: Context>(
        &self,
        id: Uuid,
        expected_version: u64,
    ) -> Result<()> {
        now(self.delete_if_with::<T, _>(Thread, id, expected_version))
    }

    /// Applies `f` optimistically: reads the committed version, runs `f` on
    /// a private copy **without holding the lock**, then commits the copy
    /// only if the committed version has not changed meanwhile; on a
    /// conflict it starts over from the newer version. Returns the result
    /// of the run of `f` whose copy was committed.
    ///
    /// `f` may run more than once (once per conflict), so it should only
    /// change the copy it is given. A panic in `f` commits nothing. The
    /// lock is held only to compare and publish; a guard holder is waited
    /// for at that point, like every writer. Under heavy contention on one
    /// key, `update_context` (which waits for the lock instead of retrying)
    /// does less work.
    ///
    /// # Cancel safety
    /// Dropping the future commits nothing that `f` computed in the
    /// attempt it interrupts.
    pub async fn update_context_optimistic<T: Context, R: Send>(
        &self,
        id: Uuid,
        f: impl FnMut(&mut T) -> R + Send,
    ) -> Result<R> {
        self.optimistic_with(Task, id, f).await
    }

    /// [`update_context_optimistic`](Self::update_context_optimistic) for
    /// plain threads.
    pub fn update_context_optimistic_blocking<T: Context, R>(
        &self,
        id: Uuid,
        f: impl FnMut(&mut T) -> R,
    ) -> Result<R> {
        now(self.optimistic_with(Thread, id, f))
    }

    // ------------------------------------------------------------ internals

    // ------------------------------------------------- writers, written once

    /// `store_context_if` and its `_blocking` form, waiting as `park` does.
    async fn store_if_with<T: Context, P: Park>(
        &self,
        park: P,
        id: Uuid,
        expected_version: u64,
        value: T,
    ) -> Result<u64> {
        let mut value = value;
        loop {
            let busy = match self.store_if_now(id, expected_version, value) {
                Now::Done(done) => return done,
                Now::Busy(back) => back,
            };
            // (If it was deleted meanwhile, the next round answers for an
            // absent key.)
            if let Some(slot) = self.table.get::<T>(id) {
                if let Some(slot) = park.lock(slot, self.fair_after).await {
                    return self.store_if_locked(&slot, id, expected_version, busy);
                }
            }
            value = busy;
        }
    }

    /// `delete_context_if` and its `_blocking` form, waiting as `park`
    /// does.
    async fn delete_if_with<T: Context, P: Park>(
        &self,
        park: P,
        id: Uuid,
        expected_version: u64,
    ) -> Result<()> {
        loop {
            if let Some(done) = self.delete_if_now::<T>(id, expected_version) {
                return done;
            }
            let slot = self.table.get::<T>(id).ok_or_else(|| not_found::<T>(id))?;
            if let Some(slot) = park.lock(slot, self.fair_after).await {
                return self.delete_if_locked(&slot, id, expected_version);
            }
        }
    }

    /// `update_context_optimistic` and its `_blocking` form, waiting as
    /// `park` does.
    async fn optimistic_with<T: Context, R, P: Park>(
        &self,
        park: P,
        id: Uuid,
        mut f: impl FnMut(&mut T) -> R,
    ) -> Result<R> {
        loop {
            let (expected, copy, out) = match self.optimistic_now(id, &mut f)? {
                Attempt::Done(out) => return Ok(out),
                Attempt::Conflict => continue,
                Attempt::Busy(attempt) => attempt,
            };
            match self.store_if_with(park, id, expected, copy).await {
                Ok(_) => return Ok(out),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One optimistic attempt inside one table pin: take a reference to the
    /// committed version, run `f` on a copy of it (no lock held), then, if
    /// the lock is free, compare and publish at once. `Busy` hands the
    /// changed copy to the waiting path.
    fn optimistic_now<T: Context, R>(
        &self,
        id: Uuid,
        f: &mut impl FnMut(&mut T) -> R,
    ) -> Result<Attempt<T, R>> {
        let attempt = self.table.with::<T, _>(id, |slot| {
            // SAFETY: `with` pins the collector `drain_limbo` retires into.
            let seen = unsafe { slot.load() };
            let expected = seen.version();
            let mut copy = T::clone(seen.value());
            // Dropped before the commit, so that the commit can recycle the
            // version it held.
            drop(seen);
            let out = f(&mut copy);
            match slot.lock.try_lock() {
                Outcome::Locked => match self.store_if_locked(slot, id, expected, copy) {
                    Ok(_) => Attempt::Done(out),
                    Err(_) => Attempt::Conflict,
                },
                // Held, or deleted under us (the waiting path re-resolves).
                Outcome::Busy | Outcome::Dead => Attempt::Busy((expected, copy, out)),
            }
        });
        attempt.ok_or_else(|| not_found::<T>(id))
    }

    /// The uncontended conditional store: compare and publish inside the
    /// table pin, or create the context when `expected_version == 0`.
    fn store_if_now<T: Context>(&self, id: Uuid, expected_version: u64, value: T) -> Now<T, u64> {
        let mut value = Some(value);
        let done = self.on_free_slot(id, |slot| {
            let value = value.take().expect("stored once");
            self.store_if_locked(slot, id, expected_version, value)
        });
        match (done, value) {
            (Free::Done(done), _) => Now::Done(done),
            (Free::Busy, Some(back)) => Now::Busy(back),
            (Free::Absent, Some(_)) if expected_version != 0 => Now::Done(Err(not_found::<T>(id))),
            (Free::Absent, Some(value)) => match self.insert_new(id, value) {
                Ok(version) => Now::Done(Ok(version)),
                // Another creator won: compare against what it created.
                Err(back) => Now::Busy(back),
            },
            (_, None) => unreachable!("the value is taken only when compared"),
        }
    }

    /// Compares and publishes (or refuses) on a slot the caller has locked;
    /// releases the lock either way.
    fn store_if_locked<T: Context>(
        &self,
        slot: &Slot<T>,
        id: Uuid,
        expected_version: u64,
        value: T,
    ) -> Result<u64> {
        // SAFETY: the caller holds the slot's lock.
        let found = unsafe { slot.version_locked() };
        if found != expected_version {
            slot.lock.unlock();
            return Err(ContextType::of::<T>().conflict(id, expected_version, found));
        }
        Ok(self.replace_locked(slot, value))
    }

    /// The uncontended conditional delete. `None` if the lock is busy or the
    /// slot died.
    fn delete_if_now<T: Context>(&self, id: Uuid, expected_version: u64) -> Option<Result<()>> {
        match self.on_free_slot(id, |slot: &Slot<T>| {
            self.delete_if_locked(slot, id, expected_version)
        }) {
            Free::Done(done) => Some(done),
            Free::Busy => None,
            Free::Absent => Some(Err(not_found::<T>(id))),
        }
    }

    /// Compares and unlinks (or refuses and releases) a slot the caller has
    /// locked.
    fn delete_if_locked<T: Context>(
        &self,
        slot: &Slot<T>,
        id: Uuid,
        expected_version: u64,
    ) -> Result<()> {
        // SAFETY: the caller holds the slot's lock.
        let found = unsafe { slot.version_locked() };
        if found != expected_version {
            slot.lock.unlock();
            return Err(ContextType::of::<T>().conflict(id, expected_version, found));
        }
        self.unlink_locked(id, slot);
        Ok(())
    }
}
