//! [`RedisContextStorage`]: the same store shared by many processes through
//! one Redis server (cargo feature `redis`).
//!
//! # Data layout
//!
//! For a namespace `ns`, a context type of kind `k` and an id `u`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `ns:k:u` | hash | `value` (the JSON bytes) and `version` (decimal) |
//! | `ns:k:u:lock` | string, `PX` lease | the random token of the lease holder |
//! | `ns:k:u:waiting` | string, `PX` | set while some process waits for the lease |
//! | `ns:#floor` | hash | per kind: the highest version a deleted context reached |
//! | channel `ns:#wake` | pub/sub | the data key whose lease was just released |
//!
//! # Versions (ABA protection)
//!
//! A commit bumps `version` with `HINCRBY` inside the commit script. Deleting
//! a context records its last version in the per-kind floor (`ns:#floor`,
//! field `k`, only ever raised), and creating a context starts from that
//! floor, so a key's versions strictly increase and are never reused, also
//! across delete and re-create, while a deleted context leaves nothing
//! behind but one number per kind. Versions travel as decimal strings, but
//! the scripts compare them as Lua numbers (doubles) when raising the floor:
//! exact up to 2^53 commits per kind, which no deployment reaches.
//!
//! Every script checks every number it reads (digits only) before its first
//! write, since Lua scripts are not rolled back, and refuses a corrupt one
//! with a `Codec` error naming the key: a corrupt version is never taken
//! into the floor (delete refuses), a lock is never taken on it, and
//! `store_context` repairs it, restarting the key's version at the server
//! clock in microseconds (above any version commits can have reached).
//!
//! # Locking, fencing and waking
//!
//! `get_context` runs one script: if `ns:k:u:lock` exists the key is held
//! (the script marks `ns:k:u:waiting` and returns the lease's remaining
//! time); otherwise it `SET`s the lock with a fresh random token and `PX`
//! lease and returns value and version in the same round trip. A task
//! renews the lease every renewal interval while the guard lives. Commit is
//! one script: the token must still be ours and the version the one we
//! read; it writes, bumps the version, deletes the lock and, if someone
//! marked `waiting`, publishes the key on `ns:#wake`. A holder whose lease
//! expired (paused process, cut network) finds another token or none and
//! gets `LeaseLost`; nothing is written. Renewal never resurrects an expired
//! lease: it only extends a lock that still holds our token.
//!
//! Within one process, the tasks that want the same key queue on a local
//! FIFO gate first, so only one task per process talks to Redis about a
//! key; the others wait in memory. Across processes, waiters are woken by
//! the `ns:#wake` publication (one RESP3 subscription per store) and, as a
//! fallback for lost messages or crashed holders, re-try no sooner than the
//! renewal interval, or exactly when the holder's lease runs out.
//!
//! # Cancellation
//!
//! A lock attempt runs in a spawned task, and every acquisition that does
//! not end in a guard gives its token back (token-checked, so it is always
//! safe to send): a reply that failed (timed out, connection lost: the
//! script may have run all the same) or did not parse is followed by a
//! release (spawned, and sent on the same connection after the script, so
//! Redis runs it after the script); a lease taken for a caller whose
//! future was dropped, while the script was in flight or after its reply
//! arrived, is released when the unclaimed reply is dropped. Dropping a
//! guard spawns the release script (it never blocks)
//! and stops the renewal task; if Redis is unreachable then, the lease simply
//! expires, since nothing renews it any more.

mod builder;
mod lease;
mod reply;
mod scripts;
mod wait;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Value;
use uuid::Uuid;

pub use builder::RedisContextStorageBuilder;
use lease::{PendingRelease, RedisLease};
use reply::{bad_reply, corrupt, held_ttl, reply_items, version_of};
use scripts::{DELETE, STORE};
use wait::WaitRegistry;

use crate::context::ContextType;
use crate::error::boxed;
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, RawGuard, RawSnapshot, Wait};
use crate::Result;

/// A [`ContextStorage`] on Redis: many processes share one store.
///
/// Same semantics as the in-memory engine (shared conformance suite), with
/// these differences, all inherent to a remote store:
/// * values are serialized (JSON) and a snapshot is a decoded copy made by
///   one `HMGET`, not a shared `Arc` of the committed value;
/// * the lock is a lease: a holder that stops renewing (crash, pause, lost
///   network) loses it after the lease length and then gets `LeaseLost` at
///   commit, writing nothing;
/// * waiters are served in arrival order within a process; across processes
///   whoever asks first after a release wins (no starvation-proof FIFO);
/// * a cancelled `store_context`/`delete_context`/`commit` whose request
///   already reached Redis may have been applied (whole, never partly).
///
/// Needs a tokio runtime (it spawns the renewal and release tasks on the
/// runtime it was connected from). Scripts touch several keys of one
/// context and of the namespace, so Redis Cluster is not supported.
#[derive(Clone)]
pub struct RedisContextStorage {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    /// The RESP3 connection subscribed to the wake channel.
    sub: ConnectionManager,
    namespace: String,
    floor_key: String,
    channel: String,
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

    /// The Redis key of the hash holding a context's value and version.
    pub fn data_key(&self, ty: &ContextType, id: Uuid) -> String {
        format!("{}:{}:{}", self.inner.namespace, ty.kind(), id)
    }

    fn keys(&self, ty: &ContextType, id: Uuid) -> Keys {
        let data = self.data_key(ty, id);
        Keys {
            lock: format!("{data}:lock"),
            waiting: format!("{data}:waiting"),
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

impl ContextStorage for RedisContextStorage {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let bytes = ty.encode(Some(id), &*value)?;
            let keys = self.keys(ty, id);
            let mark_ms = self.mark_ms();
            let (version, _gate) = self
                .with_wait(ty, id, &keys.data, Wait::Forever, |_| {
                    let mut conn = self.inner.conn.clone();
                    let keys = &keys;
                    let bytes = &bytes;
                    let floor = &self.inner.floor_key;
                    async move {
                        let v: Value = STORE
                            .key(&keys.data)
                            .key(&keys.lock)
                            .key(&keys.waiting)
                            .key(floor)
                            .arg(bytes.as_slice())
                            .arg(ty.kind())
                            .arg(mark_ms)
                            .invoke_async(&mut conn)
                            .await
                            .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
                        let (code, rest) = reply_items(ty, id, &v)?;
                        match code {
                            1 => Ok(Step::Done(version_of(ty, id, rest.first())?)),
                            0 => Ok(Step::Held(held_ttl(rest))),
                            -3 => Err(corrupt(ty, id, &keys.data, rest)),
                            _ => Err(bad_reply(ty, id, &v)),
                        }
                    }
                })
                .await?;
            Ok(version)
        })
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
                let floor = &self.inner.floor_key;
                async move {
                    let v: Value = DELETE
                        .key(&keys.data)
                        .key(&keys.lock)
                        .key(&keys.waiting)
                        .key(floor)
                        .arg(ty.kind())
                        .arg(mark_ms)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
                    let (code, rest) = reply_items(ty, id, &v)?;
                    match code {
                        1 => Ok(Step::Done(())),
                        0 => Ok(Step::Held(held_ttl(rest))),
                        -1 => Ok(Step::Missing),
                        -3 => Err(corrupt(ty, id, &keys.data, rest)),
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
            let prefix = format!("{}:{}:", self.inner.namespace, ty.kind());
            let pattern = format!("{}*", glob_escape(&prefix));
            let mut conn = self.inner.conn.clone();
            let mut ids = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("hash")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| ty.backend_error(None, boxed(e)))?;
                ids.extend(
                    keys.iter()
                        .filter_map(|k| k.strip_prefix(&prefix))
                        .filter(|rest| rest.len() == 36)
                        .filter_map(|rest| Uuid::parse_str(rest).ok()),
                );
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            // SCAN may return a key more than once.
            ids.sort_unstable();
            ids.dedup();
            Ok(ids)
        })
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
