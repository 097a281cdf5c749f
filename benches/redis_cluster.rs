//! `RedisContextStorage` on one Redis server against the same store on a
//! 3-master Redis Cluster, same machine, same run.
//!
//! Both run on this one machine, so this shows the cluster's *overhead*
//! (hash-tagged keys, per-slot floors, the cluster client's routing), not
//! its scale-out: three masters on two cores share the same CPUs. The
//! scale-out estimate comes from the server-side cost per increment that
//! the run measures (`INFO commandstats` on every master): a master spends
//! that many µs of its one thread per increment, so each added master adds
//! about `1e6 / µs` increments/s of capacity until the clients saturate.
//!
//! Workload `redis_cluster_spread`: 2,000 counters, 64 tasks, each
//! iteration increments every counter once with `update_context` (lease
//! script, decode, change, encode, commit script). Counters are checked
//! after every measurement (zero lost updates).
//!
//! After criterion: an interleaved A/B (`CTXSTORE_BENCH_AB_ROUNDS`,
//! default 8; 1 as a test) printing the median µs per increment of both
//! and their ratio; the server µs per increment on the cluster; and what
//! `WAIT 1` after each write would cost (sequential `SET` against `SET` +
//! `WAIT 1 1000` on one master).
//!
//! Needs Redis at `CTXSTORE_REDIS_URL` (default `redis://127.0.0.1:6379`)
//! and the cluster at `CTXSTORE_REDIS_CLUSTER` (default the local one of
//! `scripts/redis-cluster.sh start`).
//!
//! `cargo bench --features redis --bench redis_cluster`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ctxstore::{Context, ContextStorage, ContextStorageExt, RedisContextStorage, Uuid};
use redis_cluster_common::{masters, seeds};
use tokio::runtime::Runtime;

#[path = "../tests/redis_cluster_common/mod.rs"]
mod redis_cluster_common;

const TASKS: usize = 64;
const KEYS: usize = 2_000;

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

struct Contender {
    name: &'static str,
    store: Arc<dyn ContextStorage>,
    ids: Arc<Vec<Uuid>>,
    /// Rounds applied so far (every counter holds this many increments).
    rounds: AtomicU64,
}

async fn contender(name: &'static str, store: RedisContextStorage) -> Contender {
    let store: Arc<dyn ContextStorage> = Arc::new(store);
    let ids: Vec<Uuid> = (0..KEYS).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        store
            .store_context(
                *id,
                Counter {
                    name: "bench".into(),
                    n: 0,
                },
            )
            .await
            .unwrap();
    }
    Contender {
        name,
        store,
        ids: Arc::new(ids),
        rounds: AtomicU64::new(0),
    }
}

impl Contender {
    /// One round: every counter incremented once, split among the tasks.
    async fn round(&self) -> Duration {
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = self.store.clone();
                let ids = self.ids.clone();
                tokio::spawn(async move {
                    for id in ids.iter().skip(t).step_by(TASKS) {
                        store
                            .update_context(*id, |c: &mut Counter| c.n += 1)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        self.rounds.fetch_add(1, Ordering::Relaxed);
        start.elapsed()
    }

    async fn check(&self) {
        let want = self.rounds.load(Ordering::Relaxed);
        for id in self.ids.iter() {
            let got = self
                .store
                .get_context_snapshot::<Counter>(*id)
                .await
                .unwrap()
                .n;
            assert_eq!(got, want, "{}: lost updates on {id}", self.name);
        }
    }

    async fn delete(&self) {
        for id in self.ids.iter() {
            self.store.delete_context::<Counter>(*id).await.unwrap();
        }
    }
}

async fn on(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Total server µs spent in scripts (`evalsha` + `eval`) on `addrs`.
async fn script_usec(addrs: &[String]) -> f64 {
    let mut total = 0.0;
    for addr in addrs {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut on(addr).await)
            .await
            .unwrap();
        for line in info.lines() {
            if line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:") {
                let usec = line
                    .split(',')
                    .find_map(|f| f.strip_prefix("usec="))
                    .and_then(|u| u.parse::<f64>().ok())
                    .unwrap_or(0.0);
                total += usec;
            }
        }
    }
    total
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn benches(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ns = format!("ctxstore-bench-{}", Uuid::new_v4().simple());
    let (node, cluster) = rt.block_on(async {
        let node = RedisContextStorage::builder(url())
            .namespace(&ns)
            .connect()
            .await
            .expect("Redis must be running (see CTXSTORE_REDIS_URL)");
        let cluster = RedisContextStorage::cluster_builder(seeds())
            .namespace(&ns)
            .connect()
            .await
            .expect("the cluster must be running: scripts/redis-cluster.sh start");
        (
            contender("one_server", node).await,
            contender("cluster_3_masters", cluster).await,
        )
    });
    let both = [&node, &cluster];

    let mut group = c.benchmark_group("redis_cluster_spread");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(KEYS as u64));
    for who in both {
        group.bench_function(who.name, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += who.round().await;
                }
                total
            })
        });
        rt.block_on(who.check());
    }
    group.finish();

    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("CTXSTORE_BENCH_AB_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if bench_mode { 8 } else { 1 })
        .max(1);
    let addrs = masters();
    // The servers each contender runs on: the one server, or every master.
    let node = vec![url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned()];
    let servers = [&node, &addrs];
    let mut times: [Vec<f64>; 2] = Default::default();
    let mut server_usec = [0.0; 2];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            let before = rt.block_on(script_usec(servers[i]));
            let d = rt.block_on(both[i].round());
            server_usec[i] += rt.block_on(script_usec(servers[i])) - before;
            times[i].push(d.as_secs_f64() * 1e6 / KEYS as f64);
        }
    }
    for who in both {
        rt.block_on(who.check());
    }
    let m: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let per_incr = server_usec.map(|u| u / (rounds * KEYS) as f64);
    println!(
        "\ninterleaved A/B, {rounds} rounds, {TASKS} tasks, {KEYS} counters, median \
         us/increment: one_server {:.1}  cluster_3_masters {:.1}  cluster/one_server {:.2}  \
         (0 lost)",
        m[0],
        m[1],
        m[1] / m[0]
    );
    println!(
        "server time in scripts per increment (lock + commit, INFO commandstats): one \
         server {:.1} us, cluster {:.1} us (summed over {} masters). A master's one thread \
         saturates at about {:.0} increments/s (one-server cost; {:.0} at the cluster's, \
         which shares these cores with the replicas), so each added master adds about \
         that much capacity while the clients keep up",
        per_incr[0],
        per_incr[1],
        addrs.len(),
        1e6 / per_incr[0],
        1e6 / per_incr[1],
    );

    // What `WAIT 1` after each write would cost: sequential writes to keys
    // of one master, with and without waiting for one replica's ack.
    let (plain, waited) = rt.block_on(async {
        let mut conn = on(&addrs[0]).await;
        // Keys this master serves (others answer MOVED).
        let mut keys = Vec::new();
        let mut i = 0;
        while keys.len() < 16 {
            let key = format!("{ns}:wait-probe:{i}");
            let r: redis::RedisResult<()> = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .query_async(&mut conn)
                .await;
            if r.is_ok() {
                keys.push(key);
            }
            i += 1;
        }
        let n = if bench_mode { 2_000 } else { 100 };
        let time = |wait: bool| {
            let mut conn = conn.clone();
            let keys = keys.clone();
            async move {
                let start = Instant::now();
                for j in 0..n {
                    let _: () = redis::cmd("SET")
                        .arg(&keys[j % keys.len()])
                        .arg(j)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    if wait {
                        let acked: i64 = redis::cmd("WAIT")
                            .arg(1)
                            .arg(1000)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        assert!(acked >= 1, "no replica acknowledged");
                    }
                }
                start.elapsed().as_secs_f64() * 1e6 / n as f64
            }
        };
        let mut plain = Vec::new();
        let mut waited = Vec::new();
        for _ in 0..3 {
            plain.push(time(false).await);
            waited.push(time(true).await);
        }
        for key in &keys {
            let _: () = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        (median(&mut plain), median(&mut waited))
    });
    println!(
        "WAIT 1: a write alone {plain:.1} us, write + WAIT 1 {waited:.1} us (+{:.1} us, one \
         replica round trip per commit; ctxstore does not issue it)",
        waited - plain
    );

    rt.block_on(async {
        for who in both {
            who.delete().await;
        }
    });
}

criterion_group!(redis_cluster_benches, benches);
criterion_main!(redis_cluster_benches);
