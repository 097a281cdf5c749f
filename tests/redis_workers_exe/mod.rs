//! The `redis_workers` example, the worker processes of the multi-process
//! Redis tests (one server: `tests/redis_processes.rs`; cluster: the
//! harness in `tests/redis_cluster_common`). Cargo gives integration tests
//! the path of `[[bin]]` targets only, so the tests build the example
//! themselves, once per run, with the cargo that runs them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The worker binary: `CTXSTORE_REDIS_WORKERS`, else the `redis_workers`
/// example, built by cargo in the profile of this test binary.
pub fn worker_exe() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        if let Ok(path) = std::env::var("CTXSTORE_REDIS_WORKERS") {
            return PathBuf::from(path);
        }
        let me = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<this test> -> target/<profile>
        let profile_dir = me
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--example",
            "redis_workers",
            "--features",
            "redis",
        ]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo to build the redis_workers example");
        assert!(
            status.success(),
            "building the redis_workers example failed"
        );
        let exe = profile_dir.join("examples").join("redis_workers");
        assert!(exe.exists(), "no worker binary at {}", exe.display());
        exe
    })
}
