//! Bad input, entry point by entry point: each case gives a clear
//! `ContextError` naming the type and the key, or a documented behaviour
//! checked here. The table in `docs/bad_input.md` lists every case and the
//! test that covers it.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll, Waker};
use std::time::Duration;

use ctxstore::{
    BoxFuture, Context, ContextError, ContextStorage, ContextStorageExt, ContextType, ErasedValue,
    InMemoryContextStorage, Lease, RawGuard, RawSnapshot, Result, Uuid, Wait,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u64,
}
impl Context for Job {}

/// Another type whose `kind()` collides with `Job`'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Impostor {
    n: u64,
}
impl Context for Impostor {
    fn kind() -> &'static str {
        std::any::type_name::<Job>()
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x6f1c_0000_0000_0000_0000_0000_0000_0000 | n)
}

/// Polls once with a no-op waker.
fn poll_once<F: Future + ?Sized>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut TaskCx::from_waker(Waker::noop()))
}

/// Runs a future that must complete at its first poll.
fn now<F: Future>(fut: F) -> F::Output {
    match poll_once(pin!(fut)) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected to complete without waiting"),
    }
}

/// Checks that `e` is `NotFound` for `T` at `id`, with the documented text.
fn assert_not_found<T: Context>(e: &ContextError, id: Uuid, short: &str) {
    assert!(e.is_not_found(), "expected NotFound, got {e}");
    assert_eq!(e.id(), Some(id));
    assert_eq!(e.kind(), T::kind());
    assert_eq!(e.type_name(), std::any::type_name::<T>());
    assert_eq!(e.to_string(), format!("no {short} context known for {id}"));
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast::<&'static str>()
            .map(|s| s.to_string())
            .unwrap_or_default(),
    }
}

// ------------------------------------------------------------ unknown id

#[tokio::test]
async fn unknown_id_is_not_found_on_every_entry_point() {
    let s = InMemoryContextStorage::new();
    let d: &dyn ContextStorage = &s;
    let ty = ContextType::of::<Job>();
    let x = id(1);
    let nf = |e: ContextError| assert_not_found::<Job>(&e, x, "Job");

    nf(s.get_context::<Job>(x).await.unwrap_err());
    nf(s.try_get_context::<Job>(x).await.unwrap_err());
    for t in [Duration::ZERO, Duration::from_millis(5), Duration::MAX] {
        nf(s.get_context_timeout::<Job>(x, t).await.unwrap_err());
        nf(d.get_context_timeout::<Job>(x, t).await.unwrap_err());
        nf(s.get_context_timeout_blocking::<Job>(x, t).unwrap_err());
    }
    nf(s.get_context_snapshot::<Job>(x).await.unwrap_err());
    nf(s.snapshot::<Job>(x).unwrap_err());
    nf(s.delete_context::<Job>(x).await.unwrap_err());
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    nf(s.update_context(x, move |_: &mut Job| {
        r.store(true, std::sync::atomic::Ordering::SeqCst)
    })
    .await
    .unwrap_err());
    nf(s.get_context_blocking::<Job>(x).unwrap_err());
    nf(s.try_get_context_blocking::<Job>(x).unwrap_err());
    nf(s.update_context_blocking(x, |_: &mut Job| ()).unwrap_err());
    nf(s.delete_context_blocking::<Job>(x).unwrap_err());
    nf(d.get_context::<Job>(x).await.unwrap_err());
    nf(d.try_get_context::<Job>(x).await.unwrap_err());
    nf(d.get_context_snapshot::<Job>(x).await.unwrap_err());
    nf(d.update_context(x, |_: &mut Job| ()).await.unwrap_err());
    nf(d.delete_context::<Job>(x).await.unwrap_err());
    nf(d.lock_raw(ty, x, Wait::Forever).await.err().unwrap());
    nf(d.snapshot_raw(ty, x).await.err().unwrap());
    nf(d.delete_raw(ty, x).await.unwrap_err());
    assert!(
        !ran.load(std::sync::atomic::Ordering::SeqCst),
        "update ran f without a context"
    );
    assert!(!s.contains_context::<Job>(x).await.unwrap());
    assert!(!d.contains_raw(ty, x).await.unwrap());
    assert!(s.context_ids::<Job>().await.unwrap().is_empty());
    // Looking up unknown ids leaves nothing behind (the Python original
    // leaked a lock entry per unknown id).
    assert!(s.is_empty());
}

#[tokio::test]
async fn nil_and_max_uuids_are_ordinary_ids() {
    let s = InMemoryContextStorage::new();
    for x in [Uuid::nil(), Uuid::max()] {
        s.store_context(x, Job { n: 1 }).await.unwrap();
        s.update_context(x, |j: &mut Job| j.n += 1).await.unwrap();
        assert_eq!(s.snapshot::<Job>(x).unwrap().n, 2);
    }
    s.delete_context::<Job>(Uuid::nil()).await.unwrap();
    assert_eq!(s.context_ids::<Job>().await.unwrap(), vec![Uuid::max()]);
}

// ----------------------------------------------------------- wrong type

#[tokio::test]
async fn wrong_type_at_a_known_id_is_not_found_for_that_type() {
    let s = InMemoryContextStorage::new();
    let x = id(2);
    s.store_context(x, Job { n: 7 }).await.unwrap();
    let e = s.get_context::<Impostor>(x).await.unwrap_err();
    assert_not_found::<Impostor>(&e, x, "Impostor");
    assert_not_found::<Impostor>(&s.snapshot::<Impostor>(x).unwrap_err(), x, "Impostor");
    assert!(!s.contains_context::<Impostor>(x).await.unwrap());
    // The Job context is untouched and unlocked.
    assert_eq!(s.try_get_context::<Job>(x).await.unwrap().n, 7);
}

#[tokio::test]
async fn colliding_kinds_stay_separate_contexts_in_memory() {
    assert_eq!(Job::kind(), Impostor::kind());
    let s = InMemoryContextStorage::new();
    let x = id(3);
    let vj = s.store_context(x, Job { n: 1 }).await.unwrap();
    let vi = s.store_context(x, Impostor { n: 100 }).await.unwrap();
    assert_eq!(s.snapshot::<Job>(x).unwrap().version(), vj);
    assert_eq!(s.snapshot::<Impostor>(x).unwrap().version(), vi);
    // Both locked at once: they are different contexts.
    let mut gj = s.try_get_context::<Job>(x).await.unwrap();
    let mut gi = s.try_get_context::<Impostor>(x).await.unwrap();
    gj.n += 1;
    gi.n += 1;
    gj.commit().await.unwrap();
    gi.commit().await.unwrap();
    assert_eq!(s.snapshot::<Job>(x).unwrap().n, 2);
    assert_eq!(s.snapshot::<Impostor>(x).unwrap().n, 101);
    assert_eq!(s.len(), 2);
    s.delete_context::<Impostor>(x).await.unwrap();
    assert_eq!(s.snapshot::<Job>(x).unwrap().n, 2);
    // Errors keep both names apart: same kind, different type names.
    let e = s.snapshot::<Impostor>(x).unwrap_err();
    assert_eq!(e.kind(), Job::kind());
    assert_eq!(e.type_name(), std::any::type_name::<Impostor>());
    assert!(e.to_string().contains("Impostor"), "{e}");
}

// ------------------------------------------------ raw (type-erased) input

#[tokio::test]
async fn raw_calls_with_a_value_of_another_type_fail_cleanly() {
    let s = InMemoryContextStorage::new();
    let d: &dyn ContextStorage = &s;
    let ty = ContextType::of::<Job>();
    let x = id(4);
    let e = d
        .store_raw(ty, x, Box::new(Impostor { n: 1 }))
        .await
        .unwrap_err();
    assert!(e.is_backend(), "{e}");
    assert_eq!(
        (e.id(), e.type_name()),
        (Some(x), std::any::type_name::<Job>())
    );
    assert!(e.to_string().contains(&x.to_string()), "{e}");
    assert!(s.is_empty(), "nothing stored");

    let e = ty.encode(Some(x), &Impostor { n: 1 }).unwrap_err();
    assert!(e.is_codec() && e.id() == Some(x), "{e}");
    assert!(ty.snapshot_of(Box::new(Impostor { n: 1 }), 1).is_none());
    assert!(ty.snapshot_of(Box::new(Job { n: 1 }), 1).is_some());
}

#[test]
fn undecodable_bytes_are_codec_errors_naming_the_key() {
    let ty = ContextType::of::<Job>();
    let x = id(5);
    for bytes in [
        &b""[..],
        b"{",
        b"{\"n\":-1}",
        b"{\"n\":\"7\"}",
        b"[1,2]",
        b"\xff\xfe",
        b"null",
    ] {
        let e = ty.decode(Some(x), bytes).err().unwrap();
        assert!(e.is_codec(), "{e}");
        assert_eq!((e.id(), e.kind()), (Some(x), Job::kind()));
        assert!(e.to_string().contains(&x.to_string()), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let e = ty.decode_snapshot(x, bytes, 3).err().unwrap();
        assert!(e.is_codec() && e.id() == Some(x), "{e}");
        let e = ty.decode(None, bytes).err().unwrap();
        assert!(e.is_codec() && e.id().is_none(), "{e}");
    }
    // Nesting far beyond serde_json's recursion limit is an error, not a
    // stack overflow.
    let deep = "[".repeat(100_000);
    let e = ContextType::of::<Nested>()
        .decode(Some(x), deep.as_bytes())
        .err()
        .unwrap();
    assert!(e.is_codec(), "{e}");
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Nested(Vec<Nested>);
impl Context for Nested {}

/// A value serde_json cannot encode (a map with non-string keys): the
/// in-memory engine never serializes, so it works there; encoding it for a
/// remote backend is a `Codec` error, never a panic.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Unencodable {
    by_pair: HashMap<(u8, u8), u8>,
}
impl Context for Unencodable {}

#[tokio::test]
async fn a_value_serde_cannot_encode_is_a_codec_error_for_remote_backends() {
    let x = id(6);
    let v = Unencodable {
        by_pair: HashMap::from([((1, 2), 3)]),
    };
    let s = InMemoryContextStorage::new();
    s.store_context(x, v.clone()).await.unwrap();
    s.update_context(x, |u: &mut Unencodable| u.by_pair.insert((2, 3), 4))
        .await
        .unwrap();
    let e = ContextType::of::<Unencodable>()
        .encode(Some(x), &v)
        .unwrap_err();
    assert!(e.is_codec() && e.id() == Some(x), "{e}");
}

/// A backend that answers with guards, values and snapshots of the wrong
/// type (a buggy or malicious implementation): the typed API reports a
/// `Backend` error naming the key instead of panicking.
struct Liar {
    mode: u8,
}

struct NoLease;

impl Lease for NoLease {
    fn commit(self: Box<Self>, _: &(dyn Any + Send + Sync)) -> BoxFuture<'static, Result<u64>> {
        Box::pin(async { Ok(1) })
    }
    fn release(self: Box<Self>) {}
}

impl ContextStorage for Liar {
    fn store_raw(
        &self,
        _: &'static ContextType,
        _: Uuid,
        _: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async { Ok(1) })
    }
    fn lock_raw(
        &self,
        _: &'static ContextType,
        _: Uuid,
        _: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        let g = match self.mode {
            0 => RawGuard::Local(Box::new(42u32)),
            _ => RawGuard::Remote {
                value: Box::new(Impostor { n: 1 }),
                version: 1,
                lease: Box::new(NoLease),
            },
        };
        Box::pin(async move { Ok(g) })
    }
    fn snapshot_raw(
        &self,
        _: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        let other = ContextType::of::<Impostor>().decode_snapshot(id, b"{\"n\":1}", 1);
        Box::pin(async move { other })
    }
    fn delete_raw(&self, _: &'static ContextType, _: Uuid) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn store_if_raw(
        &self,
        _: &'static ContextType,
        _: Uuid,
        _: u64,
        _: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async { Ok(1) })
    }
    fn delete_if_raw(&self, _: &'static ContextType, _: Uuid, _: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn contains_raw(&self, _: &'static ContextType, _: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Ok(true) })
    }
    fn ids_raw(&self, _: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn backend_name(&self) -> &'static str {
        "liar"
    }
}

#[tokio::test]
async fn a_backend_returning_another_type_gives_a_backend_error() {
    let x = id(7);
    for mode in [0, 1] {
        let liar: Arc<dyn ContextStorage> = Arc::new(Liar { mode });
        let e = liar.get_context::<Job>(x).await.unwrap_err();
        assert!(e.is_backend(), "{e}");
        assert_eq!(
            (e.id(), e.type_name()),
            (Some(x), std::any::type_name::<Job>())
        );
        let e = liar.get_context_snapshot::<Job>(x).await.unwrap_err();
        assert!(e.is_backend() && e.id() == Some(x), "{e}");
        let e = liar
            .update_context(x, |j: &mut Job| j.n += 1)
            .await
            .unwrap_err();
        assert!(e.is_backend(), "{e}");
    }
}

// --------------------------------------------- guard vs delete, timeouts

/// A guard can never be committed after its context was deleted in memory:
/// `delete_context` waits for the holder, so the commit lands first and the
/// delete removes the committed value.
#[tokio::test]
async fn delete_waits_for_the_holder_so_a_guard_never_commits_into_a_deleted_context() {
    let s = InMemoryContextStorage::new();
    let x = id(8);
    s.store_context(x, Job { n: 1 }).await.unwrap();
    let mut g = s.get_context::<Job>(x).await.unwrap();
    let mut delete = pin!(s.delete_context::<Job>(x));
    assert!(
        poll_once(delete.as_mut()).is_pending(),
        "delete must wait for the holder"
    );
    assert!(poll_once(delete.as_mut()).is_pending());
    // Still there, still ours.
    assert_eq!(s.snapshot::<Job>(x).unwrap().n, 1);
    assert!(s.contains_context::<Job>(x).await.unwrap());
    g.n = 2;
    let v = g.commit().await.expect("the holder's commit succeeds");
    assert_eq!(s.snapshot::<Job>(x).unwrap().version(), v);
    // The delete was handed the lock by the commit; it completes now.
    assert!(matches!(poll_once(delete.as_mut()), Poll::Ready(Ok(()))));
    assert_not_found::<Job>(&s.snapshot::<Job>(x).unwrap_err(), x, "Job");

    // Same from a plain thread: delete_context_blocking parks until the
    // holder's guard is gone (here: rolled back by drop on another thread).
    let s = Arc::new(InMemoryContextStorage::new());
    s.store_context(x, Job { n: 1 }).await.unwrap();
    let g = s.get_context::<Job>(x).await.unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let deleter = {
        let s = s.clone();
        std::thread::spawn(move || {
            tx.send(()).unwrap();
            s.delete_context_blocking::<Job>(x)
        })
    };
    rx.recv().unwrap();
    std::thread::spawn(move || drop(g)).join().unwrap();
    deleter.join().unwrap().unwrap();
    assert!(!s.contains_context::<Job>(x).await.unwrap());
}

#[tokio::test]
async fn zero_timeout_never_waits() {
    let s = InMemoryContextStorage::new();
    let d: &dyn ContextStorage = &s;
    let x = id(9);
    s.store_context(x, Job { n: 1 }).await.unwrap();
    // Free: a zero timeout acquires.
    let g = now(s.get_context_timeout::<Job>(x, Duration::ZERO)).unwrap();
    // Held: `Timeout` at the first poll (not `WouldBlock`, not a wait).
    for e in [
        now(s.get_context_timeout::<Job>(x, Duration::ZERO)).unwrap_err(),
        now(d.get_context_timeout::<Job>(x, Duration::ZERO)).unwrap_err(),
        s.get_context_timeout_blocking::<Job>(x, Duration::ZERO)
            .unwrap_err(),
    ] {
        assert!(e.is_timeout(), "{e}");
        assert_eq!(e.id(), Some(x));
        assert_eq!(
            e.to_string(),
            format!("timed out after 0ns waiting for the lock on Job context {x}")
        );
    }
    let e = now(s.try_get_context::<Job>(x)).unwrap_err();
    assert!(e.is_would_block(), "{e}");
    assert_eq!(
        e.to_string(),
        format!("Job context {x} is locked by another holder")
    );
    drop(g);
    // Nothing was left queued: the lock is free again.
    now(s.try_get_context::<Job>(x)).unwrap().rollback();
}

/// `Duration::MAX` (and any timeout whose deadline does not fit in an
/// `Instant`) means "wait forever"; a huge but representable one waits on
/// the Tokio timer. Neither overflows or panics.
#[tokio::test]
async fn huge_timeouts_wait_like_get_context() {
    let s = Arc::new(InMemoryContextStorage::new());
    let x = id(10);
    s.store_context(x, Job { n: 1 }).await.unwrap();
    for t in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 4),
        Duration::from_secs(1 << 40),
    ] {
        let g = s.get_context::<Job>(x).await.unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.get_context_timeout::<Job>(x, t).await.map(|g| g.n) })
        };
        // Let the waiter queue, then release: it must get the lock.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        drop(g);
        assert_eq!(waiter.await.unwrap().unwrap(), 1, "timeout {t:?}");
        // Blocking variant: free lock, huge timeout.
        s.get_context_timeout_blocking::<Job>(x, t)
            .unwrap()
            .rollback();
    }
    assert_eq!(Wait::timeout(Duration::MAX), Wait::Forever);
}

/// Outside a Tokio runtime a non-zero timeout has no timer to wait on.
/// Documented behaviour: it panics with Tokio's message (as
/// `tokio::time::timeout` does); zero timeouts, `try_get_context` and
/// `Duration::MAX` need no timer and work anywhere.
#[test]
fn nonzero_timeout_outside_tokio_works_when_free_and_panics_when_held() {
    let s = InMemoryContextStorage::new();
    let x = id(11);
    s.store_context_blocking(x, Job { n: 1 }).unwrap();
    now(s.get_context_timeout::<Job>(x, Duration::ZERO))
        .unwrap()
        .rollback();
    now(s.get_context_timeout::<Job>(x, Duration::MAX))
        .unwrap()
        .rollback();
    // A free lock needs no timer, so a non-zero timeout works without a
    // runtime too.
    now(s.get_context_timeout::<Job>(x, Duration::from_secs(1)))
        .unwrap()
        .rollback();
    // A held lock needs Tokio's timer: outside a runtime that is Tokio's panic.
    let held = s.get_context_blocking::<Job>(x).unwrap();
    let p = catch_unwind(AssertUnwindSafe(|| {
        let mut fut = pin!(s.get_context_timeout::<Job>(x, Duration::from_secs(1)));
        let _ = poll_once(fut.as_mut());
    }))
    .expect_err("no timer outside a runtime");
    drop(held);
    let msg = panic_message(p);
    assert!(msg.contains("Tokio") || msg.contains("runtime"), "{msg}");
    // The lock was not left held by the panicking call.
    now(s.try_get_context::<Job>(x)).unwrap().rollback();
}

// ------------------------------------------- panicking user code (f, T)

#[tokio::test]
async fn a_panicking_update_closure_commits_nothing_and_releases_the_lock() {
    let s = Arc::new(InMemoryContextStorage::new());
    let x = id(12);
    let v0 = s.store_context(x, Job { n: 1 }).await.unwrap();
    // Async, inherent and through dyn: the panic surfaces as the task's
    // panic; the partial write is discarded.
    let t = {
        let s = s.clone();
        tokio::spawn(async move {
            s.update_context(x, |j: &mut Job| {
                j.n = 99;
                panic!("boom in update");
            })
            .await
        })
    };
    assert!(t.await.unwrap_err().is_panic());
    let t = {
        let d: Arc<dyn ContextStorage> = s.clone();
        tokio::spawn(async move {
            d.update_context(x, |j: &mut Job| {
                j.n = 98;
                panic!("boom in dyn update");
            })
            .await
        })
    };
    assert!(t.await.unwrap_err().is_panic());
    // Blocking.
    let p = catch_unwind(AssertUnwindSafe(|| {
        s.update_context_blocking(x, |j: &mut Job| {
            j.n = 97;
            panic!("boom in blocking update")
        })
    }))
    .unwrap_err();
    assert_eq!(panic_message(p), "boom in blocking update");
    let snap = s.snapshot::<Job>(x).unwrap();
    assert_eq!((snap.n, snap.version()), (1, v0), "nothing committed");
    let g = s.try_get_context::<Job>(x).await.expect("lock released");
    drop(g);
    assert_eq!(s.update_context(x, |j: &mut Job| j.n + 1).await.unwrap(), 2);
}

/// Clone panics when `bomb` is set: the engine clones on the first mutable
/// access to a guard (and when committing an untouched guard).
#[derive(Debug, Serialize, Deserialize)]
struct CloneBomb {
    n: u64,
    bomb: bool,
}
impl Clone for CloneBomb {
    fn clone(&self) -> Self {
        assert!(!self.bomb, "clone bomb");
        CloneBomb {
            n: self.n,
            bomb: self.bomb,
        }
    }
}
impl Context for CloneBomb {}

#[test]
fn a_panicking_clone_rolls_back_and_releases_the_lock() {
    let s = InMemoryContextStorage::new();
    let x = id(13);
    let v0 = s
        .store_context_blocking(x, CloneBomb { n: 1, bomb: true })
        .unwrap();
    // First mutable access clones: panics; the guard unwinds, releasing.
    let p = catch_unwind(AssertUnwindSafe(|| {
        let mut g = s.get_context_blocking::<CloneBomb>(x).unwrap();
        g.n += 1;
    }))
    .unwrap_err();
    assert_eq!(panic_message(p), "clone bomb");
    // Committing an untouched guard clones too.
    let p = catch_unwind(AssertUnwindSafe(|| {
        let g = s.get_context_blocking::<CloneBomb>(x).unwrap();
        g.commit_blocking()
    }))
    .unwrap_err();
    assert_eq!(panic_message(p), "clone bomb");
    // update_context: same.
    let p = catch_unwind(AssertUnwindSafe(|| {
        s.update_context_blocking(x, |c: &mut CloneBomb| c.n += 1)
    }))
    .unwrap_err();
    assert_eq!(panic_message(p), "clone bomb");
    let snap = s.snapshot::<CloneBomb>(x).unwrap();
    assert_eq!((snap.n, snap.version()), (1, v0));
    drop(snap);
    // The lock is free, reads never clone, and a store (no clone) works.
    let g = s
        .try_get_context_blocking::<CloneBomb>(x)
        .expect("lock released");
    assert_eq!(g.n, 1);
    drop(g);
    s.store_context_blocking(x, CloneBomb { n: 5, bomb: false })
        .unwrap();
    s.update_context_blocking(x, |c: &mut CloneBomb| c.n += 1)
        .unwrap();
    assert_eq!(s.snapshot::<CloneBomb>(x).unwrap().n, 6);
}

/// Drop panics when `bomb` is set (and the thread is not already
/// unwinding, so the test never aborts).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct DropBomb {
    n: u64,
    bomb: bool,
}
impl Drop for DropBomb {
    fn drop(&mut self) {
        if self.bomb && !std::thread::panicking() {
            panic!("drop bomb");
        }
    }
}
impl Context for DropBomb {}

/// `store_context` on an existing key writes over a recycled allocation,
/// dropping the superseded value in place. A `Drop` that panics there must
/// not leave the context locked.
#[test]
fn a_panicking_drop_during_store_does_not_leak_the_lock() {
    let s = InMemoryContextStorage::new();
    let x = id(14);
    s.store_context_blocking(x, DropBomb { n: 1, bomb: true })
        .unwrap();
    // Commit a defused copy: the armed version becomes the recycled spare.
    let mut g = s.get_context_blocking::<DropBomb>(x).unwrap();
    g.bomb = false;
    g.n = 2;
    g.commit_blocking().unwrap();
    let p = catch_unwind(AssertUnwindSafe(|| {
        s.store_context_blocking(x, DropBomb { n: 3, bomb: false })
    }))
    .expect_err("the armed value is dropped in place by the store");
    assert_eq!(panic_message(p), "drop bomb");
    // Nothing was published: the committed value is the defused one.
    let snap = s.snapshot::<DropBomb>(x).unwrap();
    assert_eq!((snap.n, snap.bomb), (2, false));
    drop(snap);
    let g = s
        .try_get_context_blocking::<DropBomb>(x)
        .expect("the lock must be free after a panicking Drop in store");
    drop(g);
    s.update_context_blocking(x, |d: &mut DropBomb| d.n += 10)
        .unwrap();
}

/// A `Drop` that panics when a guard mutates: the first mutable access
/// `clone_from`s into the recycled allocation, dropping the old value's
/// parts. The guard unwinds and releases the lock.
#[test]
fn a_panicking_drop_during_a_guard_write_releases_the_lock() {
    let s = InMemoryContextStorage::new();
    let x = id(15);
    s.store_context_blocking(x, DropBomb { n: 1, bomb: true })
        .unwrap();
    let mut g = s.get_context_blocking::<DropBomb>(x).unwrap();
    g.bomb = false;
    g.commit_blocking().unwrap(); // the armed version is now the spare
    let p = catch_unwind(AssertUnwindSafe(|| {
        let mut g = s.get_context_blocking::<DropBomb>(x).unwrap();
        g.n += 1; // clone_from into the armed spare drops it
        g.commit_blocking()
    }))
    .expect_err("clone_from drops the armed value");
    assert_eq!(panic_message(p), "drop bomb");
    let g = s
        .try_get_context_blocking::<DropBomb>(x)
        .expect("the lock must be free after a panicking Drop in a guard");
    drop(g);
}

// ------------------------------------------------------------- capacity

/// Like `std::collections::HashMap::with_capacity`, an impossible capacity
/// panics ("capacity overflow") at construction rather than misbehaving
/// later. (A possible but unallocatable one aborts on allocation failure,
/// as any Rust collection does.)
#[test]
fn an_overflowing_capacity_panics_at_construction() {
    let p = catch_unwind(|| InMemoryContextStorage::with_capacity(usize::MAX)).unwrap_err();
    assert!(panic_message(p).contains("capacity"));
    let s = InMemoryContextStorage::with_capacity(0);
    assert!(s.is_empty());
}

// ------------------------------------------------------ process-wide use

#[test]
fn the_process_wide_storage_works_outside_any_runtime() {
    let s = ctxstore::context_storage();
    let x = id(16);
    let v = now(s.store_context(x, Job { n: 1 })).unwrap();
    assert_eq!(now(s.get_context_snapshot::<Job>(x)).unwrap().version(), v);
    now(s.delete_context::<Job>(x)).unwrap();
    // A scoped override sees its own store only.
    let mine: Arc<dyn ContextStorage> = Arc::new(InMemoryContextStorage::new());
    ctxstore::with_context_storage_blocking(mine, || {
        let e = now(ctxstore::context_storage().get_context_snapshot::<Job>(x)).unwrap_err();
        assert!(e.is_not_found());
    });
}

/// A deleted context's value is dropped late, by papaya's deferred
/// reclamation, inside whichever later table operation reclaims it — so a
/// panicking `Drop` surfaces in an unrelated later call. The engine must
/// stay consistent wherever it surfaces: a delete that unlinks the context
/// still fails every queued waiter (none is left waiting forever), and no
/// lock is left held.
#[test]
fn a_panicking_drop_of_a_deleted_value_surfaces_late_and_leaves_no_lock_or_waiter_behind() {
    let s = InMemoryContextStorage::new();
    let bomb = id(16);
    s.store_context_blocking(bomb, DropBomb { n: 1, bomb: true })
        .unwrap();
    s.delete_context_blocking::<DropBomb>(bomb).unwrap();
    let mut panics = 0;
    for i in 0..2_000u128 {
        let x = id(0x1000 + i);
        // Delete `x` while a guard holds it and a waiter queues behind the
        // delete: the delete's unlink must wake the waiter (NotFound).
        let r = catch_unwind(AssertUnwindSafe(|| {
            s.store_context_blocking(x, Job { n: 1 }).unwrap();
            let g = s.get_context_blocking::<Job>(x).unwrap();
            let mut delete = Box::pin(s.delete_context::<Job>(x));
            assert!(poll_once(delete.as_mut()).is_pending());
            let mut waiter = Box::pin(s.get_context::<Job>(x));
            assert!(poll_once(waiter.as_mut()).is_pending());
            drop(g);
            let deleted = catch_unwind(AssertUnwindSafe(|| poll_once(delete.as_mut())));
            match poll_once(waiter.as_mut()) {
                Poll::Ready(Err(e)) => assert!(e.is_not_found(), "{e}"),
                Poll::Ready(Ok(_)) => panic!("waiter got a deleted context"),
                Poll::Pending => panic!("a waiter was left queued on a deleted context"),
            }
            if let Err(p) = deleted {
                std::panic::resume_unwind(p);
            }
        }));
        if let Err(p) = r {
            assert_eq!(panic_message(p), "drop bomb", "iteration {i}");
            panics += 1;
        }
        // Whatever happened, `x` is not left locked.
        match s.try_get_context_blocking::<Job>(x) {
            Ok(g) => g.rollback(),
            Err(e) => assert!(e.is_not_found(), "iteration {i}: {e}"),
        }
    }
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| drop(s))) {
        assert_eq!(panic_message(p), "drop bomb");
        panics += 1;
    }
    assert_eq!(panics, 1, "the deleted value is dropped exactly once");
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Measured {
    label: String,
    ratio: f64,
}
impl Context for Measured {}

/// Issue #15: values JSON cannot carry back (a non-finite float, `\0` in a
/// string) are refused by `ContextType::encode`, so every remote backend
/// refuses them at write time, before storing anything; the in-memory
/// engine never serializes and keeps them. Bytes that *decode* to such a
/// value (`"\u0000"`) decode fine, but cannot be committed back.
#[tokio::test]
async fn values_json_cannot_carry_back_are_refused_by_encode_but_fine_in_memory() {
    let ty = ContextType::of::<Measured>();
    let x = id(7);
    let bad = [
        Measured {
            label: "ok".into(),
            ratio: f64::NAN,
        },
        Measured {
            label: "ok".into(),
            ratio: f64::NEG_INFINITY,
        },
        Measured {
            label: "a\0b".into(),
            ratio: 0.5,
        },
    ];
    let s = InMemoryContextStorage::new();
    for v in &bad {
        let e = ty.encode(Some(x), v).unwrap_err();
        assert!(e.is_codec() && e.id() == Some(x), "{e}");
        assert!(e.to_string().contains(&x.to_string()), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        s.store_context(x, v.clone()).await.unwrap();
    }
    let decoded = ty
        .decode(Some(x), br#"{"label":"a\u0000b","ratio":0.5}"#)
        .unwrap();
    assert_eq!(decoded.downcast_ref::<Measured>(), Some(&bad[2]));
    assert!(ty.encode(Some(x), &*decoded).unwrap_err().is_codec());
    assert!(ty
        .encode(
            Some(x),
            &Measured {
                label: "a\\u0000b".into(),
                ratio: -0.0
            }
        )
        .is_ok());
}
