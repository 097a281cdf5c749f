//! Watching a slot: waiting, without any lock of the slot, for a newer
//! committed version.
//!
//! A watcher parks in the slot's watch list (`park.rs`, "Watchers"): a
//! release that sees `WATCHED` in the lock word wakes one watcher, the
//! *lead*, which wakes the rest when it runs. A commit on a key nobody
//! watches pays nothing: its release CAS already compares the whole word.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use uuid::Uuid;

use super::park::{Outcome, Waiter, IDLE, WAITING};
use super::slot::Slot;
use super::{not_found, InMemoryContextStorage};
use crate::context::Context;
use crate::snapshot::Snapshot;
use crate::sync::Since;
use crate::watch::ContextWatch;
use crate::Result;

/// The engine's side of a [`ContextWatch`]: the slot (kept alive, also
/// after a delete), the collector its versions retire into, and a boxed
/// waiter node (boxed so that the watch itself can move).
pub(crate) struct MemWatch<T> {
    id: Uuid,
    slot: Arc<Slot<T>>,
    collector: Arc<seize::Collector>,
    waiter: Box<Waiter>,
}

impl<T: Context> MemWatch<T> {
    /// A watch on `slot`, whose superseded versions retire into
    /// `collector`.
    pub(crate) fn new(id: Uuid, slot: Arc<Slot<T>>, collector: Arc<seize::Collector>) -> Self {
        Self {
            id,
            slot,
            collector,
            waiter: Box::new(Waiter::new(Since::now(Duration::ZERO))),
        }
    }

    /// `Ready` with the committed version if it is newer than `after`,
    /// `NotFound` once the context is gone; otherwise parks `cx`'s waker
    /// in the slot's watch list.
    pub(crate) fn poll_changed(
        &mut self,
        cx: &mut TaskContext<'_>,
        after: u64,
    ) -> Poll<Result<Snapshot<T>>> {
        // A completed wait (woken, or made the lead) is settled first: the
        // lead wakes the other watchers before anything else.
        let state = self.waiter.state();
        if state != WAITING && state != IDLE {
            // SAFETY: the waiter is only ever linked by `watch` on this lock.
            unsafe { self.slot.lock.unwatch(&self.waiter) };
        }
        if let Some(done) = self.check(after) {
            self.cancel();
            return Poll::Ready(done);
        }
        // SAFETY: boxed (it never moves), linked only in this lock's watch
        // list, and `Drop` unlinks it before the box goes.
        match unsafe { self.slot.lock.watch(&self.waiter, cx.waker()) } {
            Outcome::Dead => return Poll::Ready(Err(not_found::<T>(self.id))),
            Outcome::Busy | Outcome::Locked => {}
        }
        // Linked before this read: a release that publishes after it wakes
        // us (see `RawLock::watch`).
        if let Some(done) = self.check(after) {
            self.cancel();
            return Poll::Ready(done);
        }
        Poll::Pending
    }

    /// Leaves the watch list (a dropped `changed()` future, a returned
    /// version): a watch nobody polls must not be made the lead.
    pub(crate) fn cancel(&mut self) {
        if self.waiter.state() != IDLE {
            // SAFETY: the waiter is only ever linked by `watch` on this lock.
            unsafe { self.slot.lock.unwatch(&self.waiter) };
        }
    }

    fn check(&self, after: u64) -> Option<Result<Snapshot<T>>> {
        if self.slot.lock.is_dead() {
            return Some(Err(not_found::<T>(self.id)));
        }
        let _pin = self.collector.enter();
        // SAFETY: pinned in the collector the slot's limbo retires into.
        let shared = unsafe { self.slot.load() };
        (shared.version() > after).then(|| Ok(Snapshot::from_shared(shared)))
    }
}

impl<T> Drop for MemWatch<T> {
    fn drop(&mut self) {
        if self.waiter.state() != IDLE {
            // SAFETY: the waiter is only ever linked by `watch` on this lock.
            unsafe { self.slot.lock.unwatch(&self.waiter) };
        }
    }
}

impl InMemoryContextStorage {
    /// Watches the context: see [`ContextWatch`]. `NotFound` for an
    /// unknown id. A watch costs the context's writers nothing until a
    /// watcher waits, and then one wake-up per release.
    pub async fn watch_context<T: Context>(&self, id: Uuid) -> Result<ContextWatch<T>> {
        let (first, watch) = self.watch_parts::<T>(id)?;
        Ok(ContextWatch::from_memory(id, first, watch))
    }

    pub(crate) fn watch_parts<T: Context>(&self, id: Uuid) -> Result<(Snapshot<T>, MemWatch<T>)> {
        let slot = self.table.get::<T>(id).ok_or_else(|| not_found::<T>(id))?;
        let collector = self.table.collector_arc();
        let first = {
            let _pin = collector.enter();
            // SAFETY: pinned in the collector the slot's limbo retires into.
            Snapshot::from_shared(unsafe { slot.load() })
        };
        Ok((first, MemWatch::new(id, slot, collector)))
    }
}
