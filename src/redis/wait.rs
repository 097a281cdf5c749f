//! Waiting for a key: the local FIFO gate and wake-up per key, and the
//! retry loop around a script that finds the key held.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, OwnedMutexGuard};
use uuid::Uuid;

use super::{RedisContextStorage, Step};
use crate::context::ContextType;
use crate::storage::Wait;
use crate::Result;

// ---------------------------------------------------------------------------
// Local wait registry: one FIFO gate and one wake-up per key in use.

#[derive(Default)]
pub(super) struct WaitRegistry {
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
    pub(super) fn register(self: &Arc<Self>, key: &str) -> KeyHandle {
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

    pub(super) fn on_push(&self, info: PushInfo) {
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

pub(super) struct KeyHandle {
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

impl RedisContextStorage {
    /// Runs `attempt` until it is not `Held`, waiting between tries as
    /// `wait` allows. Holds the key's local gate while trying and returns it.
    pub(super) async fn with_wait<R, F, Fut>(
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
}
