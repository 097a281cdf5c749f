//! The backend conformance kit (feature `conformance`): the suite every
//! backend of this crate passes, for your own [`ContextStorage`].
//!
//! It checks the rules written down in
//! [`docs::backend`](crate::docs::backend): typed keys, exclusive locks
//! with every [`Wait`](crate::Wait), all-or-nothing commits, snapshots that
//! never wait for a holder, versions that only increase (also across
//! delete and re-create), conditional writes, watching, cancellation, and
//! the errors each case must give. There are [`case_names`]`().count()`
//! cases (43 today); each is an `async fn` in [`cases`] that panics when
//! the backend breaks the contract.
//!
//! ```toml
//! [dev-dependencies]
//! ctxstore = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! # One test per case
//!
//! [`conformance_tests!`](crate::conformance_tests)`(make)` expands to one
//! `#[test]` per case, named after it, so a report says which rule broke.
//! `make` is anything callable as `make()` that returns a future of a
//! fresh `Arc<dyn ContextStorage>` (an `async fn` is the usual). Each test
//! builds its own multi-threaded Tokio runtime, so the crate using the
//! macro needs no dependency besides `ctxstore`:
//!
//! ```
//! # // a doc test is its own crate: the macro expands as in a user's
//! # // test file (where it would sit at the top level, or in a `mod`).
//! use std::sync::Arc;
//! use ctxstore::{ContextStorage, InMemoryContextStorage};
//!
//! async fn make() -> Arc<dyn ContextStorage> {
//!     // A fresh, isolated store per case: cases run in parallel.
//!     Arc::new(InMemoryContextStorage::new())
//! }
//!
//! ctxstore::conformance_tests!(make);
//! # fn main() {}
//! ```
//!
//! A second argument passes a [`Config`] (a longer hang guard, cases to
//! skip): `conformance_tests!(make, Config::new().skip_watch())`.
//!
//! # All cases in one call
//!
//! [`run_all`]`(make).await` runs every case, one after the other, each on a
//! fresh storage from `make`, and panics listing every failing case by name
//! with its panic message. Call it from a multi-threaded Tokio runtime with
//! time enabled (`#[tokio::test(flavor = "multi_thread")]`): cases spawn
//! tasks and use Tokio's timer.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! use std::sync::Arc;
//! use ctxstore::{ContextStorage, InMemoryContextStorage};
//!
//! ctxstore::conformance::run_all(|| async {
//!     Arc::new(InMemoryContextStorage::new()) as Arc<dyn ContextStorage>
//! })
//! .await;
//! # }
//! ```
//!
//! # Hangs
//!
//! Each case is bounded in time ([`Config::case_timeout`], 120 s by default,
//! `make()` included): a backend that never answers fails that case with
//! "did not finish within …" and the run goes on. The case runs in a task
//! of its own, which is aborted at the deadline; a backend that blocks a
//! worker thread outright (a synchronous wait inside a future) cannot be
//! aborted, but the deadline is still kept on the other workers.
//!
//! # Optional parts
//!
//! Watching is optional (the default [`watch_raw`](ContextStorage::watch_raw)
//! fails): a backend without it skips [`WATCH_CASES`] with
//! [`Config::skip_watch`] and says so in its documentation. Everything else
//! is required.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use crate::{BoxFuture, ContextStorage};

pub mod cases;

/// One conformance case: a name and the `async fn` that checks it.
#[derive(Clone, Copy)]
pub struct Case {
    name: &'static str,
    run: fn(cases::Store) -> BoxFuture<'static, ()>,
}

impl Case {
    /// The case's name, which is also the name of its function in
    /// [`cases`] and of the test [`conformance_tests!`](crate::conformance_tests)
    /// generates for it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the case on `storage` (panics when the backend fails it).
    pub fn run(&self, storage: Arc<dyn ContextStorage>) -> BoxFuture<'static, ()> {
        (self.run)(storage)
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Case").field(&self.name).finish()
    }
}

/// The whole list of cases, in one place: expands
/// `$crate::__conformance_expand! { <arguments> ; <every case> }`.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($($args:tt)*) => {
        $crate::__conformance_expand! { $($args)* ;
            store_then_snapshot,
            store_replaces_and_bumps_version,
            not_found_names_type_and_id,
            keys_are_typed,
            commit_publishes_new_version,
            drop_rolls_back_and_releases,
            rollback_discards,
            error_return_rolls_back,
            snapshot_never_waits_for_holder,
            snapshot_is_isolated_from_later_commits,
            try_get_would_block_while_held,
            timeout_while_held,
            store_waits_for_holder,
            delete_waits_for_holder,
            update_context_returns_and_commits,
            panic_in_update_commits_nothing,
            versions_increase_across_delete_and_recreate,
            contains_and_ids,
            delete_unknown_is_not_found,
            guard_moves_between_tasks,
            cancelled_waiters_do_not_leak_the_lock,
            concurrent_increments_are_exact,
            delete_and_recreate_while_tasks_queue,
            scoped_default_storage,
            store_if_at_current_version_writes,
            store_if_stale_conflicts_and_changes_nothing,
            store_if_zero_creates_once,
            store_if_absent_nonzero_is_not_found,
            delete_if_right_wrong_absent,
            store_if_waits_for_holder_then_conflicts,
            store_if_waits_for_holder_then_succeeds_after_rollback,
            delete_if_waits_for_holder_then_conflicts,
            optimistic_increments_are_exact,
            optimistic_returns_result_and_not_found,
            create_once_race_succeeds_exactly_once,
            watch_first_returns_current_and_unknown_is_not_found,
            watch_sees_increasing_versions_then_not_found,
            slow_watcher_gets_only_the_newest,
            rollback_and_refused_writes_show_no_new_version,
            watch_does_not_follow_a_recreated_context,
            dropped_changed_future_loses_no_update,
            many_watchers_all_reach_the_final_version,
            watch_wakes_on_every_kind_of_write,
        }
    };
}

/// What [`__conformance_cases!`] expands into: the table of cases, or one
/// test per case.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_expand {
    (@table ; $($case:ident),* $(,)?) => {
        &[$(
            $crate::conformance::Case::__new(
                ::core::stringify!($case),
                |s| -> $crate::BoxFuture<'static, ()> {
                    ::std::boxed::Box::pin($crate::conformance::cases::$case(s))
                },
            )
        ),*]
    };
    (@tests ($make:expr, $config:expr) ; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::__run_one(::core::stringify!($case), $make, $config);
            }
        )*
    };
}

/// Generates one `#[test]` per conformance case (named after the case) for
/// the storage factory `make`: anything callable as `make()` returning a
/// future of a fresh `Arc<dyn ContextStorage>`. An optional second argument
/// is a [`Config`](crate::conformance::Config).
///
/// Each test builds its own multi-threaded Tokio runtime (4 workers, time
/// enabled), so the calling crate needs no other dependency. Put the call
/// in a `mod` to run the suite for several factories in one file. See
/// [`conformance`](crate::conformance) for an example.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr, $config:expr $(,)?) => {
        $crate::__conformance_cases!(@tests ($make, $config));
    };
    ($make:expr $(,)?) => {
        $crate::__conformance_cases!(@tests ($make, $crate::conformance::Config::new()));
    };
}

impl Case {
    #[doc(hidden)]
    pub const fn __new(
        name: &'static str,
        run: fn(cases::Store) -> BoxFuture<'static, ()>,
    ) -> Self {
        Case { name, run }
    }
}

static CASES: &[Case] = __conformance_cases!(@table);

/// The cases that need [`watch_raw`](ContextStorage::watch_raw); skip them
/// with [`Config::skip_watch`] for a backend that cannot watch.
pub const WATCH_CASES: &[&str] = &[
    "watch_first_returns_current_and_unknown_is_not_found",
    "watch_sees_increasing_versions_then_not_found",
    "slow_watcher_gets_only_the_newest",
    "rollback_and_refused_writes_show_no_new_version",
    "watch_does_not_follow_a_recreated_context",
    "dropped_changed_future_loses_no_update",
    "many_watchers_all_reach_the_final_version",
    "watch_wakes_on_every_kind_of_write",
];

/// Every case, in the order [`run_all`] runs them.
pub fn all_cases() -> &'static [Case] {
    CASES
}

/// The names of every case.
pub fn case_names() -> impl Iterator<Item = &'static str> {
    CASES.iter().map(|c| c.name)
}

/// How [`run_with`] and [`conformance_tests!`](crate::conformance_tests)
/// run the cases.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long one case may take, `make()` included, before it fails as
    /// hung (default 120 s).
    pub case_timeout: Duration,
    /// Names of cases not to run (a name that is no case fails the run, so
    /// a typo cannot skip silently).
    pub skip: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// Every case, 120 s each.
    pub fn new() -> Self {
        Config {
            case_timeout: Duration::from_secs(120),
            skip: Vec::new(),
        }
    }

    /// Sets how long one case may take before it fails as hung.
    pub fn case_timeout(mut self, timeout: Duration) -> Self {
        self.case_timeout = timeout;
        self
    }

    /// Skips these cases (by name). Skipping a case weakens what the suite
    /// shows: document why.
    pub fn skip<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.skip.extend(names.into_iter().map(Into::into));
        self
    }

    /// Skips [`WATCH_CASES`], for a backend that does not implement
    /// [`watch_raw`](ContextStorage::watch_raw).
    pub fn skip_watch(self) -> Self {
        self.skip(WATCH_CASES.iter().copied())
    }

    fn skips(&self, name: &str) -> bool {
        self.check_skips();
        self.skip.iter().any(|s| s == name)
    }

    fn check_skips(&self) {
        let unknown: Vec<&str> = self
            .skip
            .iter()
            .map(String::as_str)
            .filter(|s| !case_names().any(|n| n == *s))
            .collect();
        assert!(
            unknown.is_empty(),
            "conformance: Config::skip names no such case: {unknown:?}"
        );
    }
}

/// Runs every case against fresh storages from `make`, one case after the
/// other, each bounded by 120 s, and panics listing every failing case by
/// name. Same as [`run_with`]`(make, Config::new())`.
///
/// Call it inside a multi-threaded Tokio runtime with time enabled.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Arc<dyn ContextStorage>> + Send,
{
    run_with(make, Config::new()).await
}

/// [`run_all`] with a [`Config`].
pub async fn run_with<F, Fut>(make: F, config: Config)
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Arc<dyn ContextStorage>> + Send,
{
    config.check_skips();
    let mut report = Report::default();
    for case in CASES {
        if config.skips(case.name) {
            report.skipped.push(case.name);
            continue;
        }
        report.record(case.name, run_case(case, &make, config.case_timeout).await);
    }
    if !report.failed.is_empty() {
        panic!("{report}");
    }
}

/// Runs one case on its own runtime: what each test of
/// [`conformance_tests!`](crate::conformance_tests) calls.
#[doc(hidden)]
pub fn __run_one<F, Fut>(name: &str, make: F, config: Config)
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Arc<dyn ContextStorage>> + Send,
{
    let case = CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("conformance: no case named {name}"));
    if config.skips(name) {
        eprintln!("conformance case {name}: skipped by the runner's Config");
        return;
    }
    let rt = __rt();
    let outcome = rt.block_on(run_case(case, &make, config.case_timeout));
    // A case aborted at its deadline may still sit on a blocked worker:
    // do not wait for it.
    rt.shutdown_background();
    let mut report = Report::default();
    report.record(case.name, outcome);
    if !report.failed.is_empty() {
        panic!("{report}");
    }
}

/// The runtime each generated test runs its case on: multi-threaded, 4
/// workers, I/O and time enabled.
#[doc(hidden)]
pub fn __rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("conformance: cannot build a Tokio runtime")
}

/// How one case went: `Ok` with the backend's name, or why it failed.
type Outcome = Result<&'static str, Failure>;

struct Failure {
    backend: Option<&'static str>,
    why: String,
}

async fn run_case<F, Fut>(case: &Case, make: &F, timeout: Duration) -> Outcome
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Arc<dyn ContextStorage>> + Send,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let made = tokio::select! {
        biased;
        _ = tokio::time::sleep_until(deadline) => {
            return Err(Failure {
                backend: None,
                why: format!("make() did not return a storage within {timeout:?}"),
            });
        }
        made = CatchUnwind(Box::pin(make())) => made,
    };
    let storage = made.map_err(|payload| Failure {
        backend: None,
        why: format!("make() panicked: {}", panic_message(&*payload)),
    })?;
    let backend = storage.backend_name();
    let mut task = tokio::spawn(case.run(storage));
    // The deadline is checked before the task is polled (`biased`), so a
    // case that finishes only because it was polled once more at the
    // deadline still counts as hung.
    tokio::select! {
        biased;
        _ = tokio::time::sleep_until(deadline) => {
            task.abort();
            Err(Failure {
                backend: Some(backend),
                why: format!("did not finish within {timeout:?} (hang guard; the task was aborted)"),
            })
        }
        joined = &mut task => match joined {
            Ok(()) => Ok(backend),
            Err(e) if e.is_panic() => Err(Failure {
                backend: Some(backend),
                why: format!("panicked: {}", panic_message(&*e.into_panic())),
            }),
            Err(e) => Err(Failure {
                backend: Some(backend),
                why: format!("its task failed: {e}"),
            }),
        },
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_owned()
    }
}

/// Polls a future, turning a panic into `Err(payload)`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

#[derive(Default)]
struct Report {
    backend: Option<&'static str>,
    passed: usize,
    skipped: Vec<&'static str>,
    failed: Vec<(&'static str, String)>,
}

impl Report {
    fn record(&mut self, name: &'static str, outcome: Outcome) {
        match outcome {
            Ok(backend) => {
                self.backend.get_or_insert(backend);
                self.passed += 1;
            }
            Err(f) => {
                if let Some(b) = f.backend {
                    self.backend.get_or_insert(b);
                }
                self.failed.push((name, f.why));
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let run = self.passed + self.failed.len();
        write!(
            f,
            "conformance: {} of {run} cases failed on the {} backend",
            self.failed.len(),
            self.backend.unwrap_or("(unknown)"),
        )?;
        if !self.skipped.is_empty() {
            write!(f, " ({} skipped)", self.skipped.len())?;
        }
        write!(f, ":")?;
        for (name, why) in &self.failed {
            write!(f, "\n  - {name}: ")?;
            for (i, line) in why.lines().enumerate() {
                if i > 0 {
                    write!(f, "\n      ")?;
                }
                write!(f, "{line}")?;
            }
        }
        write!(
            f,
            "\nfailing cases: {}",
            self.failed
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_watch_cases_exist() {
        let names: Vec<&str> = case_names().collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a case is listed twice");
        for w in WATCH_CASES {
            assert!(names.contains(w), "{w} is no case");
        }
        assert_eq!(names.len(), 43);
    }

    #[test]
    #[should_panic(expected = "names no such case")]
    fn an_unknown_skip_fails() {
        Config::new().skip(["no_such_case"]).check_skips();
    }
}
