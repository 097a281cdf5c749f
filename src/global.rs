//! The process-wide storage provider, and task-scoped overrides for tests.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::{ContextStorage, InMemoryContextStorage};

type Shared = Arc<dyn ContextStorage>;

static GLOBAL: OnceLock<ArcSwap<Shared>> = OnceLock::new();

tokio::task_local! {
    static SCOPED: Shared;
}

fn global() -> &'static ArcSwap<Shared> {
    // OnceLock: exactly one initializer runs, however many threads race on
    // first use; every caller sees the same store.
    GLOBAL.get_or_init(|| ArcSwap::from_pointee(Arc::new(InMemoryContextStorage::new()) as Shared))
}

/// The storage for this task or thread: the innermost
/// [`with_context_storage`] override if inside one, else the process-wide
/// storage — lazily one [`InMemoryContextStorage`] per process, unless
/// [`set_context_storage`] installed another. First use is race-free.
///
/// It is a cheap `Arc` clone; fetch it once per task rather than per call
/// if you can.
pub fn context_storage() -> Arc<dyn ContextStorage> {
    if let Ok(scoped) = SCOPED.try_with(Arc::clone) {
        return scoped;
    }
    Arc::clone(&global().load())
}

/// Installs `storage` as the process-wide storage and returns the previous
/// one. Tasks that already fetched the old storage keep using it.
pub fn set_context_storage(storage: Arc<dyn ContextStorage>) -> Arc<dyn ContextStorage> {
    let previous = global().swap(Arc::new(storage));
    Arc::clone(&previous)
}

/// Runs `future` with `storage` as what [`context_storage`] returns, across
/// all of its `.await`s — and only there: other tasks, threads and tests
/// running concurrently keep seeing theirs.
///
/// Tasks spawned from inside `future` (`tokio::spawn`) do **not** inherit
/// the override (Tokio task-locals are per task); wrap their futures in
/// `with_context_storage` too if they should.
pub async fn with_context_storage<F: Future>(
    storage: Arc<dyn ContextStorage>,
    future: F,
) -> F::Output {
    SCOPED.scope(storage, future).await
}

/// [`with_context_storage`] for synchronous code on the current thread.
pub fn with_context_storage_blocking<R>(
    storage: Arc<dyn ContextStorage>,
    f: impl FnOnce() -> R,
) -> R {
    SCOPED.sync_scope(storage, f)
}
