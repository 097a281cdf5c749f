//! The Redis Cluster the cluster tests (and `benches/redis_cluster.rs`)
//! use: its seeds and masters, keys per master, and the worker-process
//! harness of `tests/redis_cluster_processes.rs` and
//! `tests/redis_cluster_failover.rs`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ctxstore::{Context, ContextStorageExt, RedisContextStorage, Uuid};

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

/// The first seed that answers.
pub fn first_seed() -> String {
    seeds()
        .into_iter()
        .find(|seed| {
            redis::Client::open(seed.as_str())
                .and_then(|c| c.get_connection())
                .is_ok()
        })
        .expect(NEEDS_CLUSTER)
}

/// A store whose fallback poll (the renewal interval) is 10 s and whose
/// lease is 30 s: a waiter that is not woken by a publication waits 10 s.
pub async fn slow_polling_store(ns: &str) -> RedisContextStorage {
    RedisContextStorage::cluster_builder(seeds())
        .namespace(ns)
        .lease(Duration::from_secs(30))
        .renewal_interval(Duration::from_secs(10))
        .connect()
        .await
        .expect(NEEDS_CLUSTER)
}

/// The masters of the cluster not marked as failing (`host:port`), from
/// `CLUSTER NODES` of the first seed that answers.
pub fn masters() -> Vec<String> {
    let mut con = redis::Client::open(first_seed())
        .and_then(|c| c.get_connection())
        .expect(NEEDS_CLUSTER);
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = *fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            // ip:port@cport[,hostname]
            Some(fields[1].split(['@', ',']).next()?.to_owned())
        })
        .collect()
}

/// How many keys match `pattern` on the node `addr` (`host:port`).
pub fn count_keys(addr: &str, pattern: &str) -> usize {
    let mut con = redis::Client::open(format!("redis://{addr}"))
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let (mut cursor, mut n) = (0u64, 0);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .unwrap();
        n += keys.len();
        if next == 0 {
            return n;
        }
        cursor = next;
    }
}

/// How many keys matching `pattern` each master holds.
pub fn keys_per_master(pattern: &str) -> BTreeMap<String, usize> {
    masters()
        .into_iter()
        .map(|m| {
            let n = count_keys(&m, pattern);
            (m, n)
        })
        .collect()
}

// The worker processes: the `redis_workers` example (`--cluster`, role
// `spread`), built once per test binary.

/// Same type and kind as in `examples/redis_workers.rs`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Counter {
    pub n: u64,
}

impl Context for Counter {
    fn kind() -> &'static str {
        "ctxstore.example.counter"
    }
}

/// Counters per run.
pub const CONTEXTS: usize = 1000;
/// Worker processes per run.
pub const PROCESSES: usize = 4;
/// Increments per worker.
pub const COUNT: u64 = 2000;

/// A fresh namespace for one test.
pub fn namespace() -> String {
    format!("ctxstore-test-{}", Uuid::new_v4())
}

#[path = "../redis_workers_exe/mod.rs"]
mod redis_workers_exe;
pub use redis_workers_exe::worker_exe;

/// `spread` worker processes; their stdout lines arrive on one channel as
/// `(worker, Some(line))`, and `(worker, None)` at the end of its stdout.
pub struct Workers {
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, Option<String>)>,
    open: usize,
}

impl Workers {
    pub fn spread(ns: &str, lease_ms: u64, renew_ms: u64, ids_file: &str, count: u64) -> Workers {
        let (tx, lines) = mpsc::channel();
        let cluster = seeds().join(",");
        let children = (0..PROCESSES)
            .map(|w| {
                let mut child = Command::new(worker_exe())
                    .args(["--cluster", &cluster, "--namespace", ns])
                    .args(["--lease-ms", &lease_ms.to_string()])
                    .args(["--renew-ms", &renew_ms.to_string()])
                    .args(["spread", "--ids", ids_file, "--count", &count.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn redis_workers");
                let out = child.stdout.take().unwrap();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines() {
                        let Ok(line) = line else { break };
                        if tx.send((w, Some(line))).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send((w, None));
                });
                child
            })
            .collect();
        Workers {
            children,
            lines,
            open: PROCESSES,
        }
    }

    /// The next line of any worker, `None` once every worker's stdout has
    /// ended. Panics (the hang guard) past `deadline`.
    pub fn next(&mut self, deadline: Instant, tally: &Tally) -> Option<(usize, String)> {
        while self.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((w, Some(line))) => return Some((w, line)),
                Ok((_, None)) => self.open -= 1,
                Err(_) => panic!(
                    "hang guard: the workers did not finish in time; so far: {}; \
                     last line of each worker: {:?}",
                    tally.summary(),
                    tally.last
                ),
            }
        }
        None
    }

    /// Waits for every worker's exit (they have closed their stdout).
    pub fn wait(mut self, deadline: Instant) -> Vec<ExitStatus> {
        let mut statuses = Vec::new();
        for child in &mut self.children {
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    statuses.push(status);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "hang guard: a worker closed its stdout but did not exit"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        statuses
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // A failed test must not leave workers behind.
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The outcomes the workers reported.
#[derive(Default, Debug)]
pub struct Tally {
    pub ok: u64,
    /// Commits that found their lease lost (not applied).
    pub lost: u64,
    /// Commits that found the version moved (not applied).
    pub conflict: u64,
    /// Commits that failed with a backend error (maybe applied).
    pub unknown: u64,
    /// Failed locks or reads (nothing applied).
    pub err: u64,
    /// Per context: (ok, unknown).
    pub per_id: HashMap<Uuid, (u64, u64)>,
    /// Per context: the versions its `ok` commits returned.
    pub versions: HashMap<Uuid, Vec<u64>>,
    /// Per worker: its `done <n>`.
    pub done: Vec<Option<u64>>,
    /// Per worker: its last line.
    pub last: Vec<String>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            done: vec![None; PROCESSES],
            last: vec![String::new(); PROCESSES],
            ..Tally::default()
        }
    }

    pub fn add(&mut self, worker: usize, line: &str) {
        self.last[worker] = line.to_owned();
        let mut words = line.split_whitespace();
        let kind = words.next().unwrap_or_default();
        let arg = words.next().unwrap_or_default();
        if kind == "done" {
            assert!(
                self.done[worker].is_none(),
                "worker {worker}: two done lines"
            );
            self.done[worker] = Some(arg.parse().expect("done <count>"));
            return;
        }
        assert!(
            self.done[worker].is_none(),
            "worker {worker}: {line:?} after its done line"
        );
        let id: Uuid = arg
            .parse()
            .unwrap_or_else(|_| panic!("worker {worker}: unexpected line {line:?}"));
        let entry = self.per_id.entry(id).or_default();
        match kind {
            "ok" => {
                self.ok += 1;
                entry.0 += 1;
                let version = words.next().and_then(|v| v.parse().ok());
                let version =
                    version.unwrap_or_else(|| panic!("worker {worker}: no version in {line:?}"));
                self.versions.entry(id).or_default().push(version);
            }
            "unknown" => {
                self.unknown += 1;
                entry.1 += 1;
            }
            "lost" => self.lost += 1,
            "conflict" => self.conflict += 1,
            "err" => self.err += 1,
            _ => panic!("worker {worker}: unexpected line {line:?}"),
        }
    }

    /// The `ok` commits that returned a version another `ok` commit of the
    /// same context had returned too, as `(id, version)`.
    pub fn repeated_versions(&self) -> Vec<(Uuid, u64)> {
        let mut repeated = Vec::new();
        for (id, versions) in &self.versions {
            let mut sorted = versions.clone();
            sorted.sort_unstable();
            for pair in sorted.windows(2) {
                if pair[0] == pair[1] {
                    repeated.push((*id, pair[0]));
                }
            }
        }
        repeated
    }

    pub fn summary(&self) -> String {
        format!(
            "ok {}, unknown {}, lost (LeaseLost) {}, conflict {}, err {}",
            self.ok, self.unknown, self.lost, self.conflict, self.err
        )
    }
}

/// A store on the cluster with that lease and renewal interval.
pub async fn store(ns: &str, lease_ms: u64, renew_ms: u64) -> RedisContextStorage {
    let store = RedisContextStorage::cluster_builder(seeds())
        .namespace(ns)
        .lease(Duration::from_millis(lease_ms))
        .renewal_interval(Duration::from_millis(renew_ms))
        .connect()
        .await
        .expect(NEEDS_CLUSTER);
    assert!(store.is_cluster());
    store
}

/// `CONTEXTS` new counters at 0, and a file listing their ids.
pub async fn counters(store: &RedisContextStorage) -> (Vec<Uuid>, PathBuf) {
    let ids: Vec<Uuid> = (0..CONTEXTS).map(|_| Uuid::new_v4()).collect();
    for &id in &ids {
        store.store_context(id, Counter { n: 0 }).await.unwrap();
    }
    let file = ids_file(store, &ids);
    (ids, file)
}

/// A file listing `ids` one a line (the `spread` workers' `--ids`), named
/// after the store's namespace.
pub fn ids_file(store: &RedisContextStorage, ids: &[Uuid]) -> PathBuf {
    let file = std::env::temp_dir().join(format!("{}.ids", store.namespace()));
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(&file, text).expect("write the ids file");
    file
}

/// The counters' values.
pub async fn values(store: &RedisContextStorage, ids: &[Uuid]) -> HashMap<Uuid, u64> {
    let mut values = HashMap::new();
    for &id in ids {
        values.insert(
            id,
            store.get_context_snapshot::<Counter>(id).await.unwrap().n,
        );
    }
    values
}
