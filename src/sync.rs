//! The one module that names std or loom primitives.
//!
//! Everything in the engine that takes part in the slot protocol (atomics,
//! `Mutex`, thread parking, `UnsafeCell` and the versions' race check)
//! is imported from here, so that `RUSTFLAGS="--cfg ctxstore_loom"` swaps the
//! whole protocol onto loom's model-checked types (see `loom-tests/`). The cfg
//! is renamed from the usual `loom` because tokio reacts to `cfg(loom)`.
//!
//! The papaya table is outside the models: loom cannot see inside it, and the
//! protocol does not depend on it beyond "a lookup returns a live `Arc<Slot>`
//! or nothing".

#[cfg(not(ctxstore_loom))]
mod imp {
    pub(crate) use std::sync::atomic::{
        fence, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };
    pub(crate) use std::thread::{current as current_thread, park, Thread};

    /// Parks the current thread for at most `dur` (a timed blocking wait).
    pub(crate) fn park_timeout(dur: std::time::Duration) {
        std::thread::park_timeout(dur)
    }

    /// A spin-loop hint between CAS retries.
    #[inline]
    pub(crate) fn spin_hint() {
        std::hint::spin_loop()
    }

    /// `std::sync::Mutex` without poisoning: the engine never leaves its
    /// queues half-updated across a panic, so a poisoned lock is still sound.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::sync::Mutex::new(value))
        }

        #[inline]
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

    /// `UnsafeCell` with loom's closure-based API.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        #[inline]
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }

    /// When a waiter that first queues now is owed a direct hand-off.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Since {
        /// Strict FIFO (a zero bound): always, and no clock is read.
        Always,
        At(std::time::Instant),
        /// The bound is too far away to represent.
        Never,
    }

    impl Since {
        /// `bound` from now.
        #[inline]
        pub(crate) fn now(bound: std::time::Duration) -> Self {
            if bound.is_zero() {
                return Self::Always;
            }
            match std::time::Instant::now().checked_add(bound) {
                Some(due) => Self::At(due),
                None => Self::Never,
            }
        }
    }

    /// Whether the waiter's bound has passed.
    #[inline]
    pub(crate) fn handoff_due(since: &Since) -> bool {
        match since {
            Since::Always => true,
            Since::At(due) => std::time::Instant::now() >= *due,
            Since::Never => false,
        }
    }

    /// How many rounds a lock attempt spins before it queues.
    #[inline]
    pub(crate) fn spin_rounds() -> u32 {
        5
    }

    /// Loom's data-race check on a version's value; nothing outside loom.
    #[derive(Debug, Default)]
    pub(crate) struct RaceCheck;

    impl RaceCheck {
        #[inline]
        pub(crate) const fn new() -> Self {
            Self
        }

        #[inline]
        pub(crate) fn read(&self) {}

        #[inline]
        pub(crate) fn write(&self) {}
    }
}

#[cfg(ctxstore_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{
        fence, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };
    pub(crate) use loom::thread::{current as current_thread, park, Thread};

    /// Loom has no timed park: a timed wait is modelled as a plain park
    /// (spurious wake-ups are allowed, so the caller re-checks either way).
    pub(crate) fn park_timeout(_dur: std::time::Duration) {
        loom::thread::park()
    }

    /// Under loom every spin loop must yield, or the model never ends.
    #[inline]
    pub(crate) fn spin_hint() {
        loom::thread::yield_now()
    }

    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    pub(crate) use loom::cell::UnsafeCell;

    /// Loom has no clock: arrival times are not modelled.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Since;

    impl Since {
        pub(crate) fn now(_bound: std::time::Duration) -> Self {
            Self
        }
    }

    std::thread_local! {
        /// Whether releases hand the lock to the head waiter (`true`) or
        /// wake it to compete (`false`) in the models: each model runs in
        /// both modes (`ctxstore::__loom::set_handoff`), since loom cannot
        /// model the clock that decides it for real. Thread-local: loom runs
        /// a model's threads on the OS thread that called `check`, and test
        /// binaries run models in parallel on different OS threads.
        pub(crate) static HANDOFF: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    }

    pub(crate) fn handoff_due(_since: &Since) -> bool {
        HANDOFF.with(|h| h.get())
    }

    /// No spinning in the models (every spin would have to yield).
    pub(crate) fn spin_rounds() -> u32 {
        0
    }

    /// Makes loom check that every read of a version's value is ordered
    /// with every rewrite of it (recycling): an access pair without a
    /// happens-before edge fails the model.
    #[derive(Debug)]
    pub(crate) struct RaceCheck(loom::cell::UnsafeCell<()>);

    impl RaceCheck {
        pub(crate) fn new() -> Self {
            Self(loom::cell::UnsafeCell::new(()))
        }

        pub(crate) fn read(&self) {
            self.0.with(|_| ())
        }

        pub(crate) fn write(&self) {
            self.0.with_mut(|_| ())
        }
    }
}

pub(crate) use imp::*;
