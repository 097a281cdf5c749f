//! The conformance kit seen from outside the crate: a backend written only
//! against the public API (it forwards every method to the in-memory
//! engine, hiding it from the typed fast path) passes `run_all`, and
//! variants that break one rule each make `run_all` panic with a message
//! that names the broken cases, and only those.

use std::sync::Arc;
use std::time::Duration;

use ctxstore::conformance::{self, Config, WATCH_CASES};
use ctxstore::{
    BoxFuture, ContextStorage, ContextType, ErasedValue, InMemoryContextStorage, RawGuard,
    RawSnapshot, RawWatchStart, Result, Uuid, Wait,
};

/// Which rule the backend breaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// `delete_raw` says it deleted and keeps the context.
    ForgetsDeletes,
    /// `ids_raw` lists nothing.
    ListsNoIds,
    /// `lock_raw` waits for a holder even when told `Wait::Never`.
    IgnoresNever,
    /// No `watch_raw`: the trait's default, which fails.
    CannotWatch,
}

struct Forward {
    inner: InMemoryContextStorage,
    fault: Fault,
}

impl ContextStorage for Forward {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        self.inner.store_raw(ty, id, value)
    }

    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        let wait = match (self.fault, wait) {
            (Fault::IgnoresNever, Wait::Never) => Wait::Forever,
            (_, wait) => wait,
        };
        self.inner.lock_raw(ty, id, wait)
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        self.inner.snapshot_raw(ty, id)
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        if self.fault == Fault::ForgetsDeletes {
            return Box::pin(async { Ok(()) });
        }
        self.inner.delete_raw(ty, id)
    }

    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        self.inner.store_if_raw(ty, id, expected, value)
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        self.inner.delete_if_raw(ty, id, expected)
    }

    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        if self.fault == Fault::CannotWatch {
            let name = self.backend_name();
            return Box::pin(async move {
                Err(ty.backend_message(Some(id), format!("the {name} backend cannot watch")))
            });
        }
        self.inner.watch_raw(ty, id)
    }

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        self.inner.contains_raw(ty, id)
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        if self.fault == Fault::ListsNoIds {
            return Box::pin(async { Ok(Vec::new()) });
        }
        self.inner.ids_raw(ty)
    }

    fn backend_name(&self) -> &'static str {
        "forwarding test"
    }
}

fn maker(fault: Fault) -> impl Fn() -> BoxFuture<'static, Arc<dyn ContextStorage>> + Send + Sync {
    move || {
        Box::pin(async move {
            Arc::new(Forward {
                inner: InMemoryContextStorage::new(),
                fault,
            }) as Arc<dyn ContextStorage>
        })
    }
}

/// Runs `run` in a task of its own and returns its panic message.
async fn panic_message_of(run: impl std::future::Future<Output = ()> + Send + 'static) -> String {
    let err = tokio::spawn(run)
        .await
        .expect_err("the kit passed a backend that breaks the contract");
    assert!(err.is_panic(), "{err}");
    let payload = err.into_panic();
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast::<&str>()
            .map(|s| (*s).to_owned())
            .expect("a string panic message"),
    }
}

/// The case names the summary line of a failed run lists.
fn failing(message: &str) -> Vec<String> {
    let line = message
        .lines()
        .find_map(|l| l.strip_prefix("failing cases: "))
        .unwrap_or_else(|| panic!("no summary line in {message}"));
    line.split(", ").map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarding_backend_outside_the_crate_passes_run_all() {
    conformance::run_all(maker(Fault::None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forgetting_deletes_fails_the_delete_cases() {
    let msg = panic_message_of(conformance::run_all(maker(Fault::ForgetsDeletes))).await;
    let failed = failing(&msg);
    for case in [
        "delete_waits_for_holder",
        "contains_and_ids",
        "delete_unknown_is_not_found",
        "store_if_zero_creates_once",
        "store_if_absent_nonzero_is_not_found",
    ] {
        assert!(
            failed.iter().any(|f| f == case),
            "{case} not named in:\n{msg}"
        );
        assert!(msg.contains(&format!("  - {case}: panicked: ")), "{msg}");
    }
    for case in ["store_then_snapshot", "concurrent_increments_are_exact"] {
        assert!(!msg.contains(case), "{case} passes but is named in:\n{msg}");
    }
    assert!(msg.contains("on the forwarding test backend"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_no_ids_fails_exactly_contains_and_ids() {
    let msg = panic_message_of(conformance::run_all(maker(Fault::ListsNoIds))).await;
    assert_eq!(failing(&msg), ["contains_and_ids"], "{msg}");
    assert!(
        msg.starts_with("conformance: 1 of 43 cases failed"),
        "{msg}"
    );
    // The case's own assertion comes with it.
    assert!(msg.contains("assertion `left == right` failed"), "{msg}");
}

/// A backend that waits on `Wait::Never` hangs `try_get_context` on a held
/// key: the case fails at its deadline (shortened here from 120 s) and the
/// run goes on to report it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ignoring_wait_never_fails_its_case_at_the_deadline() {
    let started = std::time::Instant::now();
    let config = Config::new().case_timeout(Duration::from_secs(10));
    let msg = panic_message_of(conformance::run_with(maker(Fault::IgnoresNever), config)).await;
    assert_eq!(failing(&msg), ["try_get_would_block_while_held"], "{msg}");
    assert!(msg.contains("did not finish within 10s"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(60), "the run hung");
}

/// Watching is the optional part: a backend without it fails exactly the
/// watch cases, and passes once it skips them (as it must then document).
/// (`many_watchers_all_reach_the_final_version` waits on a barrier its
/// failed watchers never reach: it fails at the deadline, shortened here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_cannot_watch_fails_only_the_watch_cases_unless_it_skips_them() {
    let config = Config::new().case_timeout(Duration::from_secs(30));
    let msg = panic_message_of(conformance::run_with(maker(Fault::CannotWatch), config)).await;
    let mut failed = failing(&msg);
    failed.sort();
    let mut expected: Vec<String> = WATCH_CASES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(failed, expected, "{msg}");
    assert!(msg.contains("cannot watch"), "{msg}");

    conformance::run_with(maker(Fault::CannotWatch), Config::new().skip_watch()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_or_hanging_factory_fails_every_case_by_name() {
    let msg = panic_message_of(conformance::run_with(
        || async { panic!("no server") },
        Config::new().skip(conformance::case_names().skip(2)),
    ))
    .await;
    assert_eq!(
        failing(&msg),
        ["store_then_snapshot", "store_replaces_and_bumps_version"],
        "{msg}"
    );
    assert!(msg.contains("make() panicked: no server"), "{msg}");
    assert!(msg.contains("(41 skipped)"), "{msg}");

    let msg = panic_message_of(conformance::run_with(
        std::future::pending::<Arc<dyn ContextStorage>>,
        Config::new()
            .case_timeout(Duration::from_millis(200))
            .skip(conformance::case_names().skip(1)),
    ))
    .await;
    assert_eq!(failing(&msg), ["store_then_snapshot"], "{msg}");
    assert!(
        msg.contains("make() did not return a storage within"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_misspelt_skip_fails_the_run() {
    let msg = panic_message_of(conformance::run_with(
        maker(Fault::None),
        Config::new().skip(["store_then_snapshots"]),
    ))
    .await;
    assert!(msg.contains("names no such case"), "{msg}");
}

/// The per-case tests of `conformance_tests!`, expanded outside the crate,
/// for the forwarding backend (one `#[test]` per case).
mod per_case {
    async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
        super::maker(super::Fault::None)().await
    }

    ctxstore::conformance_tests!(make);
}

/// With a `Config`: the skipped cases pass as no-ops.
mod per_case_without_watch {
    async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
        super::maker(super::Fault::CannotWatch)().await
    }

    ctxstore::conformance_tests!(make, ctxstore::conformance::Config::new().skip_watch());
}
