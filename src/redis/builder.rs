//! [`RedisContextStorageBuilder`]: options, connecting, and the checks made
//! at connect time (settings, server durability, the wake-up subscription).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{Client, ProtocolVersion, PushInfo, PushKind, Value};

use super::topology::{Conn, SlotSet, Topology};
use super::wait::{on_push, WaitRegistry};
use super::{Inner, RedisContextStorage};
use crate::error::{boxed, message};
use crate::{ContextError, ContextKey, Result};

const DEFAULT_LEASE: Duration = Duration::from_secs(5);
const MIN_LEASE: Duration = Duration::from_millis(10);

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
    target: Target,
    namespace: String,
    lease: Duration,
    renew: Option<Duration>,
    config: ConnectionManagerConfig,
    /// Set by `response_timeout` (for the cluster client, which has no
    /// `ConnectionManagerConfig`).
    response_timeout: Option<Option<Duration>>,
    connection_timeout: Option<Option<Duration>>,
}

/// What to connect to.
#[derive(Debug, Clone)]
enum Target {
    /// One server.
    Node(String),
    /// A Redis Cluster, through these seed nodes.
    Cluster(Vec<String>),
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
        self.response_timeout = Some(timeout);
        self
    }

    /// How long one connection attempt may take (driver default 1 s).
    pub fn connection_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config = self.config.set_connection_timeout(timeout);
        self.connection_timeout = Some(timeout);
        self
    }

    /// Replaces the whole connection configuration (retries, backoff,
    /// timeouts) of the `redis` crate's `ConnectionManager` (one server
    /// only; a cluster client takes `response_timeout` and
    /// `connection_timeout`, and redirects and retries by itself).
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
        // On a cluster no braces either: the first `{...}` of a key is its
        // hash tag, which must be the context's id.
        let cluster = matches!(self.target, Target::Cluster(_));
        let braces: &[char] = if cluster { &['{', '}'] } else { &[] };
        if self.namespace.is_empty()
            || self.namespace.contains(['*', '?', '[', ']', '\\', ':'])
            || self.namespace.contains(braces)
        {
            return Err(setup_error(message(format!(
                "invalid namespace {:?}: it must be non-empty and free of glob characters \
                 and `:` (and of braces on a cluster)",
                self.namespace
            ))));
        }
        let waits = Arc::new(WaitRegistry::default());
        let weak: Weak<WaitRegistry> = Arc::downgrade(&waits);
        // The cluster's slot subscriptions, forgotten when they may be gone
        // (before everyone is woken, so that they subscribe again).
        let slots = Arc::new(SlotSet::default());
        let forget = Arc::downgrade(&slots);
        let push = move |info: PushInfo| -> std::result::Result<(), ()> {
            if matches!(info.kind, PushKind::Disconnection | PushKind::SUnsubscribe) {
                if let Some(slots) = forget.upgrade() {
                    slots.forget();
                }
            }
            match weak.upgrade() {
                Some(waits) => {
                    on_push(&waits, info);
                    Ok(())
                }
                None => Err(()),
            }
        };
        let (conn, sub, topology) = match &self.target {
            Target::Node(url) => self.connect_node(url, push).await?,
            Target::Cluster(nodes) => self.connect_cluster(nodes, push, slots).await?,
        };
        check_durability(conn.clone(), &self.namespace).await;

        let inner = Arc::new(Inner {
            conn,
            sub,
            topology,
            namespace: self.namespace,
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

type Connected = (Conn, Conn, Topology);

impl RedisContextStorageBuilder {
    /// One server: a command connection, and a RESP3 one subscribed to
    /// the store's wake-up channel (the driver re-subscribes by itself
    /// after a reconnect).
    async fn connect_node(
        &self,
        url: &str,
        push: impl redis::aio::AsyncPushSender,
    ) -> Result<Connected> {
        let client = Client::open(url).map_err(|e| setup_error(boxed(e)))?;
        let conn = ConnectionManager::new_with_config(client.clone(), self.config.clone())
            .await
            .map_err(|e| setup_error(boxed(e)))?;
        let info = client.get_connection_info().clone();
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let sub_client = Client::open(info.set_redis_settings(redis_settings))
            .map_err(|e| setup_error(boxed(e)))?;
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
        let topology = Topology::Node {
            floor: format!("{}:#floor", self.namespace),
            channel,
        };
        Ok((Conn::Node(conn), Conn::Node(sub), topology))
    }

    /// A cluster: a command connection (the driver follows `MOVED`/`ASK`
    /// and slot-map changes), and a RESP3 one for the sharded wake-up
    /// subscriptions, made per slot when first needed (the driver moves
    /// them with their slots).
    async fn connect_cluster(
        &self,
        nodes: &[String],
        push: impl redis::aio::AsyncPushSender,
        subscribed: Arc<SlotSet>,
    ) -> Result<Connected> {
        if nodes.is_empty() {
            return Err(setup_error(message(
                "connect_cluster needs at least one seed node (redis://host:port)",
            )));
        }
        let builder = || {
            let mut b = ClusterClientBuilder::new(nodes.iter().map(String::as_str));
            if let Some(t) = self.response_timeout {
                if let Some(t) = t {
                    b = b.response_timeout(t);
                }
            } else {
                // The single-server default, so that a call to a dead
                // master fails instead of hanging.
                b = b.response_timeout(Duration::from_millis(500));
            }
            if let Some(Some(t)) = self.connection_timeout {
                b = b.connection_timeout(t);
            }
            // Retries through redirections, reconnections and a failover
            // (a replica is promoted within seconds) for up to a lease
            // period: longer, and the lease it serves would be gone anyway.
            // Waits 5 ms to 0.5 s between retries (exponential, jittered):
            // the driver's default minimum of 1.28 s made every `TRYAGAIN`
            // of a slot being migrated cost over a second
            // (`tests/redis_cluster_reshard.rs`).
            b.overall_response_timeout(Some(self.lease))
                .min_retry_wait(5)
                .max_retry_wait(500)
        };
        let client = builder().build().map_err(|e| setup_error(boxed(e)))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| setup_error(boxed(e)))?;
        let sub_client = builder()
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(push)
            .build()
            .map_err(|e| setup_error(boxed(e)))?;
        let sub = sub_client
            .get_async_connection()
            .await
            .map_err(|e| setup_error(boxed(e)))?;
        let topology = Topology::Cluster {
            sub: sub.clone(),
            subscribed,
        };
        Ok((Conn::Cluster(conn), Conn::Cluster(sub), topology))
    }
}

/// Warns (`tracing::warn!`) when the server's settings can lose the store's
/// keys: an `allkeys-*` eviction policy (values, versions and the version
/// floor can be evicted, after which versions repeat), or no persistence
/// at all (a restart forgets everything). Servers that refuse `CONFIG GET`
/// (managed services) are not checked.
async fn check_durability(mut conn: Conn, namespace: &str) {
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
             (appendonly yes, appendfsync everysec or always) or RDB snapshots; see \
             \"Durability: required server settings\" in the ctxstore docs (ctxstore::docs::redis)"
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

impl RedisContextStorage {
    /// Connects with the default options (namespace `ctxstore`, 5 s lease).
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// Connects to a Redis Cluster (Redis 7 or later: wake-ups use sharded
    /// pub/sub) through `nodes`, seed node URLs (`redis://host:port`; any
    /// reachable master or replica will do, the driver discovers the rest),
    /// with the default options.
    ///
    /// ```no_run
    /// # async fn demo() -> ctxstore::Result<()> {
    /// let store = ctxstore::RedisContextStorage::connect_cluster([
    ///     "redis://127.0.0.1:7000",
    ///     "redis://127.0.0.1:7001",
    ///     "redis://127.0.0.1:7002",
    /// ])
    /// .await?;
    /// assert!(store.is_cluster());
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster<I>(nodes: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::cluster_builder(nodes).connect().await
    }

    /// A builder for namespace, lease and connection options.
    pub fn builder(url: impl Into<String>) -> RedisContextStorageBuilder {
        Self::builder_for(Target::Node(url.into()))
    }

    /// A builder for a Redis Cluster reached through the seed nodes
    /// `nodes` (see [`connect_cluster`](Self::connect_cluster)).
    pub fn cluster_builder<I>(nodes: I) -> RedisContextStorageBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::builder_for(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    fn builder_for(target: Target) -> RedisContextStorageBuilder {
        RedisContextStorageBuilder {
            target,
            namespace: "ctxstore".to_owned(),
            lease: DEFAULT_LEASE,
            renew: None,
            config: ConnectionManagerConfig::new(),
            response_timeout: None,
            connection_timeout: None,
        }
    }
}
