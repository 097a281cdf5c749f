//! The conformance suite on the in-memory engine, through `dyn ContextStorage`.
mod conformance;

async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
    std::sync::Arc::new(ctxstore::InMemoryContextStorage::new())
}

conformance::conformance_tests!(make);
