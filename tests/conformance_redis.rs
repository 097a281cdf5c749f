//! The conformance suite on Redis (feature `redis`). Needs a server at
//! `CTXSTORE_REDIS_URL` (default `redis://127.0.0.1:6379`). Every case gets
//! its own namespace, `ctxstore-conf-<uuid>`, so cases run in parallel.
//! The cases are the conformance kit's (`ctxstore::conformance`).

async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
    let url =
        std::env::var("CTXSTORE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let store = ctxstore::RedisContextStorage::builder(url)
        .namespace(format!("ctxstore-conf-{}", ctxstore::Uuid::new_v4()))
        .connect()
        .await
        .expect("Redis must be running for the redis tests (see CTXSTORE_REDIS_URL)");
    std::sync::Arc::new(store)
}

ctxstore::conformance_tests!(make);
