//! The conformance suite on the in-memory engine, twice: as users hold it
//! (`Arc<dyn ContextStorage>`, whose typed methods take the engine's fast
//! path through `as_in_memory`), and behind a pass-through decorator that
//! hides the engine, so every call goes through the erased (`*_raw`)
//! methods, as it does behind any wrapper a user writes.
mod conformance;

use std::sync::Arc;

use ctxstore::{
    BoxFuture, ContextStorage, ContextType, ErasedValue, InMemoryContextStorage, RawGuard,
    RawSnapshot, RawWatchStart, Result, Uuid, Wait,
};

mod direct {
    async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
        std::sync::Arc::new(ctxstore::InMemoryContextStorage::new())
    }

    crate::conformance::conformance_tests!(make);
}

/// Forwards every raw method to the engine and keeps the default
/// `as_in_memory` (`None`), so the typed API cannot see the engine.
struct PassThrough(InMemoryContextStorage);

impl ContextStorage for PassThrough {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        self.0.store_raw(ty, id, value)
    }

    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        self.0.lock_raw(ty, id, wait)
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        self.0.snapshot_raw(ty, id)
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        self.0.delete_raw(ty, id)
    }

    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        self.0.store_if_raw(ty, id, expected, value)
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        self.0.delete_if_raw(ty, id, expected)
    }

    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        self.0.watch_raw(ty, id)
    }

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        self.0.contains_raw(ty, id)
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        self.0.ids_raw(ty)
    }

    fn backend_name(&self) -> &'static str {
        "memory behind a pass-through decorator"
    }
}

mod erased {
    async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
        std::sync::Arc::new(super::PassThrough(ctxstore::InMemoryContextStorage::new()))
    }

    crate::conformance::conformance_tests!(make);
}

/// The erased path really is taken: the decorator hides the engine.
#[test]
fn the_decorator_hides_the_engine() {
    let hidden: Arc<dyn ContextStorage> = Arc::new(PassThrough(InMemoryContextStorage::new()));
    assert!(hidden.as_in_memory().is_none());
}
