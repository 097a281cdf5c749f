//! Wake-ups survive the loss of the sharded subscriptions (feature
//! `redis`): after every subscription connection of the cluster is killed
//! (`CLIENT KILL TYPE pubsub` on every node), a lock waiter of a slot the
//! store had subscribed before is still woken by the release, not by its
//! 10 s fallback poll. The `redis` crate re-subscribes a node's shard
//! channels in one `SSUBSCRIBE`, which Redis refuses when they span slots;
//! the store forgets its slot subscriptions on the disconnection and
//! subscribes again. Its own test binary: it kills connections that other
//! cluster tests running beside it would lose too.
#![cfg(feature = "redis")]

mod redis_cluster_common;

use std::time::{Duration, Instant};

use ctxstore::{ContextStorageExt, RedisContextStorage, Uuid};
use redis_cluster_common::{slow_polling_store, Counter};

/// Holds `id` in `holder`, lets `waiter` queue for it, releases after a
/// moment, and returns how long the waiter took after the release.
async fn woken_after_release(
    holder: &RedisContextStorage,
    waiter: &RedisContextStorage,
    id: Uuid,
) -> Duration {
    let mut g = holder.get_context::<Counter>(id).await.unwrap();
    let w = waiter.clone();
    let task = tokio::spawn(async move {
        let mut g = w.get_context::<Counter>(id).await.unwrap();
        g.n += 1;
        g.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "took a held lease");
    g.n += 1;
    g.commit().await.unwrap();
    let released = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the waiter never got the lease")
        .unwrap();
    released.elapsed()
}

#[tokio::test]
async fn waiters_are_woken_after_the_subscriptions_were_killed() {
    let ns = format!("ctxstore-resub-{}", Uuid::new_v4().simple());
    let holder = slow_polling_store(&ns).await;
    let waiter = slow_polling_store(&ns).await;
    // Enough keys that every master serves several of their slots, so
    // each node's re-subscription would span slots.
    let ids: Vec<Uuid> = (0..24).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        holder.store_context(*id, Counter { n: 0 }).await.unwrap();
        let took = woken_after_release(&holder, &waiter, *id).await;
        assert!(took < Duration::from_secs(5), "before the kill: {took:?}");
    }

    // Kill every subscription connection of the cluster.
    for port in 7000..=7005 {
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
            continue;
        };
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut con)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The same slots again: each waiter must be woken by its release.
    for (i, id) in ids.iter().enumerate() {
        let took = woken_after_release(&holder, &waiter, *id).await;
        assert!(
            took < Duration::from_secs(5),
            "key {i} after the kill: the waiter took {took:?} after the release, so it was \
             not woken (the fallback poll is 10 s): its slot's subscription was lost"
        );
    }
    for id in &ids {
        holder.delete_context::<Counter>(*id).await.unwrap();
    }
}
