//! Watching on the in-memory engine: what the conformance suite does not
//! reach (the stream form, the store's drop, wake-ups under churn).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use ctxstore::{Context, ContextWatch, InMemoryContextStorage, Snapshot, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Counter {
    n: u64,
}

impl Context for Counter {}

fn assert_send_static<T: Send + 'static>(_: &T) {}

/// The next item of a stream, without a dependency on `futures`.
fn next_item<S: futures_core::Stream + Unpin>(
    s: &mut S,
) -> impl Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx| Pin::new(&mut *s).poll_next(cx))
}

/// `f`'s output within the hang guard. The deadline is checked *before*
/// `f` is polled (`biased`): `tokio::time::timeout` polls the inner future
/// first when its timer fires, and that poll would find a new version even
/// if no wake-up ever came.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::select! {
        biased;
        _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("not woken within 20 s (a lost wake-up)"),
        out = f => out,
    }
}

#[tokio::test]
async fn the_stream_yields_versions_and_ends_after_not_found() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let mut watch: ContextWatch<Counter> = store.watch_context(id).await.unwrap();
    assert_send_static(&watch);
    assert_eq!(within(next_item(&mut watch)).await.unwrap().unwrap().n, 0);
    store
        .update_context(id, |c: &mut Counter| c.n = 1)
        .await
        .unwrap();
    assert_eq!(within(next_item(&mut watch)).await.unwrap().unwrap().n, 1);
    store.delete_context::<Counter>(id).await.unwrap();
    let e = within(next_item(&mut watch)).await.unwrap().unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(
        within(next_item(&mut watch)).await.is_none(),
        "the stream ended"
    );
    assert!(
        within(next_item(&mut watch)).await.is_none(),
        "and stays ended"
    );
}

#[tokio::test]
async fn dropping_the_store_ends_its_watches() {
    let store = InMemoryContextStorage::new();
    let (idle, held) = (Uuid::new_v4(), Uuid::new_v4());
    store.store_context(idle, Counter { n: 0 }).await.unwrap();
    store.store_context(held, Counter { n: 0 }).await.unwrap();
    let mut watches = Vec::new();
    for id in [idle, held] {
        let mut w = store.watch_context::<Counter>(id).await.unwrap();
        w.changed().await.unwrap();
        watches.push(tokio::spawn(async move { within(w.changed()).await }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let guard = store.get_context::<Counter>(held).await.unwrap();
    drop(store);
    // The guard outlives its store; its release ends the last watch.
    drop(guard);
    for w in watches {
        let e = w.await.unwrap().unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }
}

/// A watch future polled once (so it is linked) and never again, then
/// dropped: the other watchers are still woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_changed_future_does_not_starve_other_watchers() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let mut abandoned = store.watch_context::<Counter>(id).await.unwrap();
    abandoned.changed().await.unwrap();
    {
        let mut fut = Box::pin(abandoned.changed());
        let waker = std::task::Waker::noop();
        assert!(fut
            .as_mut()
            .poll(&mut TaskContext::from_waker(waker))
            .is_pending());
        // Dropped here: it leaves the list, so it cannot become the lead.
    }
    let mut others = Vec::new();
    for _ in 0..8 {
        let mut w = store.watch_context::<Counter>(id).await.unwrap();
        w.changed().await.unwrap();
        others.push(tokio::spawn(
            async move { within(w.changed()).await.unwrap().n },
        ));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .update_context(id, |c: &mut Counter| c.n = 1)
        .await
        .unwrap();
    for o in others {
        assert_eq!(o.await.unwrap(), 1);
    }
    // The abandoned watch still works.
    assert_eq!(within(abandoned.changed()).await.unwrap().n, 1);
}

/// A stream polled once through a timeout (its `next()` future dropped, the
/// stream kept and never polled again) must not hold back the wake-up of
/// the other watchers of the key: each is woken by the release itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_does_not_hold_back_other_watchers() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let mut idle = store.watch_context::<Counter>(id).await.unwrap();
    within(next_item(&mut idle)).await.unwrap().unwrap();
    // Registered, then abandoned without a drop hook (a `Next`-style future).
    let timed_out = tokio::time::timeout(Duration::from_millis(20), next_item(&mut idle)).await;
    assert!(timed_out.is_err());
    let mut other = store.watch_context::<Counter>(id).await.unwrap();
    other.changed().await.unwrap();
    let waiting = tokio::spawn(async move { within(other.changed()).await.unwrap().n });
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .update_context(id, |c: &mut Counter| c.n = 1)
        .await
        .unwrap();
    assert_eq!(waiting.await.unwrap(), 1);
    drop(idle);
}

/// Writers from tasks and plain threads, watchers that sometimes cancel
/// their wait: every watcher reaches the final value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_loses_no_wake_up() {
    const WRITES: u64 = 2_000;
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let total = 4 * WRITES;
    let mut watchers = Vec::new();
    for k in 0..32u64 {
        let mut w = store.watch_context::<Counter>(id).await.unwrap();
        watchers.push(tokio::spawn(async move {
            let mut last = 0;
            let mut round = 0u64;
            loop {
                round += 1;
                // Every few rounds, give up waiting after a moment.
                let got: Option<Snapshot<Counter>> = if (round + k) % 5 == 0 {
                    match tokio::time::timeout(Duration::from_micros(50), w.changed()).await {
                        Ok(r) => Some(r.unwrap()),
                        Err(_) => None,
                    }
                } else {
                    Some(within(w.changed()).await.unwrap())
                };
                if let Some(snap) = got {
                    assert!(snap.version() > last);
                    last = snap.version();
                    if snap.n == total {
                        return;
                    }
                }
            }
        }));
    }
    let mut writers = Vec::new();
    for _ in 0..2 {
        let s = store.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..WRITES {
                s.update_context(id, |c: &mut Counter| c.n += 1)
                    .await
                    .unwrap();
            }
        }));
    }
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let s = store.clone();
            std::thread::spawn(move || {
                for _ in 0..WRITES {
                    let mut g = s.get_context_blocking::<Counter>(id).unwrap();
                    g.n += 1;
                    g.commit_blocking().unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    for w in watchers {
        within(w).await.unwrap();
    }
}

/// Many watchers on one hot key: each release wakes one lead, which wakes
/// the rest. Round by round, every watcher must see every round's commit
/// (so they are all parked when the next one lands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_see_every_round() {
    const WATCHERS: usize = 1_000;
    const ROUNDS: u64 = 20;
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context(id, Counter { n: 0 }).await.unwrap();
    let seen = Arc::new(tokio::sync::Semaphore::new(0));
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut w = store.watch_context::<Counter>(id).await.unwrap();
        w.changed().await.unwrap();
        let seen = seen.clone();
        watchers.push(tokio::spawn(async move {
            for round in 1..=ROUNDS {
                // One commit per round, and the next waits for everyone.
                assert_eq!(w.changed().await.unwrap().n, round);
                seen.add_permits(1);
            }
        }));
    }
    for _ in 1..=ROUNDS {
        store
            .update_context(id, |c: &mut Counter| c.n += 1)
            .await
            .unwrap();
        within(seen.acquire_many(WATCHERS as u32))
            .await
            .unwrap()
            .forget();
    }
    for w in watchers {
        w.await.unwrap();
    }
}

#[test]
fn watch_from_a_plain_thread_with_block_on() {
    let store = Arc::new(InMemoryContextStorage::new());
    let id = Uuid::new_v4();
    store.store_context_blocking(id, Counter { n: 0 }).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut w = rt.block_on(store.watch_context::<Counter>(id)).unwrap();
    rt.block_on(w.changed()).unwrap();
    let writer = {
        let s = store.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            s.update_context_blocking(id, |c: &mut Counter| c.n = 7)
                .unwrap();
        })
    };
    assert_eq!(rt.block_on(within(w.changed())).unwrap().n, 7);
    writer.join().unwrap();
}

#[allow(dead_code)]
fn poll_is_usable_by_hand(w: &mut ContextWatch<Counter>, cx: &mut TaskContext<'_>) -> Poll<()> {
    w.poll_changed(cx).map(|_| ())
}
