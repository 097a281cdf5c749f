//! Hand-written op sequences for the conditional writes' subtle paths, so
//! they are covered whatever the fuzzer or proptest draws. `tests/model.rs`
//! runs each through [`run`](crate::model::run); the fuzz crate encodes
//! each as a seed (`seeds/ops_vs_model/cond-<name>`, see `encode` and its
//! test in `src/lib.rs`).
//!
//! Comments say what the model predicts; the model, not the comment, is
//! what the run checks.

use crate::model::{BlockingOp, Expected, Key, Op, Ty};

/// `(name, ops)` pairs.
pub fn conditional() -> Vec<(&'static str, Vec<Op>)> {
    let a0 = Key::new(Ty::A, 0);
    let a1 = Key::new(Ty::A, 1);
    let a2 = Key::new(Ty::A, 2);
    let b0 = Key::new(Ty::B, 0);
    let b2 = Key::new(Ty::B, 2);
    let via = crate::model::Via::Inherent;
    let store_if = |task, key, val, expected| Op::StoreIf {
        task,
        key,
        val,
        expected,
    };
    let delete_if = |task, key, expected| Op::DeleteIf {
        task,
        key,
        expected,
    };
    let optimistic = |task, key, val| Op::Optimistic { task, key, val };
    let get = |task, key| Op::Get { task, key, via };
    let poll = |task| Op::Poll { task };
    let commit = |task| Op::Commit {
        task,
        blocking: false,
    };
    let snap = |key| Op::Snapshot {
        key,
        via,
        keep: true,
    };
    vec![
        (
            "create-once-and-compare",
            vec![
                store_if(0, a0, 1, Expected::Zero),    // absent: creates
                store_if(1, a0, 2, Expected::Zero),    // Conflict { 0, v }
                snap(a0),                              // unchanged, kept
                store_if(1, a0, 3, Expected::Current), // new version
                store_if(1, a0, 4, Expected::Stale),   // Conflict
                store_if(1, a0, 4, Expected::Next),    // Conflict
                delete_if(2, a0, Expected::Stale),     // Conflict
                delete_if(2, a0, Expected::Zero),      // Conflict { 0, v }
                delete_if(2, a0, Expected::Current),   // deleted
                delete_if(2, a0, Expected::Current),   // NotFound
                delete_if(2, a0, Expected::Zero),      // NotFound
                store_if(3, a0, 5, Expected::Current), // NotFound
                optimistic(3, a0, 6),                  // NotFound
                store_if(3, a0, 7, Expected::Zero),    // re-created, version above
                store_if(3, a0, 8, Expected::Stale),   // the old incarnation: Conflict
                optimistic(3, a0, 9),                  // closure runs once
                snap(a0),
            ],
        ),
        (
            "guard-then-conflicts-and-kill",
            vec![
                Op::Store {
                    task: 0,
                    key: a1,
                    val: 1,
                    via,
                },
                get(0, a1),
                store_if(1, a1, 2, Expected::Current), // queued 1st
                optimistic(2, a1, 3),                  // reads now; queued 2nd
                delete_if(3, a1, Expected::Next),      // queued 3rd
                Op::Mutate { task: 0, val: 4 },
                commit(0), // hands to task 1
                poll(1),   // Conflict; hands to task 2
                poll(2),   // Conflict; hands to task 3, runs again, queues behind
                poll(2),   // still queued
                poll(3),   // Next names the committed version: deletes, kills task 2
                poll(2),   // re-resolves: NotFound
            ],
        ),
        (
            "optimistic-after-rollback",
            vec![
                Op::Store {
                    task: 0,
                    key: b2,
                    val: 1,
                    via,
                },
                get(0, b2),
                Op::Mutate { task: 0, val: 2 },
                optimistic(1, b2, 3), // reads the committed value, queues
                Op::Rollback { task: 0 },
                poll(1), // nothing committed meanwhile: one run
                snap(b2),
            ],
        ),
        (
            "optimistic-requeues-behind-a-waiter",
            vec![
                Op::Store {
                    task: 0,
                    key: a2,
                    val: 1,
                    via,
                },
                get(0, a2),
                optimistic(1, a2, 2), // queued 1st
                get(2, a2),           // queued 2nd
                commit(0),            // hands to task 1
                poll(1),              // Conflict: hands to task 2, runs again, queues
                poll(2),              // a guard
                Op::Mutate { task: 2, val: 3 },
                commit(2), // hands to task 1
                poll(1),   // Conflict again, lock free now: third run commits
                snap(a2),
            ],
        ),
        (
            "optimistic-killed-then-recreated",
            vec![
                Op::Store {
                    task: 0,
                    key: a0,
                    val: 1,
                    via,
                },
                get(0, a0),
                Op::Delete {
                    task: 2,
                    key: a0,
                    via,
                }, // queued 1st
                optimistic(1, a0, 2), // queued 2nd
                Op::Rollback { task: 0 },
                poll(2), // deletes, kills task 1
                Op::Store {
                    task: 3,
                    key: a0,
                    val: 3,
                    via,
                }, // re-created
                poll(1), // stale read: Conflict, then a second run commits
                snap(a0),
            ],
        ),
        (
            "store-if-zero-behind-a-delete",
            vec![
                Op::Store {
                    task: 0,
                    key: b0,
                    val: 1,
                    via,
                },
                get(0, b0),
                Op::Delete {
                    task: 1,
                    key: b0,
                    via,
                }, // queued 1st
                store_if(2, b0, 2, Expected::Zero), // queued 2nd
                store_if(3, b0, 3, Expected::Zero), // queued 3rd
                commit(0),                          // hands to the delete
                poll(1),                            // deletes, kills tasks 2 and 3
                poll(3),                            // absent: creates
                poll(2),                            // exists now: Conflict { 0, v }
                snap(b0),
            ],
        ),
        (
            "dropped-granted-optimistic",
            vec![
                Op::Store {
                    task: 0,
                    key: a1,
                    val: 1,
                    via,
                },
                get(0, a1),
                optimistic(1, a1, 2),                  // queued 1st
                store_if(2, a1, 3, Expected::Current), // queued 2nd
                commit(0),                             // hands to task 1
                Op::Drop { task: 1 },                  // passes it to task 2
                poll(2),                               // Conflict
                optimistic(1, a1, 4),                  // free: one run
                snap(a1),
            ],
        ),
        (
            "blocking-forms",
            vec![
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::DeleteIf(Expected::Zero),
                    val: 0,
                }, // NotFound
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::Optimistic,
                    val: 1,
                }, // NotFound
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::StoreIf(Expected::Zero),
                    val: 2,
                }, // creates
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::StoreIf(Expected::Current),
                    val: 3,
                }, // new version
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::Optimistic,
                    val: 4,
                }, // one run
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::StoreIf(Expected::Stale),
                    val: 5,
                }, // Conflict
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::DeleteIf(Expected::Next),
                    val: 0,
                }, // Conflict
                get(1, b2),
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::Optimistic,
                    val: 6,
                }, // held: skipped (it would park)
                Op::Rollback { task: 1 },
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::DeleteIf(Expected::Current),
                    val: 0,
                }, // deleted
                Op::Blocking {
                    task: 0,
                    key: b2,
                    op: BlockingOp::StoreIf(Expected::Stale),
                    val: 7,
                }, // absent, not 0: NotFound
            ],
        ),
    ]
}
