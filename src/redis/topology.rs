//! One server or a Redis Cluster: the connection, and where the keys that
//! several contexts share live (the version floor, the wake-up channel).
//!
//! On one server they are one key each (`ns:#floor`, `ns:#wake`) and
//! writers `PUBLISH`. On a cluster nothing may be cluster-wide on the hot
//! path and a script may touch one slot only, so each of the 16,384 hash
//! slots has its own floor (`ns:#floor:{t}`) and its own sharded wake-up
//! channel (`ns:#wake:{t}`), where `t` is a short tag that hashes to that
//! slot ([`slot_tag`]); a context's keys carry its id as their hash tag
//! (`ns:{id}:kind`), and its scripts pass the floor and channel of the
//! context's slot, which `SPUBLISH`es. A process subscribes to a slot's
//! channel the first time it waits for or watches a key of that slot
//! ([`Topology::listen`]), and again after the subscriptions may have been
//! lost (a dropped connection, a slot moved away: [`SlotSet::forget`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// The number of hash slots of a Redis Cluster.
pub(super) const SLOTS: u16 = 16384;

/// A connection to one server (reconnecting) or to a cluster (following
/// `MOVED`/`ASK` redirections and slot-map changes).
#[derive(Clone)]
pub(super) enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Every key of type hash matching the glob `pattern`, on the server or
    /// on every master of the cluster (`SCAN`: a key present for the whole
    /// scan is returned, maybe more than once; keys created or deleted
    /// meanwhile may or may not be).
    pub(super) async fn scan_hashes(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let scan = |cursor: u64| {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("hash")
                .clone()
        };
        let mut keys = Vec::new();
        match self {
            Conn::Node(c) => {
                let mut conn = c.clone();
                let mut cursor = 0;
                loop {
                    let (next, found): (u64, Vec<String>) =
                        scan(cursor).query_async(&mut conn).await?;
                    keys.extend(found);
                    if next == 0 {
                        return Ok(keys);
                    }
                    cursor = next;
                }
            }
            Conn::Cluster(c) => {
                let mut conn = c.clone();
                for (host, port) in masters(&mut conn).await? {
                    let mut cursor = 0;
                    loop {
                        let reply = on_node(&mut conn, &host, port, scan(cursor)).await?;
                        let (next, found): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                        keys.extend(found);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                Ok(keys)
            }
        }
    }
}

/// Where the shared keys of a context live.
pub(super) enum Topology {
    /// One server: one floor hash and one wake-up channel for the store.
    Node { floor: String, channel: String },
    /// A cluster: a floor and a sharded channel per slot.
    Cluster {
        /// The RESP3 connection holding the sharded subscriptions.
        sub: ClusterConnection,
        /// The slots whose channel this process has subscribed to (shared
        /// with the push handler, which clears it; see `forget`).
        subscribed: Arc<SlotSet>,
    },
}

impl Topology {
    /// The version floor hash for the context whose data key is `data`.
    pub(super) fn floor_key(&self, namespace: &str, data: &str) -> String {
        match self {
            Topology::Node { floor, .. } => floor.clone(),
            Topology::Cluster { .. } => {
                format!("{namespace}:#floor:{{{}}}", slot_tag(key_slot(data)))
            }
        }
    }

    /// The wake-up channel for the context whose data key is `data`.
    pub(super) fn channel(&self, namespace: &str, data: &str) -> String {
        match self {
            Topology::Node { channel, .. } => channel.clone(),
            Topology::Cluster { .. } => slot_channel(namespace, key_slot(data)),
        }
    }

    /// The command the scripts publish a wake-up with.
    pub(super) fn publish(&self) -> &'static str {
        match self {
            Topology::Node { .. } => "PUBLISH",
            Topology::Cluster { .. } => "SPUBLISH",
        }
    }

    /// Makes sure this process hears the wake-ups published for the key
    /// `data` from now on; `true` if it subscribed just now (so a
    /// publication before this call may have been missed: look at the key
    /// again before waiting). One server: the store's one subscription,
    /// made at connect. Cluster: subscribes to the key's slot channel
    /// unless already done (a slot is subscribed once and stays so).
    pub(super) async fn listen(&self, namespace: &str, data: &str) -> RedisResult<bool> {
        let Topology::Cluster { sub, subscribed } = self else {
            return Ok(false);
        };
        let slot = key_slot(data);
        if subscribed.contains(slot) {
            return Ok(false);
        }
        // Two tasks may both subscribe the slot: `SSUBSCRIBE` is idempotent.
        let since = subscribed.generation();
        sub.clone()
            .ssubscribe(slot_channel(namespace, slot))
            .await?;
        subscribed.insert(slot, since);
        Ok(true)
    }
}

fn slot_channel(namespace: &str, slot: u16) -> String {
    format!("{namespace}:#wake:{{{}}}", slot_tag(slot))
}

/// A set of hash slots, one bit each, with a generation that `forget`
/// bumps (so that a subscription that raced a `forget` is not trusted).
pub(super) struct SlotSet {
    bits: Box<[AtomicU64]>,
    generation: AtomicU64,
}

impl Default for SlotSet {
    fn default() -> Self {
        SlotSet {
            bits: (0..SLOTS / 64).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
        }
    }
}

// Orderings: `contains`/`insert` of one subscriber pair Acquire/Release
// (a set bit is read after the subscription that set it was confirmed).
// `forget` against a subscriber is the store-buffering pattern (each
// writes one location and reads the other), so those four accesses are
// SeqCst: `forget` bumps the generation, then clears the bits; a
// subscriber sets its bit, then reads the generation. In the one total
// order, either the subscriber's read sees the bump (it removes its bit
// itself) or its bit was set before the clear (which removes it).
impl SlotSet {
    fn word(&self, slot: u16) -> (&AtomicU64, u64) {
        (&self.bits[usize::from(slot / 64)], 1 << (slot % 64))
    }

    fn contains(&self, slot: u16) -> bool {
        let (word, bit) = self.word(slot);
        // Acquire: pairs with the SeqCst (so also Release) RMW in `insert`.
        word.load(Ordering::Acquire) & bit != 0
    }

    /// The generation before a subscription is sent (see `insert`).
    fn generation(&self) -> u64 {
        // SeqCst: see the orderings above.
        self.generation.load(Ordering::SeqCst)
    }

    /// Marks `slot` subscribed by a subscription sent after the
    /// generation `since` was read; if a `forget` came since, the mark is
    /// taken back (the subscription may have been lost with it).
    fn insert(&self, slot: u16, since: u64) {
        let (word, bit) = self.word(slot);
        // SeqCst: see the orderings above.
        word.fetch_or(bit, Ordering::SeqCst);
        if self.generation() != since {
            // Relaxed: only makes us subscribe again later.
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Forgets every slot: the next wait or watch of each subscribes again.
    /// For when the server may have dropped the subscriptions: a
    /// connection dropped (`Disconnection`), or the server unsubscribed
    /// one (`SUnsubscribe`, its slot moved away). The driver re-subscribes
    /// by itself, but `redis` 1.8 sends all of a node's shard channels in
    /// one `SSUBSCRIBE`, which Redis refuses (`CROSSSLOT`) as soon as they
    /// span two slots: without this, those wake-ups would be gone for good
    /// and waiters would fall back to polling.
    pub(super) fn forget(&self) {
        // SeqCst, both: see the orderings above.
        self.generation.fetch_add(1, Ordering::SeqCst);
        for word in self.bits.iter() {
            word.store(0, Ordering::SeqCst);
        }
    }
}

/// CRC16/XMODEM (polynomial 0x1021, initial 0), the hash of Redis Cluster.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of `key`: of its hash tag (the first non-empty `{...}`)
/// if it has one, of the whole key otherwise.
pub(super) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16(hashed) % SLOTS
}

/// The shortest decimal number whose text hashes to each slot: the hash
/// tag of the slot's floor and channel. Computed once (≈ 200,000 CRCs of
/// a few bytes, about a millisecond).
static SLOT_TAGS: LazyLock<Box<[u32]>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; usize::from(SLOTS)];
    let mut left = usize::from(SLOTS);
    let mut n: u32 = 0;
    while left > 0 {
        let slot = usize::from(crc16(n.to_string().as_bytes()) % SLOTS);
        if tags[slot] == u32::MAX {
            tags[slot] = n;
            left -= 1;
        }
        n += 1;
    }
    tags.into_boxed_slice()
});

/// The hash tag (without braces) that puts a key in `slot`.
pub(super) fn slot_tag(slot: u16) -> u32 {
    SLOT_TAGS[usize::from(slot % SLOTS)]
}

/// The addresses of the cluster's masters, from `CLUSTER NODES` (for
/// commands that must run on each, like `SCAN`).
async fn masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let text: String = redis::from_redis_value(
        conn.route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?,
    )?;
    Ok(parse_masters(&text))
}

/// `CLUSTER NODES` lines: `id ip:port@cport[,host] flags master ... slots`;
/// the masters that are not failed and serve slots.
fn parse_masters(text: &str) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 {
            continue; // no slots
        }
        let flags = fields[2];
        if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
            continue;
        }
        let addr = fields[1].split(['@', ',']).next().unwrap_or_default();
        if let Some((host, port)) = addr.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                out.push((host.to_owned(), port));
            }
        }
    }
    out
}

/// Routes `cmd` to the node at `host:port`.
async fn on_node(
    conn: &mut ClusterConnection,
    host: &str,
    port: u16,
    cmd: Cmd,
) -> RedisResult<Value> {
    conn.route_command(
        cmd,
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        }),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_of_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert_eq!(key_slot(&format!("ns:#floor:{{{tag}}}")), slot);
        }
    }

    #[test]
    fn the_slot_set_remembers_each_slot_until_it_forgets() {
        let set = SlotSet::default();
        assert!(!set.contains(0) && !set.contains(16383));
        let g = set.generation();
        set.insert(16383, g);
        set.insert(64, g);
        assert!(set.contains(16383) && set.contains(64));
        assert!(!set.contains(63) && !set.contains(65));
        set.forget();
        assert!(!set.contains(16383) && !set.contains(64));
        // A subscription sent before the forget is not trusted.
        set.insert(7, g);
        assert!(!set.contains(7));
        set.insert(7, set.generation());
        assert!(set.contains(7));
    }

    #[test]
    fn masters_come_from_cluster_nodes() {
        let text = "\
e9e1 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
a0de 127.0.0.1:7005@17005 slave 15fb 0 1 1 connected
15fb 127.0.0.1:7000@17000,host myself,master - 0 1 1 connected 0-5460
dead 127.0.0.1:7002@17002 master,fail - 0 1 3 connected 10923-16383
ca70 127.0.0.1:7004@17004 master - 0 1 3 connected 10923-16383
";
        assert_eq!(
            parse_masters(text),
            vec![
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7004)
            ]
        );
    }
}
