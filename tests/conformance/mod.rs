//! The backend conformance suite: written once against
//! `Arc<dyn ContextStorage>`, run by every backend.
//!
//! A backend's runner file is:
//!
//! ```ignore
//! mod conformance;
//! async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> { /* a fresh, isolated store */ }
//! conformance::conformance_tests!(make);
//! ```
//!
//! Every case gets its own store from the factory (its own namespace or
//! table), so cases run in parallel.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ctxstore::{Context, ContextStorage, ContextStorageExt, Uuid};
use serde::{Deserialize, Serialize};

/// The main test context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfJob {
    pub name: String,
    pub n: u64,
    pub history: Vec<u64>,
}

impl Context for ConfJob {
    fn kind() -> &'static str {
        "ctxstore.conformance.job"
    }
}

/// A second type, to check that keys are typed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfOther {
    pub label: String,
}

impl Context for ConfOther {
    fn kind() -> &'static str {
        "ctxstore.conformance.other"
    }
}

fn job(name: &str, n: u64) -> ConfJob {
    ConfJob {
        name: name.into(),
        n,
        history: vec![],
    }
}

/// Generates one `#[tokio::test]` per conformance case for `$factory`.
macro_rules! conformance_tests {
    ($factory:path) => {
        crate::conformance::conformance_tests!(@cases $factory;
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
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let storage: std::sync::Arc<dyn ctxstore::ContextStorage> = $factory().await;
                tokio::time::timeout(
                    std::time::Duration::from_secs(120),
                    crate::conformance::$case(storage),
                )
                .await
                .expect("hang guard: the case did not finish within 120 s");
            }
        )*
    };
}
pub(crate) use conformance_tests;

type Store = Arc<dyn ContextStorage>;

pub async fn store_then_snapshot(s: Store) {
    let id = Uuid::new_v4();
    let v = s.store_context(id, job("a", 1)).await.unwrap();
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!(*snap, job("a", 1));
    assert_eq!(snap.version(), v);
    assert!(v >= 1);
}

pub async fn store_replaces_and_bumps_version(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 1)).await.unwrap();
    let v1 = s.store_context(id, job("b", 2)).await.unwrap();
    assert!(v1 > v0);
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!((snap.name.as_str(), snap.n, snap.version()), ("b", 2, v1));
}

pub async fn not_found_names_type_and_id(s: Store) {
    let id = Uuid::new_v4();
    let expected = format!("no ConfJob context known for {id}");
    let e = s.get_context_snapshot::<ConfJob>(id).await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(e.to_string(), expected);
    assert_eq!(e.id(), Some(id));
    assert_eq!(e.kind(), "ctxstore.conformance.job");
    let e = s.get_context::<ConfJob>(id).await.unwrap_err();
    assert_eq!(e.to_string(), expected);
    let e = s
        .update_context(id, |j: &mut ConfJob| j.n += 1)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), expected);
    let e = s.try_get_context::<ConfJob>(id).await.unwrap_err();
    assert!(e.is_not_found());
    let e = s
        .get_context_timeout::<ConfJob>(id, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(e.is_not_found());
}

pub async fn keys_are_typed(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 1)).await.unwrap();
    assert!(s
        .get_context_snapshot::<ConfOther>(id)
        .await
        .unwrap_err()
        .is_not_found());
    s.store_context(id, ConfOther { label: "x".into() })
        .await
        .unwrap();
    assert_eq!(s.get_context_snapshot::<ConfJob>(id).await.unwrap().n, 1);
    assert_eq!(
        s.get_context_snapshot::<ConfOther>(id).await.unwrap().label,
        "x"
    );
    s.delete_context::<ConfOther>(id).await.unwrap();
    assert_eq!(s.get_context_snapshot::<ConfJob>(id).await.unwrap().n, 1);
    // Holding one type's lock does not block the other type's key.
    let g = s.get_context::<ConfJob>(id).await.unwrap();
    s.store_context(id, ConfOther { label: "y".into() })
        .await
        .unwrap();
    drop(g);
}

pub async fn commit_publishes_new_version(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    assert_eq!(g.version(), v0);
    assert_eq!(g.id(), id);
    g.n += 5;
    g.history.push(7);
    let v1 = g.commit().await.unwrap();
    assert!(v1 > v0);
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!(
        (snap.n, snap.history.clone(), snap.version()),
        (5, vec![7], v1)
    );
    // Committing an unchanged guard still publishes a new version.
    let g = s.get_context::<ConfJob>(id).await.unwrap();
    let v2 = g.commit().await.unwrap();
    assert!(v2 > v1);
    assert_eq!(s.get_context_snapshot::<ConfJob>(id).await.unwrap().n, 5);
}

pub async fn drop_rolls_back_and_releases(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    {
        let mut g = s.get_context::<ConfJob>(id).await.unwrap();
        g.n = 99;
        g.name.push_str("-changed");
    }
    // The lock is free again (a remote backend releases in the background:
    // allow it a moment, bounded).
    let g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((g.n, g.name.as_str(), g.version()), (0, "a", v0));
    g.rollback();
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!((snap.n, snap.version()), (0, v0));
}

pub async fn rollback_discards(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    g.n = 42;
    g.rollback();
    let g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((g.n, g.version()), (0, v0));
}

async fn fallible_update(s: &Store, id: Uuid) -> Result<(), &'static str> {
    let mut g = s.get_context::<ConfJob>(id).await.map_err(|_| "lock")?;
    g.n += 1;
    g.history.push(1);
    Err("validation failed")?;
    g.commit().await.map_err(|_| "commit")?;
    Ok(())
}

pub async fn error_return_rolls_back(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    assert_eq!(fallible_update(&s, id).await, Err("validation failed"));
    let g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((g.n, g.history.len(), g.version()), (0, 0, v0));
}

pub async fn snapshot_never_waits_for_holder(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    g.n = 1;
    for _ in 0..10 {
        let snap = tokio::time::timeout(
            Duration::from_secs(10),
            s.get_context_snapshot::<ConfJob>(id),
        )
        .await
        .expect("a snapshot waited for the lock holder")
        .unwrap();
        // Only committed state is visible: never the holder's draft.
        assert_eq!((snap.n, snap.version()), (0, v0));
    }
    let v1 = g.commit().await.unwrap();
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!((snap.n, snap.version()), (1, v1));
}

pub async fn snapshot_is_isolated_from_later_commits(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let before = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    s.update_context(id, |j: &mut ConfJob| {
        j.n = 10;
        j.history.push(10);
    })
    .await
    .unwrap();
    s.delete_context::<ConfJob>(id).await.unwrap();
    assert_eq!((before.n, before.history.len()), (0, 0));
    let cloned = before.clone();
    assert_eq!(cloned.version(), before.version());
    assert_eq!(before.into_owned(), job("a", 0));
}

pub async fn try_get_would_block_while_held(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let g = s.get_context::<ConfJob>(id).await.unwrap();
    let e = s.try_get_context::<ConfJob>(id).await.unwrap_err();
    assert!(e.is_would_block(), "{e:?}");
    assert_eq!(e.id(), Some(id));
    assert!(e.to_string().contains("ConfJob"), "{e}");
    drop(g);
    let g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    drop(g);
}

pub async fn timeout_while_held(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let g = s.get_context::<ConfJob>(id).await.unwrap();
    let e = s
        .get_context_timeout::<ConfJob>(id, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert_eq!(e.id(), Some(id));
    let e = s
        .get_context_timeout::<ConfJob>(id, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    drop(g);
    let g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    drop(g);
}

pub async fn store_waits_for_holder(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    let s2 = s.clone();
    let store =
        tokio::spawn(async move { s2.store_context(id, job("stored", 100)).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !store.is_finished(),
        "store_context committed while a guard held the context"
    );
    g.n = 1;
    let v_guard = g.commit().await.unwrap();
    let v_store = store.await.unwrap();
    assert!(
        v_store > v_guard,
        "the store came after the guard in lock order"
    );
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!(
        (snap.name.as_str(), snap.n, snap.version()),
        ("stored", 100, v_store)
    );
}

pub async fn delete_waits_for_holder(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    let s2 = s.clone();
    let delete = tokio::spawn(async move { s2.delete_context::<ConfJob>(id).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !delete.is_finished(),
        "delete_context went ahead while a guard held the context"
    );
    g.n = 1;
    g.commit().await.unwrap();
    delete.await.unwrap().unwrap();
    assert!(!s.contains_context::<ConfJob>(id).await.unwrap());
}

pub async fn update_context_returns_and_commits(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 1)).await.unwrap();
    let out = s
        .update_context(id, |j: &mut ConfJob| {
            j.n *= 10;
            j.n
        })
        .await
        .unwrap();
    assert_eq!(out, 10);
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!(snap.n, 10);
    assert!(snap.version() > v0);
}

pub async fn panic_in_update_commits_nothing(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 1)).await.unwrap();
    let s2 = s.clone();
    let res = tokio::spawn(async move {
        s2.update_context(id, |j: &mut ConfJob| {
            j.n = 1000;
            panic!("boom in the middle of a mutation");
        })
        .await
    })
    .await;
    assert!(res.unwrap_err().is_panic());
    let g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (g.n, g.version()),
        (1, v0),
        "a panicking update left partial writes"
    );
}

pub async fn versions_increase_across_delete_and_recreate(s: Store) {
    let id = Uuid::new_v4();
    let mut seen = vec![s.store_context(id, job("a", 0)).await.unwrap()];
    for round in 0..3 {
        for _ in 0..3 {
            let g = s.get_context::<ConfJob>(id).await.unwrap();
            seen.push(g.commit().await.unwrap());
        }
        seen.push(s.store_context(id, job("b", round)).await.unwrap());
        s.delete_context::<ConfJob>(id).await.unwrap();
        seen.push(s.store_context(id, job("c", round)).await.unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "versions not strictly increasing: {seen:?}"
    );
}

pub async fn contains_and_ids(s: Store) {
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        s.store_context(*id, job("x", i as u64)).await.unwrap();
    }
    let other = Uuid::new_v4();
    s.store_context(other, ConfOther { label: "o".into() })
        .await
        .unwrap();
    let mut listed = s.context_ids::<ConfJob>().await.unwrap();
    listed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(s.context_ids::<ConfOther>().await.unwrap(), vec![other]);
    assert!(s.contains_context::<ConfJob>(ids[0]).await.unwrap());
    assert!(!s.contains_context::<ConfJob>(other).await.unwrap());
    s.delete_context::<ConfJob>(ids[0]).await.unwrap();
    assert!(!s.contains_context::<ConfJob>(ids[0]).await.unwrap());
    assert_eq!(s.context_ids::<ConfJob>().await.unwrap().len(), 4);
}

pub async fn delete_unknown_is_not_found(s: Store) {
    let id = Uuid::new_v4();
    let e = s.delete_context::<ConfJob>(id).await.unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(e.to_string(), format!("no ConfJob context known for {id}"));
    s.store_context(id, job("a", 0)).await.unwrap();
    s.delete_context::<ConfJob>(id).await.unwrap();
    assert!(s
        .delete_context::<ConfJob>(id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(s
        .get_context::<ConfJob>(id)
        .await
        .unwrap_err()
        .is_not_found());
}

pub async fn guard_moves_between_tasks(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    g.n = 1;
    let v = tokio::spawn(async move {
        tokio::task::yield_now().await;
        let mut g = g;
        g.n += 1;
        g.commit().await.unwrap()
    })
    .await
    .unwrap();
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!((snap.n, snap.version()), (2, v));
}

pub async fn cancelled_waiters_do_not_leak_the_lock(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("a", 0)).await.unwrap();
    let g = s.get_context::<ConfJob>(id).await.unwrap();
    // Waiters that give up (timeouts drop their lock futures) ...
    let mut waiters = Vec::new();
    for i in 0..8u64 {
        let s2 = s.clone();
        waiters.push(tokio::spawn(async move {
            s2.get_context_timeout::<ConfJob>(id, Duration::from_millis(20 + 10 * i))
                .await
                .map(|_| ())
        }));
    }
    // ... and one whose task is aborted outright.
    let s2 = s.clone();
    let aborted = tokio::spawn(async move { s2.get_context::<ConfJob>(id).await.map(|_| ()) });
    for w in waiters {
        assert!(w.await.unwrap().unwrap_err().is_timeout());
    }
    aborted.abort();
    assert!(aborted.await.unwrap_err().is_cancelled());
    drop(g);
    // Nobody kept or swallowed the lock.
    let mut g = s
        .get_context_timeout::<ConfJob>(id, Duration::from_secs(10))
        .await
        .unwrap();
    g.n = 1;
    g.commit().await.unwrap();
    assert_eq!(s.get_context_snapshot::<ConfJob>(id).await.unwrap().n, 1);
}

pub async fn concurrent_increments_are_exact(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("counter", 0)).await.unwrap();
    let in_section = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    const TASKS: u64 = 8;
    const EACH: u64 = 40;
    for _ in 0..TASKS {
        let s = s.clone();
        let in_section = in_section.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let mut g = s.get_context::<ConfJob>(id).await.unwrap();
                assert_eq!(
                    in_section.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                g.n += 1;
                tokio::task::yield_now().await;
                in_section.fetch_sub(1, Ordering::SeqCst);
                g.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        s.get_context_snapshot::<ConfJob>(id).await.unwrap().n,
        TASKS * EACH
    );
}

/// wepositive-di 0.2.0 defect: deleting and re-creating a key while tasks
/// queue on it gave two holders at once and lost updates.
pub async fn delete_and_recreate_while_tasks_queue(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("first", 0)).await.unwrap();
    let holder = s.get_context::<ConfJob>(id).await.unwrap();
    let in_section = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let s = s.clone();
        let in_section = in_section.clone();
        tasks.push(tokio::spawn(async move {
            match s.get_context::<ConfJob>(id).await {
                Ok(mut g) => {
                    assert_eq!(
                        in_section.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    g.n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    in_section.fetch_sub(1, Ordering::SeqCst);
                    g.commit().await.unwrap();
                    1u64
                }
                Err(e) => {
                    assert!(e.is_not_found(), "{e:?}");
                    0
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s2 = s.clone();
    let delete = tokio::spawn(async move { s2.delete_context::<ConfJob>(id).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(holder);
    // Re-create as soon as the delete went through (it may be queued behind
    // some of the waiters).
    delete.await.unwrap().unwrap();
    s.store_context(id, job("second", 0)).await.unwrap();
    let mut after_recreate = 0;
    let mut total = 0;
    for t in tasks {
        total += 1;
        after_recreate += t.await.unwrap();
    }
    assert_eq!(total, 6);
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    assert_eq!(snap.name, "second");
    // Increments that landed on the first incarnation were deleted with it;
    // the ones on the second are all there.
    assert!(snap.n <= after_recreate);
}

pub async fn scoped_default_storage(s: Store) {
    let inside = ctxstore::with_context_storage(s.clone(), async {
        tokio::task::yield_now().await;
        ctxstore::context_storage()
    })
    .await;
    assert!(Arc::ptr_eq(&inside, &s));
    let outside = ctxstore::context_storage();
    assert!(!Arc::ptr_eq(&outside, &s));
    let id = Uuid::new_v4();
    ctxstore::with_context_storage(s.clone(), async move {
        ctxstore::context_storage()
            .store_context(id, job("scoped", 1))
            .await
            .unwrap();
    })
    .await;
    assert_eq!(s.get_context_snapshot::<ConfJob>(id).await.unwrap().n, 1);
}

// ------------------------------------------------------ conditional writes

fn assert_conflict(e: &ctxstore::ContextError, id: Uuid, expected: u64, found: u64) {
    match e {
        ctxstore::ContextError::Conflict {
            expected: e_exp,
            found: e_found,
            ..
        } => assert_eq!((*e_exp, *e_found), (expected, found), "{e}"),
        other => panic!("expected Conflict, got {other}"),
    }
    assert!(e.is_conflict());
    assert_eq!(e.id(), Some(id));
    assert_eq!(e.kind(), ConfJob::kind());
}

async fn state(s: &Store, id: Uuid) -> (ConfJob, u64) {
    let snap = s.get_context_snapshot::<ConfJob>(id).await.unwrap();
    let v = snap.version();
    (snap.into_owned(), v)
}

pub async fn store_if_at_current_version_writes(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 1)).await.unwrap();
    let v1 = s.store_context_if(id, v0, job("b", 2)).await.unwrap();
    assert!(v1 > v0);
    assert_eq!(state(&s, id).await, (job("b", 2), v1));
    let v2 = s.store_context_if(id, v1, job("c", 3)).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(state(&s, id).await, (job("c", 3), v2));
}

pub async fn store_if_stale_conflicts_and_changes_nothing(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 1)).await.unwrap();
    let v1 = s.store_context(id, job("b", 2)).await.unwrap();
    let e = s
        .store_context_if(id, v0, job("stale", 9))
        .await
        .unwrap_err();
    assert_conflict(&e, id, v0, v1);
    assert_eq!(state(&s, id).await, (job("b", 2), v1));
    // A version from the future conflicts too.
    let e = s
        .store_context_if(id, v1 + 100, job("future", 9))
        .await
        .unwrap_err();
    assert_conflict(&e, id, v1 + 100, v1);
    assert_eq!(state(&s, id).await, (job("b", 2), v1));
}

pub async fn store_if_zero_creates_once(s: Store) {
    let id = Uuid::new_v4();
    let v = s.store_context_if(id, 0, job("first", 1)).await.unwrap();
    assert!(v >= 1);
    assert_eq!(state(&s, id).await, (job("first", 1), v));
    let e = s
        .store_context_if(id, 0, job("second", 2))
        .await
        .unwrap_err();
    assert_conflict(&e, id, 0, v);
    assert_eq!(state(&s, id).await, (job("first", 1), v));
    // After a delete, create-once works again, above the old version.
    s.delete_context::<ConfJob>(id).await.unwrap();
    let v2 = s.store_context_if(id, 0, job("again", 3)).await.unwrap();
    assert!(v2 > v, "a recreated context's version must not go back");
}

pub async fn store_if_absent_nonzero_is_not_found(s: Store) {
    let id = Uuid::new_v4();
    let e = s.store_context_if(id, 1, job("x", 1)).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.id(), Some(id));
    assert!(!s.contains_context::<ConfJob>(id).await.unwrap());
    // Also after a delete.
    let v = s.store_context(id, job("a", 1)).await.unwrap();
    s.delete_context::<ConfJob>(id).await.unwrap();
    let e = s.store_context_if(id, v, job("x", 1)).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(!s.contains_context::<ConfJob>(id).await.unwrap());
}

pub async fn delete_if_right_wrong_absent(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 1)).await.unwrap();
    let v1 = s.store_context(id, job("b", 2)).await.unwrap();
    let e = s.delete_context_if::<ConfJob>(id, v0).await.unwrap_err();
    assert_conflict(&e, id, v0, v1);
    let e = s.delete_context_if::<ConfJob>(id, 0).await.unwrap_err();
    assert_conflict(&e, id, 0, v1);
    assert_eq!(state(&s, id).await, (job("b", 2), v1));
    s.delete_context_if::<ConfJob>(id, v1).await.unwrap();
    assert!(!s.contains_context::<ConfJob>(id).await.unwrap());
    let e = s.delete_context_if::<ConfJob>(id, v1).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = s.delete_context_if::<ConfJob>(id, 0).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    // The version floor moved: a recreate is above the deleted version.
    let v2 = s.store_context(id, job("c", 3)).await.unwrap();
    assert!(v2 > v1);
}

pub async fn store_if_waits_for_holder_then_conflicts(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    let s2 = s.clone();
    let write = tokio::spawn(async move { s2.store_context_if(id, v0, job("cond", 7)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !write.is_finished(),
        "store_context_if went ahead while a guard held the context"
    );
    g.n = 1;
    let v_guard = g.commit().await.unwrap();
    let e = write.await.unwrap().unwrap_err();
    assert_conflict(&e, id, v0, v_guard);
    let (value, v) = state(&s, id).await;
    assert_eq!((value.name.as_str(), value.n, v), ("a", 1, v_guard));
}

pub async fn store_if_waits_for_holder_then_succeeds_after_rollback(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    let s2 = s.clone();
    let write = tokio::spawn(async move { s2.store_context_if(id, v0, job("cond", 7)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !write.is_finished(),
        "store_context_if went ahead while a guard held the context"
    );
    g.n = 1;
    g.rollback();
    let v = write.await.unwrap().unwrap();
    assert!(v > v0);
    assert_eq!(state(&s, id).await, (job("cond", 7), v));
}

pub async fn delete_if_waits_for_holder_then_conflicts(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("a", 0)).await.unwrap();
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    let s2 = s.clone();
    let delete = tokio::spawn(async move { s2.delete_context_if::<ConfJob>(id, v0).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !delete.is_finished(),
        "delete_context_if went ahead while a guard held the context"
    );
    g.n = 1;
    let v_guard = g.commit().await.unwrap();
    let e = delete.await.unwrap().unwrap_err();
    assert_conflict(&e, id, v0, v_guard);
    assert_eq!(state(&s, id).await.1, v_guard);
}

pub async fn optimistic_increments_are_exact(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("counter", 0)).await.unwrap();
    const TASKS: u64 = 16;
    const EACH: u64 = 50;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                s.update_context_optimistic(id, |c: &mut ConfJob| c.n += 1)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(state(&s, id).await.0.n, TASKS * EACH);
}

pub async fn optimistic_returns_result_and_not_found(s: Store) {
    let id = Uuid::new_v4();
    let e = s
        .update_context_optimistic(id, |c: &mut ConfJob| c.n)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let v0 = s.store_context(id, job("a", 41)).await.unwrap();
    let out = s
        .update_context_optimistic(id, |c: &mut ConfJob| {
            c.n += 1;
            c.n * 2
        })
        .await
        .unwrap();
    assert_eq!(out, 84);
    let (value, v) = state(&s, id).await;
    assert_eq!(value.n, 42);
    assert!(v > v0);
}

pub async fn create_once_race_succeeds_exactly_once(s: Store) {
    let id = Uuid::new_v4();
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.store_context_if(id, 0, job("racer", i)).await
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(v) => won.push(v),
            Err(e) => {
                assert!(e.is_conflict(), "{e}");
                assert_eq!(e.id(), Some(id));
            }
        }
    }
    assert_eq!(won.len(), 1, "create-once succeeded {} times", won.len());
    assert_eq!(state(&s, id).await.1, won[0]);
}

// ------------------------------------------------------------------ watch

/// How long a watcher is given to show a version that must not exist.
const QUIET: Duration = Duration::from_millis(300);

/// `changed()` must not return within [`QUIET`] (nothing new was committed).
async fn assert_quiet(w: &mut ctxstore::ContextWatch<ConfJob>, what: &str) {
    if let Ok(got) = tokio::time::timeout(QUIET, w.changed()).await {
        panic!("{what}: changed() returned {got:?} with no new commit");
    }
}

/// `changed()` returns within the hang guard. The deadline is checked
/// *before* the watch is polled (`biased`): `tokio::time::timeout` polls
/// the inner future first when its timer fires, and that poll would find
/// the new version even if no wake-up ever came.
async fn next(
    w: &mut ctxstore::ContextWatch<ConfJob>,
) -> ctxstore::Result<ctxstore::Snapshot<ConfJob>> {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("changed() was not woken within 20 s"),
        got = w.changed() => got,
    }
}

pub async fn watch_first_returns_current_and_unknown_is_not_found(s: Store) {
    let id = Uuid::new_v4();
    let e = s.watch_context::<ConfJob>(id).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(e.id(), Some(id));
    let v = s.store_context(id, job("w", 7)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    assert_eq!(w.id(), id);
    // A commit after the watch began: the first call still returns the
    // version current at watch time, the second this one.
    let v2 = s.store_context(id, job("w", 8)).await.unwrap();
    let first = next(&mut w).await.unwrap();
    assert_eq!((first.n, first.version()), (7, v));
    let second = next(&mut w).await.unwrap();
    assert_eq!((second.n, second.version()), (8, v2));
    assert_eq!(w.last_version(), v2);
    assert_quiet(&mut w, "after the last commit").await;
}

pub async fn watch_sees_increasing_versions_then_not_found(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("w", 0)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    const N: u64 = 60;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for _ in 0..N {
                s.update_context(id, |c: &mut ConfJob| c.n += 1)
                    .await
                    .unwrap();
            }
            s.get_context_snapshot::<ConfJob>(id)
                .await
                .unwrap()
                .version()
        })
    };
    // The watch is Send + 'static: it runs in a task of its own.
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let snap = next(&mut w).await.unwrap();
            seen.push((snap.version(), snap.n));
            if snap.n == N {
                return (w, seen);
            }
        }
    });
    let last = writer.await.unwrap();
    let (mut w, seen) = watcher.await.unwrap();
    for pair in seen.windows(2) {
        assert!(pair[1].0 > pair[0].0, "versions went {:?}", pair);
        assert!(pair[1].1 > pair[0].1, "values went {:?}", pair);
    }
    assert_eq!(seen.last().unwrap().0, last);
    assert_quiet(&mut w, "after the writer stopped").await;
    s.delete_context::<ConfJob>(id).await.unwrap();
    for _ in 0..2 {
        let e = next(&mut w).await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert_eq!(e.id(), Some(id));
    }
}

pub async fn slow_watcher_gets_only_the_newest(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("w", 0)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    next(&mut w).await.unwrap();
    let mut last = 0;
    for i in 1..=5 {
        last = s.store_context(id, job("w", i)).await.unwrap();
    }
    let snap = next(&mut w).await.unwrap();
    assert_eq!((snap.n, snap.version()), (5, last));
    assert_quiet(&mut w, "the skipped versions must not follow").await;
}

pub async fn rollback_and_refused_writes_show_no_new_version(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("w", 0)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    next(&mut w).await.unwrap();
    // A guard dropped without commit, one rolled back explicitly.
    {
        let mut g = s.get_context::<ConfJob>(id).await.unwrap();
        g.n = 99;
    }
    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
    g.n = 98;
    g.rollback();
    // Refused conditional writes and a panicking update.
    let e = s
        .store_context_if(id, v0 + 1000, job("w", 97))
        .await
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let e = s
        .delete_context_if::<ConfJob>(id, v0 + 1000)
        .await
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let e = s.store_context_if(id, 0, job("w", 96)).await.unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert_quiet(&mut w, "after rollbacks and refused writes").await;
    let v1 = s.store_context_if(id, v0, job("w", 1)).await.unwrap();
    let snap = next(&mut w).await.unwrap();
    assert_eq!((snap.n, snap.version()), (1, v1));
}

pub async fn watch_does_not_follow_a_recreated_context(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("old", 0)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    next(&mut w).await.unwrap();
    s.delete_context::<ConfJob>(id).await.unwrap();
    s.store_context(id, job("new", 1)).await.unwrap();
    s.store_context(id, job("new", 2)).await.unwrap();
    let e = next(&mut w).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = next(&mut w).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    // A new watch follows the new context.
    let mut fresh = s.watch_context::<ConfJob>(id).await.unwrap();
    assert_eq!(next(&mut fresh).await.unwrap().name, "new");
}

pub async fn dropped_changed_future_loses_no_update(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("w", 0)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    next(&mut w).await.unwrap();
    for round in 1..=3u64 {
        // Cancel a waiting call (it has registered for a wake-up)...
        assert!(
            tokio::time::timeout(Duration::from_millis(50), w.changed())
                .await
                .is_err(),
            "nothing was committed yet"
        );
        // ...then commit: the next call still sees it.
        let v = s.store_context(id, job("w", round)).await.unwrap();
        let snap = next(&mut w).await.unwrap();
        assert_eq!((snap.n, snap.version()), (round, v));
    }
}

pub async fn many_watchers_all_reach_the_final_version(s: Store) {
    let id = Uuid::new_v4();
    s.store_context(id, job("w", 0)).await.unwrap();
    const WATCHERS: usize = 24;
    const N: u64 = 40;
    let ready = Arc::new(tokio::sync::Barrier::new(WATCHERS + 1));
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let s = s.clone();
        let ready = ready.clone();
        watchers.push(tokio::spawn(async move {
            let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
            ready.wait().await;
            let mut last = (0, 0);
            loop {
                let snap = next(&mut w).await.unwrap();
                assert!(snap.version() > last.0);
                assert!(snap.n >= last.1);
                last = (snap.version(), snap.n);
                if snap.n == N {
                    return last.0;
                }
            }
        }));
    }
    ready.wait().await;
    for _ in 0..N {
        s.update_context(id, |c: &mut ConfJob| c.n += 1)
            .await
            .unwrap();
    }
    let last = s
        .get_context_snapshot::<ConfJob>(id)
        .await
        .unwrap()
        .version();
    for w in watchers {
        assert_eq!(w.await.unwrap(), last);
    }
}

pub async fn watch_wakes_on_every_kind_of_write(s: Store) {
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, job("w", 0)).await.unwrap();
    let mut w = s.watch_context::<ConfJob>(id).await.unwrap();
    next(&mut w).await.unwrap();
    // Each write happens while the watcher is already waiting.
    type Write = Box<dyn FnOnce(Store, u64) -> BoxFut + Send>;
    type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>>;
    let writes: Vec<(&str, Write)> = vec![
        (
            "store_context",
            Box::new(move |s, _| {
                Box::pin(async move { s.store_context(id, job("w", 1)).await.unwrap() })
            }),
        ),
        (
            "guard commit",
            Box::new(move |s, _| {
                Box::pin(async move {
                    let mut g = s.get_context::<ConfJob>(id).await.unwrap();
                    g.n = 2;
                    g.commit().await.unwrap()
                })
            }),
        ),
        (
            "update_context",
            Box::new(move |s, _| {
                Box::pin(async move {
                    s.update_context(id, |c: &mut ConfJob| c.n = 3)
                        .await
                        .unwrap();
                    s.get_context_snapshot::<ConfJob>(id)
                        .await
                        .unwrap()
                        .version()
                })
            }),
        ),
        (
            "store_context_if",
            Box::new(move |s, v| {
                Box::pin(async move { s.store_context_if(id, v, job("w", 4)).await.unwrap() })
            }),
        ),
        (
            "update_context_optimistic",
            Box::new(move |s, _| {
                Box::pin(async move {
                    s.update_context_optimistic(id, |c: &mut ConfJob| c.n = 5)
                        .await
                        .unwrap();
                    s.get_context_snapshot::<ConfJob>(id)
                        .await
                        .unwrap()
                        .version()
                })
            }),
        ),
    ];
    let mut version = v0;
    for (n, (what, write)) in (1u64..).zip(writes) {
        let waiting = tokio::spawn(async move {
            let got = next(&mut w).await;
            (w, got)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        version = write(s.clone(), version).await;
        let (back, got) = waiting.await.unwrap();
        w = back;
        let snap = got.unwrap();
        assert_eq!((snap.n, snap.version()), (n, version), "after {what}");
    }
    // A conditional delete ends the watch too.
    let waiting = tokio::spawn(async move { next(&mut w).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.delete_context_if::<ConfJob>(id, version).await.unwrap();
    let e = waiting.await.unwrap().unwrap_err();
    assert!(e.is_not_found(), "{e}");
}
