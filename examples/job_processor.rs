//! A high-contention job processor on the process-wide in-memory store.
//!
//! Worker tasks and plain threads pull jobs from a shared counter. Each job's
//! context is created, updated step by step (some steps also bump one of a
//! few deliberately hot shared counters), checked through a snapshot, and
//! deleted. A monitor task snapshots hot and in-flight contexts continuously,
//! measures snapshot latency and draws a live progress bar. At the end the
//! processor prints a summary and verifies every count: it exits non-zero on
//! any mismatch.
//!
//! ```text
//! cargo run --release --example job_processor
//! cargo run --release --example job_processor -- --jobs 20000 --workers 64 --threads 2 --hot-share 0.3 --json
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ctxstore::{
    context_storage, set_context_storage, Context, ContextStorageExt, InMemoryContextStorage, Uuid,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "A high-contention job processor on ctxstore's in-memory default store")]
struct Args {
    /// Number of jobs to process.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Tokio worker tasks.
    #[arg(long, default_value_t = 256)]
    workers: usize,
    /// Plain OS threads using the blocking API.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Updates per job.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Share of steps that also bump a hot shared counter (0.0..=1.0).
    #[arg(long, default_value_t = 0.25)]
    hot_share: f64,
    /// Number of hot shared counters.
    #[arg(long, default_value_t = 4)]
    hot_keys: usize,
    /// Print the summary as one JSON object (no progress bar).
    #[arg(long)]
    json: bool,
}

/// One job's progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobContext {
    job_name: String,
    steps_total: u32,
    steps_done: u32,
    /// The last few step stamps (bounded).
    history: Vec<u64>,
    worker: String,
}
impl Context for JobContext {
    fn kind() -> &'static str {
        "example.job"
    }
}

/// A counter many jobs bump: the hot keys.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct HotCounter {
    bumps: u64,
    last_job: u64,
}
impl Context for HotCounter {
    fn kind() -> &'static str {
        "example.hot"
    }
}

const HISTORY: usize = 8;

fn job_id(base: u128, n: u64) -> Uuid {
    Uuid::from_u128(base + u128::from(n))
}

/// Shared counters of the run.
#[derive(Default)]
struct Stats {
    next_job: AtomicU64,
    done_jobs: AtomicU64,
    commits: AtomicU64,
    hot_bumps: AtomicU64,
    lock_waits: AtomicU64,
    mismatches: AtomicU64,
    /// The last bump count each hot counter's watch saw.
    hot_seen: Vec<AtomicU64>,
}

/// A cheap deterministic PRNG (splitmix64) so the run needs no rand crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

struct Run {
    args: Args,
    base: u128,
    hot: Vec<Uuid>,
    stats: Stats,
}

impl Run {
    fn new_job(&self, n: u64, worker: &str) -> JobContext {
        JobContext {
            job_name: format!("job-{n}"),
            steps_total: self.args.steps,
            steps_done: 0,
            history: Vec::with_capacity(HISTORY),
            worker: worker.to_string(),
        }
    }

    fn check_final(&self, n: u64, job: &JobContext) {
        if job.steps_done != self.args.steps || job.job_name != format!("job-{n}") {
            self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn step(job: &mut JobContext, stamp: u64) {
    job.steps_done += 1;
    if job.history.len() == HISTORY {
        job.history.remove(0);
    }
    job.history.push(stamp);
}

async fn worker_task(run: Arc<Run>, worker: usize) {
    let storage = context_storage();
    let name = format!("task-{worker}");
    let mut rng = Rng(worker as u64 + 1);
    loop {
        let n = run.stats.next_job.fetch_add(1, Ordering::Relaxed);
        if n >= run.args.jobs {
            return;
        }
        let id = job_id(run.base, n);
        storage
            .store_context(id, run.new_job(n, &name))
            .await
            .expect("store");
        for s in 0..run.args.steps {
            let mut job = storage
                .get_context::<JobContext>(id)
                .await
                .expect("lock job");
            step(&mut job, u64::from(s));
            if s % 4 == 3 {
                // Held across an .await, as real jobs do.
                tokio::task::yield_now().await;
            }
            job.commit().await.expect("commit job");
            run.stats.commits.fetch_add(1, Ordering::Relaxed);
            if rng.chance(run.args.hot_share) {
                let hot = run.hot[(rng.next() % run.hot.len() as u64) as usize];
                let mut counter = match storage.try_get_context::<HotCounter>(hot).await {
                    Ok(g) => g,
                    Err(e) if e.is_would_block() => {
                        run.stats.lock_waits.fetch_add(1, Ordering::Relaxed);
                        storage
                            .get_context::<HotCounter>(hot)
                            .await
                            .expect("lock hot")
                    }
                    Err(e) => panic!("{e}"),
                };
                counter.bumps += 1;
                counter.last_job = n;
                counter.commit().await.expect("commit hot");
                run.stats.hot_bumps.fetch_add(1, Ordering::Relaxed);
                run.stats.commits.fetch_add(1, Ordering::Relaxed);
            }
        }
        let snap = storage
            .get_context_snapshot::<JobContext>(id)
            .await
            .expect("snapshot");
        run.check_final(n, &snap);
        storage
            .delete_context::<JobContext>(id)
            .await
            .expect("delete");
        run.stats.done_jobs.fetch_add(1, Ordering::Relaxed);
    }
}

fn worker_thread(run: Arc<Run>, store: Arc<InMemoryContextStorage>, worker: usize) {
    let name = format!("thread-{worker}");
    let mut rng = Rng(0xF00D + worker as u64);
    loop {
        let n = run.stats.next_job.fetch_add(1, Ordering::Relaxed);
        if n >= run.args.jobs {
            return;
        }
        let id = job_id(run.base, n);
        store
            .store_context_blocking(id, run.new_job(n, &name))
            .expect("store");
        for s in 0..run.args.steps {
            if s % 2 == 0 {
                let mut job = store
                    .get_context_blocking::<JobContext>(id)
                    .expect("lock job");
                step(&mut job, u64::from(s));
                job.commit_blocking().expect("commit job");
            } else {
                store
                    .update_context_blocking(id, |job: &mut JobContext| step(job, u64::from(s)))
                    .expect("update job");
            }
            run.stats.commits.fetch_add(1, Ordering::Relaxed);
            if rng.chance(run.args.hot_share) {
                let hot = run.hot[(rng.next() % run.hot.len() as u64) as usize];
                let mut counter = match store.try_get_context_blocking::<HotCounter>(hot) {
                    Ok(g) => g,
                    Err(e) if e.is_would_block() => {
                        run.stats.lock_waits.fetch_add(1, Ordering::Relaxed);
                        store
                            .get_context_blocking::<HotCounter>(hot)
                            .expect("lock hot")
                    }
                    Err(e) => panic!("{e}"),
                };
                counter.bumps += 1;
                counter.last_job = n;
                counter.commit_blocking().expect("commit hot");
                run.stats.hot_bumps.fetch_add(1, Ordering::Relaxed);
                run.stats.commits.fetch_add(1, Ordering::Relaxed);
            }
        }
        let snap = store.snapshot::<JobContext>(id).expect("snapshot");
        run.check_final(n, &snap);
        store
            .delete_context_blocking::<JobContext>(id)
            .expect("delete");
        run.stats.done_jobs.fetch_add(1, Ordering::Relaxed);
    }
}

/// Follows one hot counter with `watch_context` (no polling): each
/// `changed()` waits for a newer commit and returns the newest. Checks that
/// versions only increase and bumps never go down, publishes the value for
/// the progress line, and returns how many updates it saw.
async fn watch_hot(run: Arc<Run>, k: usize, stop: Arc<tokio::sync::Notify>) -> u64 {
    let storage = context_storage();
    let mut watch = storage
        .watch_context::<HotCounter>(run.hot[k])
        .await
        .expect("watch hot counter");
    let (mut seen, mut last) = (0u64, (0u64, 0u64));
    loop {
        let snap = tokio::select! {
            _ = stop.notified() => return seen,
            got = watch.changed() => got.expect("hot counter watch"),
        };
        seen += 1;
        if snap.version() <= last.0 || snap.bumps < last.1 {
            run.stats.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        last = (snap.version(), snap.bumps);
        run.stats.hot_seen[k].store(snap.bumps, Ordering::Relaxed);
    }
}

/// Snapshots in-flight jobs until told to stop, and draws the progress line
/// with the hottest counter's live value (kept current by `watch_hot`);
/// returns the snapshot latencies (ns) and the number of in-flight
/// snapshots that found their job.
async fn monitor(run: Arc<Run>, stop: Arc<AtomicBool>, bar: ProgressBar) -> (Vec<u64>, u64) {
    let storage = context_storage();
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut found = 0u64;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            i += 1;
            let t = Instant::now();
            let n = run
                .stats
                .next_job
                .load(Ordering::Relaxed)
                .saturating_sub(1 + i % 256);
            let res = storage
                .get_context_snapshot::<JobContext>(job_id(run.base, n))
                .await;
            latencies.push(t.elapsed().as_nanos() as u64);
            if let Ok(snap) = res {
                found += 1;
                if snap.steps_done > snap.steps_total || snap.history.len() > HISTORY {
                    run.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let hottest = run
            .stats
            .hot_seen
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        bar.set_message(format!("hottest counter {hottest} bumps (watched)"));
        bar.set_position(run.stats.done_jobs.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bar.set_position(run.stats.done_jobs.load(Ordering::Relaxed));
    (latencies, found)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.hot_share)
        || args.hot_keys == 0
        || args.workers + args.threads == 0
    {
        eprintln!("error: --hot-share must be in 0..=1, --hot-keys >= 1, and there must be a worker or a thread");
        return ExitCode::from(2);
    }
    let store = Arc::new(InMemoryContextStorage::with_capacity(4096));
    set_context_storage(store.clone());

    let run = Arc::new(Run {
        base: Uuid::new_v4().as_u128() & !u128::from(u64::MAX),
        hot: (0..args.hot_keys).map(|_| Uuid::new_v4()).collect(),
        stats: Stats {
            hot_seen: (0..args.hot_keys).map(|_| AtomicU64::new(0)).collect(),
            ..Stats::default()
        },
        args,
    });
    for hot in &run.hot {
        store
            .store_context_blocking(*hot, HotCounter::default())
            .expect("create hot counter");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let bar = if run.args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(run.args.jobs)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs  {per_sec}  eta {eta}  {msg}",
        )
        .expect("template"),
    );

    let start = Instant::now();
    let threads: Vec<_> = (0..run.args.threads)
        .map(|t| {
            let (run, store) = (run.clone(), store.clone());
            std::thread::spawn(move || worker_thread(run, store, t))
        })
        .collect();
    let (latencies, found, hot_updates) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_watching = Arc::new(tokio::sync::Notify::new());
        let watchers: Vec<_> = (0..run.hot.len())
            .map(|k| tokio::spawn(watch_hot(run.clone(), k, stop_watching.clone())))
            .collect();
        let monitor = tokio::spawn(monitor(run.clone(), stop.clone(), bar.clone()));
        let workers: Vec<_> = (0..run.args.workers)
            .map(|w| tokio::spawn(worker_task(run.clone(), w)))
            .collect();
        for w in workers {
            w.await.expect("worker task panicked");
        }
        for t in threads {
            t.join().expect("worker thread panicked");
        }
        stop.store(true, Ordering::Relaxed);
        // Each watch must have caught up with its counter's last commit
        // (a watch that missed a wake-up would stall here, not finish).
        for (k, hot) in run.hot.iter().enumerate() {
            let last = store
                .snapshot::<HotCounter>(*hot)
                .expect("hot counter")
                .bumps;
            while run.stats.hot_seen[k].load(Ordering::Relaxed) != last {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        stop_watching.notify_waiters();
        let mut hot_updates = 0;
        for w in watchers {
            hot_updates += w.await.expect("hot watcher panicked");
        }
        let (latencies, found) = monitor.await.expect("monitor panicked");
        (latencies, found, hot_updates)
    });
    let elapsed = start.elapsed();
    bar.finish_and_clear();

    // Verify every count.
    let mut errors = Vec::new();
    let s = &run.stats;
    let done = s.done_jobs.load(Ordering::Relaxed);
    if done != run.args.jobs {
        errors.push(format!("{done} jobs done, expected {}", run.args.jobs));
    }
    let hot_total: u64 = run
        .hot
        .iter()
        .map(|h| store.snapshot::<HotCounter>(*h).expect("hot counter").bumps)
        .sum();
    if hot_total != s.hot_bumps.load(Ordering::Relaxed) {
        errors.push(format!(
            "hot counters sum to {hot_total}, {} bumps were committed",
            s.hot_bumps.load(Ordering::Relaxed)
        ));
    }
    let mismatches = s.mismatches.load(Ordering::Relaxed);
    if mismatches != 0 {
        errors.push(format!("{mismatches} job or snapshot mismatches"));
    }
    if store.len() != run.hot.len() {
        errors.push(format!(
            "{} contexts left, expected only the {} hot counters",
            store.len(),
            run.hot.len()
        ));
    }
    for hot in &run.hot {
        store
            .delete_context_blocking::<HotCounter>(*hot)
            .expect("delete hot counter");
    }
    if !store.is_empty() {
        errors.push(format!("{} contexts left after cleanup", store.len()));
    }

    let mut sorted = latencies;
    sorted.sort_unstable();
    let secs = elapsed.as_secs_f64();
    let commits = s.commits.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "jobs": run.args.jobs,
        "workers": run.args.workers,
        "threads": run.args.threads,
        "steps_per_job": run.args.steps,
        "hot_share": run.args.hot_share,
        "hot_keys": run.args.hot_keys,
        "elapsed_s": secs,
        "jobs_per_s": done as f64 / secs,
        "commits": commits,
        "commits_per_s": commits as f64 / secs,
        "hot_bumps": s.hot_bumps.load(Ordering::Relaxed),
        "lock_waits": s.lock_waits.load(Ordering::Relaxed),
        "snapshots": sorted.len(),
        "snapshots_in_flight_found": found,
        "hot_watch_updates": hot_updates,
        "snapshot_p50_ns": percentile(&sorted, 0.50),
        "snapshot_p99_ns": percentile(&sorted, 0.99),
        "snapshot_max_ns": sorted.last().copied().unwrap_or(0),
        "ok": errors.is_empty(),
        "errors": errors,
    });
    if run.args.json {
        println!("{summary}");
    } else {
        println!(
            "ctxstore job processor: {} jobs, {} tasks + {} threads, {} steps/job, hot share {}",
            run.args.jobs, run.args.workers, run.args.threads, run.args.steps, run.args.hot_share
        );
        println!("  elapsed          {:>12.3} s", secs);
        println!("  jobs/s           {:>12.0}", done as f64 / secs);
        println!(
            "  commits/s        {:>12.0}  ({} commits, {} on hot keys)",
            commits as f64 / secs,
            commits,
            s.hot_bumps.load(Ordering::Relaxed)
        );
        println!(
            "  lock waits       {:>12}  (hot-key acquisitions that found the lock held)",
            s.lock_waits.load(Ordering::Relaxed)
        );
        println!(
            "  snapshots        {:>12}  p50 {} ns, p99 {} ns, max {} ns",
            sorted.len(),
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            sorted.last().copied().unwrap_or(0)
        );
        println!(
            "  hot watches      {:>12}  updates seen by watch_context (each the newest commit)",
            hot_updates
        );
        if errors.is_empty() {
            println!("  verification     OK: every job done once, hot counters exact, store empty");
        } else {
            for e in &errors {
                println!("  verification     FAILED: {e}");
            }
        }
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
