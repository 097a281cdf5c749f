//! Several processes share one Postgres counter (feature `postgres`): exact
//! counts across processes (row-locked and optimistic increments), exactly
//! one winner of a create-once race, and a worker SIGKILLed while holding
//! the row lock does not block the others.
//!
//! The workers are the `pg_workers` example. The test finds it next to its
//! own binary (`target/<profile>/examples/pg_workers`) after running
//! `cargo build --example pg_workers --features postgres` (same profile,
//! same target directory; a no-op when it is fresh). Set
//! `CTXSTORE_PG_WORKERS` to a prebuilt binary to skip the build.
#![cfg(all(feature = "postgres", unix))]

mod postgres_common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use ctxstore::{Context, ContextStorageExt, Uuid};

/// The counter of `examples/pg_workers.rs` (same `kind`, same shape).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Counter {
    n: u64,
}

impl Context for Counter {
    fn kind() -> &'static str {
        "ctxstore.pg_workers.counter"
    }
}

/// The worker binary, built once per test process.
fn workers_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_workers).clone()
}

fn build_workers() -> PathBuf {
    if let Ok(path) = std::env::var("CTXSTORE_PG_WORKERS") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> -> target/<profile>
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--example", "pg_workers", "--features", "postgres"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build for pg_workers");
    assert!(status.success(), "building the pg_workers example failed");
    let bin = profile_dir.join("examples").join("pg_workers");
    assert!(bin.exists(), "pg_workers not found at {}", bin.display());
    bin
}

fn worker(bin: &PathBuf, table: &str, id: Uuid, args: &[&str]) -> Child {
    Command::new(bin)
        .args(["--url", &postgres_common::url(), "--table", table, "--id"])
        .arg(id.to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn pg_workers")
}

/// Waits for a child without blocking the runtime's workers.
async fn wait_ok(child: Child) -> String {
    tokio::task::spawn_blocking(move || {
        let out = child.wait_with_output().expect("wait for pg_workers");
        assert!(out.status.success(), "worker failed: {:?}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .expect("join waiter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_count_exactly() {
    let bin = workers_binary();
    let table = postgres_common::fresh_table();
    let store = postgres_common::store_on(&table).await;
    let id = Uuid::new_v4();
    let v0 = store.store_context(id, Counter { n: 0 }).await.unwrap();
    let run = async {
        let children: Vec<Child> = (0..4)
            .map(|_| worker(&bin, &table, id, &["increment", "--count", "2000"]))
            .collect();
        for child in children {
            assert_eq!(wait_ok(child).await.trim(), "done 2000");
        }
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("hang guard: workers did not finish in 600 s");
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    assert_eq!(snap.n, 8000);
    // 8,000 commits, each a fresh version above the last.
    assert!(snap.version() >= v0 + 8000, "{} vs {v0}", snap.version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_optimistic_increments_count_exactly() {
    const COUNT: u64 = 1000;
    let bin = workers_binary();
    let table = postgres_common::fresh_table();
    let store = postgres_common::store_on(&table).await;
    let id = Uuid::new_v4();
    let v0 = store.store_context(id, Counter { n: 0 }).await.unwrap();
    let count = COUNT.to_string();
    let run = async {
        let children: Vec<Child> = (0..4)
            .map(|_| worker(&bin, &table, id, &["optimistic", "--count", &count]))
            .collect();
        let mut attempts = 0;
        for child in children {
            let out = wait_ok(child).await;
            let n: u64 = out
                .trim()
                .strip_prefix(&format!("done {COUNT} attempts "))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("expected `done {COUNT} attempts <n>`, got {out:?}"));
            // Every increment ran the change at least once.
            assert!(n >= COUNT, "{n} attempts for {COUNT} increments");
            attempts += n;
        }
        attempts
    };
    let attempts = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("hang guard: workers did not finish in 600 s");
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    assert_eq!(snap.n, 4 * COUNT, "optimistic increments were lost");
    // One commit per increment, each a fresh version above the last.
    assert!(
        snap.version() >= v0 + 4 * COUNT,
        "{} vs {v0}",
        snap.version()
    );
    eprintln!(
        "4 processes x {COUNT} optimistic increments = {}, {} conflicts retried",
        snap.n,
        attempts - 4 * COUNT
    );
}

/// A `create-once` worker: ids go in on stdin, outcomes come back on stdout.
struct Racer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Racer {
    fn spawn(bin: &PathBuf, table: &str, tag: u64) -> Racer {
        let mut child = Command::new(bin)
            .args(["--url", &postgres_common::url(), "--table", table])
            .args(["create-once", "--tag", &tag.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pg_workers create-once");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Racer {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to the worker's stdin");
        stdin.flush().expect("flush the worker's stdin");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read the worker's stdout");
        assert!(
            n > 0,
            "the worker exited early: {:?}",
            self.child.try_wait()
        );
        line.trim_end().to_owned()
    }

    /// Closes stdin and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for pg_workers");
        assert!(status.success(), "worker failed: {status:?}");
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        // A failed test must not leave workers behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A watch in this process follows the commits of two worker processes
/// (issue #12): versions only increase, and it reaches the final count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_other_processes_commits() {
    const COUNT: u64 = 200;
    let bin = workers_binary();
    let table = postgres_common::fresh_table();
    let store = postgres_common::store_on(&table).await;
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let mut watch = store.watch_context::<Counter>(id).await.unwrap();
    assert_eq!(watch.changed().await.unwrap().n, 0);
    let count = COUNT.to_string();
    let children: Vec<Child> = (0..2)
        .map(|_| worker(&bin, &table, id, &["optimistic", "--count", &count]))
        .collect();
    let waiting = tokio::spawn(async move {
        for child in children {
            wait_ok(child).await;
        }
    });
    let (mut last, mut updates) = (0u64, 0u64);
    while last < 2 * COUNT {
        let snap = tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_secs(120)) => panic!("the watch was not woken within 120 s (at n = {last})"),
            got = watch.changed() => got.unwrap(),
        };
        assert!(snap.n > last, "the watch went from {last} to {}", snap.n);
        last = snap.n;
        updates += 1;
    }
    waiting.await.unwrap();
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
    let bin = workers_binary();
    let table = postgres_common::fresh_table();
    let store = postgres_common::store_on(&table).await;
    let racers: Vec<Racer> = (0..PROCESSES)
        .map(|tag| Racer::spawn(&bin, &table, tag))
        .collect();
    // Each round: a fresh id, sent to every worker at once; each worker
    // answers with the outcome of its `store_context_if(id, 0, ..)`.
    let race = tokio::task::spawn_blocking(move || {
        let mut racers = racers;
        for r in &mut racers {
            assert_eq!(r.line(), "ready");
        }
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let id = Uuid::new_v4();
            for r in &mut racers {
                r.send(&id.to_string());
            }
            let replies: Vec<String> = racers.iter_mut().map(Racer::line).collect();
            rounds.push((id, replies));
        }
        for r in racers {
            r.finish();
        }
        rounds
    });
    let rounds = tokio::time::timeout(Duration::from_secs(300), race)
        .await
        .expect("hang guard: the race did not finish in 300 s")
        .unwrap();
    let mut wins = [0usize; PROCESSES as usize];
    for (id, replies) in rounds {
        let created: Vec<(usize, u64)> = replies
            .iter()
            .enumerate()
            .filter_map(|(tag, r)| {
                let v = r.strip_prefix(&format!("created {id} "))?;
                Some((tag, v.parse().expect("a version")))
            })
            .collect();
        let [(winner, version)] = created[..] else {
            panic!("round {id}: exactly one creation expected, got {replies:?}")
        };
        for (tag, r) in replies.iter().enumerate() {
            if tag != winner {
                // The losers expected absence (0) and found the winner's write.
                assert_eq!(r, &format!("conflict {id} 0 {version}"), "worker {tag}");
            }
        }
        let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
        assert_eq!((snap.n, snap.version()), (winner as u64, version));
        wins[winner] += 1;
    }
    eprintln!("{ROUNDS} create-once races of {PROCESSES} processes: wins per process {wins:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_holder_releases_its_row_lock() {
    let bin = workers_binary();
    let table = postgres_common::fresh_table();
    let store = postgres_common::store_on(&table).await;
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();

    // A worker takes the lock, changes the value and hangs.
    let mut holder = worker(&bin, &table, id, &["hold"]);
    let stdout = holder.stdout.take().expect("holder stdout");
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        }),
    )
    .await
    .expect("hang guard: holder did not lock in 60 s")
    .unwrap()
    .unwrap();
    assert!(line.starts_with("locked"), "holder said {line:?}");
    let e = store.try_get_context::<Counter>(id).await.unwrap_err();
    assert!(e.is_would_block(), "{e:?}");

    // Three workers queue behind it.
    let children: Vec<Child> = (0..3)
        .map(|_| worker(&bin, &table, id, &["increment", "--count", "500"]))
        .collect();
    // The holder's lock is still there while they wait, and snapshots
    // do not wait for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    assert_eq!(snap.n, 0);
    assert!(store
        .try_get_context::<Counter>(id)
        .await
        .unwrap_err()
        .is_would_block());

    // SIGKILL: no destructor runs; Postgres sees the socket close and
    // aborts the transaction, releasing the row lock.
    // SAFETY: plain FFI call with a pid we spawned and still own (not reaped).
    let rc = unsafe { libc::kill(holder.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill failed");
    let status = holder.wait().unwrap();
    assert!(!status.success());

    let run = async {
        for child in children {
            assert_eq!(wait_ok(child).await.trim(), "done 500");
        }
    };
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("hang guard: workers did not finish after the kill");
    // The killed holder's uncommitted +1,000,000 is gone; every increment
    // of the survivors is there.
    let snap = store.get_context_snapshot::<Counter>(id).await.unwrap();
    assert_eq!(snap.n, 1500);
}
