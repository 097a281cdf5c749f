//! Waiting for a key: the local FIFO gate and wake-up per key, and the
//! retry loop around a script that finds the key held.

use std::pin::pin;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use uuid::Uuid;

use super::watch::KeyWake;
use super::{Inner, RedisContextStorage, Step};
use crate::context::ContextType;
use crate::remote::{Gate, Gates};
use crate::storage::Wait;
use crate::Result;

/// The store's per-key gates (the shared FIFO gate of `crate::remote`),
/// keyed by data key, each with the key's wake-ups beside it (its lease
/// waiters and its watchers): woken when something was published for the
/// key (a release, or a change a watcher asked for), or when the
/// subscription dropped or came back (a publication may have been missed).
pub(super) type WaitRegistry = Gates<String, KeyWake>;

/// A passed gate of this store, held by a lease until Redis released it.
pub(super) type KeyGate = Gate<String, KeyWake>;

/// Wakes those a push message concerns: the waiters and watchers of the
/// key a publication names, or all of them when the subscription dropped
/// or was (re-)established, since publications may have been missed
/// meanwhile.
pub(super) fn on_push(waits: &WaitRegistry, info: PushInfo) {
    match info.kind {
        // `SMessage`: a sharded publication (cluster).
        PushKind::Message | PushKind::SMessage => {
            // data = [channel, payload]
            if let Some(Value::BulkString(key)) = info.data.get(1) {
                if let Ok(key) = std::str::from_utf8(key) {
                    waits.with_state(key, KeyWake::wake);
                }
            }
        }
        // `Subscribe` confirms a (re-)subscription: after a reconnect the
        // driver re-subscribes, and anything published between the drop
        // and now was lost. On a cluster the same goes for a sharded one
        // (also when the driver moves it after a failover or resharding),
        // and a server drops a sharded subscription (`SUnsubscribe`) when
        // its slot leaves it.
        PushKind::Disconnection
        | PushKind::Subscribe
        | PushKind::SSubscribe
        | PushKind::SUnsubscribe => waits.for_each_state(KeyWake::wake),
        _ => {}
    }
}

impl Inner {
    /// [`Topology::listen`](super::topology::Topology::listen) for the
    /// key: `true` if it subscribed just now. A failed subscription is
    /// logged and costs only latency: waiters and watchers also poll.
    pub(super) async fn listen(&self, ty: &ContextType, id: Uuid, data_key: &str) -> bool {
        match self.topology.listen(&self.namespace, data_key).await {
            Ok(now) => now,
            Err(e) => {
                tracing::debug!(kind = ty.kind(), %id, error = %e,
                    "cannot subscribe to the key's wake-ups; polling");
                false
            }
        }
    }
}

impl RedisContextStorage {
    /// [`Inner::listen`] for the key.
    pub(super) async fn listen(&self, ty: &ContextType, id: Uuid, data_key: &str) -> bool {
        self.inner.listen(ty, id, data_key).await
    }

    /// Runs `attempt` until it is not `Held`, waiting between tries as
    /// `wait` allows. Holds the key's local gate while trying and returns it.
    pub(super) async fn with_wait<R, F, Fut>(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        data_key: &str,
        wait: Wait,
        mut attempt: F,
    ) -> Result<(R, KeyGate)>
    where
        F: FnMut(bool) -> Fut,
        Fut: std::future::Future<Output = Result<Step<R>>>,
    {
        let ticket = self.inner.waits.register(data_key.to_owned());
        let entry = ticket.entry().clone();
        let gate = ticket.pass(ty, id, wait).await?;
        loop {
            // Listen before trying, so a release between our attempt and
            // our wait is not missed.
            let mut notified = pin!(entry.state().notify.notified());
            notified.as_mut().enable();
            let pttl = match attempt(wait != Wait::Never).await? {
                Step::Done(r) => return Ok((r, gate)),
                Step::Missing => return Err(ty.not_found(id)),
                Step::Held(pttl) => pttl,
            };
            // Every time, not once: a dropped connection makes the store
            // forget its slot subscriptions (see `Topology`).
            if wait != Wait::Never && self.listen(ty, id, data_key).await {
                // Subscribed just now: the release may have been published
                // before; look again before waiting.
                continue;
            }
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
}
