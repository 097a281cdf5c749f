//! Bounded memory (DESIGN.md §2.7): a million create/update/delete
//! lifecycles end with the memory they started with. Its own test binary, so
//! the resident-set measurement sees no other test's allocations.

use std::sync::Arc;

use ctxstore::{Context, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct JobContext {
    job_name: String,
    processed: u64,
}
impl Context for JobContext {}

fn job(n: u64) -> JobContext {
    JobContext {
        job_name: "nightly".into(),
        processed: n,
    }
}

#[test]
fn a_million_lifecycles_leave_nothing_behind() {
    fn rss_kib() -> Option<u64> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4)
    }
    let store = Arc::new(InMemoryContextStorage::new());
    let run = |n: u64| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..n / 2 {
                        let id = Uuid::new_v4();
                        store.store_context_blocking(id, job(i)).unwrap();
                        store
                            .update_context_blocking(id, |c: &mut JobContext| c.processed += 1)
                            .unwrap();
                        assert_eq!(store.snapshot::<JobContext>(id).unwrap().processed, i + 1);
                        store.delete_context_blocking::<JobContext>(id).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    run(20_000); // warm the allocator and the table
    let before = rss_kib();
    run(1_000_000);
    assert_eq!(store.len(), 0);
    if let (Some(before), Some(after)) = (before, rss_kib()) {
        // Without reclamation a million slots would hold hundreds of MiB.
        assert!(
            after.saturating_sub(before) < 32 * 1024,
            "RSS grew from {before} KiB to {after} KiB"
        );
    }
}
