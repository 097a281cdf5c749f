//! Watching a slot: waiting for a newer committed version.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use uuid::Uuid;

use super::slot::Slot;
use super::{not_found, InMemoryContextStorage};
use crate::context::Context;
use crate::snapshot::Snapshot;
use crate::watch::ContextWatch;
use crate::Result;

/// The engine's side of a [`ContextWatch`].
pub(crate) struct MemWatch<T> {
    id: Uuid,
    slot: Arc<Slot<T>>,
    collector: Arc<seize::Collector>,
}

impl<T: Context> MemWatch<T> {
    pub(crate) fn poll_changed(
        &mut self,
        cx: &mut TaskContext<'_>,
        after: u64,
    ) -> Poll<Result<Snapshot<T>>> {
        if self.slot.lock.is_dead() {
            return Poll::Ready(Err(not_found::<T>(self.id)));
        }
        let _pin = self.collector.enter();
        // SAFETY: pinned in the collector the slot's limbo retires into.
        let shared = unsafe { self.slot.load() };
        if shared.version() > after {
            return Poll::Ready(Ok(Snapshot::from_shared(shared)));
        }
        // TEMPORARY: re-poll until the parking protocol lands.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl InMemoryContextStorage {
    /// Watches the context: see [`ContextWatch`]. `NotFound` for an
    /// unknown id.
    pub async fn watch_context<T: Context>(&self, id: Uuid) -> Result<ContextWatch<T>> {
        let (first, watch) = self.watch_parts::<T>(id)?;
        Ok(ContextWatch::from_memory(id, first, watch))
    }

    pub(crate) fn watch_parts<T: Context>(&self, id: Uuid) -> Result<(Snapshot<T>, MemWatch<T>)> {
        let slot = self.table.get::<T>(id).ok_or_else(|| not_found::<T>(id))?;
        let collector = self.table.collector_arc();
        let watch = MemWatch {
            id,
            slot,
            collector,
        };
        let first = {
            let _pin = watch.collector.enter();
            // SAFETY: pinned in the collector the slot's limbo retires into.
            Snapshot::from_shared(unsafe { watch.slot.load() })
        };
        Ok((first, watch))
    }
}
