//! [`ContextGuard`]: one guard type over every backend.

use std::fmt;
use std::ops::{Deref, DerefMut};

use uuid::Uuid;

use crate::context::Context;
use crate::memory::MemGuard;
pub(crate) use crate::remote::RemoteGuard;
use crate::Result;

/// An exclusive, owned lock on one context, with a private working copy.
///
/// * `Deref`/`DerefMut` to `T`. The first mutable access makes the working
///   copy (in memory: into a recycled allocation when no reader still holds
///   the previous version); until then the guard reads the committed value.
/// * [`commit`](Self::commit) publishes the working copy atomically as a
///   new version; [`rollback`](Self::rollback) or dropping the guard
///   discards it and releases the lock. Dropping a guard whose value was
///   mutably borrowed without committing logs a `tracing` warning.
/// * `'static` and `Send`: hold it across `.await`, move it to another task
///   or thread.
#[must_use = "a guard holds the context's lock until it is committed or dropped"]
pub struct ContextGuard<T: Context> {
    inner: GuardInner<T>,
}

enum GuardInner<T: Context> {
    Memory(MemGuard<T>),
    // Boxed: a remote guard carries the value inline, and keeping the enum
    // as small as the in-memory guard keeps every move of a memory guard
    // (through futures and `Result`s) cheap. One allocation per remote lock
    // is nothing next to its round trips.
    Remote(Box<RemoteGuard<T>>),
}

impl<T: Context> ContextGuard<T> {
    #[inline]
    pub(crate) fn from_memory(guard: MemGuard<T>) -> Self {
        Self {
            inner: GuardInner::Memory(guard),
        }
    }

    pub(crate) fn from_remote(guard: RemoteGuard<T>) -> Self {
        Self {
            inner: GuardInner::Remote(Box::new(guard)),
        }
    }

    /// The version the guard was acquired at (the committed version it
    /// started from).
    pub fn version(&self) -> u64 {
        match &self.inner {
            GuardInner::Memory(g) => g.version(),
            GuardInner::Remote(g) => g.version(),
        }
    }

    /// The context's id.
    pub fn id(&self) -> Uuid {
        match &self.inner {
            GuardInner::Memory(g) => g.id(),
            GuardInner::Remote(g) => g.id(),
        }
    }

    /// Publishes the working copy as the context's next version and releases
    /// the lock. Returns the new version. Committing an unchanged guard still
    /// publishes a new version.
    ///
    /// In memory this completes without suspending. Remote backends fail
    /// with `LeaseLost` if the lease expired, and then write nothing.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes is a rollback for the
    /// in-memory engine. For a remote backend the write is atomic: it is
    /// applied whole or not at all, and the lock is released either way.
    pub async fn commit(self) -> Result<u64> {
        match self.inner {
            GuardInner::Memory(g) => g.commit(),
            GuardInner::Remote(g) => g.commit().await,
        }
    }

    /// [`commit`](Self::commit) for plain threads. For remote backends it
    /// blocks the calling thread on the backend's I/O; do not call it from
    /// inside an async task.
    pub fn commit_blocking(self) -> Result<u64> {
        match self.inner {
            GuardInner::Memory(g) => g.commit(),
            GuardInner::Remote(g) => crate::util::block_on(g.commit()),
        }
    }

    /// Resolves once the backend knows this guard's lock is lost, so a
    /// long-running holder can `select!` on it and stop early rather than
    /// find out at [`commit`](Self::commit) (`LeaseLost`, nothing written).
    ///
    /// Redis: when a renewal finds the lease expired, taken over or
    /// evicted, or no renewal succeeded for a whole lease period. It never
    /// resolves in memory (the lock cannot be lost) nor on Postgres (the
    /// row lock is lost only with the session, which commit reports). The
    /// future owns what it needs (`'static`, `Send`); resolving says
    /// nothing was committed by this guard, not that the value changed.
    pub fn lease_lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lost = match &self.inner {
            GuardInner::Remote(g) => g.lease_lost(),
            GuardInner::Memory(_) => None,
        };
        async move {
            match lost {
                Some(lost) => lost.await,
                None => std::future::pending().await,
            }
        }
    }

    /// Discards the working copy and releases the lock, without the warning
    /// that dropping a changed guard logs.
    pub fn rollback(self) {
        match self.inner {
            GuardInner::Memory(g) => g.rollback(),
            GuardInner::Remote(mut g) => g.discard(),
        }
    }
}

impl<T: Context> Deref for ContextGuard<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        match &self.inner {
            GuardInner::Memory(g) => g,
            GuardInner::Remote(g) => g.value(),
        }
    }
}

impl<T: Context> DerefMut for ContextGuard<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.inner {
            GuardInner::Memory(g) => g,
            GuardInner::Remote(g) => g.value_mut(),
        }
    }
}

impl<T: Context + fmt::Debug> fmt::Debug for ContextGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextGuard")
            .field("id", &self.id())
            .field("version", &self.version())
            .field("value", &**self)
            .finish()
    }
}

#[cold]
pub(crate) fn warn_uncommitted(type_name: &'static str, id: Uuid) {
    tracing::warn!(
        context = crate::error::short_type_name(type_name).as_str(),
        %id,
        "context guard dropped with uncommitted changes; they were rolled back \
         (call rollback() to discard on purpose)"
    );
}
