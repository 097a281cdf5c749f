//! A committed version: a reference-counted allocation that a slot
//! publishes, supersedes and later rewrites in place (recycling).
//!
//! # Implementation details
//!
//! An [`Inner`] is `Arc`-like (a count of references in `refs`), plus one
//! state bit, `DRAFT`, also in `refs`:
//!
//! * `DRAFT` set: the slot's lock holder is writing the version. Nobody else
//!   may read its value.
//! * `DRAFT` clear: the version is immutable (published, or superseded and
//!   intact).
//!
//! A slot holds one reference on each version it keeps (its committed
//! version, its spare, its limbo list). Readers find the committed version
//! through the slot's `AtomicPtr` and take their own reference with one
//! `fetch_add`, which also returns the state bit *atomically with the
//! increment*:
//!
//! * `DRAFT` set: the holder is recycling the allocation (the reader loaded
//!   the pointer before two commits landed). The reader drops its reference
//!   and loads the pointer again; the value is never touched.
//! * `DRAFT` clear: the version is intact, and it cannot be rewritten while
//!   the reader's reference is counted (recycling needs the count to be
//!   exactly the slot's one reference, checked by a CAS on the same word).
//!   The reader then loads the slot's pointer once more (`Slot::load`): if
//!   it is unchanged, the version is the committed one *now*, and the
//!   publishing store happens-before the reader's next steps; otherwise a
//!   commit landed in between and the reader retries with the newer pointer.
//!   Without that second load, an allocation recycled and republished
//!   between the reader's load and increment (same address, newer value)
//!   could be returned before its own publishing store is visible to the
//!   reader, and a later snapshot by the same reader could go back a
//!   version (the loom model `store_vs_guard_vs_snapshot` caught exactly
//!   that).
//!
//! The recycling decision and the reader's increment are read-modify-writes
//! of one atomic word, so their modification order is total: no `SeqCst` and
//! no store-load fence is needed, and loom checks the protocol as written.
//!
//! The one thing the count cannot protect is the *memory* between a reader's
//! pointer load and its increment. A slot therefore never frees a version it
//! held directly while readers may be in that window: it either keeps it
//! (committed, spare) or hands its reference to the store's `seize`
//! collector (the one papaya's lookups pin), which drops it after every
//! reader pinned at that time has left (`Slot::drain_limbo`). A slot's own
//! drop happens after papaya's grace period, so it releases directly.
//!
//! ## Orderings
//!
//! * Publication: the holder's `Release` clear of `DRAFT` ([`publish`]) and
//!   its `Release` store of the slot pointer pair with a reader's `Acquire`
//!   load of the pointer and `Acquire` increment: the reader sees the value
//!   written while `DRAFT` was set. Increments that follow in the word's
//!   modification order continue the release sequence.
//! * Recycling: the holder's `Acquire` CAS `1 -> DRAFT|1` pairs with every
//!   reader's `Release` decrement, so their reads of the old value happen
//!   before the holder rewrites it.
//! * Freeing: as `Arc` (`Release` decrement, `Acquire` fence by the last).

use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::sync::{fence, AtomicUsize, Ordering, RaceCheck};

/// Set while the holder is writing the version (see the module docs).
const DRAFT: usize = 1 << (usize::BITS - 1);
/// References beyond this abort (as `Arc` does) instead of overflowing into
/// the state bit.
const MAX_REFS: usize = DRAFT >> 1;

/// One version's allocation.
pub(crate) struct Inner<T> {
    /// Reference count, plus `DRAFT`.
    refs: AtomicUsize,
    /// Loom's data-race check on `version` and `value` (a no-op otherwise).
    race: RaceCheck,
    /// Written only while `DRAFT` is set, by the lock holder.
    version: u64,
    /// Written only while `DRAFT` is set, by the lock holder.
    value: T,
    /// The slot's limbo list (see `Slot`): touched only by the lock holder,
    /// or by the slot's destructor.
    pub(crate) next: *mut Inner<T>,
}

impl<T> Inner<T> {
    /// A new version, owned by the caller as a draft (one reference,
    /// `DRAFT` set: not yet readable by anybody else).
    pub(crate) fn draft(version: u64, value: T) -> NonNull<Self> {
        NonNull::from(Box::leak(Box::new(Inner {
            refs: AtomicUsize::new(DRAFT | 1),
            race: RaceCheck::new(),
            version,
            value,
            next: std::ptr::null_mut(),
        })))
    }

    /// Frees a version through its last reference and returns its value.
    ///
    /// # Safety
    /// `p` is the only reference to a version that came from [`Inner::draft`].
    pub(crate) unsafe fn into_value(p: NonNull<Self>) -> T {
        // SAFETY: forwarded from the caller.
        unsafe { Box::from_raw(p.as_ptr()) }.value
    }
}

/// Publishes a draft: clears `DRAFT`. The caller then stores the pointer in
/// the slot with `Release`.
///
/// # Safety
/// `p` is a live draft the caller owns (its holder).
#[inline]
pub(crate) unsafe fn publish<T>(p: NonNull<Inner<T>>) {
    // Release: pairs with a reader's Acquire increment in `Slot::load`
    // (the value written during the draft is visible to it).
    // SAFETY: the caller owns a reference to `p`.
    unsafe { p.as_ref() }
        .refs
        .fetch_and(!DRAFT, Ordering::Release);
}

/// Tries to turn a superseded version back into a draft: succeeds only if
/// the caller's reference is the only one (no snapshot holds it).
///
/// # Safety
/// `p` is live and the caller holds one reference to it (the slot's), and it
/// holds the slot's lock (the only recycler).
#[inline]
pub(crate) unsafe fn try_recycle<T>(p: NonNull<Inner<T>>) -> bool {
    // SAFETY: the caller holds a reference to `p`.
    let refs = unsafe { &p.as_ref().refs };
    // Relaxed: only lock holders set or clear DRAFT, and the lock orders
    // their accesses; readers' increments never change the bit.
    if refs.load(Ordering::Relaxed) & DRAFT != 0 {
        // Already ours: a draft given back by a rollback (no reader could
        // take a reference since: they back off from a draft).
        return true;
    }
    // Acquire: pairs with the Release decrement of every reader that held
    // `p`, so their reads happen before our rewrite.
    refs.compare_exchange(1, DRAFT | 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Mutable access to a draft's version number and value.
///
/// # Safety
/// `p` is a draft the caller owns (`DRAFT` set by it), and no other borrow
/// of its fields is live.
#[inline]
pub(crate) unsafe fn draft_mut<'a, T>(p: NonNull<Inner<T>>) -> (&'a mut u64, &'a mut T) {
    // SAFETY: the caller's draft: nobody reads `version`/`value` while
    // `DRAFT` is set (readers back off), and the caller is the only writer.
    // Only those two fields are borrowed; `refs` stays shared.
    unsafe {
        let inner = p.as_ptr();
        (*inner).race.write();
        (&mut (*inner).version, &mut (*inner).value)
    }
}

/// Shared access to a version the caller holds a reference to, or whose
/// draft it owns.
///
/// # Safety
/// `p` is live and either not a draft (`DRAFT` clear while the caller's
/// reference is counted) or the caller's own draft.
#[inline]
pub(crate) unsafe fn read<'a, T>(p: NonNull<Inner<T>>) -> (u64, &'a T) {
    // SAFETY: forwarded from the caller: nobody writes these fields now.
    unsafe {
        let inner = p.as_ptr();
        (*inner).race.read();
        ((*inner).version, &(*inner).value)
    }
}

/// Takes one more reference to a version found through a slot's pointer.
/// Returns `false` (and takes nothing) if the version turned into a draft.
///
/// # Safety
/// `p` is live: the caller is inside a `seize` guard of the collector that
/// retires the slot's references, or holds the slot's lock.
#[inline]
pub(crate) unsafe fn try_acquire<T>(p: NonNull<Inner<T>>) -> bool {
    // SAFETY: live, forwarded from the caller.
    let refs = unsafe { &p.as_ref().refs };
    // Acquire: pairs with the Release clear in `publish` (directly, or
    // through the release sequence of later increments), so the value is
    // visible.
    let prev = refs.fetch_add(1, Ordering::Acquire);
    if prev & !DRAFT >= MAX_REFS {
        std::process::abort();
    }
    if prev & DRAFT == 0 {
        return true;
    }
    // SAFETY: we just took this reference.
    unsafe { release(p) };
    false
}

/// Drops one reference; frees the version when it was the last.
///
/// # Safety
/// The caller owns the reference it drops, and (for a version a slot ever
/// published) no reader can be between loading `p` and incrementing its
/// count unless another reference outlives this call.
#[inline]
pub(crate) unsafe fn release<T>(p: NonNull<Inner<T>>) {
    // SAFETY: the caller's reference keeps `p` live until this decrement.
    let prev = unsafe { p.as_ref() }.refs.fetch_sub(1, Ordering::Release);
    // Release above / Acquire fence here: as `Arc`'s drop, every use of the
    // version by other holders happens before the free.
    if prev & !DRAFT == 1 {
        fence(Ordering::Acquire);
        // SAFETY: that was the last reference; `p` came from `Box::leak`.
        drop(unsafe { Box::from_raw(p.as_ptr()) });
    }
}

/// The `seize` reclaimer for a slot's reference (see `Slot::drain_limbo`).
///
/// # Safety
/// `p` carries one reference the collector now owns.
pub(crate) unsafe fn release_retired<T>(p: *mut Inner<T>, _: &seize::Collector) {
    if let Some(p) = NonNull::new(p) {
        // SAFETY: the retired reference; the grace period has passed, so no
        // reader is between loading `p` and incrementing its count.
        unsafe { release(p) }
    }
}

/// A counted reference to an immutable version: what a [`Snapshot`] holds.
///
/// [`Snapshot`]: crate::Snapshot
pub(crate) struct Shared<T> {
    ptr: NonNull<Inner<T>>,
    _owns: PhantomData<Inner<T>>,
}

// SAFETY: a `Shared` gives `&T` to whoever holds it and can drop a `T` on
// any thread, as `Arc<T>` does; `T: Send + Sync` makes both fine.
unsafe impl<T: Send + Sync> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// A version no slot holds (a remote backend's snapshot).
    pub(crate) fn new(version: u64, value: T) -> Self {
        let p = Inner::draft(version, value);
        // SAFETY: ours, fresh; publishing makes it readable.
        unsafe { publish(p) };
        Self {
            ptr: p,
            _owns: PhantomData,
        }
    }

    /// Wraps a reference the caller took with [`try_acquire`].
    ///
    /// # Safety
    /// The caller transfers one counted reference to an intact version.
    #[inline]
    pub(crate) unsafe fn from_acquired(ptr: NonNull<Inner<T>>) -> Self {
        Self {
            ptr,
            _owns: PhantomData,
        }
    }

    #[inline]
    pub(crate) fn version(&self) -> u64 {
        // SAFETY: our counted reference keeps it live and intact.
        unsafe { read(self.ptr) }.0
    }

    #[inline]
    pub(crate) fn value(&self) -> &T {
        // SAFETY: as in `version`; the borrow lives no longer than `self`.
        unsafe { read(self.ptr) }.1
    }

    /// The value, if this is the only reference (no slot and no other
    /// snapshot holds it); `self` back otherwise.
    pub(crate) fn try_unwrap(self) -> Result<T, Self> {
        // SAFETY: our reference keeps it live.
        let refs = unsafe { &self.ptr.as_ref().refs };
        // Acquire: pairs with the Release decrement of every other holder
        // (their reads happen before we move the value out).
        if refs.load(Ordering::Acquire) != 1 {
            return Err(self);
        }
        let p = self.ptr;
        std::mem::forget(self);
        // SAFETY: the only reference (no slot holds it, so no reader can
        // find it any more); `p` came from `Inner::draft`.
        Ok(unsafe { Inner::into_value(p) })
    }
}

impl<T> Clone for Shared<T> {
    #[inline]
    fn clone(&self) -> Self {
        // SAFETY: our reference keeps it live.
        let refs = unsafe { &self.ptr.as_ref().refs };
        // Relaxed: a new reference from an existing one needs no ordering
        // (as `Arc::clone`).
        if refs.fetch_add(1, Ordering::Relaxed) & !DRAFT >= MAX_REFS {
            std::process::abort();
        }
        Self {
            ptr: self.ptr,
            _owns: PhantomData,
        }
    }
}

impl<T> Drop for Shared<T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: we own this reference. A version a slot published is also
        // referenced by the slot (or by its collector) for as long as a
        // reader may find it, so this is never the release that frees it
        // under such a reader.
        unsafe { release(self.ptr) }
    }
}
