//! [`RemoteGuard`]: the remote variant of a [`ContextGuard`](crate::ContextGuard).

use uuid::Uuid;

use crate::context::{Context, ContextType};
use crate::guard::warn_uncommitted;
use crate::storage::Lease;
use crate::Result;

/// The remote variant of a guard: the decoded value and the backend's lease.
pub(crate) struct RemoteGuard<T: Context> {
    ty: &'static ContextType,
    id: Uuid,
    value: T,
    version: u64,
    dirty: bool,
    // Invariant: `Some` until `commit` takes it or `Drop` releases it.
    lease: Option<Box<dyn Lease>>,
}

impl<T: Context> RemoteGuard<T> {
    pub(crate) fn new(
        ty: &'static ContextType,
        id: Uuid,
        value: T,
        version: u64,
        lease: Box<dyn Lease>,
    ) -> Self {
        Self {
            ty,
            id,
            value,
            version,
            dirty: false,
            lease: Some(lease),
        }
    }

    /// The version the lock was acquired at.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The context's id.
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    /// The working copy.
    pub(crate) fn value(&self) -> &T {
        &self.value
    }

    /// The working copy, marked changed (dropping it then warns).
    pub(crate) fn value_mut(&mut self) -> &mut T {
        self.dirty = true;
        &mut self.value
    }

    /// Forgets the changes, so that dropping the guard does not warn.
    pub(crate) fn discard(&mut self) {
        self.dirty = false;
    }

    /// The lease's [`Lease::lost`], or `None` once the lease is gone.
    pub(crate) fn lease_lost(&self) -> Option<crate::storage::BoxFuture<'static, ()>> {
        self.lease.as_ref().map(|lease| lease.lost())
    }

    pub(crate) fn commit(
        mut self,
    ) -> impl std::future::Future<Output = Result<u64>> + Send + 'static {
        let lease = self.lease.take();
        self.dirty = false;
        let fut = lease.map(|lease| lease.commit(&self.value));
        let (ty, id) = (self.ty, self.id);
        async move {
            match fut {
                Some(fut) => fut.await,
                None => Err(ty.lease_lost(id)),
            }
        }
    }
}

impl<T: Context> Drop for RemoteGuard<T> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if self.dirty {
                warn_uncommitted(self.ty.type_name(), self.id);
            }
            lease.release();
        }
    }
}
