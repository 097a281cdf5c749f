//! The one module that names std or loom primitives.
//!
//! Everything in the engine that takes part in the slot protocol (atomics,
//! `Arc`, `Mutex`, thread parking, `UnsafeCell` and the committed-value cell)
//! is imported from here, so that `RUSTFLAGS="--cfg ctxstore_loom"` swaps the
//! whole protocol onto loom's model-checked types (see `loom-tests/`). The cfg
//! is renamed from the usual `loom` because tokio reacts to `cfg(loom)`.
//!
//! The papaya table is outside the models: loom cannot see inside it, and the
//! protocol does not depend on it beyond "a lookup returns a live `Arc<Slot>`
//! or nothing".

#[cfg(not(ctxstore_loom))]
mod imp {
    pub(crate) use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    pub(crate) use std::sync::Arc;
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
        pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

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

    /// The committed-value cell: `arc_swap::ArcSwap`, whose loads are
    /// wait-free and never block writers.
    pub(crate) struct ArcCell<T>(arc_swap::ArcSwap<T>);

    impl<T> ArcCell<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Self(arc_swap::ArcSwap::new(value))
        }

        /// A new strong reference to the current value (wait-free).
        #[inline]
        pub(crate) fn load_full(&self) -> Arc<T> {
            self.0.load_full()
        }

        /// A short-lived borrow of the current value (wait-free, no refcount
        /// traffic on the fast path).
        #[inline]
        pub(crate) fn with<R>(&self, f: impl FnOnce(&Arc<T>) -> R) -> R {
            f(&self.0.load())
        }

        /// Replaces the value with `new` if it is still `current`; returns the
        /// value found (the previous one on success). Every reader that loaded
        /// the previous value has been accounted for in its strong count when
        /// this returns, so `Arc::get_mut` on it is a sound "no reader" test.
        #[inline]
        pub(crate) fn compare_and_swap(&self, current: &Arc<T>, new: Arc<T>) -> Arc<T> {
            arc_swap::Guard::into_inner(self.0.compare_and_swap(current, new))
        }
    }
}

#[cfg(ctxstore_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicU64, AtomicU8, Ordering};
    pub(crate) use loom::sync::Arc;
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

        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    pub(crate) use loom::cell::UnsafeCell;

    /// Stand-in for `ArcSwap`: loom cannot see inside arc-swap, so the model
    /// uses a mutex-protected `Arc` with the same operations and the same
    /// "previous value is fully accounted for" property.
    pub(crate) struct ArcCell<T>(loom::sync::Mutex<Arc<T>>);

    impl<T> ArcCell<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn load_full(&self) -> Arc<T> {
            self.0.lock().unwrap().clone()
        }

        pub(crate) fn with<R>(&self, f: impl FnOnce(&Arc<T>) -> R) -> R {
            let current = self.load_full();
            f(&current)
        }

        pub(crate) fn compare_and_swap(&self, current: &Arc<T>, new: Arc<T>) -> Arc<T> {
            let mut cell = self.0.lock().unwrap();
            if Arc::ptr_eq(&cell, current) {
                std::mem::replace(&mut *cell, new)
            } else {
                cell.clone()
            }
        }
    }
}

pub(crate) use imp::*;
