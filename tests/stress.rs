//! Stress under cancellation: many tasks on a multi-threaded runtime and a
//! few plain threads hammer a small set of keys (most traffic on a hot
//! subset) with increments held across `.await` / `yield_now`, random
//! cancellations (a Tokio timeout dropping a lock future, or a guard, at any
//! point), engine timeouts, `try`, deletes and re-creates, and snapshots.
//!
//! Every version-creating write is logged as `(version, count)`. At the end,
//! per key, the log sorted by version must be a chain: each increment's
//! count is exactly one more than the write before it (a lost update or two
//! holders at once break it, also across delete + re-create), the number of
//! increments is exact, and the committed value is the log's last entry.
//! Holders also check mutual exclusion directly with a per-key flag, and
//! snapshots must never be torn (`a == b`) or go back in version.
//!
//! Bounded by operation counts, not time (a few seconds here); a generous
//! watchdog turns a hang into a failure instead of a stuck CI job.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ctxstore::{Context, ContextError, ContextGuard, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};

const KEYS: usize = 16;
const HOT: usize = 4;
const TASKS: usize = 64;
const TASK_OPS: usize = 800;
const THREADS: usize = 3;
const THREAD_OPS: usize = 2_000;

/// `a` and `b` are written in two steps with a suspension point between:
/// a torn snapshot would show them different.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Counter {
    a: u64,
    b: u64,
}
impl Context for Counter {}

#[derive(Debug, Clone, Copy)]
enum Event {
    Store { version: u64 },
    Commit { version: u64, count: u64 },
}

impl Event {
    fn version(self) -> u64 {
        match self {
            Event::Store { version } | Event::Commit { version, .. } => version,
        }
    }
}

struct Shared {
    store: InMemoryContextStorage,
    ids: Vec<Uuid>,
    log: Vec<Mutex<Vec<Event>>>,
    held: Vec<AtomicBool>,
    increments: Vec<AtomicU64>,
    cancelled: AtomicU64,
    deletes: AtomicU64,
}

impl Shared {
    fn record(&self, k: usize, e: Event) {
        self.log[k].lock().unwrap().push(e);
    }
}

/// splitmix64: a tiny deterministic generator (no `rand` in dev-deps).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn key(&mut self) -> usize {
        if self.below(10) < 7 {
            self.below(HOT as u64) as usize
        } else {
            self.below(KEYS as u64) as usize
        }
    }
}

/// A held guard plus the mutual-exclusion flag of its key. Dropping it
/// (cancellation, rollback) clears the flag before it releases the lock.
struct Held<'a> {
    guard: Option<ContextGuard<Counter>>,
    flag: &'a AtomicBool,
}

impl<'a> Held<'a> {
    fn new(guard: ContextGuard<Counter>, flag: &'a AtomicBool) -> Self {
        // AcqRel: pairs with the Release store of the previous holder, which
        // it made before releasing the lock.
        assert!(
            !flag.swap(true, Ordering::AcqRel),
            "two holders of one key at once"
        );
        Held {
            guard: Some(guard),
            flag,
        }
    }

    fn get(&mut self) -> &mut ContextGuard<Counter> {
        self.guard.as_mut().expect("held")
    }

    /// Clears the flag (while still holding the lock) and hands the guard
    /// out to be committed.
    fn release(mut self) -> ContextGuard<Counter> {
        let g = self.guard.take().expect("held");
        self.flag.store(false, Ordering::Release);
        g
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            // Release: pairs with the next holder's swap.
            self.flag.store(false, Ordering::Release);
            drop(g);
        }
    }
}

fn is_gone(e: &ContextError) -> bool {
    e.is_not_found()
}

/// Increments `k` through a held guard (suspending in between the two
/// field writes); re-creates the context if it is gone. `how` picks the
/// acquisition: 0 wait, 1 engine timeout, 2 try.
async fn increment(sh: &Shared, k: usize, how: u64, rng: &mut Rng) {
    let id = sh.ids[k];
    let got = match how {
        0 => sh.store.get_context::<Counter>(id).await,
        1 => {
            let t = Duration::from_micros(rng.below(2_000));
            sh.store.get_context_timeout::<Counter>(id, t).await
        }
        _ => sh.store.try_get_context::<Counter>(id).await,
    };
    let g = match got {
        Ok(g) => g,
        Err(e) if is_gone(&e) => return recreate(sh, k).await,
        Err(e) if e.is_timeout() || e.is_would_block() => return,
        Err(e) => panic!("unexpected error: {e}"),
    };
    let mut held = Held::new(g, &sh.held[k]);
    let next = held.get().a + 1;
    held.get().a = next;
    tokio::task::yield_now().await;
    held.get().b = next;
    if rng.below(20) == 0 {
        return; // rolled back by drop
    }
    let g = held.release();
    let version = g.commit().await.expect("in-memory commit");
    // Synchronous with the commit (no suspension in between), so a
    // cancellation cannot separate the write from its record.
    sh.record(
        k,
        Event::Commit {
            version,
            count: next,
        },
    );
    sh.increments[k].fetch_add(1, Ordering::Relaxed);
}

async fn recreate(sh: &Shared, k: usize) {
    let version = sh
        .store
        .store_context(sh.ids[k], Counter { a: 0, b: 0 })
        .await
        .expect("store");
    sh.record(k, Event::Store { version });
}

fn check_snapshot(sh: &Shared, k: usize, last_seen: &mut [u64]) {
    match sh.store.snapshot::<Counter>(sh.ids[k]) {
        Ok(s) => {
            assert_eq!(s.a, s.b, "torn snapshot of key {k}: {s:?}");
            assert!(s.version() >= last_seen[k], "snapshot version went back");
            last_seen[k] = s.version();
        }
        Err(e) => assert!(is_gone(&e), "{e}"),
    }
}

async fn task_body(sh: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed);
    let mut last_seen = vec![0u64; KEYS];
    for _ in 0..TASK_OPS {
        let k = rng.key();
        match rng.below(100) {
            0..=59 => {
                // Cancellation: a Tokio timeout drops the whole increment
                // (waiting for the lock, or holding the guard) at any point.
                let how = rng.below(3);
                let limit = Duration::from_micros(rng.below(3_000));
                let mut rng2 = Rng(rng.next());
                let fut = increment(&sh, k, how, &mut rng2);
                if tokio::time::timeout(limit, fut).await.is_err() {
                    sh.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            60..=84 => check_snapshot(&sh, k, &mut last_seen),
            85..=89 => {
                let limit = Duration::from_micros(rng.below(3_000));
                match tokio::time::timeout(limit, sh.store.delete_context::<Counter>(sh.ids[k]))
                    .await
                {
                    Ok(Ok(())) => {
                        sh.deletes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => assert!(is_gone(&e), "{e}"),
                    Err(_) => {
                        sh.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            90..=94 => {
                if !sh
                    .store
                    .contains_context::<Counter>(sh.ids[k])
                    .await
                    .unwrap()
                {
                    recreate(&sh, k).await;
                }
            }
            _ => tokio::task::yield_now().await,
        }
    }
}

fn thread_body(sh: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed);
    let mut last_seen = vec![0u64; KEYS];
    for _ in 0..THREAD_OPS {
        let k = rng.key();
        let id = sh.ids[k];
        match rng.below(100) {
            0..=59 => {
                let got = match rng.below(3) {
                    0 => sh.store.get_context_blocking::<Counter>(id),
                    1 => sh.store.get_context_timeout_blocking::<Counter>(
                        id,
                        Duration::from_micros(rng.below(2_000)),
                    ),
                    _ => sh.store.try_get_context_blocking::<Counter>(id),
                };
                let g = match got {
                    Ok(g) => g,
                    Err(e) if is_gone(&e) => {
                        let version = sh
                            .store
                            .store_context_blocking(id, Counter { a: 0, b: 0 })
                            .unwrap();
                        sh.record(k, Event::Store { version });
                        continue;
                    }
                    Err(e) if e.is_timeout() || e.is_would_block() => continue,
                    Err(e) => panic!("unexpected error: {e}"),
                };
                let mut held = Held::new(g, &sh.held[k]);
                let next = held.get().a + 1;
                held.get().a = next;
                std::thread::yield_now();
                held.get().b = next;
                if rng.below(20) == 0 {
                    continue; // rolled back by drop
                }
                let version = held.release().commit_blocking().unwrap();
                sh.record(
                    k,
                    Event::Commit {
                        version,
                        count: next,
                    },
                );
                sh.increments[k].fetch_add(1, Ordering::Relaxed);
            }
            60..=89 => check_snapshot(&sh, k, &mut last_seen),
            90..=94 => match sh.store.delete_context_blocking::<Counter>(id) {
                Ok(()) => {
                    sh.deletes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => assert!(is_gone(&e), "{e}"),
            },
            _ => std::thread::yield_now(),
        }
    }
}

fn run() -> Arc<Shared> {
    let sh = Arc::new(Shared {
        store: InMemoryContextStorage::new(),
        ids: (0..KEYS)
            .map(|k| Uuid::from_u128(0x5eed_0000 + k as u128))
            .collect(),
        log: (0..KEYS).map(|_| Mutex::new(Vec::new())).collect(),
        held: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
        increments: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        cancelled: AtomicU64::new(0),
        deletes: AtomicU64::new(0),
    });
    for k in 0..KEYS {
        let version = sh
            .store
            .store_context_blocking(sh.ids[k], Counter { a: 0, b: 0 })
            .unwrap();
        sh.record(k, Event::Store { version });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let sh = sh.clone();
            std::thread::spawn(move || thread_body(sh, 0xbad5eed + i as u64))
        })
        .collect();
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|i| tokio::spawn(task_body(sh.clone(), 0x7a5c + i as u64)))
            .collect();
        for t in tasks {
            t.await.expect("a task failed");
        }
    });
    for t in threads {
        t.join().expect("a thread failed");
    }
    sh
}

fn verify(sh: &Shared) {
    let mut total = 0;
    for k in 0..KEYS {
        let mut log = sh.log[k].lock().unwrap().clone();
        log.sort_by_key(|e| e.version());
        for w in log.windows(2) {
            assert!(
                w[0].version() < w[1].version(),
                "key {k}: version reused: {w:?}"
            );
        }
        // The chain: every increment continues exactly from the write before.
        let mut count = None;
        let mut commits = 0;
        for e in &log {
            match *e {
                Event::Store { .. } => count = Some(0),
                Event::Commit { count: c, version } => {
                    assert_eq!(
                        Some(c - 1),
                        count,
                        "key {k}: increment to {c} at version {version} does not follow \
                         the previous write (lost update or two holders)"
                    );
                    count = Some(c);
                    commits += 1;
                }
            }
        }
        assert_eq!(commits, sh.increments[k].load(Ordering::Relaxed), "key {k}");
        total += commits;
        // The committed value is the last write; its lock is free.
        let id = sh.ids[k];
        match sh.store.snapshot::<Counter>(id) {
            Ok(s) => {
                let last = log.last().expect("a live key was written");
                assert_eq!(s.version(), last.version(), "key {k}: final version");
                assert_eq!((s.a, s.b), (count.unwrap(), count.unwrap()), "key {k}");
                let g = sh
                    .store
                    .try_get_context_blocking::<Counter>(id)
                    .unwrap_or_else(|e| panic!("key {k} left locked: {e}"));
                g.rollback();
            }
            Err(e) => assert!(is_gone(&e), "{e}"),
        }
        assert!(!sh.held[k].load(Ordering::Acquire));
    }
    eprintln!(
        "stress: {total} increments, {} deletes, {} cancelled operations, {} live contexts",
        sh.deletes.load(Ordering::Relaxed),
        sh.cancelled.load(Ordering::Relaxed),
        sh.store.len()
    );
    assert!(total > 0);
}

#[test]
fn tasks_threads_cancellation_deletes_exact_counts() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let sh = run();
        verify(&sh);
        tx.send(()).unwrap();
    });
    // Hang guard only (a normal run takes seconds): a deadlock or a lost
    // wake-up fails the test instead of stalling CI.
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("stress run hung (no progress in 300 s)"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("stress run failed (see above)"),
    }
}

/// Regression: a context created while another thread deletes the previous
/// incarnation of the same key must not reuse one of its versions. (The
/// creator used to read the store's version floor before its insert, so a
/// delete landing in between let it insert at a version the deleted
/// incarnation had already used.)
#[test]
fn versions_never_repeat_when_create_races_delete() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::from_u128(0xaba);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (store, seen) = (store.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..5_000u64 {
                    match (i + t) % 3 {
                        0 => mine.push(
                            store
                                .store_context_blocking(id, Counter { a: 0, b: 0 })
                                .unwrap(),
                        ),
                        1 => {
                            let _ = store.delete_context_blocking::<Counter>(id);
                        }
                        _ => {
                            if let Ok(g) = store.try_get_context_blocking::<Counter>(id) {
                                mine.push(g.commit_blocking().unwrap());
                            }
                        }
                    }
                }
                seen.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut seen = seen.lock().unwrap().clone();
    let n = seen.len();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(n - seen.len(), 0, "versions handed out twice for one key");
}
