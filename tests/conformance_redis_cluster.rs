//! The conformance suite on a Redis Cluster (feature `redis`). Needs the
//! cluster at `CTXSTORE_REDIS_CLUSTER` (comma-separated seed URLs; default
//! the local one of `scripts/redis-cluster.sh start`, ports 7000-7005).
//! Every case gets its own namespace, so cases run in parallel.

mod redis_cluster_common;

async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
    let store = ctxstore::RedisContextStorage::cluster_builder(redis_cluster_common::seeds())
        .namespace(format!("ctxstore-conf-{}", ctxstore::Uuid::new_v4()))
        .connect()
        .await
        .expect(redis_cluster_common::NEEDS_CLUSTER);
    assert!(store.is_cluster());
    std::sync::Arc::new(store)
}

ctxstore::conformance_tests!(make);
