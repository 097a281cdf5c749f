//! A custom backend written only against ctxstore's public API: the
//! template to copy when you put contexts somewhere else (a key-value
//! service, a database the crate does not support, a test double).
//!
//! `ByteStore` behaves like a remote store: it keeps only **encoded bytes**,
//! a **version** and a **lease token** per key, behind an async mutex that
//! stands in for the server. Everything a remote backend must do is here:
//! encode before writing, decode on the way out, hand out a lock as a
//! [`Lease`] that commits fenced by its token and releases on drop without
//! blocking, wait for a holder as [`Wait`] says, keep versions increasing
//! across delete and re-create, and notify watchers. Swap the mutex for
//! your server's calls and keep the shape.
//!
//! The rules it follows are in `ctxstore::docs::backend` (`cargo doc
//! --open`); `cargo test --example custom_backend` runs the conformance kit
//! against it (one test per case), and `cargo run --example
//! custom_backend` shows it behind `Arc<dyn ContextStorage>`.
//!
//! What it gives up, as a backend must say: waiting is not fair (every
//! waiter is woken when a lease ends and they race), and a lease never
//! expires (a real remote store needs expiry, so that a crashed holder
//! does not keep the key forever, and then fencing matters: see
//! `commit`).

use std::any::Any;
use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use ctxstore::{
    BoxFuture, ContextStorage, ContextType, ErasedValue, Lease, RawGuard, RawSnapshot, RawWatch,
    RawWatchStart, Result, Uuid, Wait,
};
use tokio::sync::{watch, Mutex, MutexGuard, Notify};

/// What a remote backend keys by: the type's stable `kind()` and the id.
type Key = (&'static str, Uuid);

/// The last commit of one context, as its watchers see it.
#[derive(Clone)]
enum Committed {
    Live { version: u64, bytes: Arc<[u8]> },
    Deleted,
}

struct Entry {
    /// The value, as `ContextType::encode` made it.
    bytes: Arc<[u8]>,
    version: u64,
    /// The token of the lease holder, if the key is locked.
    lease: Option<u64>,
    /// Woken when the lease ends or the context is deleted.
    released: Arc<Notify>,
    /// This incarnation's commits, for watchers. A re-created context gets
    /// a new channel, so a watch never follows it.
    changes: watch::Sender<Committed>,
}

impl Entry {
    fn publish(&mut self, version: u64, bytes: Vec<u8>) {
        self.bytes = bytes.into();
        self.version = version;
        self.changes.send_replace(Committed::Live {
            version,
            bytes: self.bytes.clone(),
        });
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// The last version handed out, store-wide: every write takes the next
    /// one, so the versions of a key only increase and are never reused,
    /// also across delete and re-create. (A per-key counter would need a
    /// floor that survives the delete.)
    last_version: u64,
    last_token: u64,
}

impl State {
    fn next_version(&mut self) -> u64 {
        self.last_version += 1;
        self.last_version
    }

    fn insert(&mut self, key: Key, bytes: Vec<u8>) -> u64 {
        let version = self.next_version();
        let bytes: Arc<[u8]> = bytes.into();
        let (changes, _) = watch::channel(Committed::Live {
            version,
            bytes: bytes.clone(),
        });
        let entry = Entry {
            bytes,
            version,
            lease: None,
            released: Arc::new(Notify::new()),
            changes,
        };
        self.entries.insert(key, entry);
        version
    }

    fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            entry.changes.send_replace(Committed::Deleted);
            // Waiters wake, find the key gone (or re-created) and go on.
            entry.released.notify_waiters();
        }
    }

    /// Ends the lease `token` on `key` if it is still the holder's.
    fn release(&mut self, key: &Key, token: u64) {
        if let Some(entry) = self.entries.get_mut(key) {
            if entry.lease == Some(token) {
                entry.lease = None;
                entry.released.notify_waiters();
            }
        }
    }
}

/// The example backend. Cheap to clone: clones share the store.
#[derive(Clone, Default)]
pub struct ByteStore {
    state: Arc<Mutex<State>>,
}

impl ByteStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits, as `wait` allows, until `key` has no lease holder, and
    /// returns the state locked. The key may be absent: the caller decides
    /// what that means. Writers call it with `Wait::Forever`.
    async fn until_free(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> Result<MutexGuard<'_, State>> {
        let key = (ty.kind(), id);
        loop {
            let state = self.state.lock().await;
            let released = match state.entries.get(&key) {
                Some(entry) if entry.lease.is_some() => entry.released.clone(),
                _ => return Ok(state),
            };
            if wait == Wait::Never {
                return Err(ty.would_block(id));
            }
            // Register for the wake-up *before* letting go of the state, so
            // that a release in between is not missed.
            let mut notified = pin!(released.notified());
            notified.as_mut().enable();
            drop(state);
            match wait {
                Wait::Until(deadline, asked) => {
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        return Err(ty.timeout(id, asked));
                    }
                }
                _ => notified.await,
            }
        }
    }
}

impl ContextStorage for ByteStore {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            // Encode first: a value the codec refuses writes nothing.
            let bytes = ty.encode(Some(id), &*value)?;
            let mut state = self.until_free(ty, id, Wait::Forever).await?;
            let key = (ty.kind(), id);
            if !state.entries.contains_key(&key) {
                return Ok(state.insert(key, bytes));
            }
            let version = state.next_version();
            if let Some(entry) = state.entries.get_mut(&key) {
                entry.publish(version, bytes);
            }
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
            let mut state = self.until_free(ty, id, wait).await?;
            let key = (ty.kind(), id);
            state.last_token += 1;
            let token = state.last_token;
            let entry = state
                .entries
                .get_mut(&key)
                .ok_or_else(|| ty.not_found(id))?;
            // Decode before taking the lease: bad bytes leave no lock behind.
            let value = ty.decode(Some(id), &entry.bytes)?;
            entry.lease = Some(token);
            // Nothing awaits after the lease is taken, so a cancelled
            // `lock_raw` cannot leak it; from here the lease's `Drop`
            // releases it.
            Ok(RawGuard::Remote {
                value,
                version: entry.version,
                lease: Box::new(ByteLease {
                    state: self.state.clone(),
                    ty,
                    id,
                    token,
                    held: true,
                }),
            })
        })
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        Box::pin(async move {
            // The mutex is held for a lookup only, never for a lease: a
            // snapshot does not wait for the lock holder.
            let (bytes, version) = {
                let state = self.state.lock().await;
                let entry = state
                    .entries
                    .get(&(ty.kind(), id))
                    .ok_or_else(|| ty.not_found(id))?;
                (entry.bytes.clone(), entry.version)
            };
            ty.decode_snapshot(id, &bytes, version)
        })
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut state = self.until_free(ty, id, Wait::Forever).await?;
            let key = (ty.kind(), id);
            if !state.entries.contains_key(&key) {
                return Err(ty.not_found(id));
            }
            state.remove(&key);
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
        Box::pin(async move {
            let bytes = ty.encode(Some(id), &*value)?;
            // A writer: wait for the holder, then compare and write in one
            // step (the state stays locked in between).
            let mut state = self.until_free(ty, id, Wait::Forever).await?;
            let key = (ty.kind(), id);
            let found = state.entries.get(&key).map(|e| e.version);
            match found {
                None if expected == 0 => Ok(state.insert(key, bytes)),
                None => Err(ty.not_found(id)),
                Some(found) if found != expected => Err(ty.conflict(id, expected, found)),
                Some(_) => {
                    let version = state.next_version();
                    if let Some(entry) = state.entries.get_mut(&key) {
                        entry.publish(version, bytes);
                    }
                    Ok(version)
                }
            }
        })
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut state = self.until_free(ty, id, Wait::Forever).await?;
            let key = (ty.kind(), id);
            match state.entries.get(&key).map(|e| e.version) {
                None => Err(ty.not_found(id)),
                // Versions are >= 1, so `expected == 0` always conflicts.
                Some(found) if found != expected => Err(ty.conflict(id, expected, found)),
                Some(_) => {
                    state.remove(&key);
                    Ok(())
                }
            }
        })
    }

    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        Box::pin(async move {
            // Subscribe and read the current version under one lock: no
            // commit can fall between the two.
            let (rx, bytes, version) = {
                let state = self.state.lock().await;
                let entry = state
                    .entries
                    .get(&(ty.kind(), id))
                    .ok_or_else(|| ty.not_found(id))?;
                (
                    entry.changes.subscribe(),
                    entry.bytes.clone(),
                    entry.version,
                )
            };
            let first = ty.decode_snapshot(id, &bytes, version)?;
            let watch = ByteWatch {
                ty,
                id,
                rx: Some(rx),
                waiting: None,
            };
            Ok((first, Box::new(watch) as Box<dyn RawWatch>))
        })
    }

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let state = self.state.lock().await;
            Ok(state.entries.contains_key(&(ty.kind(), id)))
        })
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        Box::pin(async move {
            let state = self.state.lock().await;
            Ok(state
                .entries
                .keys()
                .filter(|(kind, _)| *kind == ty.kind())
                .map(|(_, id)| *id)
                .collect())
        })
    }

    fn backend_name(&self) -> &'static str {
        "byte store (example)"
    }
}

/// A held lock: the token that fences its commit.
struct ByteLease {
    state: Arc<Mutex<State>>,
    ty: &'static ContextType,
    id: Uuid,
    token: u64,
    /// Still ours to release (cleared once a commit has ended the lock).
    held: bool,
}

impl ByteLease {
    /// The commit ended the lock: nothing left to release.
    fn ended(&mut self) {
        self.held = false;
    }
}

impl Lease for ByteLease {
    fn commit(self: Box<Self>, value: &(dyn Any + Send + Sync)) -> BoxFuture<'static, Result<u64>> {
        // Encode before returning, as the contract asks. A refused value
        // returns here and `self` drops: the lock is released.
        let bytes = match self.ty.encode(Some(self.id), value) {
            Ok(bytes) => bytes,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        // The future owns the lease: dropped before it finishes, the lease
        // drops too and releases the lock.
        let mut lease = *self;
        Box::pin(async move {
            let state = lease.state.clone();
            let mut state = state.lock().await;
            let key = (lease.ty.kind(), lease.id);
            // Fencing: write only if the lease is still ours. (Here a lease
            // cannot expire; on a real server it can, and then this check,
            // made in the same step as the write, is what keeps a paused
            // holder from overwriting a newer value.)
            let ours = state
                .entries
                .get(&key)
                .is_some_and(|e| e.lease == Some(lease.token));
            if !ours {
                return Err(lease.ty.lease_lost(lease.id));
            }
            let version = state.next_version();
            let entry = state.entries.get_mut(&key).expect("checked above");
            entry.publish(version, bytes);
            entry.lease = None;
            entry.released.notify_waiters();
            lease.ended();
            Ok(version)
        })
    }

    // `release` keeps its default, `drop(self)`: dropping is the release.
}

impl Drop for ByteLease {
    /// Gives the lock back at once and never blocks: with the state free it
    /// releases in place, otherwise it hands the release to a task (or, with
    /// no runtime, to a thread).
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let key = (self.ty.kind(), self.id);
        let token = self.token;
        if let Ok(mut state) = self.state.try_lock() {
            state.release(&key, token);
            return;
        }
        let state = self.state.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { state.lock().await.release(&key, token) });
            }
            Err(_) => {
                std::thread::spawn(move || state.blocking_lock().release(&key, token));
            }
        }
    }
}

/// A watch on one incarnation of a context: a receiver of its channel,
/// polled through a boxed `changed()` future that owns it while waiting.
struct ByteWatch {
    ty: &'static ContextType,
    id: Uuid,
    rx: Option<watch::Receiver<Committed>>,
    waiting: Option<BoxFuture<'static, (watch::Receiver<Committed>, bool)>>,
}

impl RawWatch for ByteWatch {
    fn poll_changed(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<RawSnapshot>> {
        loop {
            if let Some(waiting) = self.waiting.as_mut() {
                let Poll::Ready((rx, open)) = waiting.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                self.waiting = None;
                self.rx = Some(rx);
                if !open {
                    // The channel is gone: the context was deleted (or the
                    // store dropped). The watch is over.
                    return Poll::Ready(Err(self.ty.not_found(self.id)));
                }
            }
            let mut rx = self.rx.take().expect("a receiver when not waiting");
            let current = rx.borrow_and_update().clone();
            match current {
                Committed::Deleted => {
                    self.rx = Some(rx);
                    return Poll::Ready(Err(self.ty.not_found(self.id)));
                }
                // The newest commit only: a slow watcher skips versions.
                Committed::Live { version, bytes } if version > after => {
                    self.rx = Some(rx);
                    return Poll::Ready(self.ty.decode_snapshot(self.id, &bytes, version));
                }
                Committed::Live { .. } => {
                    // Nothing newer yet: wait for the next send (one made
                    // since `borrow_and_update` wakes it at once).
                    self.waiting = Some(Box::pin(async move {
                        let open = rx.changed().await.is_ok();
                        (rx, open)
                    }));
                }
            }
        }
    }
}

// ------------------------------------------------------------------ demo

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    name: String,
    done: u64,
}

impl ctxstore::Context for Job {
    fn kind() -> &'static str {
        "example.job"
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    use ctxstore::ContextStorageExt;

    // Code written against `Arc<dyn ContextStorage>` runs on it unchanged.
    let store: Arc<dyn ContextStorage> = Arc::new(ByteStore::new());
    let id = Uuid::new_v4();
    let v0 = store
        .store_context(
            id,
            Job {
                name: "nightly".into(),
                done: 0,
            },
        )
        .await?;

    let mut watch = store.watch_context::<Job>(id).await?;
    watch.changed().await?; // the current version

    let mut job = store.get_context::<Job>(id).await?; // a lease
    job.done += 1;
    let v1 = job.commit().await?; // fenced by the lease's token
    let seen = watch.changed().await?;
    println!(
        "{} backend: {} went {v0} -> {v1}; the watcher saw done = {} at {}",
        store.backend_name(),
        seen.name,
        seen.done,
        seen.version()
    );

    store.update_context(id, |j: &mut Job| j.done += 1).await?;
    let snap = store.get_context_snapshot::<Job>(id).await?;
    println!("snapshot: done = {} at {}", snap.done, snap.version());

    store.delete_context::<Job>(id).await?;
    assert!(watch.changed().await.is_err_and(|e| e.is_not_found()));
    println!("deleted; the watch ended with NotFound");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A fresh store per case.
    async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
        std::sync::Arc::new(super::ByteStore::new())
    }

    // One test per conformance case (feature `conformance`).
    ctxstore::conformance_tests!(make);

    /// The demo runs through.
    #[test]
    fn main_runs() {
        super::main().unwrap();
    }
}
