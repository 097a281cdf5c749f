//! `PostgresContextStorage` against the hand-written row-lock code a user
//! would otherwise write with the same driver (`tokio-postgres` +
//! `deadpool-postgres`, same pool size, same table), in one process.
//!
//! Contenders:
//!
//! * `ctxstore`: `update_context(id, |c| c.n += 1)` through
//!   `Arc<dyn ContextStorage>` (lock, decode, change, encode, commit).
//! * `ctxstore_optimistic`: `update_context_optimistic(id, |c| c.n += 1)`
//!   (plain read, decode, change, encode, then a conditional
//!   `UPDATE … WHERE version = <read>`; started over on `Conflict`). No row
//!   lock is held while the change runs.
//! * `handwritten`: `client.transaction()`, `SELECT value … FOR UPDATE`,
//!   serde decode, `UPDATE … SET value, version = version + 1`,
//!   `commit()` — the plain four-round-trip version.
//! * `handwritten_pipelined`: the same statements with `BEGIN` + `SELECT`
//!   and `UPDATE` + `COMMIT` pipelined (two round trips, like ctxstore), to
//!   show what the library itself costs.
//! * `handwritten_pipelined_same_sql`: pipelined, with ctxstore's own SQL
//!   (`version` read back, `nextval` versions, versioned `UPDATE …
//!   RETURNING`, `SET LOCAL statement_timeout = 0`): what is left between
//!   it and `ctxstore` is the library's client-side cost.
//!
//! After criterion, an interleaved A/B run (order rotating every round,
//! `CTXSTORE_BENCH_AB_ROUNDS`, default 12, 1 when criterion runs as a
//! test) prints median µs per increment and the ratios, and snapshot
//! latency idle vs held; on a shared machine that is the fairer
//! comparison. It also prints how many conflicts `ctxstore_optimistic`
//! retried per increment.
//!
//! All contenders increment the same rows. After the criterion groups and
//! again after the A/B run the counters are checked: the hot key and the
//! sum over the spread keys must equal the increments done, or the bench
//! panics (zero lost updates).
//!
//! Workloads (one element = one increment; 8 tasks, pool of 16):
//!
//! * `pg_hot_key`: every task increments the same key.
//! * `pg_spread`: each increment goes to a random key of 1,000.
//! * `pg_snapshot`: sequential snapshot latency of one key, with the row
//!   idle and while another connection holds its row lock (`held`);
//!   `handwritten` is a plain `SELECT`.
//!
//! Needs Postgres at `CTXSTORE_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); uses (and drops) a table
//! `ctx_bench_<unix secs>`.
//!
//! `cargo bench --features postgres --bench postgres` (add `-- pg_hot_key`
//! to filter).

use std::hint::black_box;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ctxstore::{Context, ContextStorage, ContextStorageExt, PostgresContextStorage, Uuid};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

const TASKS: u64 = 8;
const POOL: usize = 16;
const SPREAD_KEYS: usize = 1000;

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
    std::env::var("CTXSTORE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

struct Env {
    rt: Runtime,
    store: Arc<dyn ContextStorage>,
    holder: PostgresContextStorage,
    pool: Pool,
    table: String,
    hot: Uuid,
    keys: Arc<Vec<Uuid>>,
    /// Increments done on the hot key and on the spread keys, by all
    /// contenders (criterion's warm-up included).
    hot_done: AtomicU64,
    spread_done: AtomicU64,
}

impl Env {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let table = format!("ctx_bench_{secs}");
        let (store, holder, pool, hot, keys) = rt.block_on(async {
            let connect = || {
                PostgresContextStorage::builder(url())
                    .table(&table)
                    .pool_size(POOL)
                    .connect()
            };
            let store = connect().await.expect("Postgres for the bench");
            let holder = connect().await.unwrap();
            let mut config = tokio_postgres::Config::from_str(&url()).unwrap();
            config.application_name("ctxstore-bench-baseline");
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager).max_size(POOL).build().unwrap();
            let store: Arc<dyn ContextStorage> = Arc::new(store);
            let counter = Counter {
                name: "bench".into(),
                n: 0,
            };
            let hot = Uuid::new_v4();
            store.store_context(hot, counter.clone()).await.unwrap();
            let mut keys = Vec::with_capacity(SPREAD_KEYS);
            for _ in 0..SPREAD_KEYS {
                let id = Uuid::new_v4();
                store.store_context(id, counter.clone()).await.unwrap();
                keys.push(id);
            }
            (store, holder, pool, hot, Arc::new(keys))
        });
        Env {
            rt,
            store,
            holder,
            pool,
            table,
            hot,
            keys,
            hot_done: AtomicU64::new(0),
            spread_done: AtomicU64::new(0),
        }
    }

    /// Panics unless every increment done so far is in the rows.
    fn check_counts(&self, after: &str) {
        let (hot, spread) = self.rt.block_on(async {
            let hot = self
                .store
                .get_context_snapshot::<Counter>(self.hot)
                .await
                .unwrap()
                .n;
            let mut spread = 0;
            for id in self.keys.iter() {
                spread += self
                    .store
                    .get_context_snapshot::<Counter>(*id)
                    .await
                    .unwrap()
                    .n;
            }
            (hot, spread)
        });
        let want = (
            self.hot_done.load(Ordering::Relaxed),
            self.spread_done.load(Ordering::Relaxed),
        );
        assert_eq!(
            (hot, spread),
            want,
            "lost updates (hot key, spread keys) after {after}"
        );
        println!(
            "after {after}: hot key {hot} increments, spread keys {spread} increments, 0 lost"
        );
    }
}

/// Runs of `ctxstore_optimistic`'s change: one per increment plus one per
/// conflict retried.
static OPTIMISTIC_ATTEMPTS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
enum Who {
    Ctxstore,
    Optimistic,
    Handwritten,
    Pipelined,
    PipelinedSameSql,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Ctxstore => "ctxstore",
            Who::Optimistic => "ctxstore_optimistic",
            Who::Handwritten => "handwritten",
            Who::Pipelined => "handwritten_pipelined",
            Who::PipelinedSameSql => "handwritten_pipelined_same_sql",
        }
    }
}

/// One increment of `id`, as each contender does it.
async fn increment(who: Who, store: &Arc<dyn ContextStorage>, pool: &Pool, table: &str, id: Uuid) {
    let select = format!("SELECT value::text FROM {table} WHERE kind = $1 AND id = $2 FOR UPDATE");
    let update = format!(
        "UPDATE {table} SET value = $3::text::jsonb, version = version + 1, updated_at = now() \
         WHERE kind = $1 AND id = $2"
    );
    // ctxstore's own statements, for `PipelinedSameSql`.
    let select_v =
        format!("SELECT version, value::text FROM {table} WHERE kind = $1 AND id = $2 FOR UPDATE");
    let commit = format!(
        "UPDATE {table} SET value = $3::text::jsonb, version = nextval('{table}_version_seq'), \
         updated_at = now() WHERE kind = $1 AND id = $2 AND version = $4 RETURNING version"
    );
    let kind = Counter::kind();
    match who {
        Who::Ctxstore => store
            .update_context(id, |c: &mut Counter| c.n += 1)
            .await
            .unwrap(),
        Who::Optimistic => store
            .update_context_optimistic(id, |c: &mut Counter| {
                OPTIMISTIC_ATTEMPTS.fetch_add(1, Ordering::Relaxed);
                c.n += 1;
            })
            .await
            .unwrap(),
        Who::Handwritten => {
            let mut client = pool.get().await.unwrap();
            let select = client.prepare_cached(&select).await.unwrap();
            let update = client.prepare_cached(&update).await.unwrap();
            let tx = client.transaction().await.unwrap();
            let row = tx.query_one(&select, &[&kind, &id]).await.unwrap();
            let mut c: Counter = serde_json::from_str(row.get::<_, &str>(0)).unwrap();
            c.n += 1;
            let json = serde_json::to_string(&c).unwrap();
            tx.execute(&update, &[&kind, &id, &json]).await.unwrap();
            tx.commit().await.unwrap();
        }
        Who::Pipelined | Who::PipelinedSameSql => {
            let same = matches!(who, Who::PipelinedSameSql);
            let client = pool.get().await.unwrap();
            let select = client
                .prepare_cached(if same { &select_v } else { &select })
                .await
                .unwrap();
            let update = client
                .prepare_cached(if same { &commit } else { &update })
                .await
                .unwrap();
            let params: [&(dyn ToSql + Sync); 2] = [&kind, &id];
            let (began, row) = tokio::join!(
                biased;
                client.batch_execute(if same { "BEGIN; SET LOCAL statement_timeout = 0" } else { "BEGIN" }),
                client.query_one(&select, &params)
            );
            began.unwrap();
            let row = row.unwrap();
            let text_col = if same { 1 } else { 0 };
            let mut c: Counter = serde_json::from_str(row.get::<_, &str>(text_col)).unwrap();
            c.n += 1;
            let json = serde_json::to_string(&c).unwrap();
            if same {
                let version: i64 = row.get(0);
                let params: [&(dyn ToSql + Sync); 4] = [&kind, &id, &json, &version];
                let (updated, committed) = tokio::join!(
                    biased;
                    client.query_one(&update, &params),
                    client.batch_execute("COMMIT")
                );
                updated.unwrap();
                committed.unwrap();
            } else {
                let params: [&(dyn ToSql + Sync); 3] = [&kind, &id, &json];
                let (updated, committed) = tokio::join!(
                    biased;
                    client.execute(&update, &params),
                    client.batch_execute("COMMIT")
                );
                updated.unwrap();
                committed.unwrap();
            }
        }
    }
}

/// `iters` increments spread over `TASKS` tasks; returns the wall time.
fn increments(env: &Env, who: Who, hot: bool, iters: u64) -> Duration {
    let per_task = iters.div_ceil(TASKS);
    let start = Instant::now();
    env.rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (store, pool, table) = (env.store.clone(), env.pool.clone(), env.table.clone());
            let (keys, hot_id) = (env.keys.clone(), env.hot);
            tasks.push(tokio::spawn(async move {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for _ in 0..per_task {
                    let id = if hot {
                        hot_id
                    } else {
                        // xorshift: a cheap random key per increment.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        keys[(x % keys.len() as u64) as usize]
                    };
                    increment(who, &store, &pool, &table, id).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let done = if hot { &env.hot_done } else { &env.spread_done };
    done.fetch_add(per_task * TASKS, Ordering::Relaxed);
    // Scale to exactly `iters` operations.
    start
        .elapsed()
        .mul_f64(iters as f64 / (per_task * TASKS) as f64)
}

fn bench(c: &mut Criterion) {
    let env = Env::new();
    for (group, hot) in [("pg_hot_key", true), ("pg_spread", false)] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(1))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(6));
        for who in [
            Who::Ctxstore,
            Who::Optimistic,
            Who::Handwritten,
            Who::Pipelined,
            Who::PipelinedSameSql,
        ] {
            g.bench_function(who.name(), |b| {
                b.iter_custom(|iters| increments(&env, who, hot, iters))
            });
        }
        g.finish();
    }
    env.check_counts("the criterion groups");

    let mut g = c.benchmark_group("pg_snapshot");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let id = env.hot;
    let snapshot = |iters: u64| {
        let start = Instant::now();
        env.rt.block_on(async {
            for _ in 0..iters {
                black_box(env.store.get_context_snapshot::<Counter>(id).await.unwrap());
            }
        });
        start.elapsed()
    };
    g.bench_function("ctxstore_idle", |b| b.iter_custom(snapshot));
    // Another connection holds the row lock for the whole measurement.
    let guard = env
        .rt
        .block_on(env.holder.get_context::<Counter>(id))
        .unwrap();
    g.bench_function("ctxstore_held", |b| b.iter_custom(snapshot));
    let sql = format!(
        "SELECT version, value::text FROM {} WHERE kind = $1 AND id = $2",
        env.table
    );
    g.bench_function("handwritten_held", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            env.rt.block_on(async {
                for _ in 0..iters {
                    let client = env.pool.get().await.unwrap();
                    let stmt = client.prepare_cached(&sql).await.unwrap();
                    let row = client
                        .query_one(&stmt, &[&Counter::kind(), &id])
                        .await
                        .unwrap();
                    let c: Counter = serde_json::from_str(row.get::<_, &str>(1)).unwrap();
                    black_box((row.get::<_, i64>(0), c));
                }
            });
            start.elapsed()
        })
    });
    g.finish();
    guard.rollback();

    interleaved(&env);
    env.check_counts("the interleaved rounds");

    env.rt.block_on(async {
        let client = env.pool.get().await.unwrap();
        let _ = client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {t}; DROP TABLE IF EXISTS {t}_watch; DROP SEQUENCE IF EXISTS {t}_version_seq;",
                t = env.table
            ))
            .await;
    });
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The contenders again, outside criterion, in interleaved rounds (the
/// order rotates every round) so that load drifting on a shared machine
/// hits all of them alike: median µs per increment and the ratio to the
/// hand-written baselines. Then snapshot latency, idle vs held, also
/// interleaved. Skipped with `CTXSTORE_BENCH_NO_AB=1`.
fn interleaved(env: &Env) {
    if std::env::var_os("CTXSTORE_BENCH_NO_AB").is_some() {
        return;
    }
    // Under `cargo test --benches` criterion runs each bench once: one
    // round is enough for a smoke test.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("CTXSTORE_BENCH_AB_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if bench_mode { 12 } else { 1 })
        .max(1);
    const OPS: u64 = 400;
    let who = [
        Who::Ctxstore,
        Who::Handwritten,
        Who::Pipelined,
        Who::PipelinedSameSql,
        Who::Optimistic,
    ];
    println!(
        "\ninterleaved A/B: {rounds} rounds x {OPS} increments, {TASKS} tasks, median us/increment"
    );
    for (name, hot) in [("pg_hot_key", true), ("pg_spread", false)] {
        let mut times: [Vec<f64>; 5] = Default::default();
        let mut attempts = 0;
        for round in 0..rounds {
            for k in 0..who.len() {
                let i = (round + k) % who.len();
                let before = OPTIMISTIC_ATTEMPTS.load(Ordering::Relaxed);
                let d = increments(env, who[i], hot, OPS);
                attempts += OPTIMISTIC_ATTEMPTS.load(Ordering::Relaxed) - before;
                times[i].push(d.as_secs_f64() * 1e6 / OPS as f64);
            }
        }
        let m: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        println!(
            "{name:<11} ctxstore {:>8.1}  handwritten {:>8.1}  handwritten_pipelined {:>8.1}  \
             handwritten_pipelined_same_sql {:>8.1}  ctxstore/handwritten {:.3}  \
             ctxstore/pipelined {:.3}  ctxstore/same_sql {:.3}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[0] / m[1],
            m[0] / m[2],
            m[0] / m[3]
        );
        // Each round did exactly OPS increments (OPS is a multiple of TASKS).
        const _: () = assert!(OPS % TASKS == 0);
        let commits = (rounds as u64 * OPS) as f64;
        println!(
            "{name:<11} ctxstore_optimistic {:>8.1}  optimistic/ctxstore {:.3}  \
             optimistic/handwritten {:.3}  conflicts retried per increment {:.2}",
            m[4],
            m[4] / m[0],
            m[4] / m[1],
            (attempts as f64 - commits) / commits
        );
    }
    let id = env.hot;
    let (mut idle, mut held) = (Vec::new(), Vec::new());
    env.rt.block_on(async {
        for round in 0..10 {
            let guard = if round % 2 == 1 {
                Some(env.holder.get_context::<Counter>(id).await.unwrap())
            } else {
                None
            };
            for _ in 0..200 {
                let t = Instant::now();
                black_box(env.store.get_context_snapshot::<Counter>(id).await.unwrap());
                let us = t.elapsed().as_secs_f64() * 1e6;
                if guard.is_some() {
                    held.push(us)
                } else {
                    idle.push(us)
                }
            }
            if let Some(g) = guard {
                g.rollback();
            }
        }
    });
    println!(
        "pg_snapshot  idle p50 {:.0} us p99 {:.0} us | row lock held by another connection: p50 {:.0} us p99 {:.0} us max {:.0} us",
        percentile(&mut idle, 0.5),
        percentile(&mut idle, 0.99),
        percentile(&mut held, 0.5),
        percentile(&mut held, 0.99),
        percentile(&mut held, 1.0),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
