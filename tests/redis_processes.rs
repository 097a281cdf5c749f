//! Several OS processes on one Redis-backed context (lease-locked and
//! optimistic increments, a create-once race), and the faults a process can
//! suffer while it holds the lease (SIGKILL, SIGSTOP).
//!
//! The workers are the `redis_workers` example. Cargo gives integration
//! tests the path of `[[bin]]` targets only, so the test builds the example
//! itself, once per run, with the cargo that runs the test
//! (`$CARGO build --example redis_workers --features redis`, `--release`
//! when the test binary is a release build) and runs it from
//! `target/<profile>/examples/`, next to this test's own `deps/` folder.
//! That build is a no-op when the example is fresh. Set
//! `CTXSTORE_REDIS_WORKERS` to a prebuilt binary to skip it.
#![cfg(all(feature = "redis", unix))]

mod redis_workers_exe;
use redis_workers_exe::worker_exe;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ctxstore::{Context, ContextStorageExt, RedisContextStorage, Uuid};

/// Same type and kind as in `examples/redis_workers.rs`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Counter {
    n: u64,
}

impl Context for Counter {
    fn kind() -> &'static str {
        "ctxstore.example.counter"
    }
}

fn url() -> String {
    std::env::var("CTXSTORE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Worker {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(ns: &str, lease_ms: u64, renew_ms: u64, role: &[&str]) -> Worker {
        let mut child = Command::new(worker_exe())
            .args(["--url", &url(), "--namespace", ns])
            .args(["--lease-ms", &lease_ms.to_string()])
            .args(["--renew-ms", &renew_ms.to_string()])
            .args(role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn redis_workers");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Worker { child, lines }
    }

    fn increment(ns: &str, lease_ms: u64, renew_ms: u64, id: Uuid, count: u64) -> Worker {
        let (id, count) = (id.to_string(), count.to_string());
        Worker::spawn(
            ns,
            lease_ms,
            renew_ms,
            &["increment", "--id", &id, "--count", &count],
        )
    }

    fn optimistic(ns: &str, id: Uuid, count: u64) -> Worker {
        let (id, count) = (id.to_string(), count.to_string());
        Worker::spawn(
            ns,
            5000,
            1000,
            &["optimistic", "--id", &id, "--count", &count],
        )
    }

    fn create_once(ns: &str, tag: u64) -> Worker {
        Worker::spawn(ns, 5000, 1000, &["create-once", "--tag", &tag.to_string()])
    }

    /// Writes one line to the worker's stdin.
    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to the worker's stdin");
        stdin.flush().expect("flush the worker's stdin");
    }

    /// Closes the worker's stdin (the end of its input).
    fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    fn hold(ns: &str, lease_ms: u64, renew_ms: u64, id: Uuid, hold_ms: u64) -> Worker {
        let (id, hold) = (id.to_string(), hold_ms.to_string());
        Worker::spawn(
            ns,
            lease_ms,
            renew_ms,
            &["hold", "--id", &id, "--hold-ms", &hold],
        )
    }

    /// The next line the worker prints (hang guard: 120 s).
    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(120))
            .expect("hang guard: the worker printed nothing for 120 s")
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and still own (not yet
        // waited for, so it cannot have been recycled) and a valid signal.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits for the exit (hang guard: 300 s, then the worker is killed).
    fn wait(mut self) -> ExitStatus {
        self.wait_mut()
    }

    /// Waits for the exit, then returns the lines the worker printed that
    /// were not read yet.
    fn wait_with_lines(mut self) -> (ExitStatus, Vec<String>) {
        let status = self.wait_mut();
        let mut lines = Vec::new();
        // The reader thread ends at the end of the worker's stdout.
        loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return (status, lines),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("hang guard: the exited worker's stdout still open after 120 s")
                }
            }
        }
    }

    fn wait_mut(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(300) {
                let _ = self.child.kill();
                panic!("hang guard: worker still running after 300 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A failed test must not leave stopped or running workers behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn store(ns: &str, lease_ms: u64, renew_ms: u64) -> RedisContextStorage {
    RedisContextStorage::builder(url())
        .namespace(ns)
        .lease(Duration::from_millis(lease_ms))
        .renewal_interval(Duration::from_millis(renew_ms))
        .connect()
        .await
        .expect("Redis must be running for the redis tests (see CTXSTORE_REDIS_URL)")
}

fn namespace() -> String {
    format!("ctxstore-test-{}", Uuid::new_v4())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_two_thousand_increments_each() {
    let ns = namespace();
    let store = store(&ns, 5000, 1000).await;
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let workers: Vec<Worker> = (0..4)
        .map(|_| Worker::increment(&ns, 5000, 1000, id, 2000))
        .collect();
    let started = Instant::now();
    let statuses = tokio::task::spawn_blocking(move || {
        workers.into_iter().map(Worker::wait).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    for s in statuses {
        assert!(s.success(), "a worker failed: {s}");
    }
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    assert_eq!(snap.n, 8000);
    eprintln!(
        "4 processes x 2000 increments = {} in {elapsed:.2?} ({:.0}/s)",
        snap.n,
        8000.0 / elapsed.as_secs_f64()
    );
    store.delete_context::<Counter>(id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_optimistic_increments_count_exactly() {
    const COUNT: u64 = 1000;
    let ns = namespace();
    let store = store(&ns, 5000, 1000).await;
    let id = Uuid::new_v4();
    let v0 = store.store_context(id, Counter { n: 0 }).await.unwrap();
    let workers: Vec<Worker> = (0..4).map(|_| Worker::optimistic(&ns, id, COUNT)).collect();
    let started = Instant::now();
    let results = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(Worker::wait_with_lines)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    let mut attempts = 0;
    for (status, lines) in results {
        assert!(status.success(), "a worker failed: {status}");
        let [line] = &lines[..] else {
            panic!("expected one line `DONE <attempts>`, got {lines:?}")
        };
        let n: u64 = line
            .strip_prefix("DONE ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("expected `DONE <attempts>`, got {line:?}"));
        // Every increment ran the change at least once.
        assert!(n >= COUNT, "{n} attempts for {COUNT} increments");
        attempts += n;
    }
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    assert_eq!(snap.n, 4 * COUNT, "optimistic increments were lost");
    assert!(snap.version() > v0, "{} vs {v0}", snap.version());
    eprintln!(
        "4 processes x {COUNT} optimistic increments = {} in {elapsed:.2?} ({:.0}/s), \
         {} conflicts retried",
        snap.n,
        (4 * COUNT) as f64 / elapsed.as_secs_f64(),
        attempts - 4 * COUNT
    );
    store.delete_context::<Counter>(id).await.unwrap();
}

/// A watch in this process follows the commits of two other processes
/// (issue #12): versions only increase, and it reaches the final count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_other_processes_commits() {
    const COUNT: u64 = 300;
    let ns = namespace();
    let store = store(&ns, 5000, 1000).await;
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let mut watch = store.watch_context::<Counter>(id).await.unwrap();
    assert_eq!(watch.changed().await.unwrap().n, 0);
    let workers: Vec<Worker> = (0..2).map(|_| Worker::optimistic(&ns, id, COUNT)).collect();
    let waiting = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(Worker::wait_with_lines)
            .collect::<Vec<_>>()
    });
    let (mut last, mut updates) = (0u64, 0u64);
    loop {
        let snap = tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_secs(60)) => panic!("the watch was not woken within 60 s (at n = {last})"),
            got = watch.changed() => got.unwrap(),
        };
        assert!(snap.n > last, "the watch went from {last} to {}", snap.n);
        last = snap.n;
        updates += 1;
        if last == 2 * COUNT {
            break;
        }
    }
    for (status, _) in waiting.await.unwrap() {
        assert!(status.success(), "a worker failed: {status}");
    }
    eprintln!(
        "the watch saw {updates} of {} commits, the last one included",
        2 * COUNT
    );
    store.delete_context::<Counter>(id).await.unwrap();
    let e = watch.changed().await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_processes_create_once_exactly_one_wins() {
    const PROCESSES: u64 = 4;
    const ROUNDS: usize = 20;
    let ns = namespace();
    let store = store(&ns, 5000, 1000).await;
    let mut workers: Vec<Worker> = (0..PROCESSES)
        .map(|tag| Worker::create_once(&ns, tag))
        .collect();
    // Each round: a fresh id, sent to every worker at once; each worker
    // answers with the outcome of its `store_context_if(id, 0, ..)`.
    let (rounds, statuses) = tokio::task::spawn_blocking(move || {
        for w in &workers {
            assert_eq!(w.line(), "READY");
        }
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let id = Uuid::new_v4();
            for w in &mut workers {
                w.send(&id.to_string());
            }
            let replies: Vec<String> = workers.iter().map(Worker::line).collect();
            rounds.push((id, replies));
        }
        let statuses: Vec<ExitStatus> = workers
            .into_iter()
            .map(|mut w| {
                w.close_stdin();
                w.wait()
            })
            .collect();
        (rounds, statuses)
    })
    .await
    .unwrap();
    for s in statuses {
        assert!(s.success(), "a worker failed: {s}");
    }
    let mut wins = [0usize; PROCESSES as usize];
    for (id, replies) in rounds {
        let created: Vec<(usize, u64)> = replies
            .iter()
            .enumerate()
            .filter_map(|(tag, r)| {
                let v = r.strip_prefix(&format!("CREATED {id} "))?;
                Some((tag, v.parse().expect("a version")))
            })
            .collect();
        let [(winner, version)] = created[..] else {
            panic!("round {id}: exactly one creation expected, got {replies:?}")
        };
        for (tag, r) in replies.iter().enumerate() {
            if tag != winner {
                // The losers expected absence (0) and found the winner's write.
                assert_eq!(r, &format!("CONFLICT {id} 0 {version}"), "worker {tag}");
            }
        }
        let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
        assert_eq!((snap.n, snap.version()), (winner as u64, version));
        store.delete_context::<Counter>(id).await.unwrap();
        wins[winner] += 1;
    }
    eprintln!("{ROUNDS} create-once races of {PROCESSES} processes: wins per process {wins:?}");
}

const LEASE_MS: u64 = 2000;
const RENEW_MS: u64 = 250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_stalls_the_others_for_at_most_one_lease() {
    let ns = namespace();
    let store = store(&ns, LEASE_MS, RENEW_MS).await;
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();

    let holder = Worker::hold(&ns, LEASE_MS, RENEW_MS, id, 600_000);
    assert!(holder.line().starts_with("LOCKED"));
    let others: Vec<Worker> = (0..3)
        .map(|_| Worker::increment(&ns, LEASE_MS, RENEW_MS, id, 300))
        .collect();
    // Let the lease be renewed a few times: the holder is alive and holds.
    tokio::time::sleep(Duration::from_millis(3 * RENEW_MS)).await;
    let e = store.try_get_context::<Counter>(id).await.unwrap_err();
    assert!(e.is_would_block(), "{e}");

    holder.signal(libc::SIGKILL);
    let killed = Instant::now();
    let holder_status = tokio::task::spawn_blocking(move || holder.wait())
        .await
        .unwrap();
    assert!(!holder_status.success());
    // Our own increment queues with the others; it gets through once the
    // dead holder's lease has run out.
    let mine = tokio::time::timeout(
        Duration::from_secs(120),
        store.update_context(id, |c: &mut Counter| c.n += 1),
    )
    .await
    .expect("hang guard: no progress 120 s after the holder was killed");
    mine.unwrap();
    let resumed = killed.elapsed();
    let statuses = tokio::task::spawn_blocking(move || {
        others.into_iter().map(Worker::wait).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for s in statuses {
        assert!(s.success(), "a worker failed: {s}");
    }
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    // The killed holder's increment was never committed.
    assert_eq!(snap.n, 3 * 300 + 1);
    eprintln!(
        "holder SIGKILLed; the next increment went through after {resumed:.2?} \
         (lease {LEASE_MS} ms, renewal {RENEW_MS} ms); final count {}",
        snap.n
    );
    store.delete_context::<Counter>(id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_past_its_lease_cannot_commit() {
    let ns = namespace();
    let store = store(&ns, LEASE_MS, RENEW_MS).await;
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();

    // The holder keeps its guard 1.5 leases, then increments and commits.
    let holder = Worker::hold(&ns, LEASE_MS, RENEW_MS, id, LEASE_MS * 3 / 2);
    assert!(holder.line().starts_with("LOCKED"));
    holder.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // While it is stopped its lease runs out and we take over.
    let newer = tokio::time::timeout(
        Duration::from_secs(120),
        store.update_context(id, |c: &mut Counter| c.n += 10),
    )
    .await
    .expect("hang guard: the stopped holder's lease never expired");
    newer.unwrap();
    let taken_over = stopped.elapsed();
    let after = store.get_context_snapshot::<Counter>(id).await.unwrap();
    // Keep it stopped past its own hold time too, then resume it: it wakes
    // up believing it holds the lock and tries to commit.
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 2)).await;
    holder.signal(libc::SIGCONT);
    assert_eq!(holder.line(), "LEASE_LOST");
    let status = tokio::task::spawn_blocking(move || holder.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(3));
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    // The stale write was not applied: the newer value and version survive.
    assert_eq!((snap.n, snap.version()), (10, after.version()));
    eprintln!(
        "holder SIGSTOPped; lease taken over after {taken_over:.2?}; after SIGCONT \
         its commit failed with LeaseLost; final count {}",
        snap.n
    );
    store.delete_context::<Counter>(id).await.unwrap();
}
