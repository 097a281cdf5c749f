//! Steady-state commits allocate nothing when the context's `Clone` has a
//! field-wise `clone_from` (DESIGN.md §4: drafts are made by `clone_from`
//! into the superseded version's allocation when no reader holds it).
//! Its own test binary, with a counting allocator that counts per thread
//! (the test harness allocates on its own threads meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ctxstore::{Context, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};

struct Counting;

thread_local! {
    /// Allocations made by this thread (const-initialized and without a
    /// destructor, so the allocator can use it at any point of a thread's
    /// life).
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

/// Allocations made by the calling thread so far.
fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    name: String,
    processed: u64,
    history: Vec<u64>,
}

/// The recommended shape: `clone_from` field by field, so a draft reuses the
/// recycled version's buffers.
impl Clone for Job {
    fn clone(&self) -> Self {
        Job {
            name: self.name.clone(),
            processed: self.processed,
            history: self.history.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.name.clone_from(&source.name);
        self.processed = source.processed;
        self.history.clone_from(&source.history);
    }
}

impl Context for Job {}

fn commit_n(store: &InMemoryContextStorage, id: Uuid, n: u64) {
    for _ in 0..n {
        let mut g = store.get_context_blocking::<Job>(id).unwrap();
        g.processed += 1;
        let i = (g.processed % 16) as usize;
        g.history[i] = g.processed;
        g.commit_blocking().unwrap();
    }
}

#[test]
fn steady_state_commits_allocate_nothing_and_held_snapshots_stay_intact() {
    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    store
        .store_context_blocking(
            id,
            Job {
                name: "nightly".into(),
                processed: 0,
                history: vec![0; 16],
            },
        )
        .unwrap();
    commit_n(&store, id, 100); // warm up: the spare exists, thread-locals are set

    let before = allocations();
    commit_n(&store, id, 10_000);
    let allocated = allocations() - before;
    assert_eq!(
        allocated, 0,
        "10,000 steady-state commits allocated {allocated} times"
    );

    // A snapshot held across commits keeps its version: the engine must not
    // recycle it, so those commits do allocate, and the snapshot is intact.
    let held = store.snapshot::<Job>(id).unwrap();
    let seen = (held.processed, held.history.clone(), held.version());
    let before = allocations();
    commit_n(&store, id, 10);
    assert!(
        allocations() > before,
        "a version a reader holds was recycled"
    );
    assert_eq!((held.processed, held.history.clone(), held.version()), seen);
    assert_eq!(store.snapshot::<Job>(id).unwrap().processed, seen.0 + 10);
}

/// A contended wait allocates nothing: the waiter node lives in the waiting
/// future (an intrusive queue), not in an `Arc` per wait as in version 1.
/// One thread plays both sides: it holds the lock with a guard, polls an
/// `update_context` future until it queues, commits (the release wakes or
/// hands over to the queued waiter) and polls the future to completion.
#[test]
fn contended_waits_allocate_nothing() {
    use std::future::Future;
    use std::task::{Context as TaskContext, Poll, Waker};

    let store = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    store
        .store_context_blocking(
            id,
            Job {
                name: "contended".into(),
                processed: 0,
                history: vec![0; 16],
            },
        )
        .unwrap();
    commit_n(&store, id, 100);
    let mut cx = TaskContext::from_waker(Waker::noop());
    let mut round = |store: &InMemoryContextStorage| {
        let mut held = store.get_context_blocking::<Job>(id).unwrap();
        let mut waiting = std::pin::pin!(store.update_context(id, |j: &mut Job| j.processed += 1));
        assert!(
            waiting.as_mut().poll(&mut cx).is_pending(),
            "the lock is held"
        );
        held.processed += 1;
        held.commit_blocking().unwrap();
        match waiting.as_mut().poll(&mut cx) {
            Poll::Ready(done) => done.unwrap(),
            Poll::Pending => panic!("the released lock was not taken by its only waiter"),
        }
    };
    round(&store); // warm up

    let before = allocations();
    for _ in 0..1_000 {
        round(&store);
    }
    let allocated = allocations() - before;
    assert_eq!(
        allocated, 0,
        "1,000 contended waits allocated {allocated} times"
    );
    assert_eq!(
        store.snapshot::<Job>(id).unwrap().processed,
        100 + 2 * 1_001
    );
}
