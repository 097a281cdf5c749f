//! What is particular to a Redis Cluster (feature `redis`): where the keys
//! go (one slot per context, contexts and version floors spread over every
//! master), `context_ids` scanning every master, and wake-ups through
//! sharded pub/sub arriving long before the fallback poll would. Needs the
//! cluster of `scripts/redis-cluster.sh start` (or `CTXSTORE_REDIS_CLUSTER`).
#![cfg(feature = "redis")]

mod redis_cluster_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ctxstore::{Context, ContextStorageExt, ContextType, RedisContextStorage, Uuid};
use redis_cluster_common::{keys_per_master, seeds, slow_polling_store, NEEDS_CLUSTER};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    n: u64,
}

impl Context for Job {
    fn kind() -> &'static str {
        "cluster.job"
    }
}

fn namespace() -> String {
    format!("ctxstore-cluster-{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn contexts_and_their_version_floors_spread_over_every_master() {
    let ns = namespace();
    let store = slow_polling_store(&ns).await;
    assert!(store.is_cluster());
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        store.store_context(*id, Job { n: i as u64 }).await.unwrap();
        // The id is the hash tag: every key of the context is in its slot.
        assert_eq!(
            store.data_key(ContextType::of::<Job>(), *id),
            format!("{ns}:{{{id}}}:cluster.job")
        );
    }
    let data = keys_per_master(&format!("{ns}:{{*}}:cluster.job"));
    assert_eq!(data.len(), 3, "three masters: {data:?}");
    assert_eq!(data.values().sum::<usize>(), 300, "{data:?}");
    assert!(
        data.values().all(|&n| n > 30),
        "the contexts of one kind spread over every master: {data:?}"
    );

    // context_ids scans every master.
    let mut found = store.context_ids::<Job>().await.unwrap();
    let mut want = ids.clone();
    found.sort();
    want.sort();
    assert_eq!(found, want);

    // Deleting raises the floor of each context's slot: floors spread too
    // (no cluster-wide key), and a re-created context starts above.
    let mut last = BTreeMap::new();
    for id in &ids {
        store
            .update_context::<Job, _, _>(*id, |j| j.n += 1)
            .await
            .unwrap();
        let v = store
            .get_context_snapshot::<Job>(*id)
            .await
            .unwrap()
            .version();
        last.insert(*id, v);
        store.delete_context::<Job>(*id).await.unwrap();
    }
    let floors = keys_per_master(&format!("{ns}:#floor:*"));
    assert!(
        floors.values().all(|&n| n > 10),
        "version floors live in every master: {floors:?}"
    );
    for id in ids.iter().take(50) {
        let v = store.store_context(*id, Job { n: 0 }).await.unwrap();
        assert!(
            v > last[id],
            "a re-created context reuses no version: {v} after {}",
            last[id]
        );
    }
    assert_eq!(store.context_ids::<Job>().await.unwrap().len(), 50);
}

/// A waiter for a held context is woken by the holder's release through
/// the sharded channel of the context's slot, not by its 10 s fallback
/// poll. The bound (5 s) only separates "woken" from "polled".
#[tokio::test]
async fn a_lock_waiter_is_woken_by_the_release_through_sharded_pubsub() {
    let ns = namespace();
    let holder = slow_polling_store(&ns).await;
    // A second connection, as another process would have.
    let waiter = slow_polling_store(&ns).await;
    for round in 0..3 {
        // A new context each round: new slots, and also slots already
        // subscribed by the earlier rounds' keys.
        let id = Uuid::new_v4();
        holder.store_context(id, Job { n: 0 }).await.unwrap();
        let mut g = holder.get_context::<Job>(id).await.unwrap();
        let w = waiter.clone();
        let task = tokio::spawn(async move {
            let mut g = w.get_context::<Job>(id).await.unwrap();
            let seen = g.n;
            g.n += 10;
            g.commit().await.unwrap();
            seen
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "round {round}: took a held lease");
        g.n = 1;
        g.commit().await.unwrap();
        let committed = Instant::now();
        let seen = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the waiter never got the lease")
            .unwrap();
        let waited = committed.elapsed();
        assert_eq!(seen, 1, "round {round}: the waiter saw the commit");
        assert!(
            waited < Duration::from_secs(5),
            "round {round}: the waiter took {waited:?} after the release: it was not woken \
             (the fallback poll is 10 s)"
        );
    }
}

/// A watch on a cluster is woken by a commit of another connection
/// through the sharded channel (its fallback re-read is every 20 s).
#[tokio::test]
async fn a_watch_is_woken_through_sharded_pubsub() {
    let ns = namespace();
    let writer = slow_polling_store(&ns).await;
    let watcher = slow_polling_store(&ns).await;
    let id = Uuid::new_v4();
    writer.store_context(id, Job { n: 0 }).await.unwrap();
    let mut watch = watcher.watch_context::<Job>(id).await.unwrap();
    let first = watch.changed().await.unwrap();
    assert_eq!(first.n, 0);
    for n in 1..=3 {
        writer
            .update_context::<Job, _, _>(id, |j| j.n = n)
            .await
            .unwrap();
        let v = writer
            .get_context_snapshot::<Job>(id)
            .await
            .unwrap()
            .version();
        let committed = Instant::now();
        let snap = tokio::time::timeout(Duration::from_secs(60), watch.changed())
            .await
            .expect("the watch never saw the commit")
            .unwrap();
        assert_eq!((snap.n, snap.version()), (n, v));
        assert!(
            committed.elapsed() < Duration::from_secs(5),
            "the watch took {:?}: it was not woken (the fallback re-read is 20 s)",
            committed.elapsed()
        );
    }
}

#[tokio::test]
async fn a_namespace_with_braces_is_refused_on_a_cluster() {
    let e = RedisContextStorage::cluster_builder(seeds())
        .namespace("a{b}")
        .connect()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("a{b}"), "{e}");
    let e = RedisContextStorage::connect_cluster(Vec::<String>::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("seed"), "{e}");
}

/// A lease that vanishes from its master (what a failover to a replica
/// that never received it does; here: deleted on the key's master through
/// the cluster) is reported, and the guard's commit fails with `LeaseLost`
/// and writes nothing: never a silent overwrite.
#[tokio::test]
async fn a_lease_lost_with_its_master_fails_the_commit() {
    let ns = namespace();
    let store = RedisContextStorage::cluster_builder(seeds())
        .namespace(&ns)
        .lease(Duration::from_millis(600))
        .renewal_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect(NEEDS_CLUSTER);
    let id = Uuid::new_v4();
    let v0 = store.store_context(id, Job { n: 1 }).await.unwrap();
    let mut g = store.get_context::<Job>(id).await.unwrap();
    let lock = format!("{}:lock", store.data_key(ContextType::of::<Job>(), id));
    let client = redis::cluster::ClusterClient::new(seeds()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let removed: i64 = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the guard's lease was at {lock}");
    tokio::time::timeout(Duration::from_secs(10), g.lease_lost())
        .await
        .expect("the lost lease was never reported");
    g.n = 99;
    let e = g.commit().await.unwrap_err();
    assert!(e.is_lease_lost(), "{e}");
    let snap = store.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!((snap.n, snap.version()), (1, v0), "nothing was written");
}
