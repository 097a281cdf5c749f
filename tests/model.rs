//! The op-sequence model of `fuzz/` (`ops_vs_model`), driven by proptest so
//! stable `cargo test` checks it too: random interleavings of store, get,
//! mutate, commit, rollback, drop, snapshot, try, timeout(0), delete,
//! contains, ids and the conditional writes (`store_context_if`,
//! `delete_context_if`, `update_context_optimistic`, async and blocking)
//! over several hand-polled tasks, compared result by result with a
//! sequential model. See `fuzz/src/model.rs` for the model and
//! `fuzz/src/scenarios.rs` for the hand-written conditional sequences.
//!
//! `PROPTEST_CASES=5000 cargo test --test model` runs more cases.

#[allow(dead_code)]
#[path = "../fuzz/src/model.rs"]
mod model;

#[path = "../fuzz/src/scenarios.rs"]
mod scenarios;

use model::{BlockingOp, Expected, Key, Op, Ty, Via};
use proptest::prelude::*;

fn ty() -> impl Strategy<Value = Ty> {
    prop_oneof![Just(Ty::A), Just(Ty::B)]
}

fn key() -> impl Strategy<Value = Key> {
    (ty(), 0..model::IDS).prop_map(|(ty, id)| Key::new(ty, id))
}

fn via() -> impl Strategy<Value = Via> {
    prop_oneof![Just(Via::Inherent), Just(Via::Dyn), Just(Via::Raw)]
}

fn task() -> impl Strategy<Value = u8> {
    0..model::TASKS
}

fn expected() -> impl Strategy<Value = Expected> {
    prop_oneof![
        1 => Just(Expected::Zero),
        3 => Just(Expected::Current),
        1 => Just(Expected::Stale),
        2 => Just(Expected::Next),
    ]
}

fn blocking_op() -> impl Strategy<Value = BlockingOp> {
    prop_oneof![
        Just(BlockingOp::Store),
        Just(BlockingOp::Get),
        Just(BlockingOp::Update),
        Just(BlockingOp::Delete),
        Just(BlockingOp::Try),
        Just(BlockingOp::Timeout0),
        expected().prop_map(BlockingOp::StoreIf),
        expected().prop_map(BlockingOp::DeleteIf),
        Just(BlockingOp::Optimistic),
    ]
}

/// Weighted towards what makes interesting interleavings: lock-taking ops,
/// polls and drops.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (task(), key(), any::<u8>(), via())
            .prop_map(|(task, key, val, via)| Op::Store { task, key, val, via }),
        4 => (task(), key(), via()).prop_map(|(task, key, via)| Op::Get { task, key, via }),
        1 => (task(), key(), via()).prop_map(|(task, key, via)| Op::GetMax { task, key, via }),
        2 => (task(), key(), any::<u8>(), via())
            .prop_map(|(task, key, val, via)| Op::Update { task, key, val, via }),
        2 => (task(), key(), via()).prop_map(|(task, key, via)| Op::Delete { task, key, via }),
        1 => (task(), key(), via()).prop_map(|(task, key, via)| Op::Try { task, key, via }),
        1 => (task(), key(), via()).prop_map(|(task, key, via)| Op::Timeout0 { task, key, via }),
        1 => (task(), key(), blocking_op(), any::<u8>())
            .prop_map(|(task, key, op, val)| Op::Blocking { task, key, op, val }),
        5 => task().prop_map(|task| Op::Poll { task }),
        2 => task().prop_map(|task| Op::Drop { task }),
        3 => (task(), any::<u8>()).prop_map(|(task, val)| Op::Mutate { task, val }),
        1 => task().prop_map(|task| Op::Read { task }),
        3 => (task(), any::<bool>()).prop_map(|(task, blocking)| Op::Commit { task, blocking }),
        1 => task().prop_map(|task| Op::Rollback { task }),
        2 => (key(), via(), any::<bool>())
            .prop_map(|(key, via, keep)| Op::Snapshot { key, via, keep }),
        1 => (key(), via()).prop_map(|(key, via)| Op::Contains { key, via }),
        1 => (ty(), via()).prop_map(|(ty, via)| Op::Ids { ty, via }),
        2 => (task(), key(), any::<u8>(), expected())
            .prop_map(|(task, key, val, expected)| Op::StoreIf { task, key, val, expected }),
        1 => (task(), key(), expected())
            .prop_map(|(task, key, expected)| Op::DeleteIf { task, key, expected }),
        2 => (task(), key(), any::<u8>())
            .prop_map(|(task, key, val)| Op::Optimistic { task, key, val }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_the_sequential_model(ops in proptest::collection::vec(op(), 0..160)) {
        model::run(&ops);
    }
}

/// A hand-written sequence for the subtle paths, so they are covered
/// whatever proptest draws: a FIFO hand-off through a cancelled granted
/// waiter, and a delete that wakes a queue which then re-resolves onto a
/// re-created context.
#[test]
fn handoff_cancel_delete_and_recreate() {
    let a0 = Key::new(Ty::A, 0);
    let via = Via::Inherent;
    model::run(&[
        Op::Store {
            task: 0,
            key: a0,
            val: 1,
            via,
        },
        Op::Get {
            task: 0,
            key: a0,
            via,
        },
        Op::Get {
            task: 1,
            key: a0,
            via,
        }, // queued 1st
        Op::Delete {
            task: 2,
            key: a0,
            via: Via::Raw,
        }, // queued 2nd
        Op::Get {
            task: 3,
            key: a0,
            via: Via::Dyn,
        }, // queued 3rd
        Op::Mutate { task: 0, val: 7 },
        Op::Commit {
            task: 0,
            blocking: false,
        }, // hands to task 1
        Op::Drop { task: 1 }, // granted, dropped: passes to the delete
        Op::Poll { task: 3 }, // still queued behind the delete
        Op::Poll { task: 2 }, // delete runs, kills task 3's wait
        Op::Store {
            task: 0,
            key: a0,
            val: 9,
            via,
        }, // re-created, version above the old
        Op::Get {
            task: 1,
            key: a0,
            via,
        },
        Op::Poll { task: 3 },     // re-resolves: queues on the new context
        Op::Rollback { task: 1 }, // hands to task 3
        Op::Poll { task: 3 },
        Op::Read { task: 3 },
        Op::Commit {
            task: 3,
            blocking: true,
        },
        Op::Snapshot {
            key: a0,
            via,
            keep: true,
        },
        Op::Delete {
            task: 0,
            key: a0,
            via,
        },
        Op::Poll { task: 3 },
    ]);
}

/// The conditional writes' hand-written sequences (`fuzz/src/scenarios.rs`,
/// also the fuzzer's `cond-*` seeds): waiting behind a guard then
/// conflicting, re-queueing after a conflict, killed and re-created keys,
/// create-once, the blocking forms.
#[test]
fn conditional_scenarios() {
    for (name, ops) in scenarios::conditional() {
        eprintln!("scenario {name}");
        model::run(&ops);
    }
}
