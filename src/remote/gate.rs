//! The per-process per-key FIFO gate both remote backends queue on.
//!
//! Tasks of one process that want the same key pass the key's gate first,
//! one at a time and in arrival order (tokio's `Mutex` is fair), so only
//! one task per process and key talks to the server about it: the others
//! wait in memory, holding no pooled connection (Postgres) and sending no
//! retries (Redis). The gate is held for as long as the server-side lock
//! is: a lease keeps its [`Gate`] and drops it only once the server has
//! released the lock (see the lease convention in [`crate::remote`]).
//!
//! A backend may keep per-key state beside the gate (`S`; Redis keeps the
//! key's wake-up there). An entry lives only while some [`Ticket`] for its
//! key does, so the gates of a store cost memory only for keys in use.
//! Everything here runs under a `std` mutex held for a map operation, never
//! across an `.await`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::context::ContextType;
use crate::storage::Wait;
use crate::Result;

/// The per-key gates of one store: key `K`, per-key state `S`.
pub(crate) struct Gates<K, S = ()> {
    keys: Mutex<KeyMap<K, S>>,
}

/// Each key in use: its entry and the number of live tickets for it.
///
/// Invariant: an entry exists while at least one `Ticket` for its key
/// lives; the count is the number of live tickets.
type KeyMap<K, S> = HashMap<K, (Arc<Entry<S>>, usize)>;

/// One key's FIFO queue and its state.
pub(crate) struct Entry<S> {
    fifo: Arc<tokio::sync::Mutex<()>>,
    // Only Redis keeps per-key state (its wake-up); Postgres' is `()`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    state: S,
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl<S> Entry<S> {
    /// The backend's state for this key.
    pub(crate) fn state(&self) -> &S {
        &self.state
    }
}

impl<K, S> Default for Gates<K, S> {
    fn default() -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, S: Default> Gates<K, S> {
    fn keys(&self) -> MutexGuard<'_, KeyMap<K, S>> {
        // A panic under this lock leaves the map consistent (each critical
        // section is one map operation), so a poisoned lock is still good.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers interest in `key`: its entry (made if missing) lives at
    /// least as long as the ticket.
    pub(crate) fn register(self: &Arc<Self>, key: K) -> Ticket<K, S> {
        let entry = {
            let mut keys = self.keys();
            let entry = keys.entry(key.clone()).or_insert_with(|| {
                (
                    Arc::new(Entry {
                        fifo: Arc::new(tokio::sync::Mutex::new(())),
                        state: S::default(),
                    }),
                    0,
                )
            });
            entry.1 += 1;
            entry.0.clone()
        };
        Ticket {
            gates: self.clone(),
            key,
            entry,
        }
    }

    /// Runs `f` on the state of `key`, if some ticket for it lives.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_state<Q>(&self, key: &Q, f: impl FnOnce(&S))
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some((entry, _)) = self.keys().get(key) {
            f(&entry.state);
        }
    }

    /// Runs `f` on the state of every key in use.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn for_each_state(&self, mut f: impl FnMut(&S)) {
        for (entry, _) in self.keys().values() {
            f(&entry.state);
        }
    }
}

/// A registration for one key: held while queued at its gate and while
/// the gate is passed.
pub(crate) struct Ticket<K: Hash + Eq + Clone, S: Default = ()> {
    gates: Arc<Gates<K, S>>,
    key: K,
    entry: Arc<Entry<S>>,
}

impl<K: Hash + Eq + Clone, S: Default> Ticket<K, S> {
    /// The key's entry (its state), shared: it outlives the ticket.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn entry(&self) -> &Arc<Entry<S>> {
        &self.entry
    }

    /// Waits for the key's gate as `wait` allows: not at all for `Never`
    /// (`WouldBlock`), until the deadline for `Until` (`Timeout`, carrying
    /// the duration asked for).
    ///
    /// # Cancel safety
    /// Dropping the future leaves the queue (tokio's `Mutex` passes on a
    /// permit it was granted) and drops the ticket.
    pub(crate) async fn pass(
        self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> Result<Gate<K, S>> {
        let fifo = self.entry.fifo.clone();
        let pass = match wait {
            Wait::Never => fifo.try_lock_owned().map_err(|_| ty.would_block(id))?,
            Wait::Forever => fifo.lock_owned().await,
            // `timeout_at` polls the lock first: a free gate is passed
            // even when the deadline is already over.
            Wait::Until(deadline, asked) => {
                tokio::time::timeout_at(deadline.into(), fifo.lock_owned())
                    .await
                    .map_err(|_| ty.timeout(id, asked))?
            }
        };
        Ok(Gate {
            _pass: pass,
            _ticket: self,
        })
    }
}

impl<K: Hash + Eq + Clone, S: Default> Drop for Ticket<K, S> {
    fn drop(&mut self) {
        let mut keys = self.gates.keys();
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

/// A passed gate: the next task of this process for the key waits until
/// this is dropped.
pub(crate) struct Gate<K: Hash + Eq + Clone, S: Default = ()> {
    // Field order matters: the gate opens before the ticket goes. Were the
    // ticket the key's last and dropped first, the entry would go while the
    // gate is still shut, and a newcomer could pass a fresh one meanwhile.
    _pass: OwnedMutexGuard<()>,
    _ticket: Ticket<K, S>,
}
