//! The engine's unboxed guard. `crate::guard::ContextGuard` wraps it.

use std::ops::{Deref, DerefMut};
use std::sync::Arc as StdArc;

use uuid::Uuid;

use crate::context::{Context, ContextType};
use crate::guard::{warn_uncommitted, Versioned};
use crate::memory::slot::{Draft, Slot};
use crate::sync::Arc;
use crate::Result;

/// Holds a slot's lock. Reads go to the committed version until the first
/// mutable access makes a draft.
pub(crate) struct MemGuard<T: Context> {
    slot: StdArc<Slot<T>>,
    // `None` only after commit took it.
    base: Option<Arc<Versioned<T>>>,
    draft: Option<Draft<T>>,
    id: Uuid,
    // Invariant: while `locked`, this guard owns `slot.lock`.
    locked: bool,
}

impl<T: Context> MemGuard<T> {
    /// Wraps a slot whose lock the caller has just acquired.
    #[inline]
    pub(crate) fn new(slot: StdArc<Slot<T>>, id: Uuid) -> Self {
        let base = slot.load();
        Self {
            slot,
            base: Some(base),
            draft: None,
            id,
            locked: true,
        }
    }

    #[inline]
    fn base(&self) -> &Versioned<T> {
        self.base.as_ref().expect("a live guard has its base")
    }

    pub(crate) fn version(&self) -> u64 {
        self.base().version
    }

    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    pub(crate) fn commit(mut self) -> Result<u64> {
        let base = self.base.take().expect("a live guard has its base");
        let draft = match self.draft.take() {
            Some(draft) => draft,
            // SAFETY: `locked`: we hold the slot's lock.
            None => unsafe { self.slot.draft_from(&base) },
        };
        // SAFETY: `locked`: we hold the slot's lock.
        let published = unsafe { self.slot.publish(base, draft) };
        self.locked = false;
        self.slot.lock.unlock();
        published.map_err(|found| {
            let ty = ContextType::of::<T>();
            ty.conflict(self.id, found.saturating_sub(1), found)
        })
    }

    pub(crate) fn rollback(mut self) {
        if let Some(draft) = self.draft.take() {
            // SAFETY: `locked`: we hold the slot's lock.
            unsafe { self.slot.discard(draft) };
        }
    }
}

impl<T: Context> Deref for MemGuard<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        match &self.draft {
            Some(draft) => draft.get(),
            None => &self.base().value,
        }
    }
}

impl<T: Context> DerefMut for MemGuard<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        if self.draft.is_none() {
            let base = self.base.as_ref().expect("a live guard has its base");
            // SAFETY: `locked`: we hold the slot's lock.
            self.draft = Some(unsafe { self.slot.draft_from(base) });
        }
        self.draft.as_mut().expect("just made").get_mut()
    }
}

impl<T: Context> Drop for MemGuard<T> {
    fn drop(&mut self) {
        if !self.locked {
            return;
        }
        if let Some(draft) = self.draft.take() {
            warn_uncommitted(std::any::type_name::<T>(), self.id);
            // SAFETY: `locked`: we hold the slot's lock.
            unsafe { self.slot.discard(draft) };
        }
        self.base = None;
        self.locked = false;
        self.slot.lock.unlock();
    }
}
