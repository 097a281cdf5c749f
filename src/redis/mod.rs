//! [`RedisContextStorage`]: the same store shared by many processes through
//! one Redis server (cargo feature `redis`).
//!
//! What the backend does and why — key layout, protocol, versions,
//! fencing, differences from the in-memory engine, required server
//! settings, faults, measurements — is written once, for users, in
//! [`crate::docs::redis`] (`docs/redis.md`). The code:
//!
//! * `mod.rs`: the store, its keys, and the `ContextStorage` methods, each
//!   one script run through the wait loop.
//! * `builder.rs`: options, `connect`, the connect-time checks (settings,
//!   the server's eviction policy and persistence) and the task that keeps
//!   the wake-up subscription alive.
//! * `wait.rs`: the key's local FIFO gate (the shared one of
//!   `crate::remote`) with its wake-up beside it, and the retry loop around
//!   a script that finds the key held: woken by the `ns:#wake` publication,
//!   or at the latest after the renewal interval or when the holder's lease
//!   runs out.
//! * `lease.rs`: taking a lease in a spawned task so that none is ever
//!   leaked (a `PendingRelease` gives back a lease nobody claimed), renewing
//!   it while the guard lives, committing and releasing it (the lease
//!   convention of `crate::remote`: dropping the lease is the release).
//! * `watch.rs`: `watch_raw`: a watch's wake-up beside the key's lease
//!   waiters, re-reads on a publication for the key (writers publish when
//!   the key is marked watched), on a subscription drop or re-subscribe,
//!   and at a slow fallback interval; the creation stamp tells a
//!   re-created context from the watched one.
//! * `topology.rs`: one server or a Redis Cluster: the connection (either
//!   kind), where the keys contexts share live (the store's floor and wake
//!   channel, or one per hash slot), the slot subscriptions made on first
//!   use, and `SCAN` over every master.
//! * `reply.rs`: the scripts' `{code, ...}` replies, and the `Codec` error
//!   for a stored number that is not one.
//! * `scripts.rs` and `scripts/*.lua`: the Lua scripts; each file says what
//!   it takes (`KEYS`, `ARGV`) and returns. Every script validates every
//!   number it reads before its first write, since Lua scripts are not
//!   rolled back.

mod builder;
mod lease;
mod reply;
mod scripts;
mod topology;
mod wait;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use uuid::Uuid;

pub use builder::RedisContextStorageBuilder;
use lease::{PendingRelease, RedisLease};
use reply::{bad_reply, corrupt, held_ttl, reply_items, version_of};
use scripts::{DELETE, DELETE_IF, STORE, STORE_IF};
use topology::{Conn, Topology};
use wait::WaitRegistry;

use crate::context::ContextType;
use crate::error::boxed;
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, RawGuard, RawSnapshot, Wait};
use crate::watch::RawWatchStart;
use crate::Result;

/// A [`ContextStorage`] on Redis: many processes share one store.
///
/// Same semantics as the in-memory engine (shared conformance suite), with
/// the differences inherent to a remote store: values are serialized
/// (JSON) and snapshots are decoded copies; the lock is a lease that a
/// holder which stops renewing loses (then `commit` fails with
/// `LeaseLost`, writing nothing); waiters are served in arrival order only
/// within a process; a cancelled write whose request reached Redis may
/// have been applied (whole, never partly). `watch_context` is woken
/// through pub/sub (writers publish only for watched keys) and re-reads the
/// context. See [`crate::docs::redis`] for all of it, and for the server
/// settings the store needs.
///
/// Needs a tokio runtime (it spawns the renewal and release tasks on the
/// runtime it was connected from). Runs on one server
/// ([`connect`](Self::connect)) or on a Redis Cluster
/// ([`connect_cluster`](Self::connect_cluster)), with the same guarantees
/// save what a cluster failover can lose (see [`crate::docs::redis`]).
#[derive(Clone)]
pub struct RedisContextStorage {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    /// The RESP3 connection subscribed to the wake-up channel(s).
    sub: Conn,
    namespace: String,
    /// One server or a cluster: where the floor and wake-ups live.
    topology: Topology,
    lease_ms: u64,
    renew: Duration,
    waits: Arc<WaitRegistry>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RedisContextStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisContextStorage")
            .field("namespace", &self.inner.namespace)
            .field("lease_ms", &self.inner.lease_ms)
            .field("renewal_interval", &self.inner.renew)
            .finish()
    }
}

struct Keys {
    data: String,
    lock: String,
    waiting: String,
    /// Exists while some watcher wants the key's changes published.
    watched: String,
    /// The version floor hash of the context's kind (on a cluster, of its
    /// kind in its slot).
    floor: String,
    /// Where its wake-ups are published.
    channel: String,
}

enum Step<R> {
    Done(R),
    /// Held by someone else; the lease has this many ms left (<0: unknown).
    Held(i64),
    Missing,
}

struct Acquired {
    version: u64,
    value: Vec<u8>,
    /// Set once the lease is ours; gives it back unless a guard takes it.
    release: Option<PendingRelease>,
}

impl RedisContextStorage {
    /// The key prefix of this store.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Whether this store runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.topology, Topology::Cluster { .. })
    }

    /// The Redis key of the hash holding a context's value and version:
    /// `ns:kind:id` on one server, `ns:{id}:kind` on a cluster (the id is
    /// the hash tag, so every key of the context is in one slot and the
    /// contexts of a kind spread over all of them).
    pub fn data_key(&self, ty: &ContextType, id: Uuid) -> String {
        match self.inner.topology {
            Topology::Node { .. } => format!("{}:{}:{}", self.inner.namespace, ty.kind(), id),
            Topology::Cluster { .. } => {
                format!("{}:{{{}}}:{}", self.inner.namespace, id, ty.kind())
            }
        }
    }

    fn keys(&self, ty: &ContextType, id: Uuid) -> Keys {
        let data = self.data_key(ty, id);
        let (ns, topology) = (&self.inner.namespace, &self.inner.topology);
        Keys {
            lock: format!("{data}:lock"),
            waiting: format!("{data}:waiting"),
            watched: format!("{data}:watched"),
            floor: topology.floor_key(ns, &data),
            channel: topology.channel(ns, &data),
            data,
        }
    }

    fn mark_ms(&self) -> u64 {
        // Long enough to survive until the waiter's next retry.
        self.inner.lease_ms.saturating_mul(2)
    }
}

fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl RedisContextStorage {
    /// `store_raw` (`expected: None`, the `STORE` script) and `store_if_raw`
    /// (`Some`, the `STORE_IF` script, which takes the expected version as
    /// one more argument and may also answer "missing" or "conflict"). Both
    /// scripts refuse while a lease is held, and `with_wait` waits for its
    /// release (the key's gate, then the wake-up) and calls them again; the
    /// conditional one compares only when the key is free.
    async fn store_with(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
        expected: Option<u64>,
    ) -> Result<u64> {
        let bytes = ty.encode(Some(id), &*value)?;
        let keys = self.keys(ty, id);
        let mark_ms = self.mark_ms();
        let (version, _gate) = self
            .with_wait(ty, id, &keys.data, Wait::Forever, |_| {
                let mut conn = self.inner.conn.clone();
                let keys = &keys;
                let bytes = &bytes;
                let publish = self.inner.topology.publish();
                async move {
                    let script = match expected {
                        None => &*STORE,
                        Some(_) => &*STORE_IF,
                    };
                    let mut call = script.prepare_invoke();
                    call.key(&keys.data)
                        .key(&keys.lock)
                        .key(&keys.waiting)
                        .key(&keys.floor)
                        .key(&keys.watched)
                        .arg(bytes.as_slice())
                        .arg(ty.kind())
                        .arg(mark_ms);
                    if let Some(expected) = expected {
                        call.arg(expected.to_string());
                    }
                    call.arg(&keys.channel).arg(&keys.data).arg(publish);
                    let v: Value = call
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
                    let (code, rest) = reply_items(ty, id, &v)?;
                    match (code, expected) {
                        (1, _) => Ok(Step::Done(version_of(ty, id, rest.first())?)),
                        (0, _) => Ok(Step::Held(held_ttl(rest))),
                        (-1, Some(_)) => Ok(Step::Missing),
                        (2, Some(expected)) => {
                            Err(ty.conflict(id, expected, version_of(ty, id, rest.first())?))
                        }
                        (-3, _) => Err(corrupt(ty, id, (&keys.data, &keys.floor), rest)),
                        _ => Err(bad_reply(ty, id, &v)),
                    }
                }
            })
            .await?;
        Ok(version)
    }
}

impl ContextStorage for RedisContextStorage {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.store_with(ty, id, value, None))
    }

    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        Box::pin(async move {
            let keys = self.keys(ty, id);
            let token = new_token();
            let (mut acquired, gate) = self
                .with_wait(ty, id, &keys.data, wait, |mark| {
                    self.try_acquire(ty, id, &keys, &token, mark)
                })
                .await?;
            // From here on, dropping `lease` releases the lock.
            let lease = RedisLease::start(
                self.inner.clone(),
                ty,
                id,
                acquired.version,
                token,
                keys,
                gate,
            );
            if let Some(pending) = acquired.release.take() {
                pending.disarm();
            }
            let value = ty.decode(Some(id), &acquired.value)?;
            Ok(RawGuard::Remote {
                value,
                version: acquired.version,
                lease: Box::new(lease),
            })
        })
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        Box::pin(async move {
            let mut conn = self.inner.conn.clone();
            let (value, version): (Option<Vec<u8>>, Option<Value>) = redis::cmd("HMGET")
                .arg(self.data_key(ty, id))
                .arg("value")
                .arg("version")
                .query_async(&mut conn)
                .await
                .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
            let Some(version) = version else {
                return Err(ty.not_found(id));
            };
            let version = version_of(ty, id, Some(&version))?;
            ty.decode_snapshot(id, value.as_deref().unwrap_or_default(), version)
        })
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let keys = self.keys(ty, id);
            let mark_ms = self.mark_ms();
            self.with_wait(ty, id, &keys.data, Wait::Forever, |_| {
                let mut conn = self.inner.conn.clone();
                let keys = &keys;
                let publish = self.inner.topology.publish();
                async move {
                    let v: Value = DELETE
                        .key(&keys.data)
                        .key(&keys.lock)
                        .key(&keys.waiting)
                        .key(&keys.floor)
                        .key(&keys.watched)
                        .arg(ty.kind())
                        .arg(mark_ms)
                        .arg(&keys.channel)
                        .arg(&keys.data)
                        .arg(publish)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
                    let (code, rest) = reply_items(ty, id, &v)?;
                    match code {
                        1 => Ok(Step::Done(())),
                        0 => Ok(Step::Held(held_ttl(rest))),
                        -1 => Ok(Step::Missing),
                        -3 => Err(corrupt(ty, id, (&keys.data, &keys.floor), rest)),
                        _ => Err(bad_reply(ty, id, &v)),
                    }
                }
            })
            .await?;
            Ok(())
        })
    }

    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.store_with(ty, id, value, Some(expected)))
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let keys = self.keys(ty, id);
            let mark_ms = self.mark_ms();
            self.with_wait(ty, id, &keys.data, Wait::Forever, |_| {
                let mut conn = self.inner.conn.clone();
                let keys = &keys;
                let publish = self.inner.topology.publish();
                async move {
                    let v: Value = DELETE_IF
                        .key(&keys.data)
                        .key(&keys.lock)
                        .key(&keys.waiting)
                        .key(&keys.floor)
                        .key(&keys.watched)
                        .arg(ty.kind())
                        .arg(mark_ms)
                        .arg(expected.to_string())
                        .arg(&keys.channel)
                        .arg(&keys.data)
                        .arg(publish)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
                    let (code, rest) = reply_items(ty, id, &v)?;
                    match code {
                        1 => Ok(Step::Done(())),
                        0 => Ok(Step::Held(held_ttl(rest))),
                        -1 => Ok(Step::Missing),
                        2 => Err(ty.conflict(id, expected, version_of(ty, id, rest.first())?)),
                        -3 => Err(corrupt(ty, id, (&keys.data, &keys.floor), rest)),
                        _ => Err(bad_reply(ty, id, &v)),
                    }
                }
            })
            .await?;
            Ok(())
        })
    }

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let mut conn = self.inner.conn.clone();
            redis::cmd("HEXISTS")
                .arg(self.data_key(ty, id))
                .arg("version")
                .query_async(&mut conn)
                .await
                .map_err(|e| ty.backend_error(Some(id), boxed(e)))
        })
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        Box::pin(async move {
            // `ns:kind:<id>` on one server, `ns:{<id>}:kind` on a cluster.
            let ns = &self.inner.namespace;
            let (prefix, suffix) = match self.inner.topology {
                Topology::Node { .. } => (format!("{ns}:{}:", ty.kind()), String::new()),
                Topology::Cluster { .. } => (format!("{ns}:{{"), format!("}}:{}", ty.kind())),
            };
            let pattern = format!("{}*{}", glob_escape(&prefix), glob_escape(&suffix));
            let keys = self
                .inner
                .conn
                .scan_hashes(&pattern)
                .await
                .map_err(|e| ty.backend_error(None, boxed(e)))?;
            let mut ids: Vec<Uuid> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(suffix.as_str()))
                .filter(|id| id.len() == 36)
                .filter_map(|id| Uuid::parse_str(id).ok())
                .collect();
            // SCAN may return a key more than once.
            ids.sort_unstable();
            ids.dedup();
            Ok(ids)
        })
    }

    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        Box::pin(self.watch(ty, id))
    }

    fn backend_name(&self) -> &'static str {
        "redis"
    }
}

/// Escapes Redis glob metacharacters (type names may contain `[`, `]`).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
