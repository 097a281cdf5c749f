//! Several OS processes on a Redis Cluster (issue #14): 4 worker processes
//! spread 8,000 guarded increments over 1,000 contexts, whose keys hash to
//! every master; the total is exact.
//!
//! Needs the cluster at `CTXSTORE_REDIS_CLUSTER` (comma-separated seed
//! URLs; default the local one of `scripts/redis-cluster.sh start`, ports
//! 7000-7005). The workers are the `redis_workers` example (`--cluster`,
//! role `spread`), run by the harness of `redis_cluster_common` and built
//! by it as in `tests/redis_processes.rs` (`CTXSTORE_REDIS_WORKERS` names
//! a prebuilt binary instead). The
//! failover test is `tests/redis_cluster_failover.rs`, its own binary so
//! that it never runs alongside these.
#![cfg(all(feature = "redis", unix))]

mod redis_cluster_common;

use std::time::{Duration, Instant};

use ctxstore::{Context, ContextStorageExt};
use redis_cluster_common::{
    counters, keys_per_master, namespace, store, values, Counter, Tally, Workers, CONTEXTS, COUNT,
    PROCESSES,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_spread_increments_over_a_thousand_contexts_exactly() {
    let ns = namespace();
    let store = store(&ns, 5000, 1000).await;
    let (ids, ids_file) = counters(&store).await;

    // The counters' data keys are spread over every master.
    let pattern = format!("{ns}:*:{}", Counter::kind());
    let per_master = keys_per_master(&pattern);
    assert!(per_master.len() >= 3, "masters: {per_master:?}");
    for (m, n) in &per_master {
        assert!(*n > 0, "no counter on master {m}: {per_master:?}");
    }
    let total: usize = per_master.values().sum();
    assert_eq!(total, CONTEXTS, "{per_master:?}");

    let started = Instant::now();
    let file = ids_file.to_str().unwrap().to_owned();
    let tally = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut workers = Workers::spread(&ns, 5000, 1000, &file, COUNT);
        let mut tally = Tally::new();
        while let Some((w, line)) = workers.next(deadline, &tally) {
            tally.add(w, &line);
        }
        for s in workers.wait(deadline) {
            assert!(s.success(), "a worker failed: {s}; {}", tally.summary());
        }
        tally
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();

    for (w, done) in tally.done.iter().enumerate() {
        assert_eq!(*done, Some(COUNT), "worker {w}: {}", tally.summary());
    }
    assert_eq!(tally.ok, PROCESSES as u64 * COUNT, "{}", tally.summary());
    let values = values(&store, &ids).await;
    for (id, n) in &values {
        let (ok, unknown) = tally.per_id.get(id).copied().unwrap_or_default();
        assert!(
            *n <= ok + unknown,
            "counter {id} = {n}, more than its {ok} ok + {unknown} unknown commits"
        );
    }
    let sum: u64 = values.values().sum();
    eprintln!(
        "{PROCESSES} processes x {COUNT} increments over {CONTEXTS} contexts (data keys per \
         master {per_master:?}): sum {sum}, {} in {elapsed:.2?} ({:.0}/s)",
        tally.summary(),
        tally.ok as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        sum, tally.ok,
        "the sum differs from the committed increments ({} unknown outcomes)",
        tally.unknown
    );
    assert_eq!(sum, PROCESSES as u64 * COUNT);
    let repeated = tally.repeated_versions();
    assert!(
        repeated.is_empty(),
        "versions acknowledged twice: {repeated:?}"
    );

    for &id in &ids {
        store.delete_context::<Counter>(id).await.unwrap();
    }
    let _ = std::fs::remove_file(ids_file);
}
