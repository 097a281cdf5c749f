//! One context: its committed version, its lock, and recycled allocations.

use std::ptr::NonNull;

use crate::memory::park::RawLock;
use crate::memory::version::{self, Inner, Shared};
use crate::sync::{spin_hint, AtomicPtr, Ordering, UnsafeCell};
use crate::util::Finally;

/// A versioned slot.
///
/// * `current`: the committed version ([`version`] explains the counting).
///   Readers load it and take a reference without waiting; only the lock holder
///   replaces it, with one `Release` store (the holder is the only writer,
///   so no compare-and-swap and no reader bookkeeping is needed).
/// * `lock`: the lock word and its parking queue ([`RawLock`]).
/// * `held`: the lock holder's private state: a spare allocation (the
///   version superseded by the last commit, rewritten in place by the next
///   draft when no snapshot still holds it) and the limbo list (superseded
///   versions a snapshot still held, waiting to be handed to the collector).
///
/// The slot holds one reference on `current`, on the spare and on every
/// limbo entry.
///
/// `repr(C)`, in this order: what every mutation touches (`current`,
/// `held`, then the lock word and its queue, see [`RawLock`]) comes first,
/// next to the `Arc`'s counts; the watch list, which only watches touch,
/// comes last. Left to the compiler, the two 32-byte mutexes went first and
/// the lock word landed in a second cache line: W1 (one hot key) lost
/// ≈ 20% when the watch list was added (median of 8 interleaved quick runs,
/// 733 against 550 µs per 1,024 mutations with this order; W2 and W7
/// unchanged or slightly faster). Aligning the slot to 64 bytes was tried
/// too: W1 no better, W2 ≈ 10% slower (more memory per slot).
#[repr(C)]
pub(crate) struct Slot<T> {
    current: AtomicPtr<Inner<T>>,
    held: UnsafeCell<Held<T>>,
    pub(crate) lock: RawLock,
}

struct Held<T> {
    spare: *mut Inner<T>,
    limbo: *mut Inner<T>,
}

// SAFETY: `held` is only touched by the current lock holder (mutual
// exclusion by `lock`, whose acquire/release orderings order one holder's
// accesses before the next's) or by the destructor. `current` is atomic.
// The values inside are `T: Send + Sync`.
unsafe impl<T: Send + Sync> Sync for Slot<T> {}
// SAFETY: as above; moving a slot moves owned `T`s, which are `Send`.
unsafe impl<T: Send + Sync> Send for Slot<T> {}

/// A version being written: a draft allocation the holder owns (see
/// [`version`]). Give it back with [`Slot::discard`] or publish it with
/// [`Slot::publish`]; dropping it otherwise leaks the allocation.
pub(crate) struct Draft<T> {
    ptr: NonNull<Inner<T>>,
}

// SAFETY: the draft is owned by the lock holder alone; moving it moves that
// ownership. `T: Send + Sync` as for every context.
unsafe impl<T: Send + Sync> Send for Draft<T> {}
// SAFETY: `&Draft` only gives `&T` (through `get`).
unsafe impl<T: Send + Sync> Sync for Draft<T> {}

impl<T> Draft<T> {
    #[inline]
    pub(crate) fn get(&self) -> &T {
        // SAFETY: our own draft; nobody else reads or writes it.
        unsafe { version::read(self.ptr) }.1
    }

    #[inline]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        // SAFETY: our own draft; `&mut self` makes this the only borrow.
        unsafe { version::draft_mut(self.ptr) }.1
    }
}

/// A borrowed view of the committed version, valid while the caller holds
/// the slot's lock (only the holder replaces it).
pub(crate) struct Base<T> {
    ptr: NonNull<Inner<T>>,
}

impl<T> Clone for Base<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Base<T> {}

// SAFETY: a `Base` is a borrow of an immutable version kept alive by the
// slot; `T: Send + Sync`.
unsafe impl<T: Send + Sync> Send for Base<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Base<T> {}

impl<T> Base<T> {
    /// The version and value.
    ///
    /// # Safety
    /// The caller still holds the lock it held when it got this `Base`, and
    /// has not published since.
    #[inline]
    pub(crate) unsafe fn get<'a>(self) -> (u64, &'a T) {
        // SAFETY: the committed version cannot be replaced or recycled while
        // the caller holds the lock (only the holder does either), and the
        // slot's reference keeps it alive.
        unsafe { version::read(self.ptr) }
    }
}

impl<T> Slot<T> {
    pub(crate) fn new(value: T, version: u64) -> Self {
        let p = Inner::draft(version, value);
        // SAFETY: a fresh draft we own; the slot takes its reference.
        unsafe { version::publish(p) };
        Self {
            lock: RawLock::new(),
            current: AtomicPtr::new(p.as_ptr()),
            held: UnsafeCell::new(Held {
                spare: std::ptr::null_mut(),
                limbo: std::ptr::null_mut(),
            }),
        }
    }

    /// A slot that starts out locked (for models that create and hold).
    #[cfg(ctxstore_loom)]
    pub(crate) fn new_locked(value: T, version: u64) -> Self {
        let slot = Self::new(value, version);
        assert!(slot.lock.try_lock() == crate::memory::park::Outcome::Locked);
        slot
    }

    /// A counted reference to the committed version: a pointer load, one
    /// `fetch_add`, and a second load of the pointer that validates it.
    /// Retries only if a commit lands between its two loads; it never waits
    /// for a lock holder.
    ///
    /// # Safety
    /// Versions this slot superseded stay allocated for the call: the caller
    /// is pinned in the collector that [`drain_limbo`](Self::drain_limbo)
    /// retires into, or the slot's limbo is never drained while it runs.
    #[inline]
    pub(crate) unsafe fn load(&self) -> Shared<T> {
        // Acquire: pairs with the Release store in `publish`.
        let mut p = self.current.load(Ordering::Acquire);
        loop {
            // SAFETY: never null (set in `new`, replaced only by non-null),
            // and it stays allocated (the caller's pin, see above).
            let version = unsafe { NonNull::new_unchecked(p) };
            // SAFETY: as just said.
            if unsafe { version::try_acquire(version) } {
                // Validate: the allocation may have been recycled and
                // republished (same address, newer value) between the load
                // and the increment. Reading the same pointer again, from
                // the store that published what the increment saw, makes
                // this the committed version now, and its store
                // happens-before everything this reader does next (so a
                // later snapshot never shows an older version). Acquire:
                // pairs with the Release store in `publish`.
                let now = self.current.load(Ordering::Acquire);
                if now == p {
                    // SAFETY: `try_acquire` took a reference to an intact
                    // version, and it is the committed one.
                    return unsafe { Shared::from_acquired(version) };
                }
                // SAFETY: the reference `try_acquire` just took.
                unsafe { version::release(version) };
                p = now;
            } else {
                spin_hint();
                // Acquire: as above.
                p = self.current.load(Ordering::Acquire);
            }
        }
    }

    /// The committed version, borrowed by the lock holder.
    ///
    /// # Safety
    /// The caller holds `lock`.
    #[inline]
    pub(crate) unsafe fn base(&self) -> Base<T> {
        // Relaxed: only lock holders store `current`, and the lock's own
        // Acquire (pairing with the previous holder's Release) orders that
        // store before this load.
        let p = self.current.load(Ordering::Relaxed);
        Base {
            // SAFETY: never null (set in `new`, replaced only by non-null).
            ptr: unsafe { NonNull::new_unchecked(p) },
        }
    }

    /// The committed version number, read by the lock holder.
    ///
    /// # Safety
    /// The caller holds `lock`.
    #[inline]
    pub(crate) unsafe fn version_locked(&self) -> u64 {
        // SAFETY: forwarded.
        unsafe { self.base().get() }.0
    }

    /// Runs `f` on the holder's private state.
    ///
    /// # Safety
    /// The caller holds `lock` (or has `&mut self`).
    #[inline]
    unsafe fn with_held<R>(&self, f: impl FnOnce(&mut Held<T>) -> R) -> R {
        // SAFETY: the caller holds the lock, which makes it the only accessor.
        self.held.with_mut(|held| f(unsafe { &mut *held }))
    }

    /// Takes the spare if it can be rewritten; moves a spare some snapshot
    /// still holds to the limbo list.
    ///
    /// # Safety
    /// The caller holds `lock`.
    #[inline]
    unsafe fn take_spare(&self) -> Option<NonNull<Inner<T>>> {
        // SAFETY: forwarded from the caller.
        unsafe {
            self.with_held(|held| {
                let spare = NonNull::new(std::mem::replace(&mut held.spare, std::ptr::null_mut()))?;
                // SAFETY: the slot's reference to the spare; we hold the lock.
                if version::try_recycle(spare) {
                    return Some(spare);
                }
                // A snapshot still holds it: keep our reference in limbo until
                // a store call hands it to the collector (`drain_limbo`).
                held.push_limbo(spare);
                None
            })
        }
    }

    /// A draft holding a copy of `base`'s value: `clone_from` into the spare
    /// allocation when no reader holds it (reusing the value's own buffers
    /// too), else a fresh clone.
    ///
    /// # Safety
    /// The caller holds `lock`, and `base` is its current [`Slot::base`].
    pub(crate) unsafe fn draft_from(&self, base: Base<T>) -> Draft<T>
    where
        T: Clone,
    {
        // SAFETY: forwarded from the caller.
        let (_, from) = unsafe { base.get() };
        // SAFETY: forwarded from the caller.
        match unsafe { self.take_spare() } {
            Some(spare) => {
                // A panicking `clone_from` leaves a valid value behind: the
                // allocation goes back to being the spare.
                let restore = Finally(|| {
                    // SAFETY: we hold the lock; `spare` is ours (a draft).
                    unsafe { self.with_held(|held| held.spare = spare.as_ptr()) }
                });
                // SAFETY: a draft we own (recycled just now).
                unsafe { version::draft_mut(spare) }.1.clone_from(from);
                std::mem::forget(restore);
                Draft { ptr: spare }
            }
            None => Draft {
                ptr: Inner::draft(0, from.clone()),
            },
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
                // Dropping the old value may unwind (a user `Drop`); the
                // assignment still completes, and the allocation goes back
                // to being the spare.
                let restore = Finally(|| {
                    // SAFETY: we hold the lock; `spare` is ours (a draft).
                    unsafe { self.with_held(|held| held.spare = spare.as_ptr()) }
                });
                // SAFETY: a draft we own (recycled just now).
                *unsafe { version::draft_mut(spare) }.1 = value;
                std::mem::forget(restore);
                Draft { ptr: spare }
            }
            None => Draft {
                ptr: Inner::draft(0, value),
            },
        }
    }

    /// Gives an unpublished draft back for reuse (rollback).
    ///
    /// # Safety
    /// The caller holds `lock`, and `draft` came from this slot.
    pub(crate) unsafe fn discard(&self, draft: Draft<T>) {
        // SAFETY: forwarded from the caller.
        unsafe { self.with_held(|held| held.keep_spare(draft.ptr)) }
    }

    /// Publishes `draft` as the version after the committed one and keeps
    /// the superseded version as the spare. Returns the new version.
    ///
    /// # Safety
    /// The caller holds `lock`, and `draft` came from this slot.
    pub(crate) unsafe fn publish(&self, draft: Draft<T>) -> u64 {
        // SAFETY: forwarded from the caller.
        let base = unsafe { self.base() };
        // SAFETY: as above; the base is not replaced until the store below.
        let version = unsafe { base.get() }.0 + 1;
        // SAFETY: our draft.
        *unsafe { version::draft_mut(draft.ptr) }.0 = version;
        // SAFETY: our draft; from here it is immutable.
        unsafe { version::publish(draft.ptr) };
        // Release: pairs with the Acquire load in `load` (and with the next
        // holder's `base`, through the lock's own Release/Acquire).
        self.current.store(draft.ptr.as_ptr(), Ordering::Release);
        // SAFETY: forwarded from the caller.
        unsafe { self.with_held(|held| held.keep_spare(base.ptr)) };
        version
    }

    /// Publishes `value` as the version after the committed one, then
    /// releases the lock — also when dropping the value the recycled
    /// allocation held unwinds (a user `Drop` may panic there). Returns the
    /// new version.
    ///
    /// # Safety
    /// The caller holds `lock`; it is released when this returns or unwinds.
    pub(crate) unsafe fn replace_and_unlock(&self, value: T) -> u64 {
        let _unlock = Finally(|| self.lock.unlock());
        // SAFETY: forwarded from the caller.
        let draft = unsafe { self.draft_with(value) };
        // SAFETY: forwarded from the caller.
        unsafe { self.publish(draft) }
    }

    /// Hands every limbo entry's reference to `collector`, which drops it
    /// once no reader pinned now can still be about to increment it.
    ///
    /// # Safety
    /// The caller holds `lock`, and `collector` is the one every reader of
    /// this slot pins (the table's).
    #[inline]
    pub(crate) unsafe fn drain_limbo(&self, collector: &seize::Collector) {
        // SAFETY: forwarded from the caller.
        let mut p = unsafe {
            self.with_held(|held| std::mem::replace(&mut held.limbo, std::ptr::null_mut()))
        };
        while !p.is_null() {
            // SAFETY: a limbo entry: the slot's reference, unreachable from
            // `current` (superseded), so readers entering from now on cannot
            // find it; `next` is the holder's field.
            unsafe {
                let next = (*p).next;
                collector.retire(p, version::release_retired::<T>);
                p = next;
            }
        }
    }

    /// Takes the committed value out of a slot that was never shared.
    pub(crate) fn into_value(self) -> Option<T> {
        // Relaxed (both): never shared, so no other thread touches it.
        let p = self.current.load(Ordering::Relaxed);
        self.current.store(std::ptr::null_mut(), Ordering::Relaxed);
        drop(self);
        let p = NonNull::new(p)?;
        // SAFETY: the slot's reference to its committed version, taken out
        // of the slot; never shared, so it is the only one, and it came from
        // `Inner::draft`.
        Some(unsafe { Inner::into_value(p) })
    }
}

impl<T> Held<T> {
    /// Adds the slot's reference to `p` to the limbo list.
    fn push_limbo(&mut self, p: NonNull<Inner<T>>) {
        // SAFETY: `next` is the holder's field, and we are the holder.
        unsafe { (*p.as_ptr()).next = self.limbo };
        self.limbo = p.as_ptr();
    }

    /// Keeps `p` (a superseded version, or a draft given back) as the spare.
    fn keep_spare(&mut self, p: NonNull<Inner<T>>) {
        // The spare is always empty here (every draft takes it first); were
        // it not, the older one must wait in limbo: readers may still find
        // it, so it cannot be freed directly.
        if let Some(old) = NonNull::new(self.spare) {
            self.push_limbo(old);
        }
        self.spare = p.as_ptr();
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        // A slot is dropped when its last `Arc` goes: the table's reference
        // is dropped by papaya only after its grace period, so no reader is
        // inside `load` on it any more, and no lock holder or waiter is
        // left. Every reference it holds is released directly.
        // SAFETY: `&mut self`: no other accessor.
        let (spare, mut limbo) = unsafe {
            self.with_held(|held| {
                (
                    std::mem::replace(&mut held.spare, std::ptr::null_mut()),
                    std::mem::replace(&mut held.limbo, std::ptr::null_mut()),
                )
            })
        };
        // Relaxed: `&mut self`, no other accessor.
        let current = self.current.load(Ordering::Relaxed);
        for p in [spare, current] {
            if let Some(p) = NonNull::new(p) {
                // SAFETY: the slot's reference; no reader left (above).
                unsafe { version::release(p) };
            }
        }
        while let Some(entry) = NonNull::new(limbo) {
            // SAFETY: as above; `next` is read before the release.
            unsafe {
                limbo = (*entry.as_ptr()).next;
                version::release(entry);
            }
        }
    }
}
