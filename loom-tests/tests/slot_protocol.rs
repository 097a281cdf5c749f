//! Loom models of the slot protocol: the lock word (`LOCKED|QUEUED|DEAD`),
//! the FIFO hand-off queue, waiter cancellation, kill (delete), and the
//! version compare-and-swap at commit.
//!
//! They drive the engine's own code paths through `ctxstore::__loom` (a thin
//! facade over `RawLock`, `Slot`, `LockSlot`, `lock_slot_blocking` and
//! `MemGuard`); the papaya table is outside the models.
//!
//! Run: `RUSTFLAGS="--cfg ctxstore_loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release`
//! (add `-- --nocapture` to see the iterations each model explored).
//! `LOOM_MAX_PREEMPTIONS` defaults to 2 here when unset;
//! `CTXSTORE_LOOM_UNBOUNDED=1` removes the bound (every interleaving).
//!
//! Three kinds of failure count: an assertion below, a loom causality error
//! on an `UnsafeCell` (the slot's spare allocation, or the `Exclusive` cell
//! every holder writes — two holders, or a hand-off without a
//! happens-before edge, trip it), and loom's deadlock detection (a lost
//! wake-up or a leaked lock leaves a thread parked forever).
#![cfg(ctxstore_loom)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Instant;

use ctxstore::__loom::{handoff, set_handoff, Lock, Locked, Refused, Slot};
use ctxstore::Context;
use loom::cell::UnsafeCell;
use loom::future::block_on;
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use serde::{Deserialize, Serialize};

/// The context value in every model: `n` counts commits, `tag` names the
/// last writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Val {
    n: u64,
    tag: u64,
}

impl Context for Val {}

fn val(n: u64, tag: u64) -> Val {
    Val { n, tag }
}

/// State only a lock holder may touch.
///
/// `cell` is a loom `UnsafeCell`: loom fails the model if two accesses are
/// not ordered by happens-before, so it checks both mutual exclusion and
/// that each hand-off publishes the previous holder's writes. `held` makes
/// "two holders at once" an explicit assertion too (`Relaxed`: it must not
/// add any happens-before edge of its own that could hide a missing one in
/// the engine).
struct Exclusive {
    cell: UnsafeCell<u64>,
    held: AtomicBool,
}

// SAFETY: `cell` is only accessed through `enter`, whose callers hold the
// slot's lock; a violation is exactly what loom reports.
unsafe impl Sync for Exclusive {}

impl Exclusive {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            cell: UnsafeCell::new(0),
            held: AtomicBool::new(false),
        })
    }

    /// Marks the caller as the holder and runs `f` on the protected value.
    fn enter<R>(&self, f: impl FnOnce(&mut u64) -> R) -> R {
        assert!(
            !self.held.swap(true, Ordering::Relaxed),
            "two holders of one slot's lock"
        );
        // SAFETY: the caller holds the slot's lock (checked by `held` and by
        // loom's causality tracking on `cell`).
        let out = self.cell.with_mut(|v| f(unsafe { &mut *v }));
        self.held.store(false, Ordering::Relaxed);
        out
    }
}

/// Runs one model and reports how many executions loom explored.
fn check(name: &'static str, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(StdAtomicUsize::new(0));
    let counter = runs.clone();
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("CTXSTORE_LOOM_UNBOUNDED").is_some() {
        // Every interleaving, no preemption bound (the slow, exhaustive run).
        builder.preemption_bound = None;
    } else if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    let f = std::sync::Arc::new(f);
    // Both release policies: waking the head to compete with newcomers
    // (bounded fairness before the bound) and handing the lock over (after
    // it). Loom has no clock, so each model runs once per policy.
    for handoff in [false, true] {
        set_handoff(handoff);
        counter.store(0, StdOrdering::Relaxed);
        let start = Instant::now();
        let (f, counter) = (f.clone(), counter.clone());
        builder.check(move || {
            counter.fetch_add(1, StdOrdering::Relaxed);
            f();
        });
        eprintln!(
            "loom model {name} ({}): {} iterations in {:.1?} (preemption bound {:?})",
            if handoff { "hand-off" } else { "wake" },
            runs.load(StdOrdering::Relaxed),
            start.elapsed(),
            builder.preemption_bound,
        );
    }
}

/// Polls a future once with a waker that does nothing.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    let mut cx = TaskContext::from_waker(Waker::noop());
    Pin::new(fut).poll(&mut cx)
}

/// Asserts the lock ended up free: no holder, no waiter left queued
/// (`QUEUED` implies `LOCKED`), not dead.
fn assert_free(slot: &Slot<Val>) {
    assert!(!slot.is_locked(), "the lock leaked");
    assert!(!slot.is_handed(), "a free lock is still marked HANDED");
    assert!(!slot.is_dead());
    slot.try_lock().expect("a free lock is acquirable").unlock();
}

/// Never two holders; a snapshot sees only committed (version, value) pairs
/// and versions only increase.
#[test]
fn two_lockers_and_snapshotter() {
    check("two_lockers_and_snapshotter", || {
        let slot = Slot::new(val(0, 0), 1);
        let excl = Exclusive::new();
        let lockers: Vec<_> = (1..=2)
            .map(|tag| {
                let (slot, excl) = (slot.clone(), excl.clone());
                thread::spawn(move || {
                    let mut g = block_on(slot.lock()).expect("never deleted").guard();
                    excl.enter(|v| *v += 1);
                    g.n += 1;
                    g.tag = tag;
                    let base = g.version();
                    let v = g.commit().expect("the holder's commit cannot conflict");
                    assert_eq!(v, base + 1);
                    v
                })
            })
            .collect();
        let (v1, a) = slot.load();
        let (v2, b) = slot.load();
        assert!(v2 >= v1, "versions went back: {v1} then {v2}");
        for (v, x) in [(v1, a), (v2, b)] {
            assert_eq!(x.n, v - 1, "snapshot of an uncommitted value");
        }
        let mut got: Vec<u64> = lockers.into_iter().map(|h| h.join().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, [2, 3]);
        assert_eq!(slot.load().0, 3);
        assert_eq!(slot.load().1.n, 2);
        assert_eq!(excl.enter(|v| *v), 2);
        assert_free(&slot);
    });
}

fn drop_after_polls(name: &'static str, polls: usize) {
    check(name, move || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let excl = Exclusive::new();
        let dropped = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || {
                let mut fut: Lock<Val> = slot.lock();
                for _ in 0..polls {
                    if let Poll::Ready(got) = poll_once(&mut fut) {
                        let got: Locked<Val> = got.expect("never deleted");
                        excl.enter(|v| *v += 1);
                        drop(got);
                        return true;
                    }
                }
                drop(fut);
                false
            })
        };
        let waiter = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || {
                let got = block_on(slot.lock()).expect("never deleted");
                excl.enter(|v| *v += 1);
                drop(got);
            })
        };
        excl.enter(|v| *v += 1);
        drop(held);
        let dropped_got_it = dropped.join().unwrap();
        waiter.join().unwrap();
        assert_eq!(excl.enter(|v| *v), 2 + u64::from(dropped_got_it));
        assert_free(&slot);
    });
}

/// A lock future polled once and dropped at any point of a hand-off (before
/// enqueue, queued, granted but not re-polled) loses no wake-up and leaks no
/// lock: the other waiter still gets it, and the lock ends free.
#[test]
fn handoff_waiter_polled_once_then_dropped() {
    drop_after_polls("handoff_waiter_polled_once_then_dropped", 1);
}

/// As above, but the dropped future was polled twice (its second poll runs
/// the register-and-re-check path before it is dropped).
#[test]
fn handoff_waiter_polled_twice_then_dropped() {
    drop_after_polls("handoff_waiter_polled_twice_then_dropped", 2);
}

/// Commit and replace racing delete: each waiter ends with the lock or with
/// `Dead` (never both, never hangs), and nothing is committed after the kill.
#[test]
fn commit_and_replace_racing_delete() {
    check("commit_and_replace_racing_delete", || {
        let slot = Slot::new(val(0, 0), 1);
        let excl = Exclusive::new();
        let committer = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || {
                let mut g = block_on(slot.lock())?.guard();
                excl.enter(|v| *v += 1);
                g.n += 1;
                Some(g.commit().expect("the holder's commit cannot conflict"))
            })
        };
        let replacer = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || match slot.lock_blocking() {
                Ok(locked) => {
                    excl.enter(|v| *v += 1);
                    Some(
                        locked
                            .store(val(100, 2))
                            .expect("the holder's store cannot conflict"),
                    )
                }
                Err(Refused::Dead) => None,
                Err(other) => panic!("an untimed wait refused with {other:?}"),
            })
        };
        let locked = block_on(slot.lock()).expect("only this thread deletes");
        let at_delete = excl.enter(|v| *v);
        let version_at_delete = slot.version();
        locked.delete();
        let c = committer.join().unwrap();
        let r = replacer.join().unwrap();
        assert!(slot.is_dead() && slot.is_locked());
        assert_eq!(slot.try_lock().err(), Some(Refused::Dead));
        assert_eq!(slot.lock_blocking().err(), Some(Refused::Dead));
        assert!(matches!(poll_once(&mut slot.lock()), Poll::Ready(None)));
        // Every waiter that got the lock did so before the kill, and nothing
        // was published after it.
        let winners = u64::from(c.is_some()) + u64::from(r.is_some());
        assert_eq!(at_delete, winners);
        assert_eq!(version_at_delete, 1 + winners);
        assert_eq!(slot.version(), version_at_delete);
        let mut versions: Vec<u64> = [c, r].into_iter().flatten().collect();
        versions.sort_unstable();
        assert_eq!(versions, (2..2 + winners).collect::<Vec<_>>());
    });
}

/// A blocking (thread-parking) waiter and an async (waker) waiter queued on
/// one slot are both served, each seeing the previous holder's writes.
#[test]
fn blocking_and_async_waiters_share_one_slot() {
    check("blocking_and_async_waiters_share_one_slot", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let excl = Exclusive::new();
        let blocking = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || {
                let got = slot.lock_blocking().expect("never deleted");
                excl.enter(|v| *v += 1);
                drop(got);
            })
        };
        let task = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || {
                let got = block_on(slot.lock()).expect("never deleted");
                excl.enter(|v| *v += 1);
                drop(got);
            })
        };
        excl.enter(|v| *v += 1);
        drop(held);
        blocking.join().unwrap();
        task.join().unwrap();
        assert_eq!(excl.enter(|v| *v), 3);
        assert_free(&slot);
    });
}

/// `store_context` vs a guard vs a snapshot: versions strictly increase,
/// the last writer in lock order wins, a guard starts from the latest commit,
/// and a snapshot only ever sees a committed (version, value) pair.
#[test]
fn store_vs_guard_vs_snapshot() {
    check("store_vs_guard_vs_snapshot", || {
        let slot = Slot::new(val(0, 0), 1);
        let store = {
            let slot = slot.clone();
            thread::spawn(move || {
                block_on(slot.lock())
                    .expect("never deleted")
                    .store(val(100, 1))
                    .expect("the holder's store cannot conflict")
            })
        };
        let guard = {
            let slot = slot.clone();
            thread::spawn(move || {
                let mut g = slot.lock_blocking().expect("never deleted").guard();
                g.n += 1;
                g.tag = 2;
                let base = g.version();
                (
                    base,
                    g.commit().expect("the holder's commit cannot conflict"),
                )
            })
        };
        let committed = |v: u64, x: &Val| match x.tag {
            0 => v == 1 && x.n == 0,
            1 => v >= 2 && x.n == 100,
            2 => v >= 2 && (x.n == 1 || x.n == 101),
            _ => false,
        };
        let (v1, a) = slot.load();
        let (v2, b) = slot.load();
        assert!(
            committed(v1, &a) && committed(v2, &b),
            "{v1}:{a:?} {v2}:{b:?}"
        );
        assert!(v2 >= v1);
        let vs = store.join().unwrap();
        let (base, vg) = guard.join().unwrap();
        assert_eq!(vg, base + 1);
        let (v, last) = slot.load();
        assert_eq!(v, 3);
        if vs < vg {
            assert_eq!((vs, base), (2, 2), "the guard must start from the store");
            assert_eq!(last, val(101, 2));
        } else {
            assert_eq!((vg, vs), (2, 3));
            assert_eq!(last, val(100, 1));
        }
        assert_free(&slot);
    });
}

/// The async timeout path: `get_context_timeout` drops the lock future when
/// the timer fires; here it fires right after the first poll.
fn async_timeout_expired(slot: &Slot<Val>) -> Result<Locked<Val>, Refused> {
    match poll_once(&mut slot.lock()) {
        Poll::Ready(Some(got)) => Ok(got),
        Poll::Ready(None) => Err(Refused::Dead),
        Poll::Pending => Err(Refused::TimedOut),
    }
}

/// A `try` refusal, a timed-out blocking wait and a timed-out (dropped) lock
/// future racing a release never keep the lock they were refused; with
/// hand-off they never take the lock meant for the waiter queued before
/// them, and without it (bounded fairness before the bound) they may barge,
/// but the queued waiter still gets the lock, and a woken waiter that is
/// dropped passes its wake-up on.
#[test]
fn try_and_timeout_refusals_racing_release() {
    check("try_and_timeout_refusals_racing_release", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let excl = Exclusive::new();
        // Queue the first waiter before anybody races the release.
        let mut queued = slot.lock();
        assert!(poll_once(&mut queued).is_pending());
        let first = {
            let excl = excl.clone();
            thread::spawn(move || {
                let got = block_on(queued).expect("never deleted");
                excl.enter(|v| {
                    if handoff() {
                        assert_eq!(*v, 1, "the queued waiter was overtaken");
                    }
                    *v += 1;
                });
                drop(got);
            })
        };
        let racer = {
            let (slot, excl) = (slot.clone(), excl.clone());
            thread::spawn(move || {
                let mut wins = 0;
                type Attempt = fn(&Slot<Val>) -> Result<Locked<Val>, Refused>;
                let attempts: [Attempt; 3] = [
                    Slot::try_lock,
                    Slot::lock_timeout_expired,
                    async_timeout_expired,
                ];
                for attempt in attempts {
                    match attempt(&slot) {
                        Ok(got) => {
                            excl.enter(|v| {
                                if handoff() {
                                    assert!(*v >= 2, "barged past a queued waiter");
                                }
                                *v += 1;
                            });
                            drop(got);
                            wins += 1;
                        }
                        Err(Refused::Held | Refused::TimedOut) => {}
                        Err(Refused::Dead) => panic!("never deleted"),
                    }
                }
                wins
            })
        };
        excl.enter(|v| *v = 1);
        drop(held);
        first.join().unwrap();
        let wins = racer.join().unwrap();
        assert_eq!(excl.enter(|v| *v), 2 + wins);
        assert_free(&slot);
    });
}

/// Kill racing a queued waiter's cancellation (a dropped future, then a
/// timed-out blocking wait): the waiter ends `Dead` or timed out, never with
/// the lock, and the dead lock is never released.
#[test]
fn kill_racing_cancel() {
    check("kill_racing_cancel", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let waiter = {
            let slot = slot.clone();
            thread::spawn(move || {
                let mut fut = slot.lock();
                match poll_once(&mut fut) {
                    Poll::Ready(got) => assert!(got.is_none(), "locked a slot being deleted"),
                    Poll::Pending => {}
                }
                drop(fut);
                slot.lock_timeout_expired().err()
            })
        };
        held.delete();
        let refused = waiter.join().unwrap();
        assert!(
            matches!(refused, Some(Refused::Dead | Refused::TimedOut)),
            "a waiter racing the kill ended with {refused:?} (None: with the lock)"
        );
        assert!(slot.is_dead() && slot.is_locked());
        assert_eq!(slot.try_lock().err(), Some(Refused::Dead));
    });
}

/// A waker that records that it was woken (std types: it only reports to the
/// model, which reads it after joining the waking thread).
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, StdOrdering::Relaxed);
    }
}

/// `RawLock::kill` wakes its waiters in batches of 16, dropping the queue
/// mutex between batches. With 18 waiters queued, two of them cancelling
/// (the first, then the last) while the kill runs — also in the gap between
/// its batches — every waiter left is woken and ends `Dead`, and the dead
/// lock stays held.
#[test]
fn kill_wakes_waiters_beyond_one_batch() {
    check("kill_wakes_waiters_beyond_one_batch", || {
        // One batch of `RawLock::kill` plus two.
        const WAITERS: usize = 18;
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let mut queued: Vec<(Lock<Val>, std::sync::Arc<Flag>)> = (0..WAITERS)
            .map(|_| {
                let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
                let waker = Waker::from(flag.clone());
                let mut fut = slot.lock();
                let polled = Pin::new(&mut fut).poll(&mut TaskContext::from_waker(&waker));
                assert!(polled.is_pending());
                (fut, flag)
            })
            .collect();
        let (first, last) = (queued.remove(0), queued.pop());
        let canceller = thread::spawn(move || {
            drop(first);
            drop(last);
        });
        held.delete();
        canceller.join().unwrap();
        for (mut fut, flag) in queued {
            assert!(
                flag.0.load(StdOrdering::Relaxed),
                "a waiter of a killed slot was never woken"
            );
            assert!(
                matches!(poll_once(&mut fut), Poll::Ready(None)),
                "a waiter of a killed slot did not end dead"
            );
        }
        assert!(slot.is_dead() && slot.is_locked());
        assert_eq!(slot.try_lock().err(), Some(Refused::Dead));
    });
}

/// Waiters queued in order A, B are served A then B (FIFO hand-off), each
/// woken although it re-polls with a new waker.
#[test]
fn fifo_handoff_order() {
    check("fifo_handoff_order", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let excl = Exclusive::new();
        let waiters: Vec<_> = (1..=2)
            .map(|turn| {
                let mut fut = slot.lock();
                assert!(poll_once(&mut fut).is_pending());
                let excl = excl.clone();
                (fut, excl, turn)
            })
            .collect();
        let handles: Vec<_> = waiters
            .into_iter()
            .map(|(fut, excl, turn)| {
                thread::spawn(move || {
                    let got = block_on(fut).expect("never deleted");
                    excl.enter(|v| {
                        assert_eq!(*v, turn, "served out of arrival order");
                        *v += 1;
                    });
                    drop(got);
                })
            })
            .collect();
        excl.enter(|v| *v = 1);
        drop(held);
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(excl.enter(|v| *v), 3);
        assert_free(&slot);
    });
}

/// A release that hands the lock to a queued waiter marks it `HANDED` for
/// as long as that waiter holds it (a newcomer then queues at once instead
/// of spinning for a holder that may not be running), and the release that
/// frees it clears the mark. A newcomer's `try_lock` races the hand-over
/// and the holder's release: if it wins, the lock it holds is not marked.
#[test]
fn the_handed_mark_covers_exactly_a_hand_over() {
    check("the_handed_mark_covers_exactly_a_hand_over", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let mut waiter = slot.lock();
        assert!(poll_once(&mut waiter).is_pending());
        let newcomer = thread::spawn({
            let slot = slot.clone();
            move || {
                if let Ok(got) = slot.try_lock() {
                    assert!(!slot.is_handed(), "a newcomer holds a lock marked HANDED");
                    drop(got);
                }
            }
        });
        drop(held);
        let got = block_on(waiter).expect("never deleted");
        // Only a hand-over marks it (in the wake policy the waiter took a
        // freed lock).
        assert_eq!(
            slot.is_handed(),
            handoff(),
            "HANDED does not match how the lock came"
        );
        drop(got);
        newcomer.join().unwrap();
        assert_free(&slot);
    });
}

/// Three queued waiters A, B, C; B is dropped (unlinked from the middle of
/// the intrusive queue) while releases serve A and C: A and C each get the
/// lock once, A before C, and the lock ends free. The queue's links live in
/// loom `UnsafeCell`s, so loom also checks that every access to them is
/// ordered (under the queue mutex, or by the waiter's state).
#[test]
fn middle_waiter_cancels_while_releases_run() {
    check("middle_waiter_cancels_while_releases_run", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let excl = Exclusive::new();
        let mut queued: Vec<Lock<Val>> = (0..3)
            .map(|_| {
                let mut fut = slot.lock();
                assert!(poll_once(&mut fut).is_pending());
                fut
            })
            .collect();
        let (c, b, a) = (queued.pop(), queued.pop(), queued.pop());
        let canceller = thread::spawn(move || drop(b));
        let served = {
            let excl = excl.clone();
            thread::spawn(move || {
                for (fut, turn) in [(a, 1), (c, 2)] {
                    let got = block_on(fut.expect("queued")).expect("never deleted");
                    excl.enter(|v| {
                        assert_eq!(*v, turn, "served out of arrival order");
                        *v += 1;
                    });
                    drop(got);
                }
            })
        };
        excl.enter(|v| *v = 1);
        drop(held);
        canceller.join().unwrap();
        served.join().unwrap();
        assert_eq!(excl.enter(|v| *v), 3);
        assert_free(&slot);
    });
}

/// A snapshot held across two commits keeps showing its version: the
/// superseded allocation is recycled into the next draft only when no
/// reader holds it.
#[test]
fn held_snapshot_is_never_recycled() {
    check("held_snapshot_is_never_recycled", || {
        let slot = Slot::new(val(0, 0), 1);
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || {
                for round in 1..=2 {
                    let mut g = block_on(slot.lock()).expect("never deleted").guard();
                    g.n += 1;
                    g.tag = round;
                    g.commit().expect("the holder's commit cannot conflict");
                }
            })
        };
        let snap = slot.snapshot();
        let seen = (snap.version(), snap.n, snap.tag);
        assert_eq!(seen.1, seen.0 - 1, "snapshot of an uncommitted value");
        writer.join().unwrap();
        assert_eq!(
            (snap.version(), snap.n, snap.tag),
            seen,
            "a held snapshot changed"
        );
        assert_eq!(slot.load(), (3, val(2, 2)));
        assert_free(&slot);
    });
}

/// The publication cell's recycling window: a writer commits three times
/// (so each of the slot's two allocations is superseded, recycled in place
/// and republished) while a reader takes two snapshots. Every snapshot must
/// show a committed `(version, value)` pair (the race check on the version's
/// value fails the model if a reader touches an allocation being
/// rewritten), and the second snapshot must never show an older version than
/// the first — even when the first one's allocation was recycled and
/// republished at the same address between the reader's pointer load and
/// its reference-count increment.
#[test]
fn snapshots_racing_recycling_commits() {
    check("snapshots_racing_recycling_commits", || {
        let slot = Slot::new(val(0, 0), 1);
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || {
                for round in 1..=3 {
                    let mut g = slot.try_lock().expect("the only locker").guard();
                    g.n += 1;
                    g.tag = round;
                    g.commit().expect("the holder's commit cannot conflict");
                }
            })
        };
        let a = slot.snapshot();
        let b = slot.snapshot();
        for s in [&a, &b] {
            assert_eq!(
                (s.n, s.tag),
                (s.version() - 1, s.version() - 1),
                "torn snapshot"
            );
        }
        assert!(
            b.version() >= a.version(),
            "a later snapshot went back a version"
        );
        drop((a, b));
        writer.join().unwrap();
        assert_eq!(slot.load(), (4, val(3, 3)));
        assert_free(&slot);
    });
}

/// Bounded fairness keeps arrival order among waiters: a woken waiter that
/// loses the free lock to a newcomer goes back to the *front* of the queue,
/// so the next release serves it before the waiter that queued after it.
/// With hand-off (past the bound) the newcomer is refused outright. Polled
/// by hand on one thread, so the interleaving is the one written here; a
/// second thread snapshots meanwhile.
#[test]
fn woken_waiter_keeps_its_place() {
    check("woken_waiter_keeps_its_place", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let reader = {
            let slot = slot.clone();
            thread::spawn(move || slot.load().0)
        };
        let mut a = slot.lock();
        let mut b = slot.lock();
        assert!(poll_once(&mut a).is_pending());
        assert!(poll_once(&mut b).is_pending());
        drop(held);
        let a_got = if handoff() {
            // Handed to `a`: the newcomer is refused.
            assert!(matches!(slot.try_lock(), Err(Refused::Held)));
            match poll_once(&mut a) {
                Poll::Ready(Some(got)) => got,
                _ => panic!("the lock was handed to the oldest waiter"),
            }
        } else {
            // Woken `a` competes; the newcomer takes the free lock first.
            let newcomer = slot.try_lock().expect("a free lock can be taken");
            assert!(poll_once(&mut a).is_pending(), "two holders");
            drop(newcomer);
            // `a` went back to the front: `b` is still queued behind it.
            assert!(
                poll_once(&mut b).is_pending(),
                "overtaken by a later waiter"
            );
            match poll_once(&mut a) {
                Poll::Ready(Some(got)) => got,
                _ => panic!("the woken waiter lost its place"),
            }
        };
        assert!(poll_once(&mut b).is_pending());
        drop(a_got);
        match poll_once(&mut b) {
            Poll::Ready(Some(got)) => drop(got),
            _ => panic!("the last waiter was not served"),
        }
        assert_eq!(reader.join().unwrap(), 1);
        assert_free(&slot);
    });
}

/// Two woken waiters that both lose the free lock to newcomers go back in
/// arrival order, whatever order they lose in: `a` and `b` are woken by two
/// releases before either runs, `a` loses first and `b` second, and the
/// next release serves `a` (the oldest), not the last loser. A third,
/// never woken waiter `c` stays behind both. With hand-off the three are
/// served in order and newcomers are refused.
#[test]
fn woken_waiters_requeue_in_arrival_order() {
    check("woken_waiters_requeue_in_arrival_order", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let mut a = slot.lock();
        let mut b = slot.lock();
        let mut c = slot.lock();
        for w in [&mut a, &mut b, &mut c] {
            assert!(poll_once(w).is_pending());
        }
        if handoff() {
            // A newcomer racing the hand-overs is refused until the end.
            let racer = {
                let slot = slot.clone();
                thread::spawn(move || {
                    if let Ok(got) = slot.try_lock() {
                        drop(got);
                    }
                })
            };
            drop(held);
            for w in [&mut a, &mut b, &mut c] {
                match poll_once(w) {
                    Poll::Ready(Some(got)) => drop(got),
                    _ => panic!("served out of arrival order"),
                }
            }
            racer.join().unwrap();
        } else {
            // The release wakes `a`; a newcomer takes the lock and its
            // release wakes `b`; a second newcomer holds it while `a`, then
            // `b` run and lose.
            drop(held);
            let n1 = slot.try_lock().expect("a free lock can be taken");
            drop(n1);
            let n2 = slot.try_lock().expect("a free lock can be taken");
            assert!(poll_once(&mut a).is_pending(), "two holders");
            assert!(poll_once(&mut b).is_pending(), "two holders");
            drop(n2);
            // That release woke the head: it must be `a`.
            assert!(
                poll_once(&mut b).is_pending(),
                "the last loser overtook an older waiter"
            );
            assert!(poll_once(&mut c).is_pending(), "overtaken by the newest");
            for w in [&mut a, &mut b, &mut c] {
                match poll_once(w) {
                    Poll::Ready(Some(got)) => drop(got),
                    _ => panic!("served out of arrival order"),
                }
            }
        }
        assert_free(&slot);
    });
}

/// A watcher waiting for each newer version while two writers (one
/// contending, so one release takes the queue path) commit: it is woken
/// every time (a lost wake-up is a loom deadlock), sees versions only
/// increase, and ends at the last one.
#[test]
fn watcher_never_misses_the_last_commit() {
    check("watcher_never_misses_the_last_commit", || {
        let slot = Slot::new(val(0, 0), 1);
        let watcher = {
            let slot = slot.clone();
            thread::spawn(move || {
                let mut w = slot.watch();
                let mut last = 1;
                while last < 3 {
                    let v = block_on(w.changed(last)).expect("never deleted");
                    assert!(v > last, "the watch went from {last} to {v}");
                    last = v;
                }
            })
        };
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || {
                let locked = block_on(slot.lock()).expect("never deleted");
                locked.store(val(1, 1)).expect("store");
            })
        };
        let locked = slot.lock_blocking().expect("never deleted");
        locked.store(val(2, 2)).expect("store");
        writer.join().unwrap();
        watcher.join().unwrap();
        assert_free(&slot);
    });
}

/// Two watchers and one commit, one of them cancelling its wait while the
/// commit runs: the other is woken (it never depends on the first).
#[test]
fn a_release_wakes_every_watcher_while_one_cancels() {
    check("a_release_wakes_every_watcher_while_one_cancels", || {
        let slot = Slot::new(val(0, 0), 1);
        // Linked before the commit, then cancelled while the commit runs.
        let mut linked = slot.watch();
        let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let polled = linked.poll(&mut TaskContext::from_waker(&waker), 1);
        assert!(polled.is_pending());
        let other = {
            let slot = slot.clone();
            thread::spawn(move || {
                let mut w = slot.watch();
                block_on(w.changed(1)).expect("never deleted")
            })
        };
        let canceller = thread::spawn(move || linked.cancel());
        let locked = slot.lock_blocking().expect("never deleted");
        locked.store(val(1, 1)).expect("store");
        assert_eq!(other.join().unwrap(), 2);
        canceller.join().unwrap();
        assert_free(&slot);
    });
}

/// A watch polled once (Pending) and then kept but never polled again (a
/// `Stream` whose `next()` lost a `select!`): another watcher still gets
/// the one commit. (A first design, where one woken watcher woke the
/// others when it ran, deadlocked here.)
#[test]
fn an_idle_watch_does_not_starve_another() {
    check("an_idle_watch_does_not_starve_another", || {
        let slot = Slot::new(val(0, 0), 1);
        let mut idle = slot.watch();
        let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(idle
            .poll(&mut TaskContext::from_waker(&waker), 1)
            .is_pending());
        let other = {
            let slot = slot.clone();
            thread::spawn(move || {
                let mut w = slot.watch();
                block_on(w.changed(1)).expect("never deleted")
            })
        };
        slot.lock_blocking()
            .expect("never deleted")
            .store(val(1, 1))
            .expect("store");
        assert_eq!(other.join().unwrap(), 2);
        assert!(
            flag.0.load(StdOrdering::Relaxed),
            "the idle watch was not woken"
        );
        drop(idle);
    });
}

/// A watch re-polled with a new waker (the waker refresh of a linked
/// watcher) while a commit runs, beside a second watcher.
#[test]
fn a_repoll_with_a_new_waker_races_a_commit() {
    check("a_repoll_with_a_new_waker_races_a_commit", || {
        let slot = Slot::new(val(0, 0), 1);
        let mut first = slot.watch();
        let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(first
            .poll(&mut TaskContext::from_waker(&waker), 1)
            .is_pending());
        let mut second = slot.watch();
        assert!(second
            .poll(&mut TaskContext::from_waker(&waker), 1)
            .is_pending());
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || {
                slot.lock_blocking()
                    .expect("never deleted")
                    .store(val(1, 1))
                    .expect("store");
            })
        };
        let other = thread::spawn(move || {
            block_on(std::future::poll_fn(|cx| second.poll(cx, 1))).expect("never deleted")
        });
        // A re-poll of the same watch with another waker (block_on's).
        let got = block_on(std::future::poll_fn(|cx| first.poll(cx, 1))).expect("never deleted");
        assert_eq!(got, 2);
        assert_eq!(other.join().unwrap(), 2);
        writer.join().unwrap();
    });
}

/// The last commit is released through the queue path (a waiter is
/// queued; with hand-off it is granted the lock) and the waiter then keeps
/// the lock: no later release can make up for a wake-up lost there.
#[test]
fn the_last_commit_released_through_the_queue_wakes_the_watcher() {
    check(
        "the_last_commit_released_through_the_queue_wakes_the_watcher",
        || {
            let slot = Slot::new(val(0, 0), 1);
            let held = slot.lock_blocking().expect("first");
            let mut w = slot.watch();
            let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
            let waker = Waker::from(flag.clone());
            assert!(w.poll(&mut TaskContext::from_waker(&waker), 1).is_pending());
            let waiter = {
                let slot = slot.clone();
                thread::spawn(move || slot.lock_blocking().expect("never deleted"))
            };
            let watcher = thread::spawn(move || {
                block_on(std::future::poll_fn(|cx| w.poll(cx, 1))).expect("never deleted")
            });
            held.store(val(1, 1)).expect("store");
            assert_eq!(
                watcher.join().unwrap(),
                2,
                "the watcher must see the last commit while the waiter holds the lock"
            );
            drop(waiter.join().unwrap());
        },
    );
}

/// The store is dropped while a guard releases a watched slot: the store's
/// `orphan()` and the release agree on who owns the reference the store
/// leaves behind, and the slot ends dead (its watchers end).
#[test]
fn store_drop_racing_a_watched_release() {
    check("store_drop_racing_a_watched_release", || {
        let (slot, held) = Slot::new_locked(val(0, 0), 1);
        let mut w = slot.watch();
        let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(w.poll(&mut TaskContext::from_waker(&waker), 1).is_pending());
        let releaser = thread::spawn(move || held.unlock_owned());
        let orphaned = slot.store_dropped();
        let handed = releaser.join().unwrap();
        assert_eq!(
            orphaned, handed,
            "orphan() = {orphaned} but the release took the reference: {handed}"
        );
        assert!(
            slot.is_dead(),
            "the store is gone but the slot is not dead (its watchers never end)"
        );
        assert!(
            flag.0.load(StdOrdering::Relaxed),
            "the watcher was not woken"
        );
        drop(w);
    });
}

/// A watcher racing a delete ends with `NotFound` (never waits forever on
/// a dead slot), whether it links before or after the kill.
#[test]
fn watch_racing_delete_ends_not_found() {
    check("watch_racing_delete_ends_not_found", || {
        let slot = Slot::new(val(0, 0), 1);
        let watcher = {
            let slot = slot.clone();
            thread::spawn(move || {
                let mut w = slot.watch();
                block_on(w.changed(1))
            })
        };
        slot.lock_blocking().expect("first").delete();
        let got = watcher.join().unwrap();
        assert!(got.is_err(), "a watch of a deleted slot returned {got:?}");
    });
}

/// The last queued waiter cancels and the store is dropped (in that order,
/// as a store cannot be dropped while a waiter borrows it) while the holder
/// releases: whichever way they interleave, the store's `orphan()` and the
/// release agree on who owns the reference the store leaves behind, and a
/// slot the store gave up ends dead.
#[test]
fn store_drop_after_the_last_waiter_cancels_racing_a_release() {
    check(
        "store_drop_after_the_last_waiter_cancels_racing_a_release",
        || {
            let (slot, held) = Slot::new_locked(val(0, 0), 1);
            let dropper = {
                let slot = slot.clone();
                thread::spawn(move || {
                    let mut fut = slot.lock();
                    let queued = poll_once(&mut fut).is_pending();
                    drop(fut);
                    (queued, slot.store_dropped())
                })
            };
            let handed = held.unlock_owned();
            let (_queued, orphaned) = dropper.join().unwrap();
            assert_eq!(
                orphaned, handed,
                "orphan() = {orphaned} but the release took the reference: {handed}"
            );
            assert!(slot.is_dead(), "the store is gone but the slot is not dead");
        },
    );
}
