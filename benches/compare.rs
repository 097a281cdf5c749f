//! ctxstore against the stores users would pick instead, on the same
//! workloads, in the same run (issue #4).
//!
//! Contenders, each a small adapter behind [`Contender`]:
//!
//! | name             | store                                                        |
//! |------------------|--------------------------------------------------------------|
//! | `ctxstore`       | `InMemoryContextStorage` through its inherent API; mutate = `update_context` |
//! | `ctxstore_guard` | the same, mutate = `get_context` + change + `commit` (a guard) |
//! | `ctxstore_optimistic` | the same, mutate = `update_context_optimistic` (change a copy without the lock, compare and publish; retry on a conflict) |
//! | `dashmap_mutex`  | `DashMap<Uuid, Arc<tokio::sync::Mutex<T>>>`, snapshot = lock + clone |
//! | `scc`            | `scc::HashMap<Uuid, T>`, `update_async` / `read_async` + clone |
//! | `papaya_mutex`   | `papaya::HashMap<Uuid, Arc<tokio::sync::Mutex<T>>>`          |
//! | `papaya_arcswap` | `papaya::HashMap<Uuid, Arc<{ArcSwap<T>, tokio::sync::Mutex<()>}>>`: naive copy-on-write |
//! | `rwlock_mutex`   | `std::sync::RwLock<HashMap<Uuid, Arc<tokio::sync::Mutex<T>>>>` |
//!
//! Throughput workloads (criterion, `iter_custom`: one iteration is a fixed
//! batch of operations spread over the tasks; the reported time is the
//! batch's wall time, and `Throughput::Elements` turns it into ops/s):
//!
//! * `W1_hot_key`: 64 tasks mutate one key (lock, change, commit).
//! * `W2_spread`: 64 tasks, 10,000 keys, a random key per mutation.
//! * `W2F_spread_clone_from`: W2 with a context whose `Clone` forwards
//!   `clone_from` field by field (what the README recommends), so
//!   copy-on-write commits reuse the value's buffers.
//! * `W4_snapshot` / `W4_snapshot_4KiB`: 64 tasks snapshot random keys of
//!   10,000, no writers (the 4 KiB variant carries a 4 KiB payload).
//! * `W5_mixed`: 90% snapshot / 9% mutate / 1% store-or-delete.
//! * `W6_lifecycle`: store a fresh id, mutate 10×, snapshot, delete
//!   (one element = one lifecycle).
//! * `W7_threads_tasks`: 2 plain threads (blocking calls) + 32 tasks
//!   mutating 100 keys.
//! * Limit lines: `limit_cas` (an uncontended `AtomicU64` CAS per op, in W1
//!   and W2) and `limit_papaya_load_full` (a bare `papaya` get +
//!   `ArcSwap::load_full`, in W4).
//!
//! Measurements criterion cannot express run after it and are written as
//! JSON under `<criterion home>/ctxstore-extras/`:
//!
//! * `W3_snapshot_under_lock`: a writer holds the key 20 ms at a time while
//!   4 tasks snapshot it: snapshot latency p50/p99/p99.9/max and rate.
//! * `W1_fairness`: every mutation's wait under W1 (p50/p99/p99.9/max); it
//!   also checks that no update was lost, and reports the optimistic
//!   contender's retries per commit. One more row, `ctxstore_fifo`, is
//!   `ctxstore` with strict FIFO hand-off (`with_fairness_bound(ZERO)`).
//!   `CTXSTORE_BENCH_FAIR_US=<µs>` sets the bound of every other ctxstore
//!   contender (default: the store's, 0.5 ms).
//! * `W6_rss`: resident memory before and after 1,000,000 lifecycles, each
//!   contender in a fresh child process.
//!
//! Commands:
//!
//! * `cargo bench --bench compare -- --quick` — everything, short (~3 min
//!   on a 2-core machine); `CTXSTORE_BENCH_QUICK=1` is the same.
//! * `cargo bench --bench compare` — everything, full sampling.
//! * `cargo bench --bench compare -- W2` — a filter (criterion regex; the
//!   extras run when their name contains the filter text).
//! * `CTXSTORE_BENCH_THREADS=1,2,4,8,16 cargo bench --bench compare -- --quick`
//!   — thread scaling of W1/W2/W4 only, one runtime per worker count.
//! * `cargo run --release --example bench_report` — turns the results into
//!   `docs/bench.md` and `docs/bench.svg`.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use crossbeam_utils::CachePadded;
use ctxstore::{Context, InMemoryContextStorage, Uuid};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

// ------------------------------------------------------------------ values

/// A context as the benchmarks use it: built from a seed, mutated in place.
trait Value: Context {
    fn fresh(seed: u64) -> Self;
    /// The mutation every workload applies: bump a counter, record it.
    fn touch(&mut self);
    fn processed(&self) -> u64;
}

/// The context: a name, a counter, 16 history entries.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobCtx {
    job_name: String,
    processed: u64,
    history: Vec<u64>,
}

impl Context for JobCtx {
    fn kind() -> &'static str {
        "bench_job"
    }
}

impl Value for JobCtx {
    fn fresh(seed: u64) -> Self {
        JobCtx {
            job_name: format!("job-{seed}"),
            processed: 0,
            history: vec![0; 16],
        }
    }

    #[inline]
    fn touch(&mut self) {
        self.processed += 1;
        let i = (self.processed % 16) as usize;
        self.history[i] = self.processed;
    }

    #[inline]
    fn processed(&self) -> u64 {
        self.processed
    }
}

/// [`JobCtx`] with the `Clone` the README recommends: `clone_from` field by
/// field, so a copy-on-write commit into a recycled allocation reuses the
/// `String` and `Vec` buffers instead of allocating new ones (W2F).
#[derive(Debug, Serialize, Deserialize)]
struct JobCtxF {
    job_name: String,
    processed: u64,
    history: Vec<u64>,
}

impl Clone for JobCtxF {
    fn clone(&self) -> Self {
        JobCtxF {
            job_name: self.job_name.clone(),
            processed: self.processed,
            history: self.history.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.job_name.clone_from(&source.job_name);
        self.processed = source.processed;
        self.history.clone_from(&source.history);
    }
}

impl Context for JobCtxF {
    fn kind() -> &'static str {
        "bench_job_f"
    }
}

impl Value for JobCtxF {
    fn fresh(seed: u64) -> Self {
        let JobCtx {
            job_name,
            processed,
            history,
        } = JobCtx::fresh(seed);
        JobCtxF {
            job_name,
            processed,
            history,
        }
    }

    #[inline]
    fn touch(&mut self) {
        self.processed += 1;
        let i = (self.processed % 16) as usize;
        self.history[i] = self.processed;
    }

    #[inline]
    fn processed(&self) -> u64 {
        self.processed
    }
}

/// The same with a 4 KiB payload, for the cost of a snapshot that copies.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BigCtx {
    job_name: String,
    processed: u64,
    history: Vec<u64>,
    payload: Vec<u8>,
}

impl Context for BigCtx {
    fn kind() -> &'static str {
        "bench_job_4k"
    }
}

impl Value for BigCtx {
    fn fresh(seed: u64) -> Self {
        BigCtx {
            job_name: format!("job-{seed}"),
            processed: 0,
            history: vec![0; 16],
            payload: vec![seed as u8; 4096],
        }
    }

    #[inline]
    fn touch(&mut self) {
        self.processed += 1;
        let i = (self.processed % 16) as usize;
        self.history[i] = self.processed;
    }

    #[inline]
    fn processed(&self) -> u64 {
        self.processed
    }
}

// -------------------------------------------------------------- contenders

/// The operations every store offers, in the form its users would write.
trait Contender<V: Value>: Send + Sync + Sized + 'static {
    const NAME: &'static str;
    fn with_capacity(n: usize) -> Self;
    /// Creates or replaces.
    fn store(&self, id: Uuid, v: V) -> impl Future<Output = ()> + Send;
    /// Lock, change (`Value::touch`), commit. `false` if the key is absent.
    fn mutate(&self, id: Uuid) -> impl Future<Output = bool> + Send;
    /// `mutate` for a plain thread.
    fn mutate_blocking(&self, id: Uuid) -> bool;
    /// A consistent read of the value; returns its counter.
    fn snapshot(&self, id: Uuid) -> impl Future<Output = Option<u64>> + Send;
    /// `false` if the key was absent.
    fn delete(&self, id: Uuid) -> impl Future<Output = bool> + Send;
    /// Lock, hold the lock for `d`, change, commit (the W3 writer).
    fn hold(&self, id: Uuid, d: Duration) -> impl Future<Output = ()> + Send;
    /// Mutations that had to start over, so far (optimistic contenders).
    fn retries(&self) -> Option<u64> {
        None
    }
}

type TokioMutex<T> = tokio::sync::Mutex<T>;

/// The in-memory store every ctxstore contender uses;
/// `CTXSTORE_BENCH_FAIR_US=<µs>` sets its fairness bound (default: the
/// store's own, 0.5 ms), for exploring the throughput/tail trade-off of W1.
fn ctxstore_store(n: usize) -> InMemoryContextStorage {
    let store = InMemoryContextStorage::with_capacity(n);
    match std::env::var("CTXSTORE_BENCH_FAIR_US") {
        Ok(us) => store.with_fairness_bound(Duration::from_micros(
            us.parse().expect("CTXSTORE_BENCH_FAIR_US: microseconds"),
        )),
        Err(_) => store,
    }
}

struct Ctxstore<V>(InMemoryContextStorage, std::marker::PhantomData<V>);

impl<V: Value> Contender<V> for Ctxstore<V> {
    const NAME: &'static str = "ctxstore";

    fn with_capacity(n: usize) -> Self {
        Ctxstore(ctxstore_store(n), std::marker::PhantomData)
    }

    async fn store(&self, id: Uuid, v: V) {
        self.0.store_context(id, v).await.expect("store");
    }

    async fn mutate(&self, id: Uuid) -> bool {
        self.0.update_context(id, V::touch).await.is_ok()
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        self.0.update_context_blocking(id, V::touch).is_ok()
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        self.0.snapshot::<V>(id).ok().map(|s| s.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.delete_context::<V>(id).await.is_ok()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        if let Ok(mut g) = self.0.get_context::<V>(id).await {
            tokio::time::sleep(d).await;
            g.touch();
            g.commit().await.expect("commit");
        }
    }
}

/// ctxstore through its guard: `get_context`, change, `commit` (the path a
/// step that awaits while holding the context takes).
struct CtxstoreGuard<V>(InMemoryContextStorage, std::marker::PhantomData<V>);

impl<V: Value> Contender<V> for CtxstoreGuard<V> {
    const NAME: &'static str = "ctxstore_guard";

    fn with_capacity(n: usize) -> Self {
        CtxstoreGuard(ctxstore_store(n), std::marker::PhantomData)
    }

    async fn store(&self, id: Uuid, v: V) {
        self.0.store_context(id, v).await.expect("store");
    }

    async fn mutate(&self, id: Uuid) -> bool {
        match self.0.get_context::<V>(id).await {
            Ok(mut g) => {
                g.touch();
                g.commit().await.is_ok()
            }
            Err(_) => false,
        }
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        match self.0.get_context_blocking::<V>(id) {
            Ok(mut g) => {
                g.touch();
                g.commit_blocking().is_ok()
            }
            Err(_) => false,
        }
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        self.0.snapshot::<V>(id).ok().map(|s| s.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.delete_context::<V>(id).await.is_ok()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        if let Ok(mut g) = self.0.get_context::<V>(id).await {
            tokio::time::sleep(d).await;
            g.touch();
            g.commit().await.expect("commit");
        }
    }
}

/// ctxstore through `update_context_optimistic`: the change runs on a copy
/// without the lock, which is taken only to compare the version and publish;
/// a conflict starts over. A contender of its own (not a parameter of
/// `Ctxstore`): one `mutate` future holding both paths would make the
/// `ctxstore` row carry this path's state (see the reverted const-GUARD
/// contender, commit 638adbc).
struct CtxstoreOptimistic<V> {
    store: InMemoryContextStorage,
    /// Extra runs of the closure (one per conflict). Touched only after a
    /// mutation that retried, so uncontended mutations pay nothing for it.
    retries: CachePadded<AtomicU64>,
    _v: std::marker::PhantomData<V>,
}

impl<V> CtxstoreOptimistic<V> {
    #[inline]
    fn note(&self, runs: u64) {
        if runs > 1 {
            self.retries.fetch_add(runs - 1, Ordering::Relaxed);
        }
    }
}

impl<V: Value> Contender<V> for CtxstoreOptimistic<V> {
    const NAME: &'static str = "ctxstore_optimistic";

    fn with_capacity(n: usize) -> Self {
        CtxstoreOptimistic {
            store: ctxstore_store(n),
            retries: CachePadded::new(AtomicU64::new(0)),
            _v: std::marker::PhantomData,
        }
    }

    async fn store(&self, id: Uuid, v: V) {
        self.store.store_context(id, v).await.expect("store");
    }

    async fn mutate(&self, id: Uuid) -> bool {
        let mut runs = 0u64;
        let done = self
            .store
            .update_context_optimistic(id, |v: &mut V| {
                runs += 1;
                v.touch();
            })
            .await
            .is_ok();
        self.note(runs);
        done
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        let mut runs = 0u64;
        let done = self
            .store
            .update_context_optimistic_blocking(id, |v: &mut V| {
                runs += 1;
                v.touch();
            })
            .is_ok();
        self.note(runs);
        done
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        self.store.snapshot::<V>(id).ok().map(|s| s.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.store.delete_context::<V>(id).await.is_ok()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        if let Ok(mut g) = self.store.get_context::<V>(id).await {
            tokio::time::sleep(d).await;
            g.touch();
            g.commit().await.expect("commit");
        }
    }

    fn retries(&self) -> Option<u64> {
        Some(self.retries.load(Ordering::Relaxed))
    }
}

struct DashMutex<V>(dashmap::DashMap<Uuid, Arc<TokioMutex<V>>>);

impl<V: Value> DashMutex<V> {
    #[inline]
    fn get(&self, id: Uuid) -> Option<Arc<TokioMutex<V>>> {
        // The shard guard must not live across an `.await` (dashmap#79).
        self.0.get(&id).map(|e| e.value().clone())
    }
}

impl<V: Value> Contender<V> for DashMutex<V> {
    const NAME: &'static str = "dashmap_mutex";

    fn with_capacity(n: usize) -> Self {
        DashMutex(dashmap::DashMap::with_capacity(n))
    }

    async fn store(&self, id: Uuid, v: V) {
        self.0.insert(id, Arc::new(TokioMutex::new(v)));
    }

    async fn mutate(&self, id: Uuid) -> bool {
        let Some(m) = self.get(id) else { return false };
        m.lock().await.touch();
        true
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        let Some(m) = self.get(id) else { return false };
        m.blocking_lock().touch();
        true
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        let m = self.get(id)?;
        let copy: V = m.lock().await.clone();
        Some(copy.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.remove(&id).is_some()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        let Some(m) = self.get(id) else { return };
        let mut g = m.lock().await;
        tokio::time::sleep(d).await;
        g.touch();
    }
}

struct Scc<V>(scc::HashMap<Uuid, V>);

impl<V: Value> Contender<V> for Scc<V> {
    const NAME: &'static str = "scc";

    fn with_capacity(n: usize) -> Self {
        Scc(scc::HashMap::with_capacity(n))
    }

    async fn store(&self, id: Uuid, v: V) {
        self.0.upsert_async(id, v).await;
    }

    async fn mutate(&self, id: Uuid) -> bool {
        self.0.update_async(&id, |_, v| v.touch()).await.is_some()
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        self.0.update_sync(&id, |_, v| v.touch()).is_some()
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        let copy: V = self.0.read_async(&id, |_, v| v.clone()).await?;
        Some(copy.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.remove_async(&id).await.is_some()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        // An occupied entry holds the bucket's lock, also across `.await`.
        if let scc::hash_map::Entry::Occupied(mut e) = self.0.entry_async(id).await {
            tokio::time::sleep(d).await;
            e.get_mut().touch();
        }
    }
}

struct PapayaMutex<V>(papaya::HashMap<Uuid, Arc<TokioMutex<V>>>);

impl<V: Value> PapayaMutex<V> {
    #[inline]
    fn get(&self, id: Uuid) -> Option<Arc<TokioMutex<V>>> {
        self.0.pin().get(&id).cloned()
    }
}

impl<V: Value> Contender<V> for PapayaMutex<V> {
    const NAME: &'static str = "papaya_mutex";

    fn with_capacity(n: usize) -> Self {
        PapayaMutex(papaya::HashMap::with_capacity(n))
    }

    async fn store(&self, id: Uuid, v: V) {
        self.0.pin().insert(id, Arc::new(TokioMutex::new(v)));
    }

    async fn mutate(&self, id: Uuid) -> bool {
        let Some(m) = self.get(id) else { return false };
        m.lock().await.touch();
        true
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        let Some(m) = self.get(id) else { return false };
        m.blocking_lock().touch();
        true
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        let m = self.get(id)?;
        let copy: V = m.lock().await.clone();
        Some(copy.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.pin().remove(&id).is_some()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        let Some(m) = self.get(id) else { return };
        let mut g = m.lock().await;
        tokio::time::sleep(d).await;
        g.touch();
    }
}

/// Naive copy-on-write: readers `load_full`, writers serialize on a
/// per-key mutex, clone, change and `store` a new `Arc`.
struct CowEntry<V> {
    value: ArcSwap<V>,
    writer: TokioMutex<()>,
}

struct PapayaArcSwap<V>(papaya::HashMap<Uuid, Arc<CowEntry<V>>>);

impl<V: Value> PapayaArcSwap<V> {
    #[inline]
    fn get(&self, id: Uuid) -> Option<Arc<CowEntry<V>>> {
        self.0.pin().get(&id).cloned()
    }
}

impl<V: Value> Contender<V> for PapayaArcSwap<V> {
    const NAME: &'static str = "papaya_arcswap";

    fn with_capacity(n: usize) -> Self {
        PapayaArcSwap(papaya::HashMap::with_capacity(n))
    }

    async fn store(&self, id: Uuid, v: V) {
        let e = Arc::new(CowEntry {
            value: ArcSwap::from_pointee(v),
            writer: TokioMutex::new(()),
        });
        self.0.pin().insert(id, e);
    }

    async fn mutate(&self, id: Uuid) -> bool {
        let Some(e) = self.get(id) else { return false };
        let _w = e.writer.lock().await;
        let mut next = V::clone(&e.value.load_full());
        next.touch();
        e.value.store(Arc::new(next));
        true
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        let Some(e) = self.get(id) else { return false };
        let _w = e.writer.blocking_lock();
        let mut next = V::clone(&e.value.load_full());
        next.touch();
        e.value.store(Arc::new(next));
        true
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        self.0
            .pin()
            .get(&id)
            .map(|e| e.value.load_full().processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.pin().remove(&id).is_some()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        let Some(e) = self.get(id) else { return };
        let _w = e.writer.lock().await;
        tokio::time::sleep(d).await;
        let mut next = V::clone(&e.value.load_full());
        next.touch();
        e.value.store(Arc::new(next));
    }
}

struct RwLockMutex<V>(RwLock<HashMap<Uuid, Arc<TokioMutex<V>>>>);

impl<V: Value> RwLockMutex<V> {
    #[inline]
    fn get(&self, id: Uuid) -> Option<Arc<TokioMutex<V>>> {
        self.0.read().expect("poisoned").get(&id).cloned()
    }
}

impl<V: Value> Contender<V> for RwLockMutex<V> {
    const NAME: &'static str = "rwlock_mutex";

    fn with_capacity(n: usize) -> Self {
        RwLockMutex(RwLock::new(HashMap::with_capacity(n)))
    }

    async fn store(&self, id: Uuid, v: V) {
        let m = Arc::new(TokioMutex::new(v));
        self.0.write().expect("poisoned").insert(id, m);
    }

    async fn mutate(&self, id: Uuid) -> bool {
        let Some(m) = self.get(id) else { return false };
        m.lock().await.touch();
        true
    }

    fn mutate_blocking(&self, id: Uuid) -> bool {
        let Some(m) = self.get(id) else { return false };
        m.blocking_lock().touch();
        true
    }

    async fn snapshot(&self, id: Uuid) -> Option<u64> {
        let m = self.get(id)?;
        let copy: V = m.lock().await.clone();
        Some(copy.processed())
    }

    async fn delete(&self, id: Uuid) -> bool {
        self.0.write().expect("poisoned").remove(&id).is_some()
    }

    async fn hold(&self, id: Uuid, d: Duration) {
        let Some(m) = self.get(id) else { return };
        let mut g = m.lock().await;
        tokio::time::sleep(d).await;
        g.touch();
    }
}

/// Calls `$f::<C, $v>($args..)` for every contender, ctxstore first.
macro_rules! for_each_contender {
    ($v:ty, $f:ident ( $($arg:expr),* $(,)? )) => {{
        $f::<Ctxstore<$v>, $v>($($arg),*);
        $f::<CtxstoreGuard<$v>, $v>($($arg),*);
        $f::<CtxstoreOptimistic<$v>, $v>($($arg),*);
        $f::<DashMutex<$v>, $v>($($arg),*);
        $f::<Scc<$v>, $v>($($arg),*);
        $f::<PapayaMutex<$v>, $v>($($arg),*);
        $f::<PapayaArcSwap<$v>, $v>($($arg),*);
        $f::<RwLockMutex<$v>, $v>($($arg),*);
    }};
}

// ------------------------------------------------------------------ driver

const TASKS: usize = 64;
const KEYS: usize = 10_000;
const W7_TASKS: usize = 32;
const W7_THREADS: usize = 2;
const W7_KEYS: usize = 100;
/// Capacity hint for the churn workloads (at most 64 contexts live at once).
const W6_CAPACITY: usize = 1024;

/// xorshift64*: cheap per-task randomness (key choice must not dominate).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }

    fn id(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next(), self.next())
    }
}

/// A fresh seed per task per sample, so samples do not replay one sequence.
fn seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Spawns `tasks` tasks made by `make(task_index)` and waits for all;
/// returns the wall time from the first spawn to the last completion.
fn run_tasks<F, Fut>(rt: &Runtime, tasks: usize, make: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks).map(|t| tokio::spawn(make(t))).collect();
        for h in handles {
            h.await.expect("bench task panicked");
        }
        start.elapsed()
    })
}

fn keys(n: usize) -> Arc<Vec<Uuid>> {
    let mut rng = Rng::new(0xC0FFEE);
    Arc::new((0..n).map(|_| rng.id()).collect())
}

fn populate<C: Contender<V>, V: Value>(rt: &Runtime, c: &C, keys: &[Uuid]) {
    rt.block_on(async {
        for (i, &k) in keys.iter().enumerate() {
            c.store(k, V::fresh(i as u64)).await;
        }
    });
}

/// Where a workload's batch goes: criterion (`iter_custom`), or a plain
/// loop for profilers (`CTXSTORE_BENCH_CHILD=run:...`).
trait Sink {
    /// `batch(iters)` runs `iters` iterations of `elements` operations each
    /// and returns their wall time.
    fn run(&mut self, name: &str, elements: u64, batch: &mut dyn FnMut(u64) -> Duration);
}

struct CriterionSink<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
    /// In scaling mode, the worker count (the benchmark id's parameter).
    workers: Option<usize>,
}

impl Sink for CriterionSink<'_, '_> {
    fn run(&mut self, name: &str, elements: u64, batch: &mut dyn FnMut(u64) -> Duration) {
        self.group.throughput(Throughput::Elements(elements));
        match self.workers {
            Some(w) => self
                .group
                .bench_function(BenchmarkId::new(name, w), |b| b.iter_custom(&mut *batch)),
            None => self
                .group
                .bench_function(name, |b| b.iter_custom(&mut *batch)),
        };
    }
}

/// Runs one batch of `iters` iterations and prints the rate.
struct LoopSink {
    iters: u64,
}

impl Sink for LoopSink {
    fn run(&mut self, name: &str, elements: u64, batch: &mut dyn FnMut(u64) -> Duration) {
        let took = batch(self.iters);
        let ops = elements * self.iters;
        println!(
            "{name}: {ops} ops in {took:?} = {:.0} ops/s",
            ops as f64 / took.as_secs_f64()
        );
    }
}

// Operations per task in one criterion iteration, per workload.
const W1_PER: u64 = 16;
const W2_PER: u64 = 32;
const W4_PER: u64 = 64;
const W5_PER: u64 = 32;
const W6_PER: u64 = 2;
const W7_PER: u64 = 32;

/// Prints an optimistic contender's retries per mutation over all of a
/// workload's batches (criterion's warm-up included), on stderr; nothing if
/// no batch ran (filtered out).
fn report_retries<C: Contender<V>, V: Value>(c: &C, workload: &str, mutations: u64) {
    if mutations == 0 {
        return;
    }
    if let Some(retries) = c.retries() {
        eprintln!(
            "{workload}/{} ({}): {retries} retries in {mutations} mutations = {:.4} per mutation",
            C::NAME,
            V::kind(),
            retries as f64 / mutations as f64
        );
    }
}

fn w1<C: Contender<V>, V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let c = Arc::new(C::with_capacity(16));
    let key = Uuid::from_u64_pair(1, 1);
    rt.block_on(c.store(key, V::fresh(1)));
    let mut mutations = 0;
    sink.run(C::NAME, TASKS as u64 * W1_PER, &mut |iters| {
        mutations += TASKS as u64 * iters * W1_PER;
        run_tasks(rt, TASKS, |_| {
            let c = c.clone();
            async move {
                for _ in 0..iters * W1_PER {
                    black_box(c.mutate(key).await);
                }
            }
        })
    });
    report_retries(&*c, "W1_hot_key", mutations);
}

fn w2<C: Contender<V>, V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let c = Arc::new(C::with_capacity(KEYS));
    let ks = keys(KEYS);
    populate(rt, &*c, &ks);
    let mut mutations = 0;
    sink.run(C::NAME, TASKS as u64 * W2_PER, &mut |iters| {
        mutations += TASKS as u64 * iters * W2_PER;
        run_tasks(rt, TASKS, |_| {
            let (c, ks) = (c.clone(), ks.clone());
            async move {
                let mut rng = Rng::new(seed());
                for _ in 0..iters * W2_PER {
                    black_box(c.mutate(ks[rng.below(ks.len())]).await);
                }
            }
        })
    });
    report_retries(&*c, "W2_spread", mutations);
}

fn w4<C: Contender<V>, V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let c = Arc::new(C::with_capacity(KEYS));
    let ks = keys(KEYS);
    populate(rt, &*c, &ks);
    sink.run(C::NAME, TASKS as u64 * W4_PER, &mut |iters| {
        run_tasks(rt, TASKS, |_| {
            let (c, ks) = (c.clone(), ks.clone());
            async move {
                let mut rng = Rng::new(seed());
                for _ in 0..iters * W4_PER {
                    black_box(c.snapshot(ks[rng.below(ks.len())]).await);
                }
            }
        })
    });
}

fn w5<C: Contender<V>, V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let c = Arc::new(C::with_capacity(KEYS + TASKS));
    let ks = keys(KEYS);
    populate(rt, &*c, &ks);
    sink.run(C::NAME, TASKS as u64 * W5_PER, &mut |iters| {
        run_tasks(rt, TASKS, |_| {
            let (c, ks) = (c.clone(), ks.clone());
            async move {
                let mut rng = Rng::new(seed());
                // The 1%: alternately store a fresh id and delete it, so
                // the 10,000 long-lived keys stay put.
                let mut mine: Option<Uuid> = None;
                for _ in 0..iters * W5_PER {
                    let r = rng.below(1000);
                    if r < 900 {
                        black_box(c.snapshot(ks[rng.below(ks.len())]).await);
                    } else if r < 990 {
                        black_box(c.mutate(ks[rng.below(ks.len())]).await);
                    } else if let Some(id) = mine.take() {
                        black_box(c.delete(id).await);
                    } else {
                        let id = rng.id();
                        c.store(id, V::fresh(7)).await;
                        mine = Some(id);
                    }
                }
                if let Some(id) = mine {
                    c.delete(id).await;
                }
            }
        })
    });
}

/// One lifecycle: store a fresh id, mutate it 10×, snapshot, delete.
async fn lifecycle<C: Contender<V>, V: Value>(c: &C, rng: &mut Rng) {
    let id = rng.id();
    c.store(id, V::fresh(3)).await;
    for _ in 0..10 {
        black_box(c.mutate(id).await);
    }
    black_box(c.snapshot(id).await);
    black_box(c.delete(id).await);
}

fn w6<C: Contender<V>, V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let c = Arc::new(C::with_capacity(W6_CAPACITY));
    sink.run(C::NAME, TASKS as u64 * W6_PER, &mut |iters| {
        run_tasks(rt, TASKS, |_| {
            let c = c.clone();
            async move {
                let mut rng = Rng::new(seed());
                for _ in 0..iters * W6_PER {
                    lifecycle(&*c, &mut rng).await;
                }
            }
        })
    });
}

fn w7<C: Contender<V>, V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let c = Arc::new(C::with_capacity(W7_KEYS));
    let ks = keys(W7_KEYS);
    populate(rt, &*c, &ks);
    sink.run(
        C::NAME,
        (W7_TASKS + W7_THREADS) as u64 * W7_PER,
        &mut |iters| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..W7_THREADS {
                    let (c, ks) = (&c, &ks);
                    scope.spawn(move || {
                        let mut rng = Rng::new(seed());
                        for _ in 0..iters * W7_PER {
                            black_box(c.mutate_blocking(ks[rng.below(ks.len())]));
                        }
                    });
                }
                run_tasks(rt, W7_TASKS, |_| {
                    let (c, ks) = (c.clone(), ks.clone());
                    async move {
                        let mut rng = Rng::new(seed());
                        for _ in 0..iters * W7_PER {
                            black_box(c.mutate(ks[rng.below(ks.len())]).await);
                        }
                    }
                });
            });
            start.elapsed()
        },
    );
}

/// Ceiling for a lock: one uncontended CAS per op, each task on its own
/// cache line.
fn limit_cas(sink: &mut dyn Sink, rt: &Runtime, per: u64) {
    let cells: Arc<Vec<CachePadded<AtomicU64>>> = Arc::new(
        (0..TASKS)
            .map(|_| CachePadded::new(AtomicU64::new(0)))
            .collect(),
    );
    sink.run("limit_cas", TASKS as u64 * per, &mut |iters| {
        run_tasks(rt, TASKS, |t| {
            let cells = cells.clone();
            async move {
                let cell = &cells[t];
                for _ in 0..iters * per {
                    let v = cell.load(Ordering::Relaxed);
                    // AcqRel: the ordering a lock acquire would use (the
                    // ceiling must cost what a lock's CAS costs); nothing
                    // else reads these cells.
                    black_box(cell.compare_exchange(v, v + 1, Ordering::AcqRel, Ordering::Relaxed))
                        .ok();
                }
            }
        })
    });
}

/// Ceiling for a snapshot: a bare `papaya` get + `ArcSwap::load_full`.
fn limit_load_full<V: Value>(sink: &mut dyn Sink, rt: &Runtime) {
    let map: Arc<papaya::HashMap<Uuid, ArcSwap<V>>> =
        Arc::new(papaya::HashMap::with_capacity(KEYS));
    let ks = keys(KEYS);
    for (i, &k) in ks.iter().enumerate() {
        map.pin()
            .insert(k, ArcSwap::from_pointee(V::fresh(i as u64)));
    }
    sink.run(
        "limit_papaya_load_full",
        TASKS as u64 * W4_PER,
        &mut |iters| {
            run_tasks(rt, TASKS, |_| {
                let (map, ks) = (map.clone(), ks.clone());
                async move {
                    let mut rng = Rng::new(seed());
                    for _ in 0..iters * W4_PER {
                        let k = ks[rng.below(ks.len())];
                        black_box(map.pin().get(&k).map(|v| v.load_full().processed()));
                    }
                }
            })
        },
    );
}

// ------------------------------------------------------------------ extras

/// Sizes of the measurements outside criterion.
#[derive(Clone, Copy)]
struct Sizes {
    w3_run: Duration,
    w3_hold: Duration,
    fair_per_task: u64,
    w6_lifecycles: u64,
    /// Wall-time cap per contender for the W6 memory pass.
    w6_budget: Duration,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latency_json(name: &str, mut lat: Vec<u64>, run: Duration) -> serde_json::Value {
    lat.sort_unstable();
    serde_json::json!({
        "contender": name,
        "samples": lat.len(),
        "p50_ns": percentile(&lat, 0.50),
        "p99_ns": percentile(&lat, 0.99),
        "p999_ns": percentile(&lat, 0.999),
        "max_ns": lat.last().copied().unwrap_or(0),
        "rate_per_s": lat.len() as f64 / run.as_secs_f64(),
    })
}

/// W3: a writer holds the key `w3_hold` at a time; 4 tasks snapshot it.
fn w3<C: Contender<V>, V: Value>(rt: &Runtime, sz: Sizes, out: &mut Vec<serde_json::Value>) {
    const READERS: usize = 4;
    let c = Arc::new(C::with_capacity(4));
    let key = Uuid::from_u64_pair(3, 3);
    rt.block_on(c.store(key, V::fresh(3)));
    let stop = Arc::new(AtomicBool::new(false));
    let (lat, commits, run) = rt.block_on(async {
        let writer = {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut commits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.hold(key, sz.w3_hold).await;
                    commits += 1;
                    tokio::task::yield_now().await;
                }
                commits
            })
        };
        // Let the writer take the lock first.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (c, stop) = (c.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(1 << 16);
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..32 {
                            let t = Instant::now();
                            black_box(c.snapshot(key).await);
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                        // Readers that never yield would starve the writer
                        // on a 2-worker runtime.
                        tokio::task::yield_now().await;
                    }
                    lat
                })
            })
            .collect();
        tokio::time::sleep(sz.w3_run).await;
        stop.store(true, Ordering::Relaxed);
        let run = start.elapsed();
        let mut lat = Vec::new();
        for r in readers {
            lat.extend(r.await.expect("reader panicked"));
        }
        let commits = writer.await.expect("writer panicked");
        (lat, commits, run)
    });
    let mut j = latency_json(C::NAME, lat, run);
    j["writer_commits"] = commits.into();
    j["hold_ms"] = (sz.w3_hold.as_millis() as u64).into();
    println!("W3_snapshot_under_lock/{:<16} {}", C::NAME, j);
    out.push(j);
}

/// W1 fairness: the wait of every mutation under the hot key; also checks
/// that no update was lost.
fn w1_fairness<C: Contender<V>, V: Value>(
    rt: &Runtime,
    sz: Sizes,
    out: &mut Vec<serde_json::Value>,
) {
    w1_fairness_of(C::NAME, C::with_capacity(16), rt, sz, out);
}

/// [`w1_fairness`] for one store, reported under `name` (the `ctxstore_fifo`
/// row is `ctxstore` with strict FIFO hand-off).
fn w1_fairness_of<C: Contender<V>, V: Value>(
    name: &'static str,
    c: C,
    rt: &Runtime,
    sz: Sizes,
    out: &mut Vec<serde_json::Value>,
) {
    let c = Arc::new(c);
    let key = Uuid::from_u64_pair(1, 1);
    rt.block_on(c.store(key, V::fresh(1)));
    let per = sz.fair_per_task;
    let start = Instant::now();
    let lat = rt.block_on(async {
        let handles: Vec<_> = (0..TASKS)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per as usize);
                    for _ in 0..per {
                        let t = Instant::now();
                        assert!(c.mutate(key).await, "{name}: hot key vanished");
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("fairness task panicked"));
        }
        all
    });
    let run = start.elapsed();
    let total = TASKS as u64 * per;
    let seen = rt.block_on(c.snapshot(key));
    assert_eq!(seen, Some(total), "{name}: lost updates under the hot key");
    let mut j = latency_json(name, lat, run);
    j["ops"] = total.into();
    if let Some(retries) = c.retries() {
        j["retries"] = retries.into();
        j["retries_per_commit"] = (retries as f64 / total as f64).into();
    }
    println!("W1_fairness/{name:<16} {j}");
    out.push(j);
}

/// Resident set size in bytes, from `/proc/self/statm`.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

const CHILD_ENV: &str = "CTXSTORE_BENCH_CHILD";

/// In the child process: `lifecycles` lifecycles over 64 tasks (or as many
/// as fit in `budget`), RSS before and after (the store still alive, all its
/// contexts deleted).
fn w6_child<C: Contender<V>, V: Value>(name: &str, lifecycles: u64, budget: Duration) {
    if name != C::NAME {
        return;
    }
    let rt = runtime(default_workers());
    let c = Arc::new(C::with_capacity(W6_CAPACITY));
    let before = rss_bytes().unwrap_or(0);
    let per = lifecycles.div_ceil(TASKS as u64);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + budget;
    let took = run_tasks(&rt, TASKS, |t| {
        let (c, done) = (c.clone(), done.clone());
        async move {
            let mut rng = Rng::new(0x5EED + t as u64);
            for i in 0..per {
                if i % 64 == 0 && Instant::now() > deadline {
                    break;
                }
                lifecycle(&*c, &mut rng).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let after = rss_bytes().unwrap_or(0);
    let done = done.load(Ordering::Relaxed);
    let j = serde_json::json!({
        "contender": C::NAME,
        "lifecycles": done,
        "budget_hit": done < per * TASKS as u64,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_delta_bytes": after as i64 - before as i64,
        "lifecycles_per_s": done as f64 / took.as_secs_f64(),
    });
    println!("W6_RSS_RESULT {j}");
}

fn w6_rss<C: Contender<V>, V: Value>(sz: Sizes, out: &mut Vec<serde_json::Value>) {
    let exe = std::env::current_exe().expect("current_exe");
    let child = std::process::Command::new(exe)
        .env(
            CHILD_ENV,
            format!(
                "w6:{}:{}:{}",
                C::NAME,
                sz.w6_lifecycles,
                sz.w6_budget.as_millis()
            ),
        )
        .output()
        .expect("spawn the W6 child");
    let stdout = String::from_utf8_lossy(&child.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("W6_RSS_RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "W6 child for {} printed no result (status {}): {}",
                C::NAME,
                child.status,
                String::from_utf8_lossy(&child.stderr)
            )
        });
    let j: serde_json::Value = serde_json::from_str(line).expect("W6 child JSON");
    println!("W6_rss/{:<16} {}", C::NAME, j);
    out.push(j);
}

fn extras_dir() -> PathBuf {
    let home = match std::env::var_os("CRITERION_HOME") {
        Some(h) => PathBuf::from(h),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("criterion"),
    };
    home.join("ctxstore-extras")
}

fn write_extras(name: &str, rows: Vec<serde_json::Value>, meta: &serde_json::Value) {
    let dir = extras_dir();
    std::fs::create_dir_all(&dir).expect("create the extras directory");
    let doc = serde_json::json!({ "meta": meta, "rows": rows });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json")).expect("write extras");
    println!("wrote {}", path.display());
}

/// The criterion groups, in order, and the workload each runs.
const GROUPS: &[(&str, &str)] = &[
    ("W1_hot_key", "w1"),
    ("W2_spread", "w2"),
    ("W2F_spread_clone_from", "w2f"),
    ("W4_snapshot", "w4"),
    ("W4_snapshot_4KiB", "w4_4k"),
    ("W5_mixed", "w5"),
    ("W6_lifecycle", "w6"),
    ("W7_threads_tasks", "w7"),
];

fn workload_for<C: Contender<V>, V: Value>(workload: &str, sink: &mut dyn Sink, rt: &Runtime) {
    match workload {
        "w1" => w1::<C, V>(sink, rt),
        "w2" => w2::<C, V>(sink, rt),
        "w4" => w4::<C, V>(sink, rt),
        "w5" => w5::<C, V>(sink, rt),
        "w6" => w6::<C, V>(sink, rt),
        "w7" => w7::<C, V>(sink, rt),
        other => eprintln!("unknown workload {other:?}"),
    }
}

/// Profiling entry (`CTXSTORE_BENCH_CHILD=run:<workload>:<contender>:<iters>`):
/// one contender, one workload, no criterion in the profile.
fn run_one<C: Contender<V>, V: Value>(
    workload: &str,
    name: &str,
    sink: &mut dyn Sink,
    rt: &Runtime,
) {
    if name == C::NAME {
        workload_for::<C, V>(workload, sink, rt);
    }
}

// -------------------------------------------------------------------- main

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The criterion filter (first positional argument), if any.
fn filter_arg() -> Option<String> {
    const WITH_VALUE: &[&str] = &[
        "--measurement-time",
        "--warm-up-time",
        "--sample-size",
        "--save-baseline",
        "-s",
        "--baseline",
        "-b",
        "--baseline-lenient",
        "--load-baseline",
        "--color",
        "-c",
        "--output-format",
        "--plotting-backend",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--format",
    ];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let parts: Vec<&str> = spec.split(':').collect();
        match parts[..] {
            ["w6", name, n, budget_ms] => {
                let n = n.parse().unwrap_or(0);
                let budget = Duration::from_millis(budget_ms.parse().unwrap_or(60_000));
                for_each_contender!(JobCtx, w6_child(name, n, budget));
            }
            ["run", workload, name, iters] if iters.parse::<u64>().is_ok() => {
                let rt = runtime(default_workers());
                let mut sink = LoopSink {
                    iters: iters.parse().unwrap_or(1),
                };
                if workload == "w4_4k" {
                    for_each_contender!(BigCtx, run_one("w4", name, &mut sink, &rt));
                } else if workload == "w2f" {
                    for_each_contender!(JobCtxF, run_one("w2", name, &mut sink, &rt));
                } else {
                    for_each_contender!(JobCtx, run_one(workload, name, &mut sink, &rt));
                }
            }
            _ => eprintln!(
                "{CHILD_ENV}={spec:?}: expected w6:<contender>:<lifecycles>:<budget_ms> or \
                 run:<w1|w2|w2f|w4|w4_4k|w5|w6|w7>:<contender>:<iterations>"
            ),
        }
        return;
    }

    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let quick =
        has("--quick") || std::env::var_os("CTXSTORE_BENCH_QUICK").is_some_and(|v| v != "0");
    // Criterion's own rule: without `--bench` (as under `cargo test
    // --benches`) every benchmark runs once as a smoke test.
    let test_mode = !has("--bench") || has("--test");
    let list_mode = has("--list");

    let c = Criterion::default();
    let c = if has("--quick") {
        // Criterion's quick mode: doubling batches until the estimate
        // settles, at most `measurement_time` per benchmark.
        c.measurement_time(Duration::from_secs(1))
            .nresamples(10_000)
            .without_plots()
    } else if quick {
        // CTXSTORE_BENCH_QUICK without `--quick`: short regular sampling.
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1_200))
            .sample_size(10)
            .nresamples(10_000)
            .without_plots()
    } else {
        c.warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(4))
            .sample_size(30)
    };
    let mut c = c.configure_from_args();

    let workers = default_workers();
    let scaling: Option<Vec<usize>> = std::env::var("CTXSTORE_BENCH_THREADS").ok().map(|s| {
        s.split(',')
            .map(|t| {
                t.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| {
                        panic!(
                            "CTXSTORE_BENCH_THREADS={s:?}: expected worker counts like 1,2,4,8,16"
                        )
                    })
            })
            .collect()
    });

    if let Some(counts) = scaling {
        for (n, rt) in counts.iter().map(|&n| (n, runtime(n))) {
            for (group, workload) in [
                ("scale_W1_hot_key", "w1"),
                ("scale_W2_spread", "w2"),
                ("scale_W4_snapshot", "w4"),
            ] {
                let mut g = c.benchmark_group(group);
                let mut sink = CriterionSink {
                    group: &mut g,
                    workers: Some(n),
                };
                for_each_contender!(JobCtx, workload_for(workload, &mut sink, &rt));
                g.finish();
            }
        }
        c.final_summary();
        return;
    }

    let rt = runtime(workers);
    for (group, workload) in GROUPS {
        let mut g = c.benchmark_group(*group);
        let mut sink = CriterionSink {
            group: &mut g,
            workers: None,
        };
        if *workload == "w4_4k" {
            for_each_contender!(BigCtx, workload_for("w4", &mut sink, &rt));
            limit_load_full::<BigCtx>(&mut sink, &rt);
        } else if *workload == "w2f" {
            for_each_contender!(JobCtxF, workload_for("w2", &mut sink, &rt));
        } else {
            for_each_contender!(JobCtx, workload_for(workload, &mut sink, &rt));
        }
        match *workload {
            "w1" => limit_cas(&mut sink, &rt, W1_PER),
            "w2" => limit_cas(&mut sink, &rt, W2_PER),
            "w4" => limit_load_full::<JobCtx>(&mut sink, &rt),
            _ => {}
        }
        g.finish();
    }
    c.final_summary();

    if list_mode || std::env::var_os("CTXSTORE_BENCH_EXTRAS").is_some_and(|v| v == "0") {
        return;
    }
    let sizes = if test_mode {
        Sizes {
            w3_run: Duration::from_millis(100),
            w3_hold: Duration::from_millis(20),
            fair_per_task: 20,
            w6_lifecycles: 2_000,
            w6_budget: Duration::from_secs(10),
        }
    } else if quick {
        Sizes {
            w3_run: Duration::from_millis(1_000),
            w3_hold: Duration::from_millis(20),
            fair_per_task: 300,
            w6_lifecycles: 1_000_000,
            w6_budget: Duration::from_secs(12),
        }
    } else {
        Sizes {
            w3_run: Duration::from_secs(3),
            w3_hold: Duration::from_millis(20),
            fair_per_task: 2_000,
            w6_lifecycles: 1_000_000,
            w6_budget: Duration::from_secs(120),
        }
    };
    let filter = filter_arg();
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let meta = serde_json::json!({
        "workers": workers,
        "mode": if test_mode { "test" } else if quick { "quick" } else { "full" },
    });
    if wanted("W3_snapshot_under_lock") {
        let mut rows = Vec::new();
        for_each_contender!(JobCtx, w3(&rt, sizes, &mut rows));
        if !test_mode {
            write_extras("W3_snapshot_under_lock", rows, &meta);
        }
    }
    if wanted("W1_fairness") {
        let mut rows = Vec::new();
        for_each_contender!(JobCtx, w1_fairness(&rt, sizes, &mut rows));
        // The tail of strict FIFO hand-off, for comparison with the bounded
        // fairness of the default store and with tokio's FIFO mutex.
        let fifo = InMemoryContextStorage::with_capacity(16).with_fairness_bound(Duration::ZERO);
        w1_fairness_of::<Ctxstore<JobCtx>, JobCtx>(
            "ctxstore_fifo",
            Ctxstore(fifo, std::marker::PhantomData),
            &rt,
            sizes,
            &mut rows,
        );
        if !test_mode {
            write_extras("W1_fairness", rows, &meta);
        }
    }
    if wanted("W6_rss") {
        let mut rows = Vec::new();
        for_each_contender!(JobCtx, w6_rss(sizes, &mut rows));
        if !test_mode {
            write_extras("W6_rss", rows, &meta);
        }
    }
}
