//! The Redis Cluster the cluster tests use.
#![allow(dead_code)]

/// What to do when the cluster is not there.
pub const NEEDS_CLUSTER: &str = "a Redis Cluster must be running for the redis cluster tests: \
     scripts/redis-cluster.sh start (or set CTXSTORE_REDIS_CLUSTER to its seed URLs)";

/// The seed nodes: `CTXSTORE_REDIS_CLUSTER` (comma-separated), by default
/// the local cluster of `scripts/redis-cluster.sh` (127.0.0.1:7000-7005).
pub fn seeds() -> Vec<String> {
    match std::env::var("CTXSTORE_REDIS_CLUSTER") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => (7000..=7005)
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect(),
    }
}
