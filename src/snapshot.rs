//! [`Snapshot`]: one read-only view type over every backend, and
//! [`Versioned`], a committed value as a remote backend decodes it.
//!
//! A snapshot holds the engine's counted version handle (`memory::Shared`):
//! in memory it shares the committed allocation itself (zero-copy); a remote
//! backend wraps the value it decoded in a handle of its own. This, the
//! guard enum and the storage fast path are the only places outside the
//! engine that name an engine type.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use uuid::Uuid;

use crate::context::{Context, ContextType};
use crate::memory::Shared;
use crate::storage::RawSnapshot;
use crate::Result;

/// A committed value and its version, as a remote backend decodes it.
#[derive(Debug)]
pub(crate) struct Versioned<T> {
    pub(crate) version: u64,
    pub(crate) value: T,
}

/// A read-only, consistent view of one committed version of a context.
///
/// Shares the committed value (reference-counted, like an `Arc`), never
/// copies it; cloning is one reference-count increment. It stays valid
/// however the context changes later, including deletion.
pub struct Snapshot<T> {
    inner: Shared<T>,
}

impl<T> Snapshot<T> {
    #[inline]
    pub(crate) fn from_shared(inner: Shared<T>) -> Self {
        Self { inner }
    }

    /// The version this snapshot shows.
    #[inline]
    pub fn version(&self) -> u64 {
        self.inner.version()
    }
}

impl<T: Context> Snapshot<T> {
    pub(crate) fn from_raw(ty: &'static ContextType, id: Uuid, raw: RawSnapshot) -> Result<Self> {
        match raw.0.downcast::<Shared<T>>() {
            Ok(inner) => Ok(Self { inner: *inner }),
            Err(_) => {
                Err(ty.backend_message(Some(id), "backend returned a snapshot of another type"))
            }
        }
    }

    pub(crate) fn into_raw(self) -> RawSnapshot {
        RawSnapshot::from_shared(self.inner)
    }

    /// The value, cloned only if other snapshots still share it.
    pub fn into_owned(self) -> T {
        match self.inner.try_unwrap() {
            Ok(value) => value,
            Err(shared) => shared.value().clone(),
        }
    }
}

impl<T> Clone for Snapshot<T> {
    #[inline]
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Deref for Snapshot<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        self.inner.value()
    }
}

impl<T> AsRef<T> for Snapshot<T> {
    fn as_ref(&self) -> &T {
        self.inner.value()
    }
}

impl<T> Borrow<T> for Snapshot<T> {
    fn borrow(&self) -> &T {
        self.inner.value()
    }
}

impl<T: fmt::Debug> fmt::Debug for Snapshot<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.inner.version())
            .field("value", self.inner.value())
            .finish()
    }
}
