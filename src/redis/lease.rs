//! The lease: taking it (an acquisition attempt that never leaks one),
//! renewing it while a guard lives, committing or releasing it.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::reply::{bad_reply, corrupt, parse_acquire, reply_items, version_of};
use super::scripts::{ACQUIRE, COMMIT, RELEASE, RENEW};
use super::topology::Conn;
use super::wait::KeyGate;
use super::{Acquired, Inner, Keys, RedisContextStorage, Step};
use crate::context::ContextType;
use crate::error::boxed;
use crate::storage::{BoxFuture, Lease};
use crate::Result;

impl RedisContextStorage {
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
    pub(super) async fn try_acquire(
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
        let (channel, floor) = (keys.channel.clone(), keys.floor.clone());
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
                .and_then(|v| parse_acquire(ty, id, (&data, &floor), v));
            // From here the lease is ours to give back until a guard owns it.
            let pending = PendingRelease {
                store,
                ty,
                id,
                token,
                data,
                lock,
                waiting,
                channel,
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
            Err(_) => Err(ty.backend_message(Some(id), "lock task was cancelled")),
        }
    }
}

/// A lease a lock script took that no guard owns yet: released
/// (token-checked, in the background) when dropped, unless [`disarm`]ed.
///
/// [`disarm`]: PendingRelease::disarm
pub(super) struct PendingRelease {
    store: Arc<Inner>,
    ty: &'static ContextType,
    id: Uuid,
    token: String,
    data: String,
    lock: String,
    waiting: String,
    channel: String,
}

impl PendingRelease {
    /// A guard owns the lease now (its `RedisLease` releases it).
    pub(super) fn disarm(mut self) {
        self.token.clear();
    }
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if self.token.is_empty() {
            return;
        }
        let mut conn = self.store.conn.clone();
        let publish = self.store.topology.publish();
        let channel = std::mem::take(&mut self.channel);
        let token = std::mem::take(&mut self.token);
        let data = std::mem::take(&mut self.data);
        let lock = std::mem::take(&mut self.lock);
        let waiting = std::mem::take(&mut self.waiting);
        let (ty, id) = (self.ty, self.id);
        // Never block in drop. If the runtime is gone, the lease expires.
        self.store.runtime.spawn(async move {
            let wake = (channel.as_str(), data.as_str(), publish);
            if let Err(e) = release_now(&mut conn, &lock, &waiting, &token, wake).await {
                tracing::debug!(kind = ty.kind(), %id, error = %e,
                    "release of an unclaimed lease failed; it expires on its own");
            }
        });
    }
}

/// Runs the release script; `wake` is (channel, data key, publish
/// command), what it publishes if a waiter marked the key.
async fn release_now(
    conn: &mut Conn,
    lock: &str,
    waiting: &str,
    token: &str,
    (channel, data, publish): (&str, &str, &str),
) -> redis::RedisResult<i64> {
    RELEASE
        .key(lock)
        .key(waiting)
        .arg(token)
        .arg(channel)
        .arg(data)
        .arg(publish)
        .invoke_async::<i64>(conn)
        .await
}

/// Renews the lease every `every` while the guard lives, and tells the
/// guard (`lost`) once the lease is certainly gone: Redis said it is not
/// ours any more (expired, taken over, evicted), or no renewal succeeded
/// for a whole lease period (Redis unreachable: it has expired by then).
async fn renew_loop(
    mut conn: Conn,
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
///
/// Follows the lease convention of `crate::remote`: dropping it is the
/// release (the token-checked release script, spawned); `commit` takes
/// what it holds first.
pub(super) struct RedisLease {
    ty: &'static ContextType,
    id: Uuid,
    version: u64,
    token: String,
    keys: Keys,
    store: Arc<Inner>,
    renewal: Option<JoinHandle<()>>,
    /// Set by the renewal task once the lease is certainly lost.
    lost: tokio::sync::watch::Receiver<bool>,
    /// The key's local gate, passed on once Redis released.
    held: Option<KeyGate>,
}

impl RedisLease {
    /// A lease the lock script just took: starts its renewal task.
    pub(super) fn start(
        store: Arc<Inner>,
        ty: &'static ContextType,
        id: Uuid,
        version: u64,
        token: String,
        keys: Keys,
        held: KeyGate,
    ) -> Self {
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let renewal = store.runtime.spawn(renew_loop(
            store.conn.clone(),
            keys.lock.clone(),
            token.clone(),
            store.lease_ms,
            store.renew,
            lost_tx,
        ));
        RedisLease {
            ty,
            id,
            version,
            token,
            keys,
            store,
            renewal: Some(renewal),
            lost,
            held: Some(held),
        }
    }
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
                watched: String::new(),
                floor: String::new(),
                channel: String::new(),
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
                .key(&keys.watched)
                .arg(&token)
                .arg(expected)
                .arg(bytes)
                .arg(&keys.channel)
                .arg(&keys.data)
                .arg(store.topology.publish())
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
                        channel: keys.channel.clone(),
                    });
                    drop(held);
                    return Err(ty.backend_message(
                        Some(id),
                        format!(
                            "no reply to the commit script ({e}): it may or may not have been \
                             applied (whole or not at all); read the context to find out"
                        ),
                    ));
                }
            };
            drop(held);
            let (code, rest) = reply_items(ty, id, &v)?;
            match code {
                1 => version_of(ty, id, rest.first()),
                -1 => Err(ty.lease_lost(id)),
                -2 => Err(ty.conflict(id, expected, version_of(ty, id, rest.first())?)),
                -3 => Err(corrupt(ty, id, (&keys.data, &keys.floor), rest)),
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

    // `release` is the trait's default, `drop(self)`: dropping is the
    // release (the lease convention of `crate::remote`).

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
        let channel = std::mem::take(&mut self.keys.channel);
        let publish = self.store.topology.publish();
        let (ty, id) = (self.ty, self.id);
        // Never block in drop: release in the background, then open the
        // local gate. If the runtime is gone, the lease simply expires.
        self.store.runtime.spawn(async move {
            let wake = (channel.as_str(), data.as_str(), publish);
            if let Err(e) = release_now(&mut conn, &lock, &waiting, &token, wake).await {
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
