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

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::{oneshot, Notify, OwnedMutexGuard};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::context::ContextType;
use crate::error::{boxed, message};
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, Lease, RawGuard, RawSnapshot, Wait};
use crate::{ContextError, ContextKey, Result};

const DEFAULT_LEASE: Duration = Duration::from_secs(5);
const MIN_LEASE: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// Scripts. KEYS and ARGV are listed above each one.

/// Prepended to every script that reads a stored number: `num(s)` is the
/// number if `s` is a plain decimal version (digits only, at most 18 of
/// them, so that `HINCRBY` and Lua's doubles handle it exactly enough), else
/// `nil`. Every script validates every number it reads *before its first
/// write* (Lua scripts are not rolled back) and otherwise refuses with
/// `{-3, what, found}`, which the client turns into a `Codec` error naming
/// the key.
const NUM: &str = r"
local function num(s)
  if type(s) == 'string' and #s > 0 and #s <= 18 and not string.find(s, '%D') then
    return tonumber(s)
  end
  return nil
end
";

fn script(body: &str) -> Script {
    Script::new(&format!("{NUM}{body}"))
}

/// KEYS: data, lock, waiting. ARGV: token, lease ms, waiting-mark ms (0: do
/// not mark). Returns `{1, version, value}`, `{0, pttl}` if held, `{-1}` if
/// the context does not exist, `{-3, 'version', found}` if the stored
/// version is not a number (no lock is taken in either case).
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[3] ~= '0' then redis.call('SET', KEYS[3], '1', 'PX', ARGV[3]) end
  return {0, redis.call('PTTL', KEYS[2])}
end
local r = redis.call('HMGET', KEYS[1], 'value', 'version')
if not r[2] then return {-1} end
if not num(r[2]) then return {-3, 'version', r[2]} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, r[2], r[1] or ''}
",
    )
});

/// KEYS: data, lock, waiting, floor. ARGV: value, kind, waiting-mark ms.
/// Returns `{1, new version}`, `{0, pttl}` if held, `{-3, 'floor', found}`
/// if the kind's floor is not a number (nothing written).
///
/// A stored version that is not a number is repaired: the new version is
/// the server clock in microseconds (or the kind's floor if that is
/// higher), above any version the key can have reached by commits, so
/// versions still never repeat.
static STORE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  return {0, redis.call('PTTL', KEYS[2])}
end
local v = redis.call('HGET', KEYS[1], 'version')
if (not v) or (not num(v)) then
  local f = redis.call('HGET', KEYS[4], ARGV[2])
  local base = 0
  if f then
    base = num(f)
    if not base then return {-3, 'floor', f} end
  end
  if v then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    if now > base then base = now end
  end
  redis.call('HSET', KEYS[1], 'version', string.format('%.0f', base))
end
redis.call('HSET', KEYS[1], 'value', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return {1, redis.call('HGET', KEYS[1], 'version')}
",
    )
});

/// KEYS: data, lock, waiting, floor. ARGV: kind, waiting-mark ms.
/// Returns `{1}` when deleted, `{0, pttl}` if held, `{-1}` if absent,
/// `{-3, 'version' | 'floor', found}` if a number is corrupt (nothing
/// written: a corrupt version never reaches the floor).
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
  return {0, redis.call('PTTL', KEYS[2])}
end
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {-1} end
local n = num(v)
if not n then return {-3, 'version', v} end
local f = redis.call('HGET', KEYS[4], ARGV[1])
if f and not num(f) then return {-3, 'floor', f} end
if (not f) or num(f) < n then redis.call('HSET', KEYS[4], ARGV[1], v) end
redis.call('DEL', KEYS[1])
return {1}
",
    )
});

/// KEYS: data, lock, waiting. ARGV: token, version as read, value, wake
/// channel, data key. Returns `{1, new version}`, `{-1}` if the lease is no
/// longer ours (nothing written), `{-2, found version}` if the version moved
/// (nothing written, lease released), `{-3, 'version', found}` if the
/// stored version is not a number (nothing written, lease released).
static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {-1} end
local v = redis.call('HGET', KEYS[1], 'version')
local ok = (v == ARGV[2]) and (num(v) ~= nil)
if ok then
  redis.call('HSET', KEYS[1], 'value', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
end
redis.call('DEL', KEYS[2])
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
if ok then return {1, redis.call('HGET', KEYS[1], 'version')} end
if v and not num(v) then return {-3, 'version', v} end
return {-2, v or '0'}
",
    )
});

/// KEYS: lock, waiting. ARGV: token, wake channel, data key. Returns 1 if
/// the lease was ours and is released.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('DEL', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
",
    )
});

/// KEYS: lock. ARGV: token, lease ms. Returns 1 if the lease was still ours
/// and is extended; 0 if it expired or was taken (never re-created).
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

// ---------------------------------------------------------------------------
// Builder

/// Configures and connects a [`RedisContextStorage`].
///
/// ```no_run
/// # async fn demo() -> ctxstore::Result<()> {
/// use std::time::Duration;
/// let store = ctxstore::RedisContextStorage::builder("redis://127.0.0.1:6379")
///     .namespace("jobs")
///     .lease(Duration::from_secs(10))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RedisContextStorageBuilder {
    url: String,
    namespace: String,
    lease: Duration,
    renew: Option<Duration>,
    config: ConnectionManagerConfig,
}

impl RedisContextStorageBuilder {
    /// The key prefix (default `ctxstore`; no glob characters, no `:`). Stores with different namespaces
    /// on one server never see each other's contexts.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long a lease lives without renewal (default 5 s, at least 10 ms):
    /// the longest a crashed holder can keep others waiting.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often a live guard renews its lease, and the slowest fallback
    /// poll of a waiter (default: a third of the lease; must be shorter than
    /// the lease).
    pub fn renewal_interval(mut self, every: Duration) -> Self {
        self.renew = Some(every);
        self
    }

    /// How long one Redis command may take before it fails with a `Backend`
    /// error (the driver's default is 500 ms; `None` waits forever).
    pub fn response_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config = self.config.set_response_timeout(timeout);
        self
    }

    /// How long one connection attempt may take (driver default 1 s).
    pub fn connection_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config = self.config.set_connection_timeout(timeout);
        self
    }

    /// Replaces the whole connection configuration (retries, backoff,
    /// timeouts) of the `redis` crate's `ConnectionManager`.
    pub fn connection_config(mut self, config: ConnectionManagerConfig) -> Self {
        self.config = config;
        self
    }

    /// Connects (two connections: commands and the wake-up subscription).
    /// Fails with a `Backend` error if Redis cannot be reached or the
    /// options are invalid.
    pub async fn connect(self) -> Result<RedisContextStorage> {
        let lease = self.lease;
        let renew = self.renew.unwrap_or(lease / 3);
        if lease < MIN_LEASE || renew.is_zero() || renew >= lease {
            return Err(setup_error(message(format!(
                "invalid lease settings: lease {lease:?} (at least {MIN_LEASE:?}) \
                 and renewal interval {renew:?} (non-zero, shorter than the lease)"
            ))));
        }
        // No `:` either: keys are `ns:kind:id`, and a kind may contain `:`,
        // so only a colon-free namespace keeps (namespace, kind) apart.
        if self.namespace.is_empty() || self.namespace.contains(['*', '?', '[', ']', '\\', ':']) {
            return Err(setup_error(message(format!(
                "invalid namespace {:?}: it must be non-empty and free of glob characters and `:`",
                self.namespace
            ))));
        }
        let client = Client::open(self.url.as_str()).map_err(|e| setup_error(boxed(e)))?;
        let conn = ConnectionManager::new_with_config(client.clone(), self.config.clone())
            .await
            .map_err(|e| setup_error(boxed(e)))?;

        check_durability(conn.clone(), &self.namespace).await;

        // The subscription connection speaks RESP3 so that the driver
        // re-subscribes by itself after a reconnect.
        let info = client.get_connection_info().clone();
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let sub_client = Client::open(info.set_redis_settings(redis_settings))
            .map_err(|e| setup_error(boxed(e)))?;
        let waits = Arc::new(WaitRegistry::default());
        let weak: Weak<WaitRegistry> = Arc::downgrade(&waits);
        let push = move |info: PushInfo| -> std::result::Result<(), ()> {
            match weak.upgrade() {
                Some(waits) => {
                    waits.on_push(info);
                    Ok(())
                }
                None => Err(()),
            }
        };
        let sub_config = self
            .config
            .clone()
            .set_push_sender(push)
            .set_automatic_resubscription();
        let mut sub = ConnectionManager::new_with_config(sub_client, sub_config)
            .await
            .map_err(|e| setup_error(boxed(e)))?;
        let channel = format!("{}:#wake", self.namespace);
        sub.subscribe(&channel)
            .await
            .map_err(|e| setup_error(boxed(e)))?;

        let inner = Arc::new(Inner {
            conn,
            sub,
            floor_key: format!("{}:#floor", self.namespace),
            namespace: self.namespace,
            channel,
            lease_ms: lease.as_millis().max(1) as u64,
            renew,
            waits,
            runtime: tokio::runtime::Handle::current(),
        });
        inner
            .runtime
            .spawn(watch_subscription(Arc::downgrade(&inner), renew));
        Ok(RedisContextStorage { inner })
    }
}

/// Warns (`tracing::warn!`) when the server's settings can lose the store's
/// keys: an `allkeys-*` eviction policy (values, versions and the version
/// floor can be evicted, after which versions repeat), or no persistence
/// at all (a restart forgets everything). Servers that refuse `CONFIG GET`
/// (managed services) are not checked.
async fn check_durability(mut conn: ConnectionManager, namespace: &str) {
    let config: redis::RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory*")
        .query_async(&mut conn)
        .await;
    let persistence: redis::RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut conn)
        .await;
    let save: redis::RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut conn)
        .await;
    let (config, aof, save) = match (config, persistence, save) {
        (Ok(c), Ok(a), Ok(s)) => (c, a, s),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            tracing::debug!(error = %e, "cannot read the Redis configuration; durability not checked");
            return;
        }
    };
    let policy = config.get("maxmemory-policy").map_or("", String::as_str);
    if let Some(warning) = eviction_warning(policy, config.get("maxmemory").map(String::as_str)) {
        tracing::warn!(namespace, maxmemory_policy = policy, "{warning}");
    }
    let aof_on = aof.get("appendonly").is_some_and(|v| v == "yes");
    let rdb_on = save.get("save").is_some_and(|v| !v.trim().is_empty());
    if !aof_on && !rdb_on {
        tracing::warn!(
            namespace,
            "Redis has no persistence (appendonly no, save \"\"): a restart loses every \
             context and the version floor, after which versions repeat. Enable AOF \
             (appendonly yes, appendfsync everysec or always) or RDB snapshots; see the \
             README's Redis durability notes"
        );
    }
}

/// The warning for an eviction policy that can evict the store's keys.
fn eviction_warning(policy: &str, maxmemory: Option<&str>) -> Option<String> {
    if policy.starts_with("allkeys-") {
        Some(format!(
            "Redis maxmemory-policy is {policy} (maxmemory {}): under memory pressure it can \
             evict contexts and the version floor, losing committed values and letting \
             versions repeat. Use maxmemory-policy noeviction for a ctxstore server",
            maxmemory.unwrap_or("?")
        ))
    } else {
        None
    }
}

/// Keeps the wake-up subscription alive. The driver reconnects (and
/// re-subscribes) when it sees the connection drop, but if Redis stays away
/// longer than its retries, only a command on the connection makes it try
/// again; nothing else is ever sent on it, so ping it. Ends with the store.
async fn watch_subscription(inner: Weak<Inner>, renew: Duration) {
    let every = renew.min(Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let Some(mut sub) = inner.upgrade().map(|i| i.sub.clone()) else {
            return;
        };
        if let Err(e) = redis::cmd("PING").query_async::<Value>(&mut sub).await {
            tracing::debug!(error = %e, "wake-up subscription is down; reconnecting");
        }
    }
}

fn setup_error(source: crate::BoxError) -> ContextError {
    ContextError::Backend {
        key: ContextKey::of_backend("redis", "RedisContextStorage"),
        source,
    }
}

// ---------------------------------------------------------------------------
// Local wait registry: one FIFO gate and one wake-up per key in use.

#[derive(Default)]
struct WaitRegistry {
    // Invariant: an entry exists while at least one KeyHandle for it lives;
    // the count is the number of live handles.
    keys: Mutex<HashMap<String, (Arc<KeyState>, usize)>>,
}

struct KeyState {
    /// Local FIFO queue: one task per process talks to Redis about a key.
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Woken when the key's lease is released (pub/sub) or the subscription
    /// connection dropped (a release may have been missed).
    wake: Notify,
}

impl WaitRegistry {
    fn register(self: &Arc<Self>, key: &str) -> KeyHandle {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let entry = keys.entry(key.to_owned()).or_insert_with(|| {
            (
                Arc::new(KeyState {
                    gate: Arc::new(tokio::sync::Mutex::new(())),
                    wake: Notify::new(),
                }),
                0,
            )
        });
        entry.1 += 1;
        KeyHandle {
            registry: self.clone(),
            key: key.to_owned(),
            state: entry.0.clone(),
        }
    }

    fn on_push(&self, info: PushInfo) {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        match info.kind {
            PushKind::Message => {
                // data = [channel, payload]
                if let Some(Value::BulkString(key)) = info.data.get(1) {
                    if let Some((state, _)) =
                        std::str::from_utf8(key).ok().and_then(|k| keys.get(k))
                    {
                        state.wake.notify_waiters();
                    }
                }
            }
            PushKind::Disconnection => {
                for (state, _) in keys.values() {
                    state.wake.notify_waiters();
                }
            }
            _ => {}
        }
    }
}

struct KeyHandle {
    registry: Arc<WaitRegistry>,
    key: String,
    state: Arc<KeyState>,
}

impl Drop for KeyHandle {
    fn drop(&mut self) {
        let mut keys = self.registry.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The store

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
    /// Connects with the default options (namespace `ctxstore`, 5 s lease).
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// A builder for namespace, lease and connection options.
    pub fn builder(url: impl Into<String>) -> RedisContextStorageBuilder {
        RedisContextStorageBuilder {
            url: url.into(),
            namespace: "ctxstore".to_owned(),
            lease: DEFAULT_LEASE,
            renew: None,
            config: ConnectionManagerConfig::new(),
        }
    }

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

    /// Runs `attempt` until it is not `Held`, waiting between tries as
    /// `wait` allows. Holds the key's local gate while trying and returns it.
    async fn with_wait<R, F, Fut>(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        data_key: &str,
        wait: Wait,
        mut attempt: F,
    ) -> Result<(R, KeyHandle, OwnedMutexGuard<()>)>
    where
        F: FnMut(bool) -> Fut,
        Fut: std::future::Future<Output = Result<Step<R>>>,
    {
        let handle = self.inner.waits.register(data_key);
        let state = handle.state.clone();
        let gate = state.gate.clone();
        let gate = match wait {
            Wait::Never => gate.try_lock_owned().map_err(|_| ty.would_block(id))?,
            Wait::Forever => gate.lock_owned().await,
            Wait::Until(deadline, waited) => {
                tokio::time::timeout_at(deadline.into(), gate.lock_owned())
                    .await
                    .map_err(|_| ty.timeout(id, waited))?
            }
        };
        loop {
            // Listen before trying, so a release between our attempt and
            // our wait is not missed.
            let mut notified = pin!(state.wake.notified());
            notified.as_mut().enable();
            let pttl = match attempt(wait != Wait::Never).await? {
                Step::Done(r) => return Ok((r, handle, gate)),
                Step::Missing => return Err(ty.not_found(id)),
                Step::Held(pttl) => pttl,
            };
            // Fallback poll: at the renewal interval, or when the holder's
            // lease runs out if that is sooner (a crashed holder).
            let nap = match u64::try_from(pttl) {
                Ok(ms) => self.inner.renew.min(Duration::from_millis(ms + 1)),
                Err(_) => self.inner.renew,
            };
            match wait {
                Wait::Never => return Err(ty.would_block(id)),
                Wait::Forever => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(nap) => {}
                    }
                }
                Wait::Until(deadline, waited) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(ty.timeout(id, waited));
                    }
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(nap) => {}
                        _ = tokio::time::sleep_until(deadline.into()) => {
                            return Err(ty.timeout(id, waited));
                        }
                    }
                }
            }
        }
    }

    /// One acquisition attempt, in a spawned task so that a lease taken by
    /// a script whose caller went away is released, not leaked.
    ///
    /// Every path that does not end in a guard gives the token back
    /// (token-checked, so it is always safe to send): a reply that fails
    /// (timed out, connection lost: the script may have run all the same)
    /// or does not parse is followed by a release (in the background, sent
    /// after the script on the same connection), and a success carries a
    /// [`PendingRelease`] that releases
    /// when dropped, so one that dies in the channel (the caller's future
    /// was dropped after the reply arrived) is given back too.
    async fn try_acquire(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        keys: &Keys,
        token: &str,
        mark: bool,
    ) -> Result<Step<Acquired>> {
        let (tx, rx) = oneshot::channel();
        let store = self.inner.clone();
        let (data, lock, waiting) = (keys.data.clone(), keys.lock.clone(), keys.waiting.clone());
        let token = token.to_owned();
        let lease_ms = self.inner.lease_ms;
        let mark_ms = if mark { self.mark_ms() } else { 0 };
        self.inner.runtime.spawn(async move {
            let mut conn = store.conn.clone();
            let reply = ACQUIRE
                .key(&data)
                .key(&lock)
                .key(&waiting)
                .arg(&token)
                .arg(lease_ms)
                .arg(mark_ms)
                .invoke_async::<Value>(&mut conn)
                .await
                .map_err(|e| ty.backend_error(Some(id), boxed(e)))
                .and_then(|v| parse_acquire(ty, id, &data, v));
            // From here the lease is ours to give back until a guard owns it.
            let pending = PendingRelease {
                store,
                ty,
                id,
                token,
                data,
                lock,
                waiting,
            };
            let reply = match reply {
                Ok(Step::Done(mut acquired)) => {
                    acquired.release = Some(pending);
                    Ok(Step::Done(acquired))
                }
                Ok(step) => {
                    // Held or missing: the script took no lease.
                    pending.disarm();
                    Ok(step)
                }
                Err(e) => {
                    // The script may have taken the lease (a reply that
                    // timed out, or one we cannot read): give it back. In
                    // the background, so that an outage does not double
                    // the time to report it; a waiter that finds the lease
                    // meanwhile is woken by the release.
                    drop(pending);
                    Err(e)
                }
            };
            // If the caller is gone, `reply` drops here (or with the
            // channel), and a `PendingRelease` in it gives the lease back.
            let _ = tx.send(reply);
        });
        match rx.await {
            Ok(reply) => reply,
            Err(_) => Err(ty.backend_error(Some(id), message("lock task was cancelled"))),
        }
    }
}

/// A lease a lock script took that no guard owns yet: released
/// (token-checked, in the background) when dropped, unless [`disarm`]ed.
///
/// [`disarm`]: PendingRelease::disarm
struct PendingRelease {
    store: Arc<Inner>,
    ty: &'static ContextType,
    id: Uuid,
    token: String,
    data: String,
    lock: String,
    waiting: String,
}

impl PendingRelease {
    /// A guard owns the lease now (its `RedisLease` releases it).
    fn disarm(mut self) {
        self.token.clear();
    }
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if self.token.is_empty() {
            return;
        }
        let mut conn = self.store.conn.clone();
        let channel = self.store.channel.clone();
        let token = std::mem::take(&mut self.token);
        let data = std::mem::take(&mut self.data);
        let lock = std::mem::take(&mut self.lock);
        let waiting = std::mem::take(&mut self.waiting);
        let (ty, id) = (self.ty, self.id);
        // Never block in drop. If the runtime is gone, the lease expires.
        self.store.runtime.spawn(async move {
            if let Err(e) = release_now(&mut conn, &lock, &waiting, &token, &channel, &data).await {
                tracing::debug!(kind = ty.kind(), %id, error = %e,
                    "release of an unclaimed lease failed; it expires on its own");
            }
        });
    }
}

async fn release_now(
    conn: &mut ConnectionManager,
    lock: &str,
    waiting: &str,
    token: &str,
    channel: &str,
    data: &str,
) -> redis::RedisResult<i64> {
    RELEASE
        .key(lock)
        .key(waiting)
        .arg(token)
        .arg(channel)
        .arg(data)
        .invoke_async::<i64>(conn)
        .await
}

fn bad_reply(ty: &'static ContextType, id: Uuid, what: &Value) -> ContextError {
    ty.backend_error(
        Some(id),
        message(format!("unexpected reply from a ctxstore script: {what:?}")),
    )
}

fn reply_items<'v>(ty: &'static ContextType, id: Uuid, v: &'v Value) -> Result<(i64, &'v [Value])> {
    if let Value::Array(items) = v {
        if let Some(Value::Int(code)) = items.first() {
            return Ok((*code, &items[1..]));
        }
    }
    Err(bad_reply(ty, id, v))
}

fn version_of(ty: &'static ContextType, id: Uuid, v: Option<&Value>) -> Result<u64> {
    let parsed = match v {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
        Some(Value::SimpleString(s)) => s.parse().ok(),
        Some(Value::Int(i)) => u64::try_from(*i).ok(),
        _ => None,
    };
    parsed.ok_or_else(|| {
        ty.codec_error(
            Some(id),
            message(format!("stored version is not a number: {v:?}")),
        )
    })
}

fn held_ttl(rest: &[Value]) -> i64 {
    match rest.first() {
        Some(Value::Int(ms)) => *ms,
        _ => -1,
    }
}

fn parse_acquire(
    ty: &'static ContextType,
    id: Uuid,
    data: &str,
    v: Value,
) -> Result<Step<Acquired>> {
    let (code, rest) = reply_items(ty, id, &v)?;
    match code {
        1 => {
            let version = version_of(ty, id, rest.first())?;
            let value = match rest.get(1) {
                Some(Value::BulkString(b)) => b.clone(),
                _ => Vec::new(),
            };
            Ok(Step::Done(Acquired {
                version,
                value,
                release: None,
            }))
        }
        0 => Ok(Step::Held(held_ttl(rest))),
        -1 => Ok(Step::Missing),
        -3 => Err(corrupt(ty, id, data, rest)),
        _ => Err(bad_reply(ty, id, &v)),
    }
}

/// The `Codec` error for a script's `{-3, what, found}`: a stored number
/// (the context's version, or its kind's floor) that is not a number.
fn corrupt(ty: &'static ContextType, id: Uuid, data: &str, rest: &[Value]) -> ContextError {
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    let found = text(rest.get(1));
    let detail = if text(rest.first()) == "floor" {
        let floor = data
            .split_once(':')
            .map_or_else(|| "#floor".to_owned(), |(ns, _)| format!("{ns}:#floor"));
        format!(
            "the version floor of kind {:?} (hash {floor}, field {:?}) is not a number: {found:?}; \
             nothing was written. Set it to a number at least as high as any version of the kind",
            ty.kind(),
            ty.kind()
        )
    } else {
        format!(
            "the stored version of {data} is not a number: {found:?}; nothing was written \
             (store_context over it repairs it)"
        )
    };
    ty.codec_error(Some(id), message(detail))
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
            let (version, _handle, _gate) = self
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
            let (mut acquired, handle, gate) = self
                .with_wait(ty, id, &keys.data, wait, |mark| {
                    self.try_acquire(ty, id, &keys, &token, mark)
                })
                .await?;
            let (lost_tx, lost) = tokio::sync::watch::channel(false);
            let renewal = self.inner.runtime.spawn(renew_loop(
                self.inner.conn.clone(),
                keys.lock.clone(),
                token.clone(),
                self.inner.lease_ms,
                self.inner.renew,
                lost_tx,
            ));
            // From here on, dropping `lease` releases the lock.
            let lease = RedisLease {
                ty,
                id,
                version: acquired.version,
                token,
                keys,
                store: self.inner.clone(),
                renewal: Some(renewal),
                lost,
                held: Some((handle, gate)),
            };
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

/// Renews the lease every `every` while the guard lives, and tells the
/// guard (`lost`) once the lease is certainly gone: Redis said it is not
/// ours any more (expired, taken over, evicted), or no renewal succeeded
/// for a whole lease period (Redis unreachable: it has expired by then).
async fn renew_loop(
    mut conn: ConnectionManager,
    lock: String,
    token: String,
    lease_ms: u64,
    every: Duration,
    lost: tokio::sync::watch::Sender<bool>,
) {
    let lease = Duration::from_millis(lease_ms);
    // The lease was set before this task started, so it expires at the
    // latest a lease period from now; each renewal pushes that out from the
    // moment its reply arrived (it was applied before).
    let mut expires = tokio::time::Instant::now() + lease;
    loop {
        tokio::time::sleep(every).await;
        let mut invocation = RENEW.key(&lock);
        invocation.arg(&token).arg(lease_ms);
        let renewal = invocation.invoke_async::<i64>(&mut conn);
        // A renewal stuck in a reconnect must not delay the news.
        let renewed = tokio::select! {
            renewed = renewal => renewed,
            _ = tokio::time::sleep_until(expires) => {
                lost.send_replace(true);
                return;
            }
        };
        match renewed {
            Ok(1) => expires = tokio::time::Instant::now() + lease,
            // Expired or taken over: it is not coming back.
            Ok(_) => {
                lost.send_replace(true);
                return;
            }
            // Redis unreachable: try again next interval; once a whole
            // lease period passed without a renewal, the lease is gone (and
            // commit reports LeaseLost).
            Err(e) => {
                tracing::debug!(%lock, error = %e, "lease renewal failed");
                if tokio::time::Instant::now() >= expires {
                    lost.send_replace(true);
                    return;
                }
            }
        }
    }
}

/// A held lease: commits or releases the lock, stops its renewal.
struct RedisLease {
    ty: &'static ContextType,
    id: Uuid,
    version: u64,
    token: String,
    keys: Keys,
    store: Arc<Inner>,
    renewal: Option<JoinHandle<()>>,
    /// Set by the renewal task once the lease is certainly lost.
    lost: tokio::sync::watch::Receiver<bool>,
    /// The local gate and registration, handed back once Redis released.
    held: Option<(KeyHandle, OwnedMutexGuard<()>)>,
}

impl Lease for RedisLease {
    fn commit(
        mut self: Box<Self>,
        value: &(dyn std::any::Any + Send + Sync),
    ) -> BoxFuture<'static, Result<u64>> {
        let (ty, id) = (self.ty, self.id);
        let bytes = match ty.encode(Some(id), value) {
            Ok(bytes) => bytes,
            // Dropping `self` releases the lease.
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let renewal = self.renewal.take();
        let held = self.held.take();
        let token = std::mem::take(&mut self.token);
        let keys = std::mem::replace(
            &mut self.keys,
            Keys {
                data: String::new(),
                lock: String::new(),
                waiting: String::new(),
            },
        );
        let expected = self.version;
        let store = self.store.clone();
        // `self` is now inert: its Drop has nothing to release.
        drop(self);
        let mut conn = store.conn.clone();
        let runtime = store.runtime.clone();
        let task = runtime.spawn(async move {
            let reply = COMMIT
                .key(&keys.data)
                .key(&keys.lock)
                .key(&keys.waiting)
                .arg(&token)
                .arg(expected)
                .arg(bytes)
                .arg(&store.channel)
                .arg(&keys.data)
                .invoke_async::<Value>(&mut conn)
                .await;
            if let Some(r) = renewal {
                r.abort();
            }
            let v = match reply {
                Ok(v) => v,
                Err(e) => {
                    // Sent after the commit script on the same connection:
                    // if the script ran, this finds nothing to release;
                    // if not, waiters need not wait for the lease to expire.
                    drop(PendingRelease {
                        store: store.clone(),
                        ty,
                        id,
                        token,
                        data: keys.data.clone(),
                        lock: keys.lock,
                        waiting: keys.waiting,
                    });
                    drop(held);
                    return Err(ty.backend_error(
                        Some(id),
                        message(format!(
                            "no reply to the commit script ({e}): it may or may not have been \
                             applied (whole or not at all); read the context to find out"
                        )),
                    ));
                }
            };
            drop(held);
            let (code, rest) = reply_items(ty, id, &v)?;
            match code {
                1 => version_of(ty, id, rest.first()),
                -1 => Err(ty.lease_lost(id)),
                -2 => Err(ty.conflict(id, expected, version_of(ty, id, rest.first())?)),
                -3 => Err(corrupt(ty, id, &keys.data, rest)),
                _ => Err(bad_reply(ty, id, &v)),
            }
        });
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(ty.backend_error(Some(id), boxed(e))),
            }
        })
    }

    fn release(self: Box<Self>) {
        // Drop does it.
    }

    fn lost(&self) -> BoxFuture<'static, ()> {
        let mut lost = self.lost.clone();
        Box::pin(async move {
            if lost.wait_for(|l| *l).await.is_err() {
                // The renewal task is gone without saying "lost" (the
                // guard committed or was dropped): nothing to report.
                std::future::pending::<()>().await;
            }
        })
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        let Some(held) = self.held.take() else {
            return;
        };
        let mut conn = self.store.conn.clone();
        let token = std::mem::take(&mut self.token);
        let lock = std::mem::take(&mut self.keys.lock);
        let waiting = std::mem::take(&mut self.keys.waiting);
        let data = std::mem::take(&mut self.keys.data);
        let channel = self.store.channel.clone();
        let (ty, id) = (self.ty, self.id);
        // Never block in drop: release in the background, then open the
        // local gate. If the runtime is gone, the lease simply expires.
        self.store.runtime.spawn(async move {
            if let Err(e) = release_now(&mut conn, &lock, &waiting, &token, &channel, &data).await {
                tracing::debug!(
                    kind = ty.kind(),
                    %id,
                    error = %e,
                    "lease release failed; it expires on its own"
                );
            }
            drop(held);
        });
    }
}
