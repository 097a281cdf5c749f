//! Conditional writes and optimistic updates on the in-memory engine
//! (issue #11): every outcome of `store_context_if`, `delete_context_if`
//! and `update_context_optimistic`, their blocking forms, and their races
//! with guards and with each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use ctxstore::{Context, ContextError, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    name: String,
    n: u64,
}
impl Context for Job {}

fn job(name: &str, n: u64) -> Job {
    Job {
        name: name.into(),
        n,
    }
}

const HANG: Duration = Duration::from_secs(60);

fn conflict_of(e: &ContextError) -> (u64, u64) {
    match e {
        ContextError::Conflict {
            expected, found, ..
        } => (*expected, *found),
        other => panic!("expected a Conflict, got {other:?}"),
    }
}

/// The committed (version, value), read without waiting.
fn committed(store: &InMemoryContextStorage, id: Uuid) -> (u64, Job) {
    let s = store.snapshot::<Job>(id).unwrap();
    (s.version(), Job::clone(&s))
}

#[tokio::test]
async fn store_if_writes_only_at_the_expected_version() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    let v1 = store.store_context(id, job("a", 1)).await.unwrap();

    let v2 = store.store_context_if(id, v1, job("b", 2)).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(committed(&store, id), (v2, job("b", 2)));

    // A stale version: refused, naming both versions, and nothing changes.
    let e = store
        .store_context_if(id, v1, job("c", 3))
        .await
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert_eq!(conflict_of(&e), (v1, v2));
    assert_eq!(e.id(), Some(id));
    assert!(e.to_string().contains(&id.to_string()), "{e}");
    assert_eq!(committed(&store, id), (v2, job("b", 2)));

    // A version from the future is refused as well.
    let e = store
        .store_context_if(id, v2 + 7, job("d", 4))
        .await
        .unwrap_err();
    assert_eq!(conflict_of(&e), (v2 + 7, v2));
    assert_eq!(committed(&store, id), (v2, job("b", 2)));
}

#[tokio::test]
async fn expected_zero_creates_once() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    let v1 = store
        .store_context_if(id, 0, job("first", 1))
        .await
        .unwrap();
    assert!(v1 >= 1);
    let e = store
        .store_context_if(id, 0, job("second", 2))
        .await
        .unwrap_err();
    assert_eq!(conflict_of(&e), (0, v1));
    assert_eq!(committed(&store, id), (v1, job("first", 1)));
}

#[tokio::test]
async fn a_missing_context_is_not_found_unless_creating() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    let e = store
        .store_context_if(id, 1, job("x", 1))
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(!store.contains_context::<Job>(id).await.unwrap());
    let e = store.delete_context_if::<Job>(id, 1).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = store.delete_context_if::<Job>(id, 0).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = store
        .update_context_optimistic(id, |j: &mut Job| j.n += 1)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn delete_if_deletes_only_at_the_expected_version() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    let v1 = store.store_context(id, job("a", 1)).await.unwrap();
    let v2 = store.store_context(id, job("b", 2)).await.unwrap();

    let e = store.delete_context_if::<Job>(id, v1).await.unwrap_err();
    assert_eq!(conflict_of(&e), (v1, v2));
    let e = store.delete_context_if::<Job>(id, 0).await.unwrap_err();
    assert_eq!(conflict_of(&e), (0, v2));
    assert_eq!(committed(&store, id), (v2, job("b", 2)));

    store.delete_context_if::<Job>(id, v2).await.unwrap();
    assert!(!store.contains_context::<Job>(id).await.unwrap());
    // Versions are never reused: a re-creation starts above the deleted one.
    let v3 = store
        .store_context_if(id, 0, job("again", 0))
        .await
        .unwrap();
    assert!(v3 > v2, "re-created at {v3} after deleting {v2}");
}

#[tokio::test]
async fn a_conditional_write_waits_for_a_guard_then_compares() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    let v1 = store.store_context(id, job("a", 1)).await.unwrap();

    // The guard commits: the waiting conditional write then conflicts.
    let mut guard = store.get_context::<Job>(id).await.unwrap();
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.store_context_if(id, v1, job("late", 9)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !waiting.is_finished(),
        "a conditional write passed a held guard"
    );
    guard.n = 2;
    let v2 = guard.commit().await.unwrap();
    let e = tokio::time::timeout(HANG, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(conflict_of(&e), (v1, v2));
    assert_eq!(committed(&store, id), (v2, job("a", 2)));

    // The guard rolls back: the waiting conditional write then succeeds.
    let guard = store.get_context::<Job>(id).await.unwrap();
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.store_context_if(id, v2, job("ok", 3)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished());
    drop(guard);
    let v3 = tokio::time::timeout(HANG, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(committed(&store, id), (v3, job("ok", 3)));

    // A conditional delete waits the same way.
    let mut guard = store.get_context::<Job>(id).await.unwrap();
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.delete_context_if::<Job>(id, v3).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !waiting.is_finished(),
        "a conditional delete passed a held guard"
    );
    guard.n = 4;
    let v4 = guard.commit().await.unwrap();
    let e = tokio::time::timeout(HANG, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(conflict_of(&e), (v3, v4));
    assert!(store.contains_context::<Job>(id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn optimistic_increments_from_16_tasks_are_exact() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context(id, job("hot", 0)).await.unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, runs) = (store.clone(), runs.clone());
            tokio::spawn(async move {
                for _ in 0..500 {
                    let seen = store
                        .update_context_optimistic(id, |j: &mut Job| {
                            runs.fetch_add(1, Ordering::Relaxed);
                            j.n += 1;
                            j.n
                        })
                        .await
                        .unwrap();
                    assert!(seen >= 1);
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(HANG, t).await.unwrap().unwrap();
    }
    let (version, value) = committed(&store, id);
    assert_eq!(value.n, 8_000, "lost or doubled optimistic updates");
    assert!(runs.load(Ordering::Relaxed) >= 8_000);
    assert!(version >= 8_001);
}

#[test]
fn optimistic_increments_from_8_threads_are_exact() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context_blocking(id, job("hot", 0)).unwrap();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    store
                        .update_context_optimistic_blocking(id, |j: &mut Job| j.n += 1)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(committed(&store, id).1.n, 4_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_once_raced_by_16_tasks_succeeds_exactly_once() {
    for _ in 0..20 {
        let store = Arc::new(InMemoryContextStorage::new());
        let id = Uuid::new_v4();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.store_context_if(id, 0, job("c", i)).await })
            })
            .collect();
        let mut created = Vec::new();
        for t in tasks {
            match tokio::time::timeout(HANG, t).await.unwrap().unwrap() {
                Ok(v) => created.push(v),
                Err(e) => assert_eq!(conflict_of(&e).0, 0),
            }
        }
        assert_eq!(
            created.len(),
            1,
            "create-once succeeded {} times",
            created.len()
        );
        assert_eq!(committed(&store, id).0, created[0]);
    }
}

#[test]
fn create_once_raced_by_8_threads_succeeds_exactly_once() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    let start = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                store.store_context_if_blocking(id, 0, job("c", i)).is_ok()
            })
        })
        .collect();
    let wins = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&won| won)
        .count();
    assert_eq!(wins, 1, "create-once succeeded {wins} times");
}

#[test]
fn blocking_forms_compare_like_the_async_ones() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    let v1 = store.store_context_if_blocking(id, 0, job("a", 1)).unwrap();
    let e = store
        .store_context_if_blocking(id, 0, job("b", 2))
        .unwrap_err();
    assert_eq!(conflict_of(&e), (0, v1));
    let v2 = store
        .store_context_if_blocking(id, v1, job("b", 2))
        .unwrap();
    let e = store.delete_context_if_blocking::<Job>(id, v1).unwrap_err();
    assert_eq!(conflict_of(&e), (v1, v2));
    store.delete_context_if_blocking::<Job>(id, v2).unwrap();
    let e = store
        .store_context_if_blocking(id, v2, job("c", 3))
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn a_panic_in_the_optimistic_closure_commits_nothing() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    let v1 = store.store_context(id, job("a", 1)).await.unwrap();
    let panicked = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .update_context_optimistic(id, |j: &mut Job| {
                    j.n = 99;
                    panic!("refused");
                })
                .await
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    assert_eq!(committed(&store, id), (v1, job("a", 1)));
    // Nothing was left locked.
    drop(store.try_get_context::<Job>(id).await.unwrap());
}

/// `f` runs again after a conflict, on the newer version, and the result
/// returned is that of the run whose copy was committed.
#[tokio::test]
async fn the_optimistic_closure_reruns_on_the_newer_version() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context(id, job("a", 10)).await.unwrap();
    let mut runs = 0;
    let out = store
        .update_context_optimistic(id, |j: &mut Job| {
            runs += 1;
            if runs == 1 {
                // A concurrent writer commits while `f` runs the first time.
                store.store_context_blocking(id, job("a", 100)).unwrap();
            }
            j.n += 1;
            j.n
        })
        .await
        .unwrap();
    assert_eq!(runs, 2);
    assert_eq!(out, 101, "the result of the committed run");
    assert_eq!(committed(&store, id).1.n, 101);
}
