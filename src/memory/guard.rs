//! The engine's unboxed guard. `crate::guard::ContextGuard` wraps it.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc as StdArc;

use uuid::Uuid;

use crate::context::Context;
use crate::guard::warn_uncommitted;
use crate::memory::slot::{Base, Draft, Slot};
use crate::Result;

/// Holds a slot's lock. Reads go to the committed version (borrowed: the
/// holder is the only one who could replace it) until the first mutable
/// access makes a draft.
///
/// It holds no reference count on the slot: a slot cannot be unlinked while
/// its lock is held (delete locks first), so the table's reference keeps it
/// alive; if the store itself is dropped, its destructor leaves one
/// reference for this guard's release to drop (`RawLock::orphan`).
pub(crate) struct MemGuard<T: Context> {
    slot: NonNull<Slot<T>>,
    base: Base<T>,
    draft: Option<Draft<T>>,
    id: Uuid,
    // Invariant: while `locked`, this guard owns `slot.lock`.
    locked: bool,
}

// SAFETY: the guard owns the slot's lock (mutual exclusion) and only reaches
// the slot through `&Slot`, which is `Sync`; `T: Send + Sync`.
unsafe impl<T: Context> Send for MemGuard<T> {}
// SAFETY: `&MemGuard` only gives `&T`.
unsafe impl<T: Context> Sync for MemGuard<T> {}

impl<T: Context> MemGuard<T> {
    /// Wraps a slot whose lock the caller has just acquired.
    ///
    /// # Safety
    /// The caller holds `slot.lock` and hands it to the guard, and `slot` is
    /// linked in a store's table (true of every slot that could be locked:
    /// a deleted slot's lock is dead) or otherwise kept alive until the
    /// guard is dropped.
    #[inline]
    pub(crate) unsafe fn new(slot: &Slot<T>, id: Uuid) -> Self {
        // SAFETY: the caller has just acquired the lock, which we now own.
        let base = unsafe { slot.base() };
        Self {
            slot: NonNull::from(slot),
            base,
            draft: None,
            id,
            locked: true,
        }
    }

    #[inline]
    fn slot(&self) -> &Slot<T> {
        // SAFETY: alive while we hold its lock (see the type's docs); we
        // stop using it once we have released the lock.
        unsafe { self.slot.as_ref() }
    }

    /// Releases the lock (the guard's last use of the slot).
    #[inline]
    fn release(&mut self) {
        self.locked = false;
        if self.slot().lock.unlock_owned() {
            // The store was dropped: drop the reference it left us.
            // SAFETY: the table held this slot as an `Arc<Slot<T>>` (coerced
            // to `Arc<dyn SlotEntry>`, same allocation and pointer), and the
            // store's destructor leaked one count of it for us.
            unsafe { StdArc::decrement_strong_count(self.slot.as_ptr()) };
        }
    }

    #[inline]
    fn base(&self) -> (u64, &T) {
        // SAFETY: `locked` (a live guard always is until consumed), and we
        // publish only in `commit`, which consumes the guard.
        unsafe { self.base.get() }
    }

    pub(crate) fn version(&self) -> u64 {
        self.base().0
    }

    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    pub(crate) fn commit(mut self) -> Result<u64> {
        let draft = match self.draft.take() {
            Some(draft) => draft,
            // SAFETY: `locked`: we hold the slot's lock; `base` is current.
            None => unsafe { self.slot().draft_from(self.base) },
        };
        // SAFETY: `locked`: we hold the slot's lock.
        let version = unsafe { self.slot().publish(draft) };
        self.release();
        Ok(version)
    }

    pub(crate) fn rollback(mut self) {
        if let Some(draft) = self.draft.take() {
            // SAFETY: `locked`: we hold the slot's lock.
            unsafe { self.slot().discard(draft) };
        }
    }
}

impl<T: Context> Deref for MemGuard<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        match &self.draft {
            Some(draft) => draft.get(),
            None => self.base().1,
        }
    }
}

impl<T: Context> DerefMut for MemGuard<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        if self.draft.is_none() {
            // SAFETY: `locked`: we hold the slot's lock; `base` is current.
            self.draft = Some(unsafe { self.slot().draft_from(self.base) });
        }
        self.draft.as_mut().expect("just made").get_mut()
    }
}

impl<T: Context> Drop for MemGuard<T> {
    fn drop(&mut self) {
        if !self.locked {
            return;
        }
        if let Some(draft) = self.draft.take() {
            warn_uncommitted(std::any::type_name::<T>(), self.id);
            // SAFETY: `locked`: we hold the slot's lock.
            unsafe { self.slot().discard(draft) };
        }
        self.release();
    }
}

/// The `update_context` step on a slot the caller has locked: copy the
/// committed value into a draft, run `f` on it, publish, unlock — with no
/// guard object and no reference count touched. A panic in `f` (or in the
/// value's `Clone`) publishes nothing, logs the rollback warning like a
/// dropped guard, and still unlocks.
///
/// # Safety
/// The caller holds `slot.lock`; it is released when this returns or unwinds.
#[inline]
pub(crate) unsafe fn update_locked<T: Context, R>(
    slot: &Slot<T>,
    id: Uuid,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    /// Unlocks on every exit; on unwind also gives the draft back.
    struct Held<'a, T: Context> {
        slot: &'a Slot<T>,
        draft: Option<Draft<T>>,
        id: Uuid,
    }

    impl<T: Context> Drop for Held<'_, T> {
        fn drop(&mut self) {
            if let Some(draft) = self.draft.take() {
                warn_uncommitted(std::any::type_name::<T>(), self.id);
                // SAFETY: we hold the slot's lock until the unlock below.
                unsafe { self.slot.discard(draft) };
            }
            self.slot.lock.unlock();
        }
    }

    let mut held = Held {
        slot,
        draft: None,
        id,
    };
    // SAFETY: the caller holds the lock; `base` is its committed version.
    let draft = held.draft.insert(unsafe { slot.draft_from(slot.base()) });
    let out = f(draft.get_mut());
    let draft = held.draft.take().expect("set above");
    // SAFETY: we hold the lock (released when `held` drops, right after).
    unsafe { slot.publish(draft) };
    out
}
