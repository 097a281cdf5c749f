//! The conformance suite on PostgreSQL (feature `postgres`). Needs a server
//! at `CTXSTORE_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Every case gets its own table, `ctx_test_<unix secs>_<random>`; tables
//! of earlier runs older than an hour are dropped on the way. The cases
//! are the conformance kit's (`ctxstore::conformance`).
mod postgres_common;

async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
    std::sync::Arc::new(postgres_common::fresh_store().await)
}

ctxstore::conformance_tests!(make);
