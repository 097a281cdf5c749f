//! The engine behind `dyn ContextStorage`: the raw (type-erased) methods,
//! dispatched through the monomorphized entry points each [`ContextType`]
//! carries ([`MemOps`]), so an erased call costs one indirect call and no
//! boxing of values.

use std::task::{Context as TaskContext, Poll};

use uuid::Uuid;

use super::{not_found, InMemoryContextStorage, MemWatch};
use crate::context::{Context, ContextType};
use crate::guard::ContextGuard;
use crate::snapshot::Snapshot;
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, MemOps, RawGuard, RawSnapshot, Wait};
use crate::watch::{RawWatch, RawWatchStart};
use crate::Result;

impl ContextStorage for InMemoryContextStorage {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        (ty.mem.store)(self, id, value)
    }

    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        (ty.mem.lock)(self, id, wait)
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        Box::pin(std::future::ready((ty.mem.snapshot)(self, id)))
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        (ty.mem.delete)(self, id)
    }

    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        (ty.mem.store_if)(self, id, expected, value)
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        (ty.mem.delete_if)(self, id, expected)
    }

    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        Box::pin(std::future::ready((ty.mem.watch)(self, id)))
    }

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(std::future::ready(Ok((ty.mem.contains)(self, id))))
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        Box::pin(std::future::ready(Ok((ty.mem.ids)(self))))
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }

    fn as_in_memory(&self) -> Option<&InMemoryContextStorage> {
        Some(self)
    }
}

impl MemOps {
    /// The engine's monomorphized entry points for `T`, stored in `T`'s
    /// [`ContextType`] so that the raw (type-erased) interface reaches them.
    pub(crate) const fn of<T: Context>() -> Self {
        Self {
            store: store::<T>,
            lock: lock::<T>,
            snapshot: snapshot::<T>,
            delete: delete::<T>,
            store_if: store_if::<T>,
            delete_if: delete_if::<T>,
            watch: watch::<T>,
            contains: contains::<T>,
            ids: ids::<T>,
        }
    }
}

fn store<T: Context>(
    s: &InMemoryContextStorage,
    id: Uuid,
    value: ErasedValue,
) -> BoxFuture<'_, Result<u64>> {
    Box::pin(async move {
        match value.downcast::<T>() {
            Ok(value) => s.store_context(id, *value).await,
            Err(_) => Err(ContextType::of::<T>().backend_error(
                Some(id),
                crate::error::message("store_raw got a value of another type"),
            )),
        }
    })
}

fn lock<T: Context>(
    s: &InMemoryContextStorage,
    id: Uuid,
    wait: Wait,
) -> BoxFuture<'_, Result<RawGuard>> {
    Box::pin(async move {
        let guard = s.lock_async::<T>(id, wait).await?;
        Ok(RawGuard::Local(Box::new(ContextGuard::from_memory(guard))))
    })
}

fn snapshot<T: Context>(s: &InMemoryContextStorage, id: Uuid) -> Result<RawSnapshot> {
    s.table
        // SAFETY: `with` pins the collector `drain_limbo` retires into.
        .with::<T, _>(id, |slot| RawSnapshot::from_shared(unsafe { slot.load() }))
        .ok_or_else(|| not_found::<T>(id))
}

fn delete<T: Context>(s: &InMemoryContextStorage, id: Uuid) -> BoxFuture<'_, Result<()>> {
    Box::pin(s.delete_context::<T>(id))
}

fn store_if<T: Context>(
    s: &InMemoryContextStorage,
    id: Uuid,
    expected: u64,
    value: ErasedValue,
) -> BoxFuture<'_, Result<u64>> {
    Box::pin(async move {
        match value.downcast::<T>() {
            Ok(value) => s.store_context_if(id, expected, *value).await,
            Err(_) => Err(ContextType::of::<T>().backend_error(
                Some(id),
                crate::error::message("store_if_raw got a value of another type"),
            )),
        }
    })
}

fn delete_if<T: Context>(
    s: &InMemoryContextStorage,
    id: Uuid,
    expected: u64,
) -> BoxFuture<'_, Result<()>> {
    Box::pin(s.delete_context_if::<T>(id, expected))
}

/// The engine's watch behind `dyn RawWatch`.
struct ErasedWatch<T: Context>(MemWatch<T>);

impl<T: Context> RawWatch for ErasedWatch<T> {
    fn poll_changed(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<RawSnapshot>> {
        self.0
            .poll_changed(cx, after)
            .map(|r| r.map(Snapshot::into_raw))
    }
}

fn watch<T: Context>(s: &InMemoryContextStorage, id: Uuid) -> Result<RawWatchStart> {
    let (first, watch) = s.watch_parts::<T>(id)?;
    Ok((first.into_raw(), Box::new(ErasedWatch(watch))))
}

fn contains<T: Context>(s: &InMemoryContextStorage, id: Uuid) -> bool {
    s.contains::<T>(id)
}

fn ids<T: Context>(s: &InMemoryContextStorage) -> Vec<Uuid> {
    s.ids::<T>()
}
