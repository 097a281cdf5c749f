//! Steady-state commits allocate nothing when the context's `Clone` has a
//! field-wise `clone_from` (DESIGN.md §4: drafts are made by `clone_from`
//! into the superseded version's allocation when no reader holds it).
//! Its own test binary: the counting allocator sees only this test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ctxstore::{Context, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
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

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    commit_n(&store, id, 10_000);
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(
        allocated, 0,
        "10,000 steady-state commits allocated {allocated} times"
    );

    // A snapshot held across commits keeps its version: the engine must not
    // recycle it, so those commits do allocate, and the snapshot is intact.
    let held = store.snapshot::<Job>(id).unwrap();
    let seen = (held.processed, held.history.clone(), held.version());
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    commit_n(&store, id, 10);
    assert!(
        ALLOCATIONS.load(Ordering::Relaxed) > before,
        "a version a reader holds was recycled"
    );
    assert_eq!((held.processed, held.history.clone(), held.version()), seen);
    assert_eq!(store.snapshot::<Job>(id).unwrap().processed, seen.0 + 10);
}
