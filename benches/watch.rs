//! What watching costs the writers (issue #12).
//!
//! `hot_key_commits/<watchers>`: 4 tasks commit `update_context` on one key
//! while `<watchers>` tasks follow it with `watch_context` (each looping on
//! `changed()`); one element = one commit. The watchers are started and
//! parked before the clock starts; the time is the committers' only (the
//! watchers may still be catching up when it stops). 0 watchers is the
//! baseline: a commit nobody watches must cost what it did before watching
//! existed; with 1 and 1,000 watchers each release wakes one watcher (the
//! lead), which wakes the rest, so the committers' cost should not grow
//! with the number of watchers (the bound: at most 2x at 1,000).
//!
//! Busy watchers (`changed()` again at once) never park on a key that
//! commits continuously: each call finds a newer version and returns, so
//! 1,000 of them are 1,000 busy tasks competing with the committers for
//! the same cores. `hot_key_commits_paced/<watchers>` gives each watcher a
//! 10 ms pause after every update (a dashboard refreshing at 100 Hz), which
//! leaves the cost of the wake-ups themselves.
//!
//! `cargo bench --bench watch` (add `-- --quick` for a short run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ctxstore::{Context, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Clone, Default, Serialize, Deserialize)]
struct Hot {
    n: u64,
    label: String,
}

impl Context for Hot {}

const COMMITTERS: u64 = 4;
const BATCH: u64 = 4_000;

/// `iters` batches of `BATCH` commits by `COMMITTERS` tasks, with
/// `watchers` watches parked on the key; returns the committers' time.
fn run(rt: &tokio::runtime::Runtime, watchers: usize, pause: Duration, iters: u64) -> Duration {
    rt.block_on(async {
        let store = Arc::new(InMemoryContextStorage::new());
        let id = Uuid::new_v4();
        store.store_context(id, Hot::default()).await.unwrap();
        let ready = Arc::new(tokio::sync::Barrier::new(watchers + 1));
        let mut tasks = Vec::new();
        for _ in 0..watchers {
            let (store, ready) = (store.clone(), ready.clone());
            tasks.push(tokio::spawn(async move {
                let mut w = store.watch_context::<Hot>(id).await.unwrap();
                w.changed().await.unwrap();
                ready.wait().await;
                let mut seen = 0u64;
                // Ends with NotFound when the context is deleted.
                while let Ok(snap) = w.changed().await {
                    seen = seen.max(snap.n);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                seen
            }));
        }
        ready.wait().await;
        // Let the watchers park.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let per = iters * BATCH / COMMITTERS;
        let start = Instant::now();
        let committers: Vec<_> = (0..COMMITTERS)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    for _ in 0..per {
                        store
                            .update_context(id, |h: &mut Hot| h.n += 1)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for c in committers {
            c.await.unwrap();
        }
        let took = start.elapsed();
        store.delete_context::<Hot>(id).await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        took
    })
}

fn hot_key_commits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, pause) in [
        ("hot_key_commits", Duration::ZERO),
        ("hot_key_commits_paced", Duration::from_millis(10)),
    ] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(BATCH));
        for watchers in [0usize, 1, 1_000] {
            if pause.is_zero() || watchers > 0 {
                group.bench_function(BenchmarkId::from_parameter(watchers), |b| {
                    b.iter_custom(|iters| run(&rt, watchers, pause, iters))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, hot_key_commits);
criterion_main!(benches);
