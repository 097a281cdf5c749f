//! One context: its committed version, its lock, and a recycled allocation.

use crate::guard::Versioned;
use crate::memory::park::RawLock;
use crate::sync::{Arc, ArcCell, UnsafeCell};
use crate::util::Finally;

/// A versioned slot.
///
/// * `current`: the committed version. Readers load it wait-free; only the
///   lock holder replaces it, by compare-and-swap from the version it read.
/// * `lock`: the lock word and its parking queue ([`RawLock`]).
/// * `spare`: an allocation of a superseded version that no reader holds any
///   more, kept for the next writer to `clone_from` into, so steady-state
///   commits allocate nothing.
pub(crate) struct Slot<T> {
    pub(crate) lock: RawLock,
    current: ArcCell<Versioned<T>>,
    // Invariant: only accessed by the holder of `lock`; when `Some`, the Arc
    // is unique (strong count 1, no weak), since it was never republished.
    spare: UnsafeCell<Option<Arc<Versioned<T>>>>,
}

// SAFETY: `spare` is the only field that is not `Sync` by itself, and it is
// only touched by the current lock holder (mutual exclusion by `lock`, whose
// acquire/release orderings order one holder's accesses before the next's).
// The values inside are `T: Send + Sync`.
unsafe impl<T: Send + Sync> Sync for Slot<T> {}
// SAFETY: as above; moving a slot moves owned `T`s, which are `Send`.
unsafe impl<T: Send + Sync> Send for Slot<T> {}

/// A version being written: a unique `Arc` and a pointer into it that keeps
/// write provenance, so `DerefMut` costs no atomic operation.
pub(crate) struct Draft<T> {
    arc: Arc<Versioned<T>>,
    ptr: std::ptr::NonNull<Versioned<T>>,
}

// SAFETY: `ptr` points into `arc`, which this draft owns uniquely; moving the
// draft moves that ownership. `T: Send + Sync` as for every context.
unsafe impl<T: Send + Sync> Send for Draft<T> {}
// SAFETY: `&Draft` only gives `&T` (through `get`).
unsafe impl<T: Send + Sync> Sync for Draft<T> {}

impl<T> Draft<T> {
    fn new(mut arc: Arc<Versioned<T>>) -> Self {
        let ptr = std::ptr::NonNull::from(Arc::get_mut(&mut arc).expect("a draft's Arc is unique"));
        Self { arc, ptr }
    }

    #[inline]
    pub(crate) fn get(&self) -> &T {
        // SAFETY: `ptr` came from `Arc::get_mut` on `arc`, which is unique and
        // is not cloned or read through `&Arc` while the draft lives.
        unsafe { &(*self.ptr.as_ptr()).value }
    }

    #[inline]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        // SAFETY: as in `get`; `&mut self` makes this the only borrow.
        unsafe { &mut (*self.ptr.as_ptr()).value }
    }

    fn into_arc(self, version: u64) -> Arc<Versioned<T>> {
        // SAFETY: as in `get`; this is the last use of `ptr`.
        unsafe { (*self.ptr.as_ptr()).version = version };
        self.arc
    }
}

impl<T> Slot<T> {
    pub(crate) fn new(value: T, version: u64) -> Self {
        Self {
            lock: RawLock::new(),
            current: ArcCell::new(Arc::new(Versioned { version, value })),
            spare: UnsafeCell::new(None),
        }
    }

    /// A slot that starts out locked (for models that create and hold).
    #[cfg(ctxstore_loom)]
    pub(crate) fn new_locked(value: T, version: u64) -> Self {
        Self {
            lock: RawLock::new_locked(),
            current: ArcCell::new(Arc::new(Versioned { version, value })),
            spare: UnsafeCell::new(None),
        }
    }

    /// The committed version (wait-free; one reference-count increment).
    #[inline]
    pub(crate) fn load(&self) -> Arc<Versioned<T>> {
        self.current.load_full()
    }

    /// The committed version number, without touching reference counts.
    #[inline]
    pub(crate) fn version(&self) -> u64 {
        self.current.with(|v| v.version)
    }

    /// Takes the recycled allocation, if any.
    ///
    /// # Safety
    /// The caller holds `lock`.
    #[inline]
    unsafe fn take_spare(&self) -> Option<Arc<Versioned<T>>> {
        // SAFETY: the caller holds the lock, which makes it the only accessor.
        self.spare.with_mut(|spare| unsafe { (*spare).take() })
    }

    /// Keeps `arc` for the next writer if nobody else holds it.
    ///
    /// # Safety
    /// The caller holds `lock`.
    #[inline]
    unsafe fn recycle(&self, mut arc: Arc<Versioned<T>>) {
        if Arc::get_mut(&mut arc).is_some() {
            // SAFETY: the caller holds the lock. `arc` is unique (get_mut),
            // and it was unpublished, so no new reference can appear.
            self.spare.with_mut(|spare| unsafe { *spare = Some(arc) });
        }
    }

    /// A draft holding a copy of `base`'s value: `clone_from` into the spare
    /// allocation when there is one (reusing the value's own buffers too),
    /// else a fresh clone.
    ///
    /// # Safety
    /// The caller holds `lock`.
    pub(crate) unsafe fn draft_from(&self, base: &Versioned<T>) -> Draft<T>
    where
        T: Clone,
    {
        // SAFETY: forwarded from the caller.
        match unsafe { self.take_spare() } {
            Some(spare) => {
                let mut draft = Draft::new(spare);
                draft.get_mut().clone_from(&base.value);
                draft
            }
            None => Draft::new(Arc::new(Versioned {
                version: base.version,
                value: base.value.clone(),
            })),
        }
    }

    /// A draft holding `value` (moved in; reuses the spare allocation).
    ///
    /// # Safety
    /// The caller holds `lock`.
    pub(crate) unsafe fn draft_with(&self, value: T) -> Draft<T> {
        // SAFETY: forwarded from the caller.
        match unsafe { self.take_spare() } {
            Some(spare) => {
                let mut draft = Draft::new(spare);
                *draft.get_mut() = value;
                draft
            }
            None => Draft::new(Arc::new(Versioned { version: 0, value })),
        }
    }

    /// Gives an unpublished draft back for reuse (rollback).
    ///
    /// # Safety
    /// The caller holds `lock`.
    pub(crate) unsafe fn discard(&self, draft: Draft<T>) {
        // SAFETY: forwarded from the caller; a draft's Arc is unique.
        unsafe { self.recycle(draft.arc) }
    }

    /// Publishes `draft` as the version after `base`, by compare-and-swap
    /// from `base`. Returns the new version, or the version found if the
    /// committed value was not `base` (which the lock rules out; kept as a
    /// check, not a code path).
    ///
    /// # Safety
    /// The caller holds `lock`.
    pub(crate) unsafe fn publish(
        &self,
        base: Arc<Versioned<T>>,
        draft: Draft<T>,
    ) -> Result<u64, u64> {
        let version = base.version + 1;
        let new = draft.into_arc(version);
        let prev = self.current.compare_and_swap(&base, new);
        if !Arc::ptr_eq(&prev, &base) {
            return Err(prev.version);
        }
        drop(base);
        // SAFETY: forwarded from the caller. `prev` is the superseded
        // version; every reader that still holds it is counted in its strong
        // count (ArcCell::compare_and_swap), so `recycle` keeps it only if
        // nobody does.
        unsafe { self.recycle(prev) };
        Ok(version)
    }

    /// Publishes `value` as the version after the committed one, then
    /// releases the lock — also when dropping the value the recycled
    /// allocation held unwinds (a user `Drop` may panic there). Returns the
    /// new version, or the version found (see [`Slot::publish`]).
    ///
    /// # Safety
    /// The caller holds `lock`; it is released when this returns or unwinds.
    pub(crate) unsafe fn replace_and_unlock(&self, value: T) -> Result<u64, u64> {
        let _unlock = Finally(|| self.lock.unlock());
        let base = self.load();
        // SAFETY: forwarded from the caller.
        let draft = unsafe { self.draft_with(value) };
        // SAFETY: forwarded from the caller.
        unsafe { self.publish(base, draft) }
    }

    /// Takes the committed value out of a slot that was never shared.
    pub(crate) fn into_value(self) -> Option<T> {
        let current = self.current.load_full();
        drop(self);
        Arc::try_unwrap(current).ok().map(|v| v.value)
    }
}
