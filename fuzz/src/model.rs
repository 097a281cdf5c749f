//! The op-sequence model: a sequence of [`Op`]s is applied to
//! [`InMemoryContextStorage`] and to a plain sequential model (a `HashMap`
//! of values with explicit lock owners and FIFO wait queues), and every
//! result must agree.
//!
//! Shared by the `ops_vs_model` fuzz target (which builds ops with
//! `arbitrary`) and `tests/model.rs` (which builds them with `proptest`);
//! this file depends on nothing but `ctxstore`, `serde` and `std`.
//!
//! Several simulated tasks each hold at most one thing: a guard, or a
//! pending lock future (`get`, `store`, `update`, `delete`). The futures are
//! polled by hand with a no-op waker, so guards and waiters interleave
//! deterministically: a waiter that is handed the lock completes at its next
//! [`Op::Poll`], and the model knows exactly which one that is.
//!
//! The semantics modelled (from `DESIGN.md` §2 and `src/memory/`):
//! * waiters are strictly FIFO; a release hands the lock to the oldest
//!   waiter, which owns it from then on (even before it is polled again);
//! * a dropped waiting future leaves the queue; one that had been handed the
//!   lock passes it on;
//! * `delete` waits for the holder like any writer, then unlinks the context
//!   and wakes every queued waiter, which re-resolves the key at its next
//!   poll (`NotFound`, or queueing on a re-created context; a `store`
//!   creates it);
//! * `store` on an existing key waits for the lock; on a missing key it
//!   creates the context at once;
//! * versions strictly increase per key and never repeat, also across
//!   delete and re-create; a guard reports the version it started from;
//! * `try` gives `WouldBlock` if held; a zero timeout gives `Timeout` if held
//!   and never waits; `Duration::MAX` waits like `get`;
//! * snapshots, `contains` and `ids` never wait, and a snapshot keeps showing
//!   the version it was taken at;
//! * conditional writes (`store_context_if`, `delete_context_if`,
//!   `update_context_optimistic` and their `_blocking` forms; inherent
//!   only) are writers: they wait for a held key like `store`, then compare
//!   the committed version with the expected one (`Conflict { expected,
//!   found }` on a mismatch, releasing the lock to the next waiter and
//!   changing nothing). `store_context_if` with 0 creates an absent key at
//!   once; with anything else an absent key is `NotFound`, as for the
//!   other two. The optimistic update reads the committed version when it
//!   starts (even while a guard holds the key), runs its closure on a copy,
//!   and on a conflict reads again, runs the closure again and goes back
//!   to the lock (behind the queue if the release handed the lock on); the
//!   model predicts how many times the closure runs.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::task::{Context as TaskCx, Poll, Waker};
use std::time::Duration;

use ctxstore::{
    Context, ContextError, ContextGuard, ContextStorage, ContextStorageExt, ContextType,
    InMemoryContextStorage, RawGuard, Snapshot, Uuid, Wait,
};
use serde::{Deserialize, Serialize};

/// Number of simulated tasks.
pub const TASKS: u8 = 4;
/// Number of distinct ids (id 0 is `Uuid::nil()`).
pub const IDS: u8 = 3;

/// The first context type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alpha {
    /// A counter the ops scramble.
    pub n: u64,
}

/// The second context type. Its `kind()` collides with `Alpha`'s on purpose:
/// in memory, types are told apart by `TypeId`, never by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Beta {
    /// A string the ops append to.
    pub s: String,
}

/// The shared kind name of both model types.
pub const SHARED_KIND: &str = "model.shared-kind";

impl Context for Alpha {
    fn kind() -> &'static str {
        SHARED_KIND
    }
}

impl Context for Beta {
    fn kind() -> &'static str {
        SHARED_KIND
    }
}

/// Which context type an op addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ty {
    /// [`Alpha`].
    A,
    /// [`Beta`].
    B,
}

/// A key: a type and an id index (`0..IDS`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The type.
    pub ty: Ty,
    /// The id index.
    pub id: u8,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}{}", self.ty, self.id)
    }
}

impl Key {
    /// A key, with `id` folded into `0..IDS`.
    pub fn new(ty: Ty, id: u8) -> Self {
        Key { ty, id: id % IDS }
    }

    fn uuid(self) -> Uuid {
        uuid_of(self.id)
    }
}

fn uuid_of(id: u8) -> Uuid {
    Uuid::from_u128(u128::from(id))
}

/// The API path an op goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `InMemoryContextStorage`'s inherent (monomorphized) methods.
    Inherent,
    /// `ContextStorageExt` on `&dyn ContextStorage`.
    Dyn,
    /// The type-erased `ContextStorage` methods (`store_raw`, `lock_raw`...).
    Raw,
}

/// The version a conditional write expects, chosen from what the model
/// knows when the op starts. Versions are never predicted, only learnt from
/// the engine (and checked to increase), so these name versions relative
/// to the key's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// 0: "only if no context exists" (create-once).
    Zero,
    /// The key's newest version (if it is absent: the last one it had).
    Current,
    /// The version before that (0 if none): a stale read, also one from
    /// before a delete and re-create.
    Stale,
    /// One above the newest: matches only if exactly one write lands (or a
    /// re-create reuses the next number) while the op waits.
    Next,
}

/// An op run from a plain thread with a `_blocking` method. Ops that would
/// wait (the model says the lock is held) are skipped, so nothing parks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockingOp {
    /// `store_context_blocking`.
    Store,
    /// `get_context_blocking`.
    Get,
    /// `update_context_blocking`.
    Update,
    /// `delete_context_blocking`.
    Delete,
    /// `try_get_context_blocking`.
    Try,
    /// `get_context_timeout_blocking(id, Duration::ZERO)`.
    Timeout0,
    /// `store_context_if_blocking` (the op's `val`).
    StoreIf(Expected),
    /// `delete_context_if_blocking`.
    DeleteIf(Expected),
    /// `update_context_optimistic_blocking` (scramble with the op's `val`).
    Optimistic,
}

/// One step of a sequence. `task` is folded into `0..TASKS`; an op on a task
/// in the wrong state (e.g. `Commit` on a task holding nothing) is a no-op.
#[derive(Clone, Debug)]
pub enum Op {
    /// Start `store_context` (completes at once unless the key is held).
    Store {
        task: u8,
        key: Key,
        val: u8,
        via: Via,
    },
    /// Start `get_context`.
    Get { task: u8, key: Key, via: Via },
    /// Start `get_context_timeout(id, Duration::MAX)` (same as `get`).
    GetMax { task: u8, key: Key, via: Via },
    /// Start `update_context` (scramble with `val`, return the old value).
    Update {
        task: u8,
        key: Key,
        val: u8,
        via: Via,
    },
    /// Start `delete_context`.
    Delete { task: u8, key: Key, via: Via },
    /// `try_get_context`.
    Try { task: u8, key: Key, via: Via },
    /// `get_context_timeout(id, Duration::ZERO)`.
    Timeout0 { task: u8, key: Key, via: Via },
    /// Start `store_context_if` (inherent only, for now).
    StoreIf {
        task: u8,
        key: Key,
        val: u8,
        expected: Expected,
    },
    /// Start `delete_context_if` (inherent only, for now).
    DeleteIf {
        task: u8,
        key: Key,
        expected: Expected,
    },
    /// Start `update_context_optimistic` (scramble with `val`, return the
    /// old value; inherent only, for now).
    Optimistic { task: u8, key: Key, val: u8 },
    /// A `_blocking` op that will not wait.
    Blocking {
        task: u8,
        key: Key,
        op: BlockingOp,
        val: u8,
    },
    /// Poll the task's pending future once.
    Poll { task: u8 },
    /// Drop the task's pending future or guard (cancellation / drop).
    Drop { task: u8 },
    /// Mutate the held guard's value.
    Mutate { task: u8, val: u8 },
    /// Read the held guard's value, version and id.
    Read { task: u8 },
    /// Commit the held guard (`commit().await` polled once, or
    /// `commit_blocking`).
    Commit { task: u8, blocking: bool },
    /// Roll the held guard back.
    Rollback { task: u8 },
    /// Take a snapshot (and maybe keep it, to re-check later).
    Snapshot { key: Key, via: Via, keep: bool },
    /// `contains_context`.
    Contains { key: Key, via: Via },
    /// `context_ids`.
    Ids { ty: Ty, via: Via },
}

// ------------------------------------------------------------------ values

/// A value of either type, as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    /// An `Alpha`.
    A(u64),
    /// A `Beta`.
    B(String),
}

fn scramble(v: &Val, by: u8) -> Val {
    match v {
        Val::A(n) => Val::A(n.wrapping_mul(31).wrapping_add(u64::from(by))),
        Val::B(s) => {
            let mut s = if s.len() >= 12 {
                String::new()
            } else {
                s.clone()
            };
            s.push(char::from(b'a' + by % 26));
            Val::B(s)
        }
    }
}

fn fresh(ty: Ty, val: u8) -> Val {
    match ty {
        Ty::A => Val::A(u64::from(val)),
        Ty::B => Val::B(format!("v{val}")),
    }
}

/// Ties a context type to the model.
trait ModelType: Context + fmt::Debug {
    const TY: Ty;
    fn to_val(&self) -> Val;
    fn from_val(v: &Val) -> Self;
    fn wrap(g: ContextGuard<Self>) -> AnyGuard;
    fn apply(&mut self, by: u8) {
        *self = Self::from_val(&scramble(&self.to_val(), by));
    }
}

impl ModelType for Alpha {
    const TY: Ty = Ty::A;
    fn to_val(&self) -> Val {
        Val::A(self.n)
    }
    fn from_val(v: &Val) -> Self {
        match v {
            Val::A(n) => Alpha { n: *n },
            Val::B(_) => panic!("model bug: Beta value for Alpha"),
        }
    }
    fn wrap(g: ContextGuard<Self>) -> AnyGuard {
        AnyGuard::A(g)
    }
    fn apply(&mut self, by: u8) {
        // Scramble in place, through the guard's `DerefMut`.
        self.n = self.n.wrapping_mul(31).wrapping_add(u64::from(by));
    }
}

impl ModelType for Beta {
    const TY: Ty = Ty::B;
    fn to_val(&self) -> Val {
        Val::B(self.s.clone())
    }
    fn from_val(v: &Val) -> Self {
        match v {
            Val::B(s) => Beta { s: s.clone() },
            Val::A(_) => panic!("model bug: Alpha value for Beta"),
        }
    }
    fn wrap(g: ContextGuard<Self>) -> AnyGuard {
        AnyGuard::B(g)
    }
}

/// A guard of either type.
enum AnyGuard {
    A(ContextGuard<Alpha>),
    B(ContextGuard<Beta>),
}

impl AnyGuard {
    fn read(&self) -> (Val, u64, Uuid) {
        match self {
            AnyGuard::A(g) => (g.to_val(), g.version(), g.id()),
            AnyGuard::B(g) => (g.to_val(), g.version(), g.id()),
        }
    }

    fn mutate(&mut self, by: u8) {
        match self {
            AnyGuard::A(g) => ModelType::apply(&mut **g, by),
            AnyGuard::B(g) => ModelType::apply(&mut **g, by),
        }
    }

    fn commit(self, blocking: bool) -> Result<u64, ContextError> {
        fn once<T: Context>(g: ContextGuard<T>, blocking: bool) -> Result<u64, ContextError> {
            if blocking {
                return g.commit_blocking();
            }
            let mut fut = std::pin::pin!(g.commit());
            match fut.as_mut().poll(&mut TaskCx::from_waker(Waker::noop())) {
                Poll::Ready(r) => r,
                Poll::Pending => panic!("an in-memory commit suspended"),
            }
        }
        match self {
            AnyGuard::A(g) => once(g, blocking),
            AnyGuard::B(g) => once(g, blocking),
        }
    }

    fn rollback(self) {
        match self {
            AnyGuard::A(g) => g.rollback(),
            AnyGuard::B(g) => g.rollback(),
        }
    }
}

/// What an engine call gave back, type-erased.
enum Outcome {
    Guard(AnyGuard),
    Stored(u64),
    Updated(Val),
    /// An optimistic update: the old value and how often the closure ran.
    Optimistic(Val, u32),
    Deleted,
    Err(ContextError),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Guard(g) => {
                let (v, ver, _) = g.read();
                write!(f, "Guard({v:?} @ {ver})")
            }
            Outcome::Stored(v) => write!(f, "Stored(@ {v})"),
            Outcome::Updated(old) => write!(f, "Updated(old {old:?})"),
            Outcome::Optimistic(old, runs) => {
                write!(f, "Optimistic(old {old:?}, closure ran {runs}×)")
            }
            Outcome::Deleted => f.write_str("Deleted"),
            Outcome::Err(e) => write!(f, "Err({e})"),
        }
    }
}

fn outcome<R>(r: Result<R, ContextError>, ok: impl FnOnce(R) -> Outcome) -> Outcome {
    match r {
        Ok(r) => ok(r),
        Err(e) => Outcome::Err(e),
    }
}

type Fut<'s> = Pin<Box<dyn Future<Output = Outcome> + 's>>;

/// The engine's stores: the same store, typed and as `dyn`.
#[derive(Clone, Copy)]
struct Stores<'s> {
    mem: &'s InMemoryContextStorage,
    dyn_: &'s dyn ContextStorage,
}

fn downcast_guard<T: ModelType>(raw: RawGuard) -> Outcome {
    match raw {
        RawGuard::Local(b) => match b.downcast::<ContextGuard<T>>() {
            Ok(g) => Outcome::Guard(T::wrap(*g)),
            Err(_) => panic!("lock_raw gave a guard of another type"),
        },
        RawGuard::Remote { .. } => panic!("the in-memory engine gave a remote guard"),
    }
}

/// The lock-taking and writing ops, as futures.
#[derive(Clone, Debug, PartialEq, Eq)]
enum WaitOp {
    Get,
    GetMax,
    Store(u8),
    Update(u8),
    Delete,
    StoreIf {
        val: u8,
        expected: u64,
    },
    DeleteIf {
        expected: u64,
    },
    /// `seen`: the version the current attempt read (the model's state;
    /// the engine future only uses `by`); `runs`: how often the closure has
    /// run, this attempt included.
    Optimistic {
        by: u8,
        seen: u64,
        runs: u32,
    },
}

fn start<'s, T: ModelType>(s: Stores<'s>, id: Uuid, op: &WaitOp, via: Via) -> Fut<'s> {
    let ty = ContextType::of::<T>();
    match (op.clone(), via) {
        (WaitOp::Get, Via::Inherent) => Box::pin(async move {
            outcome(s.mem.get_context::<T>(id).await, |g| {
                Outcome::Guard(T::wrap(g))
            })
        }),
        (WaitOp::Get, Via::Dyn) => Box::pin(async move {
            outcome(s.dyn_.get_context::<T>(id).await, |g| {
                Outcome::Guard(T::wrap(g))
            })
        }),
        (WaitOp::Get, Via::Raw) => Box::pin(async move {
            outcome(s.dyn_.lock_raw(ty, id, Wait::Forever).await, |g| {
                downcast_guard::<T>(g)
            })
        }),
        (WaitOp::GetMax, Via::Inherent) => Box::pin(async move {
            outcome(
                s.mem.get_context_timeout::<T>(id, Duration::MAX).await,
                |g| Outcome::Guard(T::wrap(g)),
            )
        }),
        (WaitOp::GetMax, Via::Dyn) => Box::pin(async move {
            outcome(
                s.dyn_.get_context_timeout::<T>(id, Duration::MAX).await,
                |g| Outcome::Guard(T::wrap(g)),
            )
        }),
        (WaitOp::GetMax, Via::Raw) => Box::pin(async move {
            let wait = Wait::timeout(Duration::MAX);
            outcome(s.dyn_.lock_raw(ty, id, wait).await, |g| {
                downcast_guard::<T>(g)
            })
        }),
        (WaitOp::Store(v), Via::Inherent) => Box::pin(async move {
            let value = T::from_val(&fresh(T::TY, v));
            outcome(s.mem.store_context(id, value).await, Outcome::Stored)
        }),
        (WaitOp::Store(v), Via::Dyn) => Box::pin(async move {
            let value = T::from_val(&fresh(T::TY, v));
            outcome(s.dyn_.store_context(id, value).await, Outcome::Stored)
        }),
        (WaitOp::Store(v), Via::Raw) => Box::pin(async move {
            let value = Box::new(T::from_val(&fresh(T::TY, v)));
            outcome(s.dyn_.store_raw(ty, id, value).await, Outcome::Stored)
        }),
        (WaitOp::Update(by), Via::Inherent) => Box::pin(async move {
            let r = s
                .mem
                .update_context(id, move |x: &mut T| {
                    let old = x.to_val();
                    x.apply(by);
                    old
                })
                .await;
            outcome(r, Outcome::Updated)
        }),
        // There is no raw update: both go through the typed `dyn` path.
        (WaitOp::Update(by), Via::Dyn | Via::Raw) => Box::pin(async move {
            let r = s
                .dyn_
                .update_context(id, move |x: &mut T| {
                    let old = x.to_val();
                    x.apply(by);
                    old
                })
                .await;
            outcome(r, Outcome::Updated)
        }),
        (WaitOp::Delete, Via::Inherent) => {
            Box::pin(
                async move { outcome(s.mem.delete_context::<T>(id).await, |()| Outcome::Deleted) },
            )
        }
        (WaitOp::Delete, Via::Dyn) => {
            Box::pin(
                async move { outcome(s.dyn_.delete_context::<T>(id).await, |()| Outcome::Deleted) },
            )
        }
        (WaitOp::Delete, Via::Raw) => {
            Box::pin(async move { outcome(s.dyn_.delete_raw(ty, id).await, |()| Outcome::Deleted) })
        }
        // Conditional writes are inherent-only for now (`via` is ignored).
        (WaitOp::StoreIf { val, expected }, _) => Box::pin(async move {
            let value = T::from_val(&fresh(T::TY, val));
            outcome(
                s.mem.store_context_if(id, expected, value).await,
                Outcome::Stored,
            )
        }),
        (WaitOp::DeleteIf { expected }, _) => Box::pin(async move {
            outcome(s.mem.delete_context_if::<T>(id, expected).await, |()| {
                Outcome::Deleted
            })
        }),
        (WaitOp::Optimistic { by, .. }, _) => Box::pin(async move {
            let runs = AtomicU32::new(0);
            let r = s
                .mem
                .update_context_optimistic(id, |x: &mut T| {
                    runs.fetch_add(1, Relaxed);
                    let old = x.to_val();
                    x.apply(by);
                    old
                })
                .await;
            outcome(r, |old| Outcome::Optimistic(old, runs.load(Relaxed)))
        }),
    }
}

fn poll_once(fut: &mut Fut<'_>) -> Poll<Outcome> {
    fut.as_mut().poll(&mut TaskCx::from_waker(Waker::noop()))
}

/// Runs a future that must complete at its first poll.
fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut TaskCx::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an operation that never waits returned Pending"),
    }
}

/// `try` / `timeout(0)`, through `via`; completes at once.
fn try_now<T: ModelType>(s: Stores<'_>, id: Uuid, zero_timeout: bool, via: Via) -> Outcome {
    let ty = ContextType::of::<T>();
    let wrap = |g: ContextGuard<T>| Outcome::Guard(T::wrap(g));
    match (zero_timeout, via) {
        (false, Via::Inherent) => outcome(now(s.mem.try_get_context::<T>(id)), wrap),
        (false, Via::Dyn) => outcome(now(s.dyn_.try_get_context::<T>(id)), wrap),
        (false, Via::Raw) => outcome(now(s.dyn_.lock_raw(ty, id, Wait::Never)), |g| {
            downcast_guard::<T>(g)
        }),
        (true, Via::Inherent) => outcome(
            now(s.mem.get_context_timeout::<T>(id, Duration::ZERO)),
            wrap,
        ),
        (true, Via::Dyn) => outcome(
            now(s.dyn_.get_context_timeout::<T>(id, Duration::ZERO)),
            wrap,
        ),
        (true, Via::Raw) => {
            let wait = Wait::timeout(Duration::ZERO);
            outcome(now(s.dyn_.lock_raw(ty, id, wait)), |g| {
                downcast_guard::<T>(g)
            })
        }
    }
}

fn blocking<T: ModelType>(s: Stores<'_>, id: Uuid, op: BlockingOp, val: u8) -> Outcome {
    let m = s.mem;
    let wrap = |g: ContextGuard<T>| Outcome::Guard(T::wrap(g));
    match op {
        BlockingOp::Store => outcome(
            m.store_context_blocking(id, T::from_val(&fresh(T::TY, val))),
            Outcome::Stored,
        ),
        BlockingOp::Get => outcome(m.get_context_blocking::<T>(id), wrap),
        BlockingOp::Update => outcome(
            m.update_context_blocking(id, move |x: &mut T| {
                let old = x.to_val();
                x.apply(val);
                old
            }),
            Outcome::Updated,
        ),
        BlockingOp::Delete => outcome(m.delete_context_blocking::<T>(id), |()| Outcome::Deleted),
        BlockingOp::Try => outcome(m.try_get_context_blocking::<T>(id), wrap),
        BlockingOp::Timeout0 => outcome(
            m.get_context_timeout_blocking::<T>(id, Duration::ZERO),
            wrap,
        ),
        BlockingOp::StoreIf(_) | BlockingOp::DeleteIf(_) | BlockingOp::Optimistic => {
            unreachable!("conditional blocking ops go through `blocking_if`")
        }
    }
}

/// The conditional `_blocking` ops, with the expected version the model
/// resolved.
fn blocking_if<T: ModelType>(s: Stores<'_>, id: Uuid, op: &WaitOp) -> Outcome {
    let m = s.mem;
    match *op {
        WaitOp::StoreIf { val, expected } => outcome(
            m.store_context_if_blocking(id, expected, T::from_val(&fresh(T::TY, val))),
            Outcome::Stored,
        ),
        WaitOp::DeleteIf { expected } => {
            outcome(m.delete_context_if_blocking::<T>(id, expected), |()| {
                Outcome::Deleted
            })
        }
        WaitOp::Optimistic { by, .. } => {
            let mut runs = 0;
            let r = m.update_context_optimistic_blocking(id, |x: &mut T| {
                runs += 1;
                let old = x.to_val();
                x.apply(by);
                old
            });
            outcome(r, |old| Outcome::Optimistic(old, runs))
        }
        ref other => unreachable!("not a conditional op: {other:?}"),
    }
}

/// A snapshot of either type, with what it showed when taken.
enum AnySnap {
    A(Snapshot<Alpha>),
    B(Snapshot<Beta>),
}

impl AnySnap {
    fn read(&self) -> (Val, u64) {
        match self {
            AnySnap::A(s) => (s.to_val(), s.version()),
            AnySnap::B(s) => (s.to_val(), s.version()),
        }
    }
}

fn snapshot<T: ModelType>(
    s: Stores<'_>,
    id: Uuid,
    via: Via,
    wrap: fn(Snapshot<T>) -> AnySnap,
) -> Result<AnySnap, ContextError> {
    match via {
        Via::Inherent => s.mem.snapshot::<T>(id).map(wrap),
        Via::Dyn => now(s.dyn_.get_context_snapshot::<T>(id)).map(wrap),
        Via::Raw => {
            // A raw snapshot is opaque outside the crate: check that it
            // agrees on presence, then read the value through the typed API.
            let raw = now(s.dyn_.snapshot_raw(ContextType::of::<T>(), id)).map(|_| ());
            let typed = s.mem.snapshot::<T>(id);
            assert_eq!(
                raw.is_ok(),
                typed.is_ok(),
                "snapshot_raw and snapshot disagree"
            );
            typed.map(wrap)
        }
    }
}

fn current_version<T: Context>(s: Stores<'_>, id: Uuid) -> u64 {
    s.mem
        .snapshot::<T>(id)
        .expect("just updated, so present")
        .version()
}

// ------------------------------------------------------------------- model

/// What an error must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrKind {
    NotFound,
    WouldBlock,
    Timeout,
    Conflict { expected: u64, found: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the key's queue.
    Queued,
    /// Handed the lock; completes at its next poll.
    Granted,
    /// Its context was deleted; re-resolves the key at its next poll.
    Killed,
}

#[derive(Clone, Debug)]
enum MTask {
    Idle,
    Holding { key: Key, value: Val, base: u64 },
    Waiting { key: Key, op: WaitOp, phase: Phase },
}

#[derive(Clone, Debug)]
struct MKey {
    value: Val,
    version: u64,
    owner: Option<u8>,
    queue: VecDeque<u8>,
}

/// What the engine must answer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    Pending,
    Guard { value: Val, version: u64 },
    Stored,
    Updated { old: Val },
    Optimistic { old: Val, runs: u32 },
    Deleted,
    Err(ErrKind),
}

#[derive(Default)]
struct Model {
    keys: HashMap<Key, MKey>,
    /// The highest version each key ever had (kept across deletes).
    max_seen: HashMap<Key, u64>,
    /// The version each key had before that (for [`Expected::Stale`]).
    prev_seen: HashMap<Key, u64>,
    tasks: Vec<MTask>,
}

impl Model {
    fn new() -> Self {
        Model {
            tasks: vec![MTask::Idle; usize::from(TASKS)],
            ..Model::default()
        }
    }

    fn release(&mut self, key: Key) {
        let k = self
            .keys
            .get_mut(&key)
            .expect("model: release of a missing key");
        k.owner = k.queue.pop_front();
        if let Some(next) = k.owner {
            match &mut self.tasks[usize::from(next)] {
                MTask::Waiting { phase, .. } if *phase == Phase::Queued => {
                    *phase = Phase::Granted;
                }
                other => panic!("model bug: queued task in state {other:?}"),
            }
        }
    }

    /// The op `op` of `task` acquires `key` (free) or joins its queue.
    /// Returns the expectation; for an op that completes, applies it.
    fn resolve(&mut self, task: u8, key: Key, op: WaitOp) -> Expect {
        let Some(k) = self.keys.get_mut(&key) else {
            self.tasks[usize::from(task)] = MTask::Idle;
            return match op {
                // Only `store_context_if` at 0 creates, of the conditional
                // writes.
                WaitOp::Store(v)
                | WaitOp::StoreIf {
                    val: v,
                    expected: 0,
                } => {
                    // Version: checked and filled in by `written`.
                    self.keys.insert(
                        key,
                        MKey {
                            value: fresh(key.ty, v),
                            version: 0,
                            owner: None,
                            queue: VecDeque::new(),
                        },
                    );
                    Expect::Stored
                }
                _ => Expect::Err(ErrKind::NotFound),
            };
        };
        if k.owner.is_some() {
            k.queue.push_back(task);
            self.tasks[usize::from(task)] = MTask::Waiting {
                key,
                op,
                phase: Phase::Queued,
            };
            return Expect::Pending;
        }
        k.owner = Some(task);
        self.complete(task, key, op)
    }

    /// `task` owns `key`'s lock: carry out `op`.
    fn complete(&mut self, task: u8, key: Key, op: WaitOp) -> Expect {
        let k = self
            .keys
            .get_mut(&key)
            .expect("model: owner of a missing key");
        assert_eq!(
            k.owner,
            Some(task),
            "model bug: completing without the lock"
        );
        match op {
            WaitOp::Get | WaitOp::GetMax => {
                let (value, version) = (k.value.clone(), k.version);
                self.tasks[usize::from(task)] = MTask::Holding {
                    key,
                    value: value.clone(),
                    base: version,
                };
                Expect::Guard { value, version }
            }
            WaitOp::Store(v) => {
                k.value = fresh(key.ty, v);
                self.tasks[usize::from(task)] = MTask::Idle;
                self.release(key);
                Expect::Stored
            }
            WaitOp::Update(by) => {
                let old = k.value.clone();
                k.value = scramble(&old, by);
                self.tasks[usize::from(task)] = MTask::Idle;
                self.release(key);
                Expect::Updated { old }
            }
            WaitOp::Delete => self.unlink(task, key),
            WaitOp::StoreIf { val, expected } => {
                let found = k.version;
                self.tasks[usize::from(task)] = MTask::Idle;
                if found != expected {
                    self.release(key);
                    return Expect::Err(ErrKind::Conflict { expected, found });
                }
                k.value = fresh(key.ty, val);
                self.release(key);
                Expect::Stored
            }
            WaitOp::DeleteIf { expected } => {
                let found = k.version;
                if found != expected {
                    self.tasks[usize::from(task)] = MTask::Idle;
                    self.release(key);
                    return Expect::Err(ErrKind::Conflict { expected, found });
                }
                self.unlink(task, key)
            }
            WaitOp::Optimistic { by, seen, runs } => {
                if k.version == seen {
                    let old = k.value.clone();
                    k.value = scramble(&old, by);
                    self.tasks[usize::from(task)] = MTask::Idle;
                    self.release(key);
                    return Expect::Optimistic { old, runs };
                }
                // Conflict: the lock goes to the next waiter (if any), the
                // closure runs again on the newest version, and the commit
                // goes back to the lock.
                self.release(key);
                self.start_optimistic(task, key, by, runs + 1)
            }
        }
    }

    /// `task` (owning `key`'s lock) deletes it: every queued waiter will
    /// re-resolve the key at its next poll.
    fn unlink(&mut self, task: u8, key: Key) -> Expect {
        let k = self
            .keys
            .remove(&key)
            .expect("model: unlink of a missing key");
        for waiter in k.queue {
            match &mut self.tasks[usize::from(waiter)] {
                MTask::Waiting { phase, .. } => *phase = Phase::Killed,
                other => panic!("model bug: queued task in state {other:?}"),
            }
        }
        self.tasks[usize::from(task)] = MTask::Idle;
        Expect::Deleted
    }

    /// An optimistic attempt: read the committed version (never waits;
    /// `NotFound` if absent), then go for the lock to compare and publish.
    fn start_optimistic(&mut self, task: u8, key: Key, by: u8, runs: u32) -> Expect {
        let seen = match self.keys.get(&key) {
            Some(k) => k.version,
            None => {
                self.tasks[usize::from(task)] = MTask::Idle;
                return Expect::Err(ErrKind::NotFound);
            }
        };
        self.resolve(task, key, WaitOp::Optimistic { by, seen, runs })
    }

    /// The version `e` names for `key`, now.
    fn expected(&self, key: Key, e: Expected) -> u64 {
        let newest = self.max_seen.get(&key).copied().unwrap_or(0);
        match e {
            Expected::Zero => 0,
            Expected::Current => newest,
            Expected::Stale => self.prev_seen.get(&key).copied().unwrap_or(0),
            Expected::Next => newest + 1,
        }
    }

    /// The version the engine reported for a write to `key` that the model
    /// already applied: it must exceed every version the key ever had.
    fn written(&mut self, key: Key, version: u64, ctx: &str) {
        let max = self.max_seen.entry(key).or_insert(0);
        assert!(
            version > *max,
            "{ctx}: version {version} of {key:?} does not exceed {max}, which it had before"
        );
        self.prev_seen.insert(key, *max);
        *max = version;
        if let Some(k) = self.keys.get_mut(&key) {
            k.version = version;
        }
    }
}

// ----------------------------------------------------------------- harness

enum Task<'s> {
    Idle,
    Holding(AnyGuard),
    Pending(Fut<'s>),
}

/// Applies `ops` to a fresh store and to the model, asserting they agree
/// (panics, with the op index and a description, where they do not).
pub fn run(ops: &[Op]) {
    // Strict FIFO hand-off: the model serves waiters in arrival order at
    // every release (the default bound depends on the clock).
    let mem = InMemoryContextStorage::new().with_fairness_bound(Duration::ZERO);
    let stores = Stores {
        mem: &mem,
        dyn_: &mem,
    };
    let mut h = Harness {
        s: stores,
        model: Model::new(),
        tasks: (0..TASKS).map(|_| Task::Idle).collect(),
        kept: VecDeque::new(),
        step: String::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        h.step = format!("op #{i} {op:?}");
        h.apply(op);
    }
    h.step = "final drop of every task".into();
    for t in 0..TASKS {
        h.drop_task(t);
    }
    h.check_final();
}

struct Harness<'s> {
    s: Stores<'s>,
    model: Model,
    tasks: Vec<Task<'s>>,
    kept: VecDeque<(AnySnap, Val, u64)>,
    step: String,
}

impl<'s> Harness<'s> {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Store {
                task,
                key,
                val,
                via,
            } => self.start(task, key, WaitOp::Store(val), via),
            Op::Get { task, key, via } => self.start(task, key, WaitOp::Get, via),
            Op::GetMax { task, key, via } => self.start(task, key, WaitOp::GetMax, via),
            Op::Update {
                task,
                key,
                val,
                via,
            } => self.start(task, key, WaitOp::Update(val), via),
            Op::Delete { task, key, via } => self.start(task, key, WaitOp::Delete, via),
            Op::Try { task, key, via } => self.try_lock(task, key, false, via),
            Op::Timeout0 { task, key, via } => self.try_lock(task, key, true, via),
            Op::StoreIf {
                task,
                key,
                val,
                expected,
            } => {
                let expected = self.model.expected(key, expected);
                self.start(task, key, WaitOp::StoreIf { val, expected }, Via::Inherent);
            }
            Op::DeleteIf {
                task,
                key,
                expected,
            } => {
                let expected = self.model.expected(key, expected);
                self.start(task, key, WaitOp::DeleteIf { expected }, Via::Inherent);
            }
            Op::Optimistic { task, key, val } => {
                // `seen` is filled in by the model when the attempt reads.
                let op = WaitOp::Optimistic {
                    by: val,
                    seen: 0,
                    runs: 1,
                };
                self.start(task, key, op, Via::Inherent);
            }
            Op::Blocking { task, key, op, val } => self.blocking(task, key, op, val),
            Op::Poll { task } => self.poll(task),
            Op::Drop { task } => self.drop_task(task),
            Op::Mutate { task, val } => self.mutate(task, val),
            Op::Read { task } => self.read(task),
            Op::Commit { task, blocking } => self.commit(task, blocking),
            Op::Rollback { task } => self.rollback(task),
            Op::Snapshot { key, via, keep } => self.snapshot(key, via, keep),
            Op::Contains { key, via } => self.contains(key, via),
            Op::Ids { ty, via } => self.ids(ty, via),
        }
        self.check_kept();
    }

    fn idle(&self, task: u8) -> bool {
        matches!(self.tasks[usize::from(task % TASKS)], Task::Idle)
    }

    fn start(&mut self, task: u8, key: Key, op: WaitOp, via: Via) {
        let task = task % TASKS;
        if !self.idle(task) {
            return;
        }
        let id = key.uuid();
        let mut fut = match key.ty {
            Ty::A => start::<Alpha>(self.s, id, &op, via),
            Ty::B => start::<Beta>(self.s, id, &op, via),
        };
        let expect = match op {
            WaitOp::Optimistic { by, runs, .. } => self.model.start_optimistic(task, key, by, runs),
            op => self.model.resolve(task, key, op),
        };
        let got = poll_once(&mut fut);
        self.settle(task, key, expect, got, Some(fut));
    }

    /// Compares an engine poll result with the model's expectation and
    /// records the task's new state.
    fn settle(
        &mut self,
        task: u8,
        key: Key,
        expect: Expect,
        got: Poll<Outcome>,
        fut: Option<Fut<'s>>,
    ) {
        let step = self.step.clone();
        let got = match got {
            Poll::Pending => {
                assert_eq!(expect, Expect::Pending, "{step}: engine is Pending");
                self.tasks[usize::from(task)] =
                    Task::Pending(fut.expect("a Pending result comes from a future"));
                return;
            }
            Poll::Ready(got) => got,
        };
        self.tasks[usize::from(task)] = Task::Idle;
        match (expect, got) {
            (Expect::Guard { value, version }, Outcome::Guard(g)) => {
                let (v, ver, id) = g.read();
                assert_eq!(
                    (&v, ver, id),
                    (&value, version, key.uuid()),
                    "{step}: guard"
                );
                self.tasks[usize::from(task)] = Task::Holding(g);
            }
            (Expect::Stored, Outcome::Stored(version)) => {
                self.model.written(key, version, &step);
            }
            (Expect::Updated { old }, Outcome::Updated(got_old)) => {
                assert_eq!(got_old, old, "{step}: update saw another value");
                let version = match key.ty {
                    Ty::A => current_version::<Alpha>(self.s, key.uuid()),
                    Ty::B => current_version::<Beta>(self.s, key.uuid()),
                };
                self.model.written(key, version, &step);
            }
            (Expect::Optimistic { old, runs }, Outcome::Optimistic(got_old, got_runs)) => {
                assert_eq!(
                    (got_old, got_runs),
                    (old, runs),
                    "{step}: optimistic update (old value, closure runs)"
                );
                let version = match key.ty {
                    Ty::A => current_version::<Alpha>(self.s, key.uuid()),
                    Ty::B => current_version::<Beta>(self.s, key.uuid()),
                };
                self.model.written(key, version, &step);
            }
            (Expect::Deleted, Outcome::Deleted) => {}
            (Expect::Err(kind), Outcome::Err(e)) => check_err(&e, kind, key, &step),
            (expect, got) => panic!("{step}: expected {expect:?}, engine gave {got:?}"),
        }
    }

    fn try_lock(&mut self, task: u8, key: Key, zero_timeout: bool, via: Via) {
        let task = task % TASKS;
        if !self.idle(task) {
            return;
        }
        let expect = self.try_expect(task, key, zero_timeout);
        let got = match key.ty {
            Ty::A => try_now::<Alpha>(self.s, key.uuid(), zero_timeout, via),
            Ty::B => try_now::<Beta>(self.s, key.uuid(), zero_timeout, via),
        };
        self.settle(task, key, expect, Poll::Ready(got), None);
    }

    /// `try` / `timeout(0)` in the model: never queues.
    fn try_expect(&mut self, task: u8, key: Key, zero_timeout: bool) -> Expect {
        match self.model.keys.get(&key) {
            None => Expect::Err(ErrKind::NotFound),
            Some(k) if k.owner.is_some() => Expect::Err(if zero_timeout {
                ErrKind::Timeout
            } else {
                ErrKind::WouldBlock
            }),
            Some(_) => self.model.resolve(task, key, WaitOp::Get),
        }
    }

    fn blocking(&mut self, task: u8, key: Key, op: BlockingOp, val: u8) {
        let task = task % TASKS;
        if !self.idle(task) {
            return;
        }
        let held = self.model.keys.get(&key).is_some_and(|k| k.owner.is_some());
        let cond = match op {
            BlockingOp::StoreIf(e) => Some(WaitOp::StoreIf {
                val,
                expected: self.model.expected(key, e),
            }),
            BlockingOp::DeleteIf(e) => Some(WaitOp::DeleteIf {
                expected: self.model.expected(key, e),
            }),
            BlockingOp::Optimistic => Some(WaitOp::Optimistic {
                by: val,
                seen: 0,
                runs: 1,
            }),
            _ => None,
        };
        let expect = match op {
            BlockingOp::Try => self.try_expect(task, key, false),
            BlockingOp::Timeout0 => self.try_expect(task, key, true),
            // It would park the thread: skip.
            _ if held => return,
            BlockingOp::Store => self.model.resolve(task, key, WaitOp::Store(val)),
            BlockingOp::Get => self.model.resolve(task, key, WaitOp::Get),
            BlockingOp::Update => self.model.resolve(task, key, WaitOp::Update(val)),
            BlockingOp::Delete => self.model.resolve(task, key, WaitOp::Delete),
            // Nothing holds the key, so no conflict can arise meanwhile:
            // the closure runs once.
            BlockingOp::Optimistic => self.model.start_optimistic(task, key, val, 1),
            BlockingOp::StoreIf(_) | BlockingOp::DeleteIf(_) => {
                let op = cond.clone().expect("built above");
                self.model.resolve(task, key, op)
            }
        };
        let got = match (key.ty, &cond) {
            (Ty::A, None) => blocking::<Alpha>(self.s, key.uuid(), op, val),
            (Ty::B, None) => blocking::<Beta>(self.s, key.uuid(), op, val),
            (Ty::A, Some(c)) => blocking_if::<Alpha>(self.s, key.uuid(), c),
            (Ty::B, Some(c)) => blocking_if::<Beta>(self.s, key.uuid(), c),
        };
        self.settle(task, key, expect, Poll::Ready(got), None);
    }

    fn poll(&mut self, task: u8) {
        let task = task % TASKS;
        let Task::Pending(fut) = &mut self.tasks[usize::from(task)] else {
            return;
        };
        let got = poll_once(fut);
        let MTask::Waiting { key, op, phase } = self.model.tasks[usize::from(task)].clone() else {
            panic!("{}: engine has a pending future, model does not", self.step);
        };
        let expect = match phase {
            Phase::Queued => Expect::Pending,
            Phase::Granted => self.model.complete(task, key, op),
            Phase::Killed => self.model.resolve(task, key, op),
        };
        let fut = match std::mem::replace(&mut self.tasks[usize::from(task)], Task::Idle) {
            Task::Pending(fut) => fut,
            _ => unreachable!("matched above"),
        };
        self.settle(task, key, expect, got, Some(fut));
    }

    fn drop_task(&mut self, task: u8) {
        let task = task % TASKS;
        let engine = std::mem::replace(&mut self.tasks[usize::from(task)], Task::Idle);
        drop(engine);
        match std::mem::replace(&mut self.model.tasks[usize::from(task)], MTask::Idle) {
            MTask::Idle => {}
            MTask::Holding { key, .. } => self.model.release(key),
            MTask::Waiting { key, phase, .. } => match phase {
                Phase::Queued => {
                    let k = self.model.keys.get_mut(&key).expect("queued on a live key");
                    k.queue.retain(|&t| t != task);
                }
                Phase::Granted => self.model.release(key),
                Phase::Killed => {}
            },
        }
    }

    fn holding(&mut self, task: u8) -> Option<(&mut AnyGuard, Key, &mut Val, u64)> {
        let task = usize::from(task % TASKS);
        let Task::Holding(g) = &mut self.tasks[task] else {
            return None;
        };
        let MTask::Holding { key, value, base } = &mut self.model.tasks[task] else {
            panic!("{}: engine holds a guard, model does not", self.step);
        };
        Some((g, *key, value, *base))
    }

    fn mutate(&mut self, task: u8, by: u8) {
        if let Some((g, _, value, _)) = self.holding(task) {
            g.mutate(by);
            *value = scramble(value, by);
        }
    }

    fn read(&mut self, task: u8) {
        let step = self.step.clone();
        if let Some((g, key, value, base)) = self.holding(task) {
            let got = g.read();
            assert_eq!(got, (value.clone(), base, key.uuid()), "{step}: guard read");
        }
    }

    fn commit(&mut self, task: u8, blocking: bool) {
        let task = task % TASKS;
        let Task::Holding(_) = &self.tasks[usize::from(task)] else {
            return;
        };
        let Task::Holding(g) = std::mem::replace(&mut self.tasks[usize::from(task)], Task::Idle)
        else {
            unreachable!("matched above")
        };
        let MTask::Holding { key, value, base } =
            std::mem::replace(&mut self.model.tasks[usize::from(task)], MTask::Idle)
        else {
            panic!("{}: engine holds a guard, model does not", self.step);
        };
        let version = g
            .commit(blocking)
            .unwrap_or_else(|e| panic!("{}: in-memory commit failed: {e}", self.step));
        assert!(
            version > base,
            "{}: commit did not bump the version",
            self.step
        );
        self.model.keys.get_mut(&key).expect("held, so live").value = value;
        let step = self.step.clone();
        self.model.written(key, version, &step);
        self.model.release(key);
    }

    fn rollback(&mut self, task: u8) {
        let task = task % TASKS;
        if let Task::Holding(_) = &self.tasks[usize::from(task)] {
            let Task::Holding(g) =
                std::mem::replace(&mut self.tasks[usize::from(task)], Task::Idle)
            else {
                unreachable!("matched above")
            };
            g.rollback();
            // Same as a drop in the model; the engine side is already idle.
            self.drop_task(task);
        }
    }

    fn snapshot(&mut self, key: Key, via: Via, keep: bool) {
        let got = match key.ty {
            Ty::A => snapshot::<Alpha>(self.s, key.uuid(), via, AnySnap::A),
            Ty::B => snapshot::<Beta>(self.s, key.uuid(), via, AnySnap::B),
        };
        let step = &self.step;
        match (self.model.keys.get(&key), got) {
            (None, Err(e)) => check_err(&e, ErrKind::NotFound, key, step),
            (Some(k), Ok(snap)) => {
                let (value, version) = snap.read();
                assert_eq!((&value, version), (&k.value, k.version), "{step}: snapshot");
                if keep {
                    if self.kept.len() >= 8 {
                        self.kept.pop_front();
                    }
                    self.kept.push_back((snap, value, version));
                }
            }
            (None, Ok(snap)) => panic!("{step}: snapshot of a missing key: {:?}", snap.read()),
            (Some(_), Err(e)) => panic!("{step}: snapshot of a live key failed: {e}"),
        }
    }

    fn contains(&mut self, key: Key, via: Via) {
        let id = key.uuid();
        let got = match (key.ty, via) {
            (Ty::A, Via::Inherent) => now(self.s.mem.contains_context::<Alpha>(id)),
            (Ty::B, Via::Inherent) => now(self.s.mem.contains_context::<Beta>(id)),
            (Ty::A, Via::Dyn) => now(self.s.dyn_.contains_context::<Alpha>(id)),
            (Ty::B, Via::Dyn) => now(self.s.dyn_.contains_context::<Beta>(id)),
            (Ty::A, Via::Raw) => now(self.s.dyn_.contains_raw(ContextType::of::<Alpha>(), id)),
            (Ty::B, Via::Raw) => now(self.s.dyn_.contains_raw(ContextType::of::<Beta>(), id)),
        }
        .expect("in-memory contains never fails");
        let want = self.model.keys.contains_key(&key);
        assert_eq!(got, want, "{}: contains", self.step);
    }

    fn ids(&mut self, ty: Ty, via: Via) {
        let got = match (ty, via) {
            (Ty::A, Via::Inherent) => now(self.s.mem.context_ids::<Alpha>()),
            (Ty::B, Via::Inherent) => now(self.s.mem.context_ids::<Beta>()),
            (Ty::A, Via::Dyn) => now(self.s.dyn_.context_ids::<Alpha>()),
            (Ty::B, Via::Dyn) => now(self.s.dyn_.context_ids::<Beta>()),
            (Ty::A, Via::Raw) => now(self.s.dyn_.ids_raw(ContextType::of::<Alpha>())),
            (Ty::B, Via::Raw) => now(self.s.dyn_.ids_raw(ContextType::of::<Beta>())),
        }
        .expect("in-memory ids never fails");
        assert_eq!(
            got.len(),
            got.iter().collect::<BTreeSet<_>>().len(),
            "ids repeat"
        );
        let got: BTreeSet<Uuid> = got.into_iter().collect();
        let want: BTreeSet<Uuid> = self
            .model
            .keys
            .keys()
            .filter(|k| k.ty == ty)
            .map(|k| k.uuid())
            .collect();
        assert_eq!(got, want, "{}: ids", self.step);
    }

    fn check_kept(&self) {
        for (snap, value, version) in &self.kept {
            assert_eq!(
                snap.read(),
                (value.clone(), *version),
                "{}: a kept snapshot changed",
                self.step
            );
        }
    }

    fn check_final(&mut self) {
        let step = self.step.clone();
        assert_eq!(self.s.mem.len(), self.model.keys.len(), "{step}: len");
        assert_eq!(self.s.mem.is_empty(), self.model.keys.is_empty(), "{step}");
        let keys: Vec<Key> = self.model.keys.keys().copied().collect();
        for key in keys {
            let k = &self.model.keys[&key];
            assert!(
                k.owner.is_none() && k.queue.is_empty(),
                "model bug: {key:?} held"
            );
            self.snapshot(key, Via::Inherent, false);
            // Every lock must be free once every task is gone.
            let id = key.uuid();
            let free = match key.ty {
                Ty::A => self.s.mem.try_get_context_blocking::<Alpha>(id).is_ok(),
                Ty::B => self.s.mem.try_get_context_blocking::<Beta>(id).is_ok(),
            };
            assert!(
                free,
                "{step}: {key:?} still locked after every task dropped"
            );
        }
        for ty in [Ty::A, Ty::B] {
            self.ids(ty, Via::Inherent);
        }
    }
}

fn check_err(e: &ContextError, kind: ErrKind, key: Key, step: &str) {
    let ok = match kind {
        ErrKind::NotFound => e.is_not_found(),
        ErrKind::WouldBlock => e.is_would_block(),
        ErrKind::Timeout => e.is_timeout(),
        ErrKind::Conflict { expected, found } => {
            e.is_conflict()
                && matches!(
                    *e,
                    ContextError::Conflict { expected: x, found: y, .. } if (x, y) == (expected, found)
                )
        }
    };
    assert!(ok, "{step}: expected {kind:?}, engine gave {e}");
    let type_name = match key.ty {
        Ty::A => std::any::type_name::<Alpha>(),
        Ty::B => std::any::type_name::<Beta>(),
    };
    assert_eq!(
        e.id(),
        Some(key.uuid()),
        "{step}: error names another id: {e}"
    );
    assert_eq!(
        e.type_name(),
        type_name,
        "{step}: error names another type: {e}"
    );
    assert_eq!(e.kind(), SHARED_KIND, "{step}: error kind: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&key.uuid().to_string()),
        "{step}: message does not name the id: {msg}"
    );
}
