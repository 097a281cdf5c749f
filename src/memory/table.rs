//! The lock-free map `(TypeId, Uuid) -> Arc<Slot<T>>` (type-erased).

use std::any::{Any, TypeId};
use std::sync::Arc;

use uuid::Uuid;

use crate::memory::park::RawLock;
use crate::memory::slot::Slot;

type Key = (TypeId, Uuid);
type Entry = Arc<dyn SlotEntry>;

/// A type-erased slot: what the table stores.
pub(crate) trait SlotEntry: Any + Send + Sync {
    /// The slot's lock (for the store's destructor, which knows no `T`).
    fn raw_lock(&self) -> &RawLock;
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Send + Sync + 'static> SlotEntry for Slot<T> {
    fn raw_lock(&self) -> &RawLock {
        &self.lock
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// A `papaya::HashMap` of type-erased slots. A key's `TypeId` always matches
/// the slot's `T`, so the downcasts below cannot fail; they are checked
/// anyway (no `unsafe` here).
///
/// The table's `Arc` is what keeps a slot alive while its lock is held (a
/// guard holds no reference of its own): only a holder of the lock unlinks
/// a slot, and the store's destructor hands its reference to a live holder
/// (see `InMemoryContextStorage`'s `Drop`).
pub(crate) struct Table {
    map: papaya::HashMap<Key, Entry, foldhash::fast::RandomState>,
    // The map's reclamation collector, shared so that slots can retire the
    // versions readers may still be loading into the same grace periods that
    // lookups pin (`Slot::drain_limbo`).
    collector: Arc<seize::Collector>,
}

impl Table {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let collector = Arc::new(seize::Collector::new());
        Self {
            // papaya's and seize's defaults (incremental resize, batches
            // of 32), kept by measurement: no other resize mode, batch size
            // or capacity saves 3% of a W6 lifecycle, bigger batches cost
            // more, and a blocking resize stalls one insert for a copy of
            // the whole table (docs/bench-profile.md, "A lifecycle (W6)").
            map: papaya::HashMap::builder()
                .capacity(capacity)
                .hasher(foldhash::fast::RandomState::default())
                .shared_collector(collector.clone())
                .build(),
            collector,
        }
    }

    /// The collector every lookup pins.
    #[inline]
    pub(crate) fn collector(&self) -> &seize::Collector {
        &self.collector
    }

    /// The collector, shared (a watch outlives its lookup).
    pub(crate) fn collector_arc(&self) -> Arc<seize::Collector> {
        self.collector.clone()
    }

    /// Runs `f` on the slot without touching its reference count, pinned in
    /// [`collector`](Self::collector) for the whole call.
    #[inline]
    pub(crate) fn with<T: 'static + Send + Sync, R>(
        &self,
        id: Uuid,
        f: impl FnOnce(&Slot<T>) -> R,
    ) -> Option<R> {
        let map = self.map.pin();
        let entry = map.get(&(TypeId::of::<T>(), id))?;
        entry.as_any().downcast_ref::<Slot<T>>().map(f)
    }

    /// An owned handle to the slot.
    #[inline]
    pub(crate) fn get<T: 'static + Send + Sync>(&self, id: Uuid) -> Option<Arc<Slot<T>>> {
        let map = self.map.pin();
        let entry = map.get(&(TypeId::of::<T>(), id))?;
        entry.clone().into_any().downcast::<Slot<T>>().ok()
    }

    /// Inserts `slot` if the key is free; gives it back otherwise.
    pub(crate) fn try_insert<T: 'static + Send + Sync>(
        &self,
        id: Uuid,
        slot: Arc<Slot<T>>,
    ) -> Result<(), Arc<Slot<T>>> {
        let map = self.map.pin();
        let entry: Entry = slot;
        match map.try_insert((TypeId::of::<T>(), id), entry) {
            Ok(_) => Ok(()),
            Err(e) => Err(e
                .not_inserted
                .into_any()
                .downcast::<Slot<T>>()
                .expect("entry of the key's type")),
        }
    }

    /// Unlinks `slot` if it is still the one stored under the key.
    pub(crate) fn remove<T: 'static + Send + Sync>(&self, id: Uuid, slot: &Slot<T>) {
        let map = self.map.pin();
        let target = slot as *const Slot<T> as *const ();
        let _ = map.remove_if(&(TypeId::of::<T>(), id), |_, entry| {
            Arc::as_ptr(entry) as *const () == target
        });
    }

    /// Runs `f` on every slot's lock (the store's destructor).
    pub(crate) fn for_each_entry(&self, mut f: impl FnMut(&Entry)) {
        for entry in self.map.pin().values() {
            f(entry);
        }
    }

    pub(crate) fn contains<T: 'static>(&self, id: Uuid) -> bool {
        self.map.pin().contains_key(&(TypeId::of::<T>(), id))
    }

    /// Every id of type `T` (a scan of the whole table).
    pub(crate) fn ids<T: 'static>(&self) -> Vec<Uuid> {
        let ty = TypeId::of::<T>();
        self.map
            .pin()
            .keys()
            .filter(|(t, _)| *t == ty)
            .map(|(_, id)| *id)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}
