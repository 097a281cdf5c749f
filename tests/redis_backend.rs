//! Redis-specific behaviour of `RedisContextStorage` (feature `redis`; Redis
//! at `CTXSTORE_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Every test uses its own namespace, so they run in parallel and never see
//! each other's keys. Two stores on one namespace stand in for two processes.
//! Waits are bounded only by generous hang guards, never asserted on.
#![cfg(feature = "redis")]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ctxstore::{
    Context, ContextStorage, ContextStorageExt, ContextType, RedisContextStorage, Uuid,
};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Job {
    name: String,
    done: u64,
}

impl Context for Job {
    fn kind() -> &'static str {
        "test.job"
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Other {
    done: u64,
}

impl Context for Other {
    fn kind() -> &'static str {
        "test.other[1]*"
    }
}

fn url() -> String {
    std::env::var("CTXSTORE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn namespace() -> String {
    format!("ctxstore-test-{}", Uuid::new_v4())
}

/// A store with a long lease: anything that completes quickly below was
/// woken by a release, not by a lease running out.
async fn store_in(ns: &str) -> RedisContextStorage {
    RedisContextStorage::builder(url())
        .namespace(ns)
        .lease(Duration::from_secs(360))
        .renewal_interval(Duration::from_secs(120))
        .connect()
        .await
        .expect("Redis must be running for the redis tests (see CTXSTORE_REDIS_URL)")
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn guard<F: Future>(what: &str, secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(out) => out,
        Err(_) => panic!("hang guard: {what} did not finish within {secs} s"),
    }
}

fn job(done: u64) -> Job {
    Job {
        name: "nightly".into(),
        done,
    }
}

#[tokio::test]
async fn round_trip_versions_and_errors() {
    let store = store_in(&namespace()).await;
    let id = Uuid::new_v4();
    let missing = store.get_context_snapshot::<Job>(id).await.unwrap_err();
    assert!(missing.is_not_found());
    assert_eq!(
        missing.to_string(),
        format!("no Job context known for {id}")
    );
    assert!(store
        .get_context::<Job>(id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(store
        .delete_context::<Job>(id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(!store.contains_context::<Job>(id).await.unwrap());

    let v0 = store.store_context(id, job(0)).await.unwrap();
    let mut g = store.get_context::<Job>(id).await.unwrap();
    assert_eq!((g.done, g.version()), (0, v0));
    g.done = 5;
    let v1 = g.commit().await.unwrap();
    assert!(v1 > v0);
    let snap = store.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!((snap.done, snap.version()), (5, v1));

    let out = store
        .update_context(id, |j: &mut Job| {
            j.done += 1;
            j.done
        })
        .await
        .unwrap();
    assert_eq!(out, 6);
    // Rollback writes nothing.
    let mut g = store.get_context::<Job>(id).await.unwrap();
    g.done = 1000;
    g.rollback();
    let snap = store.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!(snap.done, 6);
    assert!(snap.version() > v1);
    // Typed keys: the same id under another type is another context.
    assert!(!store.contains_context::<Other>(id).await.unwrap());
    assert!(store.contains_context::<Job>(id).await.unwrap());
    store.delete_context::<Job>(id).await.unwrap();
    assert!(!store.contains_context::<Job>(id).await.unwrap());
}

#[tokio::test]
async fn versions_are_never_reused_across_delete_and_recreate() {
    let store = store_in(&namespace()).await;
    let id = Uuid::new_v4();
    let mut last = 0;
    for round in 0..5 {
        let v = store.store_context(id, job(round)).await.unwrap();
        assert!(v > last, "version {v} after {last}");
        store
            .update_context(id, |j: &mut Job| j.done += 1)
            .await
            .unwrap();
        let v2 = store
            .get_context_snapshot::<Job>(id)
            .await
            .unwrap()
            .version();
        assert!(v2 > v);
        last = v2;
        store.delete_context::<Job>(id).await.unwrap();
    }
    // Another id of the same kind also starts above every deleted version.
    let fresh = store.store_context(Uuid::new_v4(), job(0)).await.unwrap();
    assert!(fresh > last);
}

#[tokio::test]
async fn ids_by_scan_are_typed_and_complete() {
    let store = store_in(&namespace()).await;
    let mut jobs: Vec<Uuid> = (0..2500).map(|_| Uuid::new_v4()).collect();
    for chunk in jobs.chunks(250) {
        let futs: Vec<_> = chunk
            .iter()
            .map(|id| store.store_context(*id, job(0)))
            .collect();
        for f in futs {
            f.await.unwrap();
        }
    }
    let other = Uuid::new_v4();
    store.store_context(other, Other { done: 1 }).await.unwrap();
    // A held lock key must not show up as an id.
    let held = store.get_context::<Job>(jobs[0]).await.unwrap();
    let mut ids = store.context_ids::<Job>().await.unwrap();
    ids.sort();
    jobs.sort();
    assert_eq!(ids, jobs);
    // A kind with glob characters is matched literally.
    assert_eq!(store.context_ids::<Other>().await.unwrap(), vec![other]);
    held.rollback();
}

#[tokio::test]
async fn try_and_timeout_refuse_while_another_process_holds() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let b = store_in(&ns).await;
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    let held = a.get_context::<Job>(id).await.unwrap();
    // Another "process".
    assert!(b
        .try_get_context::<Job>(id)
        .await
        .unwrap_err()
        .is_would_block());
    let e = b
        .get_context_timeout::<Job>(id, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    // The same process: the local queue answers without asking Redis.
    assert!(a
        .try_get_context::<Job>(id)
        .await
        .unwrap_err()
        .is_would_block());
    // Snapshots never wait for the holder.
    let snap = guard("snapshot", 30, b.get_context_snapshot::<Job>(id)).await;
    assert_eq!(snap.unwrap().done, 0);
    drop(held);
}

#[tokio::test]
async fn a_release_wakes_a_waiter_in_another_process() {
    let ns = namespace();
    let a = Arc::new(store_in(&ns).await);
    let b = Arc::new(store_in(&ns).await);
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    let mut held = a.get_context::<Job>(id).await.unwrap();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.update_context(id, |j: &mut Job| j.done += 1).await }
    });
    // Let the waiter find the lock held and go to sleep.
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.done = 10;
    held.commit().await.unwrap();
    // Lease 360 s, fallback poll 120 s: finishing within the guard means the
    // pub/sub wake-up worked.
    guard("woken waiter", 60, waiter).await.unwrap().unwrap();
    assert_eq!(a.get_context_snapshot::<Job>(id).await.unwrap().done, 11);

    // The same after a plain drop (rollback) instead of a commit.
    let held = a.get_context::<Job>(id).await.unwrap();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.get_context::<Job>(id).await.map(|g| g.done) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(held);
    assert_eq!(
        guard("woken waiter", 60, waiter).await.unwrap().unwrap(),
        11
    );
}

#[tokio::test]
async fn many_tasks_two_processes_no_lost_update() {
    let ns = namespace();
    let stores = [Arc::new(store_in(&ns).await), Arc::new(store_in(&ns).await)];
    let id = Uuid::new_v4();
    stores[0].store_context(id, job(0)).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = stores[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                store
                    .update_context(id, |j: &mut Job| j.done += 1)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        guard("increments", 120, t).await.unwrap();
    }
    assert_eq!(
        stores[1]
            .get_context_snapshot::<Job>(id)
            .await
            .unwrap()
            .done,
        400
    );
}

#[tokio::test]
async fn an_expired_lease_cannot_commit_and_the_newer_value_survives() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let b = store_in(&ns).await;
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    let mut stale = a.get_context::<Job>(id).await.unwrap();
    // The lease runs out (as for a paused process): remove the lock key.
    let key = a.data_key(ContextType::of::<Job>(), id);
    let mut conn = raw().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{key}:lock"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let newer = b.update_context(id, |j: &mut Job| j.done = 7).await;
    newer.unwrap();
    let v_newer = b.get_context_snapshot::<Job>(id).await.unwrap().version();
    stale.done = 666;
    let e = stale.commit().await.unwrap_err();
    assert!(e.is_lease_lost(), "{e}");
    assert_eq!(e.id(), Some(id));
    let snap = a.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!((snap.done, snap.version()), (7, v_newer));
    // And the lock is free again.
    a.try_get_context::<Job>(id).await.unwrap().rollback();
}

#[tokio::test]
async fn a_value_that_does_not_decode_is_a_codec_error_naming_the_key() {
    let store = store_in(&namespace()).await;
    let id = Uuid::new_v4();
    store.store_context(id, job(1)).await.unwrap();
    let key = store.data_key(ContextType::of::<Job>(), id);
    let mut conn = raw().await;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("value")
        .arg(b"{\"name\": 12, garbage".as_slice())
        .query_async(&mut conn)
        .await
        .unwrap();
    let e = store.get_context_snapshot::<Job>(id).await.unwrap_err();
    assert!(e.is_codec(), "{e}");
    assert_eq!(e.id(), Some(id));
    assert!(e.to_string().contains(&id.to_string()), "{e}");
    let e = store.get_context::<Job>(id).await.unwrap_err();
    assert!(e.is_codec(), "{e}");
    // The lock taken to read it was given back: the context can be repaired.
    guard(
        "store after codec error",
        60,
        store.store_context(id, job(2)),
    )
    .await
    .unwrap();
    assert_eq!(store.get_context_snapshot::<Job>(id).await.unwrap().done, 2);

    // A corrupt version is a codec error too, not a panic.
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("version")
        .arg("not-a-number")
        .query_async(&mut conn)
        .await
        .unwrap();
    let e = store.get_context_snapshot::<Job>(id).await.unwrap_err();
    assert!(e.is_codec(), "{e}");
}

#[tokio::test]
async fn cancelled_lock_futures_and_updates_leak_no_lease() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let b = store_in(&ns).await;
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    // Lock futures dropped at every point of their life, including while
    // the acquire script is in flight. A leaked lease would block the key
    // for the 360 s lease.
    for i in 0..200u64 {
        let _ = tokio::time::timeout(Duration::from_micros(i * 10), a.get_context::<Job>(id)).await;
        let _ = tokio::time::timeout(
            Duration::from_micros(i * 10),
            a.update_context(id, |j: &mut Job| j.done += 1),
        )
        .await;
    }
    // Another process gets the lock promptly (the background releases ran).
    let g = guard("lock after cancellations", 60, async {
        loop {
            match b.try_get_context::<Job>(id).await {
                Ok(g) => break g,
                Err(e) if e.is_would_block() => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    g.rollback();
}

#[tokio::test]
async fn guards_work_from_plain_threads() {
    let store = Arc::new(store_in(&namespace()).await);
    let id = Uuid::new_v4();
    store.store_context(id, job(0)).await.unwrap();
    let g = store.get_context::<Job>(id).await.unwrap();
    let v = tokio::task::spawn_blocking(move || {
        let mut g = g;
        g.done = 3;
        g.commit_blocking()
    })
    .await
    .unwrap()
    .unwrap();
    let snap = store.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!((snap.done, snap.version()), (3, v));
    // Dropped on a plain thread: released in the background.
    let g = store.get_context::<Job>(id).await.unwrap();
    std::thread::spawn(move || drop(g)).join().unwrap();
    guard(
        "lock after drop on a thread",
        60,
        store.get_context::<Job>(id),
    )
    .await
    .unwrap()
    .rollback();
}

#[tokio::test]
async fn bad_settings_and_unreachable_redis_are_errors() {
    let e = RedisContextStorage::builder(url())
        .lease(Duration::from_secs(1))
        .renewal_interval(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert!(e.is_backend(), "{e}");
    let e = RedisContextStorage::builder(url())
        .namespace("a*b")
        .connect()
        .await
        .unwrap_err();
    assert!(e.is_backend(), "{e}");
    // `a:b` + kind `c` would share keys with `a` + kind `b:c`.
    let e = RedisContextStorage::builder(url())
        .namespace("a:b")
        .connect()
        .await
        .unwrap_err();
    assert!(e.is_backend() && e.to_string().contains("a:b"), "{e}");
    // Nothing listens on port 1.
    let e = RedisContextStorage::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert!(e.is_backend(), "{e}");
    let e = RedisContextStorage::connect("not a url").await.unwrap_err();
    assert!(e.is_backend(), "{e}");
}

#[tokio::test]
async fn works_as_dyn_context_storage() {
    let store: Arc<dyn ContextStorage> = Arc::new(store_in(&namespace()).await);
    assert_eq!(store.backend_name(), "redis");
    let id = Uuid::new_v4();
    store.store_context(id, job(0)).await.unwrap();
    store
        .update_context(id, |j: &mut Job| j.done += 2)
        .await
        .unwrap();
    assert_eq!(store.get_context_snapshot::<Job>(id).await.unwrap().done, 2);
}

// ---------------------------------------------------------------------------
// Outages, through a TCP proxy the test can cut (the shared Redis stays up).

mod proxy {
    use std::net::SocketAddr;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    pub struct Proxy {
        pub addr: SocketAddr,
        up: watch::Sender<bool>,
    }

    impl Proxy {
        /// While cut, the port refuses connections (the listener is
        /// closed) and open connections are dropped, as when Redis is down.
        pub async fn start(target: String) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (up, _) = watch::channel(true);
            let mut rx = up.subscribe();
            tokio::spawn(async move {
                let mut listener = Some(listener);
                loop {
                    let Some(l) = listener.as_ref() else {
                        if rx.wait_for(|up| *up).await.is_err() {
                            return;
                        }
                        listener = Some(TcpListener::bind(addr).await.unwrap());
                        continue;
                    };
                    let accepted = tokio::select! {
                        accepted = l.accept() => accepted,
                        _ = rx.wait_for(|up| !*up) => {
                            listener = None;
                            continue;
                        }
                    };
                    let Ok((mut inbound, _)) = accepted else {
                        return;
                    };
                    let mut conn_rx = rx.clone();
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = conn_rx.wait_for(|up| !*up) => {}
                        }
                    });
                }
            });
            Proxy { addr, up }
        }

        pub fn cut(&self) {
            self.up.send_replace(false);
        }

        pub fn restore(&self) {
            self.up.send_replace(true);
        }
    }
}

fn redis_host_port() -> String {
    let url = url();
    let rest = url.strip_prefix("redis://").unwrap_or(&url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

#[tokio::test]
async fn redis_outage_gives_backend_errors_and_the_store_recovers() {
    let proxy = proxy::Proxy::start(redis_host_port()).await;
    let ns = namespace();
    let store = RedisContextStorage::builder(format!("redis://{}", proxy.addr))
        .namespace(&ns)
        .lease(Duration::from_millis(600))
        .renewal_interval(Duration::from_millis(200))
        .response_timeout(Some(Duration::from_millis(300)))
        .connection_timeout(Some(Duration::from_millis(300)))
        .connect()
        .await
        .unwrap();
    let id = Uuid::new_v4();
    store.store_context(id, job(0)).await.unwrap();
    let mut g = store.get_context::<Job>(id).await.unwrap();
    g.done = 99;
    let other = Uuid::new_v4();
    store.store_context(other, job(0)).await.unwrap();
    let g2 = store.get_context::<Job>(other).await.unwrap();

    proxy.cut();
    // Every operation fails with a Backend error naming the key; none panics.
    let e = guard(
        "snapshot during outage",
        60,
        store.get_context_snapshot::<Job>(id),
    )
    .await
    .unwrap_err();
    assert!(e.is_backend(), "{e}");
    assert_eq!(e.id(), Some(id));
    let e = guard("commit during outage", 60, g.commit())
        .await
        .unwrap_err();
    assert!(e.is_backend() || e.is_lease_lost(), "{e}");
    let e = guard(
        "store during outage",
        60,
        store.store_context(Uuid::new_v4(), job(1)),
    )
    .await
    .unwrap_err();
    assert!(e.is_backend(), "{e}");

    // No renewal could succeed for a lease period: the holder was told.
    guard("lease_lost during the outage", 30, g2.lease_lost()).await;
    drop(g2);

    // The guard (gone with the failed commit) left a lock that nobody renews:
    // it expires by itself while Redis cannot be told.
    let key = store.data_key(ContextType::of::<Job>(), id);
    let mut conn = raw().await;
    guard("lease expiry", 60, async {
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{key}:lock"))
                .query_async(&mut conn)
                .await
                .unwrap();
            if !exists {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    proxy.restore();
    // The connection manager reconnects; the store works again.
    let v = guard("recovery", 120, async {
        loop {
            match store.update_context(id, |j: &mut Job| j.done += 1).await {
                Ok(()) => break,
                Err(e) if e.is_backend() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
        store.get_context_snapshot::<Job>(id).await.unwrap()
    })
    .await;
    // The commit cut off by the outage wrote nothing.
    assert_eq!(v.done, 1);
}

#[tokio::test]
async fn the_wake_up_subscription_comes_back_after_an_outage() {
    let proxy = proxy::Proxy::start(redis_host_port()).await;
    let ns = namespace();
    // Long lease and poll: a prompt wake-up below can only come by pub/sub.
    // Few reconnect attempts, so that the outage outlasts them.
    let cut_off = RedisContextStorage::builder(format!("redis://{}", proxy.addr))
        .namespace(&ns)
        .lease(Duration::from_secs(360))
        .renewal_interval(Duration::from_secs(120))
        .connection_config(
            redis::aio::ConnectionManagerConfig::new()
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(100))
                .set_response_timeout(Some(Duration::from_millis(300)))
                .set_connection_timeout(Some(Duration::from_millis(300))),
        )
        .connect()
        .await
        .unwrap();
    let direct = store_in(&ns).await;
    let channel = format!("{ns}:#wake");
    let mut conn = raw().await;
    let subscribers = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let channel = channel.clone();
        async move {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .unwrap();
            n
        }
    };
    // Ours and `direct`'s.
    assert_eq!(subscribers(&mut conn).await, 2);

    proxy.cut();
    guard("subscription dropped", 60, async {
        while subscribers(&mut conn).await != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Longer than the driver's own reconnect attempts (about 0.2 s here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    guard("subscription restored", 60, async {
        while subscribers(&mut conn).await != 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let id = Uuid::new_v4();
    direct.store_context(id, job(0)).await.unwrap();
    let held = direct.get_context::<Job>(id).await.unwrap();
    let waiter = tokio::spawn(async move {
        loop {
            match cut_off.update_context(id, |j: &mut Job| j.done += 1).await {
                Ok(()) => return,
                // The command connection may still be reconnecting.
                Err(e) if e.is_backend() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    guard("woken after the outage", 60, waiter).await.unwrap();
    assert_eq!(
        direct.get_context_snapshot::<Job>(id).await.unwrap().done,
        1
    );
}

// ---------------------------------------------------------------------------
// Issue #15: leaked leases and poisoned state.

async fn lock_exists(conn: &mut redis::aio::MultiplexedConnection, data_key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(format!("{data_key}:lock"))
        .query_async(conn)
        .await
        .unwrap()
}

/// Waits (bounded) for the lease key of `data_key` to be gone; the tests
/// use a 360 s lease, so a leaked lease is still there when this gives up.
async fn assert_lease_released(what: &str, data_key: &str) {
    let mut conn = raw().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while lock_exists(&mut conn, data_key).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the lease of {data_key} leaked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hset(key: &str, field: &str, value: &str) {
    let mut conn = raw().await;
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn issue15_a_lock_attempt_on_a_corrupt_version_leaks_no_lease() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let id = Uuid::new_v4();
    a.store_context(id, job(1)).await.unwrap();
    let key = a.data_key(ContextType::of::<Job>(), id);
    for corrupt in ["not-a-number", "1.5", "-3", "1e3", ""] {
        hset(&key, "version", corrupt).await;
        let e = a.get_context::<Job>(id).await.unwrap_err();
        assert!(e.is_codec(), "{corrupt:?}: {e}");
        assert_eq!(e.id(), Some(id));
        assert_lease_released("lock on a corrupt version", &key).await;
        let e = a.try_get_context::<Job>(id).await.unwrap_err();
        assert!(e.is_codec(), "{corrupt:?}: {e}");
        assert_lease_released("try_lock on a corrupt version", &key).await;
    }
}

/// A private `redis-server` on a free loopback port, for tests that block
/// or reconfigure the whole server; killed on drop.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl PrivateRedis {
    async fn start(extra: &[&str]) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("ctxstore-redis-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = std::env::var("CTXSTORE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(exe)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test (or set CTXSTORE_REDIS_SERVER)");
        let server = PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: TempDir(dir),
        };
        let client = redis::Client::open(server.url.as_str()).unwrap();
        guard("private redis-server start", 30, async {
            loop {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut c)
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        server
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn issue15_a_lock_reply_that_times_out_leaks_no_lease() {
    // Blocks its server for a second: a private one, not the shared one.
    let server = PrivateRedis::start(&[]).await;
    let a = RedisContextStorage::builder(&server.url)
        .namespace(namespace())
        .lease(Duration::from_secs(360))
        .renewal_interval(Duration::from_secs(120))
        .response_timeout(Some(Duration::from_millis(100)))
        .connect()
        .await
        .unwrap();
    let id = Uuid::new_v4();
    a.store_context(id, job(1)).await.unwrap();
    let key = a.data_key(ContextType::of::<Job>(), id);
    // Load the lock script (so that it runs, not fails NOSCRIPT, below).
    a.get_context::<Job>(id).await.unwrap().rollback();
    let mut conn = server.conn().await;
    // Keep Redis busy for a second with a script: our lock script queues
    // behind it, its reply times out, and then it runs all the same.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let busy = tokio::spawn({
        let mut conn = conn.clone();
        async move {
            let spin = redis::Script::new(
                "local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] \
                 while true do local t = redis.call('TIME') \
                 if t[1] * 1000000 + t[2] - t0 > 1000000 then return 1 end end",
            );
            // Load it first, so that the timed call below is one EVALSHA.
            let _: String = spin.prepare_invoke().load_async(&mut conn).await.unwrap();
            let _ = started_tx.send(());
            let _: i64 = spin.invoke_async(&mut conn).await.unwrap();
        }
    });
    started_rx.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = a.get_context::<Job>(id).await.unwrap_err();
    assert!(e.is_backend(), "{e}");
    busy.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while redis::cmd("EXISTS")
        .arg(format!("{key}:lock"))
        .query_async::<bool>(&mut conn)
        .await
        .unwrap()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease of {key} leaked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the key is usable at once.
    a.try_get_context::<Job>(id).await.unwrap().rollback();
}

#[tokio::test]
async fn issue15_a_lock_future_dropped_after_the_reply_arrived_leaks_no_lease() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let id = Uuid::new_v4();
    a.store_context(id, job(1)).await.unwrap();
    let key = a.data_key(ContextType::of::<Job>(), id);
    for _ in 0..5 {
        // Poll once (the script is sent), let the reply arrive, then drop
        // the future without polling it again (a lost `select!` branch).
        let mut fut = Box::pin(a.get_context::<Job>(id));
        std::future::poll_fn(|cx| {
            assert!(fut.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(fut);
        assert_lease_released("lock future dropped with its reply", &key).await;
    }
    guard("lock after the drops", 30, a.get_context::<Job>(id))
        .await
        .unwrap()
        .rollback();
}

#[tokio::test]
async fn issue15_a_corrupt_version_does_not_poison_its_kind_and_store_repairs_it() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let id = Uuid::new_v4();
    let v1 = a.store_context(id, job(1)).await.unwrap();
    let key = a.data_key(ContextType::of::<Job>(), id);
    hset(&key, "version", "garbage").await;
    // Deleting refuses (it would copy the garbage into the kind's floor).
    let e = a.delete_context::<Job>(id).await.unwrap_err();
    assert!(e.is_codec(), "{e}");
    assert_eq!(e.id(), Some(id));
    assert!(e.to_string().contains(&id.to_string()), "{e}");
    // Other contexts of the kind are unaffected.
    let other = Uuid::new_v4();
    let v = a.store_context(other, job(2)).await.unwrap();
    assert!(v >= 1);
    assert_eq!(a.get_context_snapshot::<Job>(other).await.unwrap().done, 2);
    // store_context repairs the corrupt key, with a version above any it had.
    let v2 = a.store_context(id, job(3)).await.unwrap();
    assert!(v2 > v1, "{v2} after {v1}");
    let snap = a.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!((snap.done, snap.version()), (3, v2));
    a.update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    a.delete_context::<Job>(id).await.unwrap();
    let v3 = a.store_context(id, job(0)).await.unwrap();
    assert!(v3 > v2, "{v3} after {v2}");

    // A corrupt floor (written by hand) is refused before anything is
    // written, naming the floor; existing contexts keep working.
    let floor = format!("{ns}:#floor");
    hset(&floor, Job::kind(), "NaN").await;
    let fresh = Uuid::new_v4();
    let e = a.store_context(fresh, job(0)).await.unwrap_err();
    assert!(e.is_codec() && e.to_string().contains("#floor"), "{e}");
    assert!(!a.contains_context::<Job>(fresh).await.unwrap());
    let e = a.delete_context::<Job>(id).await.unwrap_err();
    assert!(e.is_codec(), "{e}");
    a.update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Reading {
    label: String,
    value: f64,
    extra: Option<f32>,
    tags: std::collections::BTreeMap<String, f64>,
}

impl Context for Reading {
    fn kind() -> &'static str {
        "test.reading"
    }
}

fn reading() -> Reading {
    Reading {
        label: "ok".into(),
        value: 1.5,
        extra: Some(2.5),
        tags: [("t".to_owned(), 3.0)].into(),
    }
}

/// Values the in-memory store takes but JSON cannot carry back.
fn unportable_readings() -> Vec<Reading> {
    let mut out = Vec::new();
    for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        out.push(Reading {
            value: v,
            ..reading()
        });
    }
    out.push(Reading {
        extra: Some(f32::NAN),
        ..reading()
    });
    out.push(Reading {
        tags: [("t".to_owned(), f64::NAN)].into(),
        ..reading()
    });
    out.push(Reading {
        label: "nul\0inside".into(),
        ..reading()
    });
    out.push(Reading {
        tags: [("k\0".to_owned(), 1.0)].into(),
        ..reading()
    });
    out
}

#[tokio::test]
async fn issue15_non_finite_floats_and_nul_strings_are_refused_at_write_time() {
    let store = store_in(&namespace()).await;
    for bad in unportable_readings() {
        let id = Uuid::new_v4();
        let e = store.store_context(id, bad.clone()).await.unwrap_err();
        assert!(e.is_codec(), "{bad:?}: {e}");
        assert_eq!(e.id(), Some(id));
        assert!(e.to_string().contains(&id.to_string()), "{e}");
        assert!(!store.contains_context::<Reading>(id).await.unwrap());
        // Through a guard: refused, nothing written, the lock released.
        let v = store.store_context(id, reading()).await.unwrap();
        let mut g = store.get_context::<Reading>(id).await.unwrap();
        *g = bad.clone();
        let e = g.commit().await.unwrap_err();
        assert!(e.is_codec(), "{bad:?}: {e}");
        assert_eq!(e.id(), Some(id));
        let snap = store.get_context_snapshot::<Reading>(id).await.unwrap();
        assert_eq!((&*snap, snap.version()), (&reading(), v));
        guard(
            "lock after a refused commit",
            30,
            store.get_context::<Reading>(id),
        )
        .await
        .unwrap()
        .rollback();
    }
}

/// Captures what `tracing` logs on this thread while `f` runs.
async fn logged<F: Future>(f: F) -> (F::Output, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let buf = buf.clone();
            move || buf.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let out = {
        let _default = tracing::subscriber::set_default(subscriber);
        f.await
    };
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
}

#[tokio::test]
async fn issue15_connect_warns_when_the_server_can_evict_or_forget_the_store() {
    // Private servers: the shared one's settings are not ours to change.
    let evicting = PrivateRedis::start(&["--maxmemory-policy", "allkeys-lru"]).await;
    let (store, log) = logged(
        RedisContextStorage::builder(&evicting.url)
            .namespace(namespace())
            .connect(),
    )
    .await;
    store.unwrap();
    assert!(
        log.contains("WARN") && log.contains("allkeys-lru") && log.contains("noeviction"),
        "{log}"
    );
    assert!(log.contains("persistence"), "{log}");

    let durable = PrivateRedis::start(&["--appendonly", "yes"]).await;
    let (store, log) = logged(
        RedisContextStorage::builder(&durable.url)
            .namespace(namespace())
            .connect(),
    )
    .await;
    store.unwrap();
    assert!(!log.contains("WARN"), "{log}");
}

#[tokio::test]
async fn issue15_a_holder_is_told_when_its_lease_is_lost() {
    let ns = namespace();
    let a = RedisContextStorage::builder(url())
        .namespace(&ns)
        .lease(Duration::from_millis(600))
        .renewal_interval(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    // A healthy lease stays: renewals keep it for many lease periods.
    let g = a.get_context::<Job>(id).await.unwrap();
    let lost = g.lease_lost();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), lost)
            .await
            .is_err(),
        "a renewed lease was reported lost"
    );
    // Taken away (what expiry, eviction or a takeover do): reported within
    // a renewal interval or so, and the commit is refused.
    let key = a.data_key(ContextType::of::<Job>(), id);
    let mut conn = raw().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{key}:lock"))
        .query_async(&mut conn)
        .await
        .unwrap();
    guard("lease_lost after the lock vanished", 10, g.lease_lost()).await;
    let mut g = g;
    g.done = 5;
    assert!(g.commit().await.unwrap_err().is_lease_lost());

    // In memory the lock cannot be lost.
    let mem = ctxstore::InMemoryContextStorage::new();
    mem.store_context(id, job(0)).await.unwrap();
    let g = mem.get_context::<Job>(id).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), g.lease_lost())
            .await
            .is_err()
    );
    g.rollback();
}

// ---------------------------------------------------------------------------
// Issue #12: watching (`watch_context`) on Redis.
//
// A watch re-reads at the latest every 20 s even when nothing woke it; the
// hang guards below that must beat it (15 s) are far longer than a
// publication takes, and only fail if the publication never came.

/// `changed()` must not return within `ms` (no new version). Waiting that
/// long proves nothing about speed; returning would break the contract.
async fn assert_no_new_version(w: &mut ctxstore::ContextWatch<Job>, ms: u64, what: &str) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(ms), w.changed()).await {
        panic!("{what}: the watch returned {:?}", r.map(|s| s.version()));
    }
}

#[tokio::test]
async fn watch_sees_increasing_versions_up_to_the_last_then_not_found() {
    let ns = namespace();
    let store = Arc::new(store_in(&ns).await);
    let id = Uuid::new_v4();
    let v0 = store.store_context(id, job(0)).await.unwrap();
    let mut w = store.watch_context::<Job>(id).await.unwrap();
    let first = w.changed().await.unwrap();
    assert_eq!((first.version(), first.done), (v0, 0));

    const WRITES: u64 = 200;
    let writer = tokio::spawn({
        let store = store.clone();
        async move {
            for _ in 0..WRITES {
                store
                    .update_context(id, |j: &mut Job| j.done += 1)
                    .await
                    .unwrap();
            }
            store
                .get_context_snapshot::<Job>(id)
                .await
                .unwrap()
                .version()
        }
    });
    let (mut last_version, mut last_done, mut seen) = (v0, 0, 0);
    guard("watcher reaches the last version", 60, async {
        while last_done < WRITES {
            let s = w.changed().await.unwrap();
            assert!(
                s.version() > last_version,
                "{} after {last_version}",
                s.version()
            );
            assert!(s.done > last_done, "done {} after {last_done}", s.done);
            (last_version, last_done) = (s.version(), s.done);
            seen += 1;
        }
    })
    .await;
    let final_version = writer.await.unwrap();
    assert_eq!(last_version, final_version);
    assert!((1..=WRITES).contains(&seen));
    // Nothing newer than the last: no repeat.
    assert_no_new_version(&mut w, 300, "after the writer stopped").await;

    store.delete_context::<Job>(id).await.unwrap();
    let e = guard("NotFound after delete", 15, w.changed())
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.id(), Some(id));
    assert!(w.changed().await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn watch_follows_commits_and_conditional_writes_of_another_process() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let b = store_in(&ns).await;
    let id = Uuid::new_v4();
    // Created once by the other process (a create-once conditional write).
    let v0 = b.store_context_if(id, 0, job(0)).await.unwrap();
    let mut w = a.watch_context::<Job>(id).await.unwrap();
    assert_eq!(w.changed().await.unwrap().version(), v0);

    // A guard's commit in the other process.
    let mut g = b.get_context::<Job>(id).await.unwrap();
    g.done = 1;
    let v1 = g.commit().await.unwrap();
    let s = guard("commit seen", 15, w.changed()).await.unwrap();
    assert_eq!((s.version(), s.done), (v1, 1));
    // A plain store.
    let v2 = b.store_context(id, job(2)).await.unwrap();
    let s = guard("store seen", 15, w.changed()).await.unwrap();
    assert_eq!((s.version(), s.done), (v2, 2));
    // A conditional store.
    let v3 = b.store_context_if(id, v2, job(3)).await.unwrap();
    let s = guard("conditional store seen", 15, w.changed())
        .await
        .unwrap();
    assert_eq!((s.version(), s.done), (v3, 3));
    // An optimistic update (a conditional store underneath).
    b.update_context_optimistic(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    let s = guard("optimistic update seen", 15, w.changed())
        .await
        .unwrap();
    assert!(s.version() > v3);
    assert_eq!(s.done, 4);
    // A conditional delete.
    b.delete_context_if::<Job>(id, s.version()).await.unwrap();
    let e = guard("conditional delete seen", 15, w.changed())
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn watch_does_not_follow_a_context_created_again() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let b = store_in(&ns).await;

    // Deleted and created again (plain store) before the watcher looks.
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    let mut w = a.watch_context::<Job>(id).await.unwrap();
    w.changed().await.unwrap();
    b.delete_context::<Job>(id).await.unwrap();
    b.store_context(id, job(7)).await.unwrap();
    let e = guard("re-created", 15, w.changed()).await.unwrap_err();
    assert!(e.is_not_found(), "followed a re-created context: {e}");
    // For good, even as the new context changes.
    b.update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    assert!(w.changed().await.unwrap_err().is_not_found());
    // A new watch follows the new context.
    let mut w2 = a.watch_context::<Job>(id).await.unwrap();
    assert_eq!(w2.changed().await.unwrap().done, 8);

    // The same with a conditional delete and a create-once.
    let s = a.get_context_snapshot::<Job>(id).await.unwrap();
    b.delete_context_if::<Job>(id, s.version()).await.unwrap();
    b.store_context_if(id, 0, job(9)).await.unwrap();
    let e = guard("re-created once", 15, w2.changed())
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "followed a re-created context: {e}");

    // Data written before creation stamps (no `born` field): still
    // watched (best effort), and a re-creation by this version is seen.
    let id = Uuid::new_v4();
    a.store_context(id, job(0)).await.unwrap();
    let key = a.data_key(ContextType::of::<Job>(), id);
    let mut conn = raw().await;
    let removed: u64 = redis::cmd("HDEL")
        .arg(&key)
        .arg("born")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1, "a created context carries its creation stamp");
    let mut w = a.watch_context::<Job>(id).await.unwrap();
    w.changed().await.unwrap();
    b.update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    assert_eq!(guard("old data", 15, w.changed()).await.unwrap().done, 1);
    b.delete_context::<Job>(id).await.unwrap();
    b.store_context(id, job(5)).await.unwrap();
    let e = guard("old data re-created", 15, w.changed())
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "followed a re-created context: {e}");
}

#[tokio::test]
async fn rollbacks_refused_writes_and_spurious_wake_ups_return_no_new_version() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let b = Arc::new(store_in(&ns).await);
    let id = Uuid::new_v4();
    let v0 = a.store_context(id, job(0)).await.unwrap();
    let mut w = a.watch_context::<Job>(id).await.unwrap();
    assert_eq!(w.changed().await.unwrap().version(), v0);

    // A rollback with a waiter queued in a third process: the release is
    // published (the waiter marked the key), which wakes the watch too.
    let c = store_in(&ns).await;
    let mut held = b.get_context::<Job>(id).await.unwrap();
    held.done = 100;
    let e = c
        .get_context_timeout::<Job>(id, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    held.rollback();
    assert_no_new_version(&mut w, 500, "after a rollback").await;

    // Refused conditional writes.
    let e = b.store_context_if(id, v0 + 1000, job(1)).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let e = b.delete_context_if::<Job>(id, v0 + 1000).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert_no_new_version(&mut w, 500, "after refused conditional writes").await;

    // A publication for the key with no change behind it.
    let key = a.data_key(ContextType::of::<Job>(), id);
    let mut conn = raw().await;
    let receivers: u64 = redis::cmd("PUBLISH")
        .arg(format!("{ns}:#wake"))
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 3, "three stores subscribe to the wake channel");
    assert_no_new_version(&mut w, 500, "after a spurious wake-up").await;

    // A real commit is seen, and only it.
    b.update_context(id, |j: &mut Job| j.done = 1)
        .await
        .unwrap();
    let s = guard("real commit", 15, w.changed()).await.unwrap();
    assert_eq!(s.done, 1);
    assert!(s.version() > v0);
    assert_eq!(w.last_version(), s.version());
    assert_no_new_version(&mut w, 300, "after the commit").await;
}

#[tokio::test]
async fn writes_publish_only_while_someone_watches() {
    let ns = namespace();
    let a = store_in(&ns).await;
    let id = Uuid::new_v4();
    let key = a.data_key(ContextType::of::<Job>(), id);
    let client = redis::Client::open(url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(format!("{ns}:#wake")).await.unwrap();
    let (mut sink, mut messages) = sub.split();
    // Nobody watches: store, commit, update and delete publish nothing.
    a.store_context(id, job(0)).await.unwrap();
    a.update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    let mut g = a.get_context::<Job>(id).await.unwrap();
    g.done = 5;
    g.commit().await.unwrap();
    a.delete_context::<Job>(id).await.unwrap();
    a.store_context(id, job(0)).await.unwrap();
    // Then a watch marks the key: the next write is published.
    let mut w = a.watch_context::<Job>(id).await.unwrap();
    w.changed().await.unwrap();
    a.update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    let next = std::future::poll_fn(|cx| {
        futures_core::Stream::poll_next(std::pin::Pin::new(&mut messages), cx)
    });
    let first = guard("a publication", 15, next).await.unwrap();
    let payload: String = first.get_payload().unwrap();
    // The first publication is the watched write's, not an earlier one.
    assert_eq!(payload, key);
    let s = guard("watched write", 15, w.changed()).await.unwrap();
    assert_eq!(s.done, 1);
    drop(sink.unsubscribe(format!("{ns}:#wake")).await);
}

#[tokio::test]
async fn watch_through_an_outage_gives_backend_errors_then_the_newest_version() {
    let proxy = proxy::Proxy::start(redis_host_port()).await;
    let ns = namespace();
    // Long lease and poll: nothing but the watch itself talks to Redis.
    let cut_off = RedisContextStorage::builder(format!("redis://{}", proxy.addr))
        .namespace(&ns)
        .lease(Duration::from_secs(360))
        .renewal_interval(Duration::from_secs(120))
        .response_timeout(Some(Duration::from_millis(300)))
        .connection_timeout(Some(Duration::from_millis(300)))
        .connect()
        .await
        .unwrap();
    let direct = store_in(&ns).await;
    let channel = format!("{ns}:#wake");
    let conn = raw().await;
    let subscribers = || {
        let mut conn = conn.clone();
        let channel = channel.clone();
        async move {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .unwrap();
            n
        }
    };
    let id = Uuid::new_v4();
    let v0 = direct.store_context(id, job(0)).await.unwrap();
    let mut w = cut_off.watch_context::<Job>(id).await.unwrap();
    assert_eq!(w.changed().await.unwrap().version(), v0);

    // Cut while a `changed()` is waiting: it is woken and fails.
    let waiting = tokio::spawn(async move {
        let r = w.changed().await.map(|s| s.version());
        (w, r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    guard("subscription dropped", 60, async {
        while subscribers().await != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (mut w, r) = guard("the waiting watch is told", 15, waiting)
        .await
        .unwrap();
    let e = r.unwrap_err();
    assert!(e.is_backend(), "{e}");
    assert_eq!(e.id(), Some(id));

    // Another process commits meanwhile.
    for _ in 0..3 {
        direct
            .update_context(id, |j: &mut Job| j.done += 1)
            .await
            .unwrap();
    }
    let newest = direct.get_context_snapshot::<Job>(id).await.unwrap();
    assert_eq!(newest.done, 3);

    // While cut: Backend errors naming the key (or a wait), never a version.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(300), w.changed()).await {
            Err(_) => {}
            Ok(Err(e)) => {
                assert!(e.is_backend(), "{e}");
                assert_eq!(e.id(), Some(id));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Ok(s)) => panic!("a version while cut off: {}", s.version()),
        }
    }

    // Back: the next success is the newest version (none was lost).
    proxy.restore();
    let s = guard("the newest version after the outage", 60, async {
        loop {
            match w.changed().await {
                Ok(s) => break s,
                Err(e) if e.is_backend() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!((s.version(), s.done), (newest.version(), 3));

    // And pub/sub works again: a later commit wakes the watch.
    guard("subscription restored", 60, async {
        while subscribers().await != 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    direct
        .update_context(id, |j: &mut Job| j.done += 1)
        .await
        .unwrap();
    let s = guard("a commit after the outage", 15, w.changed())
        .await
        .unwrap();
    assert_eq!(s.done, 4);
}
