//! Several processes share one Postgres counter (feature `postgres`): exact
//! counts across processes, and a worker SIGKILLed while holding the row
//! lock does not block the others.
//!
//! The workers are the `pg_workers` example. The test finds it next to its
//! own binary (`target/<profile>/examples/pg_workers`) after running
//! `cargo build --example pg_workers --features postgres` (same profile,
//! same target directory; a no-op when it is fresh). Set
//! `CTXSTORE_PG_WORKERS` to a prebuilt binary to skip the build.
#![cfg(all(feature = "postgres", unix))]

mod postgres_common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
