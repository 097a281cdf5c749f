//! `RedisContextStorage` against the standard Redis optimistic pattern, in
//! one process, same server, same run.
//!
//! Contenders:
//!
//! * `ctxstore`: `update_context(id, |c| c.n += 1)` through
//!   `Arc<dyn ContextStorage>` (lease lock + read in one script, decode,
//!   change, encode, commit script).
//! * `ctxstore_optimistic`: `update_context_optimistic(id, |c| c.n += 1)`
//!   (no lease: read, decode, change, encode, conditional-write script,
//!   started over on `Conflict`).
//! * `watch_multi_exec`: `WATCH key`, `GET key`, serde decode, change,
//!   encode, `MULTI; SET key; EXEC`, retried until `EXEC` is not aborted.
//!   `WATCH` is per connection, so every task has its own connection.
//!
//! Workloads (one element = one increment; 64 tasks):
//!
//! * `redis_hot_key`: every task increments the same key, 8 times per
//!   iteration (512 increments).
//! * `redis_spread`: 10,000 keys; each iteration increments every key once,
//!   the keys split among the tasks.
//!
//! After each measurement the counters are checked: every increment must be
//! there (zero lost updates), or the bench panics. The retry counts of the
//! two optimistic contenders are printed.
//!
//! After criterion, an interleaved A/B run (the same two workloads, the
//! contenders' order rotating every round, `CTXSTORE_BENCH_AB_ROUNDS`,
//! default 8, 1 when criterion runs as a test) prints the median µs per
//! increment, the ratios and the retries per increment; on a shared machine
//! that is the fairer comparison. Its counters are checked too. Skipped with
//! `CTXSTORE_BENCH_NO_AB=1`.
//!
//! Needs Redis at `CTXSTORE_REDIS_URL` (default `redis://127.0.0.1:6379`);
//! uses a fresh namespace `ctxstore-bench-<uuid>` and deletes its keys.
//!
//! `cargo bench --features redis --bench redis` (add `-- redis_hot_key` to
//! filter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ctxstore::{Context, ContextStorage, ContextStorageExt, RedisContextStorage, Uuid};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::runtime::Runtime;

const TASKS: usize = 64;
const HOT_PER_TASK: u64 = 8;
const SPREAD_KEYS: usize = 10_000;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Counter {
    name: String,
    n: u64,
}

impl Context for Counter {
    fn kind() -> &'static str {
        "ctxstore.bench.counter"
    }
}

fn url() -> String {
    std::env::var("CTXSTORE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn counter() -> Counter {
    Counter {
        name: "bench".into(),
        n: 0,
    }
}

struct Setup {
    store: Arc<dyn ContextStorage>,
    conns: Vec<MultiplexedConnection>,
    ns: String,
    /// Optimistic transactions aborted by a concurrent write.
    retries: Arc<AtomicU64>,
}

async fn setup() -> Setup {
    let ns = format!("ctxstore-bench-{}", Uuid::new_v4());
    let store = RedisContextStorage::builder(url())
        .namespace(&ns)
        .connect()
        .await
        .expect("Redis must be running (see CTXSTORE_REDIS_URL)");
    let client = redis::Client::open(url()).unwrap();
    let mut conns = Vec::new();
    for _ in 0..TASKS {
        conns.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    Setup {
        store: Arc::new(store),
        conns,
        ns,
        retries: Arc::new(AtomicU64::new(0)),
    }
}

/// How a `ctxstore` contender increments.
#[derive(Clone, Copy)]
enum Update {
    /// `update_context`: lease lock, change, commit.
    Locked,
    /// `update_context_optimistic`: read, change, conditional write, retry.
    Optimistic,
}

impl Update {
    fn name(self) -> &'static str {
        match self {
            Update::Locked => "ctxstore",
            Update::Optimistic => "ctxstore_optimistic",
        }
    }

    /// One increment of `id`; `attempts` counts the runs of the optimistic
    /// change (one per increment plus one per conflict).
    async fn increment(self, store: &Arc<dyn ContextStorage>, id: Uuid, attempts: &AtomicU64) {
        match self {
            Update::Locked => store
                .update_context(id, |c: &mut Counter| c.n += 1)
                .await
                .unwrap(),
            Update::Optimistic => store
                .update_context_optimistic(id, |c: &mut Counter| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    c.n += 1;
                })
                .await
                .unwrap(),
        }
    }

    fn report(self, group: &str, increments: u64, attempts: &AtomicU64) {
        match self {
            Update::Locked => println!("{group}/ctxstore: {increments} increments, 0 lost"),
            Update::Optimistic => println!(
                "{group}/ctxstore_optimistic: {increments} increments, 0 lost, {} conflicts retried",
                attempts.load(Ordering::Relaxed) - increments
            ),
        }
    }
}

/// The textbook optimistic increment of a JSON value.
async fn watch_increment(con: &mut MultiplexedConnection, key: &str, retries: &AtomicU64) {
    loop {
        redis::cmd("WATCH").arg(key).exec_async(con).await.unwrap();
        let raw: Vec<u8> = redis::cmd("GET").arg(key).query_async(con).await.unwrap();
        let mut c: Counter = serde_json::from_slice(&raw).unwrap();
        c.n += 1;
        let bytes = serde_json::to_vec(&c).unwrap();
        let reply: Value = redis::pipe()
            .atomic()
            .set(key, bytes)
            .query_async(con)
            .await
            .unwrap();
        if !matches!(reply, Value::Nil) {
            return;
        }
        retries.fetch_add(1, Ordering::Relaxed);
    }
}

async fn watch_value(con: &mut MultiplexedConnection, key: &str) -> u64 {
    let raw: Vec<u8> = redis::cmd("GET").arg(key).query_async(con).await.unwrap();
    serde_json::from_slice::<Counter>(&raw).unwrap().n
}

async fn watch_set(con: &mut MultiplexedConnection, key: &str) {
    let bytes = serde_json::to_vec(&counter()).unwrap();
    redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .exec_async(con)
        .await
        .unwrap();
}

fn hot_key(c: &mut Criterion, rt: &Runtime, s: &Setup) {
    let mut group = c.benchmark_group("redis_hot_key");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(TASKS as u64 * HOT_PER_TASK));

    for how in [Update::Locked, Update::Optimistic] {
        let id = Uuid::new_v4();
        rt.block_on(s.store.store_context(id, counter())).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(AtomicU64::new(0));
        group.bench_function(how.name(), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let store = s.store.clone();
                let done = done.clone();
                let attempts = attempts.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|_| {
                                let store = store.clone();
                                let attempts = attempts.clone();
                                tokio::spawn(async move {
                                    for _ in 0..HOT_PER_TASK {
                                        how.increment(&store, id, &attempts).await;
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                        done.fetch_add(TASKS as u64 * HOT_PER_TASK, Ordering::Relaxed);
                    }
                    start.elapsed()
                }
            })
        });
        let got = rt
            .block_on(s.store.get_context_snapshot::<Counter>(id))
            .unwrap()
            .n;
        let want = done.load(Ordering::Relaxed);
        assert_eq!(got, want, "{} lost updates on the hot key", how.name());
        how.report("redis_hot_key", want, &attempts);
        rt.block_on(s.store.delete_context::<Counter>(id)).unwrap();
    }

    let key = format!("{}:watch:hot", s.ns);
    let mut con = s.conns[0].clone();
    rt.block_on(watch_set(&mut con, &key));
    let done = Arc::new(AtomicU64::new(0));
    s.retries.store(0, Ordering::Relaxed);
    group.bench_function("watch_multi_exec", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let conns = s.conns.clone();
            let key = key.clone();
            let done = done.clone();
            let retries = s.retries.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let tasks: Vec<_> = conns
                        .iter()
                        .cloned()
                        .map(|mut con| {
                            let key = key.clone();
                            let retries = retries.clone();
                            tokio::spawn(async move {
                                for _ in 0..HOT_PER_TASK {
                                    watch_increment(&mut con, &key, &retries).await;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    done.fetch_add(TASKS as u64 * HOT_PER_TASK, Ordering::Relaxed);
                }
                start.elapsed()
            }
        })
    });
    let got = rt.block_on(watch_value(&mut con, &key));
    let want = done.load(Ordering::Relaxed);
    assert_eq!(got, want, "WATCH/MULTI/EXEC lost updates on the hot key");
    println!(
        "redis_hot_key/watch_multi_exec: {want} increments, 0 lost, {} aborted transactions retried",
        s.retries.load(Ordering::Relaxed)
    );
    rt.block_on(redis::cmd("DEL").arg(&key).exec_async(&mut con))
        .unwrap();
    group.finish();
}

fn spread(c: &mut Criterion, rt: &Runtime, s: &Setup) {
    let mut group = c.benchmark_group("redis_spread");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(SPREAD_KEYS as u64));

    let ids: Arc<Vec<Uuid>> = Arc::new((0..SPREAD_KEYS).map(|_| Uuid::new_v4()).collect());
    let mut total_rounds = 0;
    rt.block_on(async {
        for chunk in ids.chunks(500) {
            let futs: Vec<_> = chunk
                .iter()
                .map(|id| s.store.store_context(*id, counter()))
                .collect();
            for f in futs {
                f.await.unwrap();
            }
        }
    });
    for how in [Update::Locked, Update::Optimistic] {
        let rounds = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(AtomicU64::new(0));
        group.bench_function(how.name(), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let store = s.store.clone();
                let ids = ids.clone();
                let rounds = rounds.clone();
                let attempts = attempts.clone();
                async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|t| {
                                let store = store.clone();
                                let ids = ids.clone();
                                let attempts = attempts.clone();
                                tokio::spawn(async move {
                                    for id in ids.iter().skip(t).step_by(TASKS) {
                                        how.increment(&store, *id, &attempts).await;
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                    start.elapsed()
                }
            })
        });
        // Both contenders increment the same keys: each key holds every
        // round of both so far.
        let want = total_rounds + rounds.load(Ordering::Relaxed);
        rt.block_on(async {
            for id in ids.iter() {
                let got = s
                    .store
                    .get_context_snapshot::<Counter>(*id)
                    .await
                    .unwrap()
                    .n;
                assert_eq!(got, want, "{} lost updates on key {id}", how.name());
            }
        });
        let rounds = rounds.load(Ordering::Relaxed);
        total_rounds = want;
        how.report("redis_spread", rounds * SPREAD_KEYS as u64, &attempts);
    }
    rt.block_on(async {
        for id in ids.iter() {
            s.store.delete_context::<Counter>(*id).await.unwrap();
        }
    });

    let keys: Arc<Vec<String>> = Arc::new(
        ids.iter()
            .map(|id| format!("{}:watch:{id}", s.ns))
            .collect(),
    );
    rt.block_on(async {
        let mut con = s.conns[0].clone();
        for key in keys.iter() {
            watch_set(&mut con, key).await;
        }
    });
    let rounds = Arc::new(AtomicU64::new(0));
    s.retries.store(0, Ordering::Relaxed);
    group.bench_function("watch_multi_exec", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let conns = s.conns.clone();
            let keys = keys.clone();
            let rounds = rounds.clone();
            let retries = s.retries.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let tasks: Vec<_> = conns
                        .iter()
                        .cloned()
                        .enumerate()
                        .map(|(t, mut con)| {
                            let keys = keys.clone();
                            let retries = retries.clone();
                            tokio::spawn(async move {
                                for key in keys.iter().skip(t).step_by(TASKS) {
                                    watch_increment(&mut con, key, &retries).await;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
                start.elapsed()
            }
        })
    });
    let want = rounds.load(Ordering::Relaxed);
    rt.block_on(async {
        let mut con = s.conns[0].clone();
        for key in keys.iter() {
            assert_eq!(
                watch_value(&mut con, key).await,
                want,
                "WATCH/MULTI/EXEC lost updates on {key}"
            );
            redis::cmd("DEL")
                .arg(key)
                .exec_async(&mut con)
                .await
                .unwrap();
        }
    });
    println!(
        "redis_spread/watch_multi_exec: {} increments, 0 lost, {} aborted transactions retried",
        want * SPREAD_KEYS as u64,
        s.retries.load(Ordering::Relaxed)
    );
    group.finish();
}

/// A contender of the interleaved run.
#[derive(Clone, Copy)]
enum Who {
    Ctxstore(Update),
    WatchMultiExec,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Ctxstore(how) => how.name(),
            Who::WatchMultiExec => "watch_multi_exec",
        }
    }
}

/// The keys of the interleaved run: entry `i` of `ids` (ctxstore) and of
/// `keys` (`WATCH`) are the same counter for the two kinds of contender.
struct AbKeys {
    ids: Arc<Vec<Uuid>>,
    keys: Arc<Vec<String>>,
}

impl AbKeys {
    async fn create(s: &Setup, n: usize, label: &str) -> AbKeys {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}:ab:{label}:{id}", s.ns))
            .collect();
        let mut con = s.conns[0].clone();
        for chunk in ids.chunks(500) {
            let futs: Vec<_> = chunk
                .iter()
                .map(|id| s.store.store_context(*id, counter()))
                .collect();
            for f in futs {
                f.await.unwrap();
            }
        }
        for key in &keys {
            watch_set(&mut con, key).await;
        }
        AbKeys {
            ids: Arc::new(ids),
            keys: Arc::new(keys),
        }
    }

    /// Panics unless every ctxstore counter is `ctx` and every `WATCH`
    /// counter is `watch`; then deletes them all.
    async fn check_and_delete(&self, s: &Setup, ctx: u64, watch: u64, label: &str) {
        let mut con = s.conns[0].clone();
        for (id, key) in self.ids.iter().zip(self.keys.iter()) {
            let got = s
                .store
                .get_context_snapshot::<Counter>(*id)
                .await
                .unwrap()
                .n;
            assert_eq!(got, ctx, "A/B {label}: ctxstore contenders lost updates");
            let got = watch_value(&mut con, key).await;
            assert_eq!(got, watch, "A/B {label}: WATCH/MULTI/EXEC lost updates");
            s.store.delete_context::<Counter>(*id).await.unwrap();
            redis::cmd("DEL")
                .arg(key)
                .exec_async(&mut con)
                .await
                .unwrap();
        }
    }
}

/// One round of `who`: the hot-key workload when `ab` has one key (every
/// task increments it `HOT_PER_TASK` times), else every key once, the keys
/// split among the tasks. Returns the wall time and the increments done.
async fn ab_round(s: &Setup, ab: &AbKeys, who: Who, attempts: &Arc<AtomicU64>) -> (Duration, u64) {
    let hot = ab.ids.len() == 1;
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, mut con) = (s.store.clone(), s.conns[t].clone());
            let (ids, keys) = (ab.ids.clone(), ab.keys.clone());
            let (attempts, retries) = (attempts.clone(), s.retries.clone());
            tokio::spawn(async move {
                let mine: Vec<usize> = if hot {
                    vec![0; HOT_PER_TASK as usize]
                } else {
                    (t..ids.len()).step_by(TASKS).collect()
                };
                for i in mine {
                    match who {
                        Who::Ctxstore(how) => how.increment(&store, ids[i], &attempts).await,
                        Who::WatchMultiExec => watch_increment(&mut con, &keys[i], &retries).await,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let done = if hot {
        TASKS as u64 * HOT_PER_TASK
    } else {
        ab.ids.len() as u64
    };
    (start.elapsed(), done)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The contenders again, outside criterion, in interleaved rounds (the
/// order rotates every round) so that load drifting on a shared machine
/// hits all of them alike.
fn interleaved(rt: &Runtime, s: &Setup) {
    if std::env::var_os("CTXSTORE_BENCH_NO_AB").is_some() {
        return;
    }
    // Under `cargo test --benches` criterion runs each bench once: one
    // round is enough for a smoke test.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("CTXSTORE_BENCH_AB_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if bench_mode { 8 } else { 1 })
        .max(1);
    let who = [
        Who::Ctxstore(Update::Locked),
        Who::Ctxstore(Update::Optimistic),
        Who::WatchMultiExec,
    ];
    println!(
        "\ninterleaved A/B: {rounds} rounds, {TASKS} tasks, median us/increment \
         (hot: {} increments of 1 key per round; spread: {SPREAD_KEYS} keys once each)",
        TASKS as u64 * HOT_PER_TASK
    );
    for (name, n) in [("redis_hot_key", 1), ("redis_spread", SPREAD_KEYS)] {
        let ab = rt.block_on(AbKeys::create(s, n, name));
        let attempts = Arc::new(AtomicU64::new(0));
        let mut times: [Vec<f64>; 3] = Default::default();
        let (mut ctx_done, mut watch_done, mut optimistic_done, mut watch_retries) = (0, 0, 0, 0);
        for round in 0..rounds {
            for k in 0..who.len() {
                let i = (round + k) % who.len();
                let retries_before = s.retries.load(Ordering::Relaxed);
                let (d, done) = rt.block_on(ab_round(s, &ab, who[i], &attempts));
                times[i].push(d.as_secs_f64() * 1e6 / done as f64);
                match who[i] {
                    Who::Ctxstore(how) => {
                        ctx_done += done;
                        if matches!(how, Update::Optimistic) {
                            optimistic_done += done;
                        }
                    }
                    Who::WatchMultiExec => {
                        watch_done += done;
                        watch_retries += s.retries.load(Ordering::Relaxed) - retries_before;
                    }
                }
            }
        }
        // Per key: the hot key got every increment, a spread key one per
        // round and contender.
        let per_key = |done: u64| done / n as u64;
        rt.block_on(ab.check_and_delete(s, per_key(ctx_done), per_key(watch_done), name));
        let m: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        let optimistic_retries = attempts.load(Ordering::Relaxed) - optimistic_done;
        println!(
            "{name:<13} {} {:>8.1}  {} {:>8.1}  {} {:>8.1}  optimistic/ctxstore {:.3}  \
             optimistic/watch {:.3}  watch/ctxstore {:.3}  retries per increment: \
             optimistic {:.2}, watch {:.2}  (0 lost)",
            who[0].name(),
            m[0],
            who[1].name(),
            m[1],
            who[2].name(),
            m[2],
            m[1] / m[0],
            m[1] / m[2],
            m[2] / m[0],
            optimistic_retries as f64 / optimistic_done as f64,
            watch_retries as f64 / watch_done as f64,
        );
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(setup());
    hot_key(c, &rt, &s);
    spread(c, &rt, &s);
    interleaved(&rt, &s);
}

criterion_group!(redis_benches, benches);
criterion_main!(redis_benches);
