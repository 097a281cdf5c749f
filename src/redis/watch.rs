//! Watching a context (`watch_raw`): the per-key wake-ups of local
//! watchers, and [`RedisWatch`], the [`RawWatch`] of this backend.
//!
//! A watch re-reads the context (the `WATCH` script) whenever it may have
//! changed and reports the read only if it is newer than the last version
//! returned; it never trusts a notification's content, so a spurious
//! wake-up (a rollback's release, a refused conditional write, another key's
//! reconnect) costs one read and returns nothing. It is woken:
//!
//! * by the store's one wake-up subscription (`ns:#wake`, see `wait.rs`):
//!   writers publish the data key there for every new version and every
//!   delete of a key that is *marked watched* (`<data>:watched`, set by the
//!   `WATCH` script, with a lifetime of [`MARK`]); nobody watching, nothing
//!   published;
//! * when the subscription drops or is re-established (a publication may
//!   have been missed);
//! * at the latest every [`REREAD`] (which also renews the mark, well
//!   before it runs out; a mark that ran out anyway is repaired by that
//!   same read, which sees whatever was committed unannounced).
//!
//! Interest is registered (the key's local wake-up) before every read, so a
//! change between the read and the wait wakes the watch.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context as TaskContext, Poll, Waker};
use std::time::Duration;

use redis::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use super::reply::{bad_reply, version_of};
use super::scripts::WATCH;
use super::{Inner, RedisContextStorage};
use crate::context::ContextType;
use crate::error::boxed;
use crate::storage::{BoxFuture, RawSnapshot};
use crate::watch::{RawWatch, RawWatchStart};
use crate::Result;

/// How long one watch read keeps the key marked watched (writers publish
/// its changes while the mark lives).
const MARK: Duration = Duration::from_secs(60);

/// A watch re-reads (and so renews the mark) at least this often, even
/// when nothing woke it.
const REREAD: Duration = Duration::from_secs(20);

/// One key's wake-ups in this process: the tasks waiting for its lease
/// (`with_wait`) and its watchers.
#[derive(Default)]
pub(super) struct KeyWake {
    /// Lease waiters.
    pub(super) notify: Notify,
    /// The signals of this key's live watches.
    watchers: Mutex<Vec<Arc<Signal>>>,
}

/// A poisoned lock is still good: every critical section here is one
/// assignment or one `Vec` operation.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyWake {
    /// Wakes the key's lease waiters and watchers.
    pub(super) fn wake(&self) {
        self.notify.notify_waiters();
        for signal in lock(&self.watchers).iter() {
            signal.wake();
        }
    }

    fn add(&self, signal: Arc<Signal>) {
        lock(&self.watchers).push(signal);
    }

    fn remove(&self, signal: &Arc<Signal>) {
        let mut watchers = lock(&self.watchers);
        if let Some(i) = watchers.iter().position(|s| Arc::ptr_eq(s, signal)) {
            watchers.swap_remove(i);
        }
    }
}

/// One watch's wake-up: a flag that stays set until the watch looks at it
/// (so a wake-up while it reads is not lost) and the waker to call.
#[derive(Default)]
struct Signal(Mutex<SignalState>);

#[derive(Default)]
struct SignalState {
    woken: bool,
    waker: Option<Waker>,
}

impl Signal {
    fn wake(&self) {
        let waker = {
            let mut s = lock(&self.0);
            s.woken = true;
            s.waker.take()
        };
        // Outside the lock: a waker may run arbitrary code.
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether a wake-up came since the last call (clearing it). If none
    /// did, the next one wakes `waker`. One lock covers both, so a wake-up
    /// is either seen here or finds the waker.
    fn take_or_register(&self, waker: &Waker) -> bool {
        let mut s = lock(&self.0);
        if std::mem::take(&mut s.woken) {
            return true;
        }
        match &mut s.waker {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
        false
    }
}

/// A context as one watch read found it.
struct Current {
    version: u64,
    /// The creation stamp (the context's first version); `None` on data
    /// written before stamps existed.
    born: Option<u64>,
    value: Vec<u8>,
}

type Read = BoxFuture<'static, Result<Option<Current>>>;

/// Marks the key watched and reads it (`None`: no such context).
/// On a cluster it first makes sure this process hears the key's slot
/// channel (a dropped connection makes the store forget its slot
/// subscriptions, and wakes every watch, whose next read subscribes
/// again).
fn read(inner: &Arc<Inner>, ty: &'static ContextType, id: Uuid, data: &str, watched: &str) -> Read {
    let mut conn = inner.conn.clone();
    let inner = inner.clone();
    let key = data.to_owned();
    let mut call = WATCH.prepare_invoke();
    call.key(data).key(watched).arg(MARK.as_millis() as u64);
    Box::pin(async move {
        inner.listen(ty, id, &key).await;
        let v: Value = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| ty.backend_error(Some(id), boxed(e)))?;
        let Value::Array(items) = &v else {
            return Err(bad_reply(ty, id, &v));
        };
        let [value, version, born] = items.as_slice() else {
            return Err(bad_reply(ty, id, &v));
        };
        if matches!(version, Value::Nil) {
            return Ok(None);
        }
        let version = version_of(ty, id, Some(version))?;
        let born = match born {
            Value::Nil => None,
            b => Some(version_of(ty, id, Some(b))?),
        };
        let value = match value {
            Value::BulkString(b) => b.clone(),
            _ => Vec::new(),
        };
        Ok(Some(Current {
            version,
            born,
            value,
        }))
    })
}

/// Whether a read is still the context the watch began on (creation
/// stamps `began` then, `now` now). Both unknown (data written before
/// stamps existed): best effort, assumed the same. A stamp that appeared or
/// vanished means the key was deleted and created again.
fn same_context(began: Option<u64>, now: Option<u64>) -> bool {
    began == now
}

/// The [`RawWatch`] of [`RedisContextStorage`].
pub(super) struct RedisWatch {
    /// Keeps the store's connections (and so its subscription) alive.
    inner: Arc<Inner>,
    ty: &'static ContextType,
    id: Uuid,
    data: String,
    watched: String,
    /// The creation stamp of the context the watch began on.
    born: Option<u64>,
    signal: Arc<Signal>,
    /// Takes `signal` off the key's watchers and drops the key's ticket.
    unregister: Option<Box<dyn FnOnce() + Send>>,
    /// The read in flight, if any.
    read: Option<Read>,
    /// When to re-read even if nothing woke the watch.
    reread: Pin<Box<tokio::time::Sleep>>,
    /// The last read failed: read again at the next poll.
    stale: bool,
    /// The context is gone (deleted, or replaced by another one).
    gone: bool,
}

impl RedisWatch {
    fn start_read(&mut self) {
        self.reread
            .as_mut()
            .reset(tokio::time::Instant::now() + REREAD);
        self.read = Some(read(
            &self.inner,
            self.ty,
            self.id,
            &self.data,
            &self.watched,
        ));
    }
}

impl RawWatch for RedisWatch {
    fn poll_changed(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<RawSnapshot>> {
        let (ty, id) = (self.ty, self.id);
        if self.gone {
            return Poll::Ready(Err(ty.not_found(id)));
        }
        loop {
            if let Some(pending) = self.read.as_mut() {
                let result = ready!(pending.as_mut().poll(cx));
                self.read = None;
                let current = match result {
                    Ok(Some(current)) if same_context(self.born, current.born) => current,
                    Ok(_) => {
                        self.gone = true;
                        return Poll::Ready(Err(ty.not_found(id)));
                    }
                    Err(e) => {
                        self.stale = true;
                        return Poll::Ready(Err(e));
                    }
                };
                if current.version > after {
                    let snapshot = ty.decode_snapshot(id, &current.value, current.version);
                    self.stale = snapshot.is_err();
                    return Poll::Ready(snapshot);
                }
                // Nothing newer (a spurious wake-up): wait again.
            }
            let woken = self.signal.take_or_register(cx.waker());
            let due = self.reread.as_mut().poll(cx).is_ready();
            if !(woken || due || std::mem::take(&mut self.stale)) {
                return Poll::Pending;
            }
            self.start_read();
        }
    }
}

impl Drop for RedisWatch {
    fn drop(&mut self) {
        if let Some(unregister) = self.unregister.take() {
            unregister();
        }
    }
}

impl RedisContextStorage {
    /// `watch_raw`: registers the watch's wake-up, then reads (and marks)
    /// the key.
    pub(super) async fn watch(&self, ty: &'static ContextType, id: Uuid) -> Result<RawWatchStart> {
        let keys = self.keys(ty, id);
        let signal = Arc::new(Signal::default());
        let ticket = self.inner.waits.register(keys.data.clone());
        ticket.entry().state().add(signal.clone());
        let registered = signal.clone();
        let unregister = Box::new(move || {
            ticket.entry().state().remove(&registered);
            drop(ticket);
        });
        let reread = {
            // The timer belongs to the store's runtime, wherever the watch
            // is polled.
            let _runtime = self.inner.runtime.enter();
            Box::pin(tokio::time::sleep(REREAD))
        };
        // From here on, dropping `watch` (an error, a cancelled call)
        // unregisters it.
        let mut watch = RedisWatch {
            inner: self.inner.clone(),
            ty,
            id,
            data: keys.data,
            watched: keys.watched,
            born: None,
            signal,
            unregister: Some(unregister),
            read: None,
            reread,
            stale: false,
            gone: false,
        };
        // The read hears the key's publications before it marks the key.
        let first = read(&self.inner, ty, id, &watch.data, &watch.watched)
            .await?
            .ok_or_else(|| ty.not_found(id))?;
        watch.born = first.born;
        let snapshot = ty.decode_snapshot(id, &first.value, first.version)?;
        Ok((snapshot, Box::new(watch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, ContextStorage, ContextStorageExt};

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Watched {
        n: u64,
    }

    impl Context for Watched {
        fn kind() -> &'static str {
            "test.watched"
        }
    }

    /// The key entries and watcher signals this store has registered.
    fn registered(store: &RedisContextStorage) -> (usize, usize) {
        let (mut keys, mut watchers) = (0, 0);
        store.inner.waits.for_each_state(|wake| {
            keys += 1;
            watchers += lock(&wake.watchers).len();
        });
        (keys, watchers)
    }

    /// A watch registers its wake-up and frees it when dropped, also when
    /// it could not start; nothing is marked for a missing context. Needs
    /// the Redis at `CTXSTORE_REDIS_URL` (default `redis://127.0.0.1:6379`).
    #[tokio::test]
    async fn dropping_a_watch_unregisters_it() {
        let url = std::env::var("CTXSTORE_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let store = RedisContextStorage::builder(url)
            .namespace(format!("ctxstore-test-{}", Uuid::new_v4()))
            .connect()
            .await
            .expect("Redis must be running for the redis tests (see CTXSTORE_REDIS_URL)");
        let ty = ContextType::of::<Watched>();
        let id = Uuid::new_v4();

        let missing = store.watch_raw(ty, id).await.err().expect("NotFound");
        assert!(missing.is_not_found(), "{missing}");
        assert_eq!(registered(&store), (0, 0));
        let mut conn = store.inner.conn.clone();
        let watched = store.keys(ty, id).watched;
        let marked: bool = redis::cmd("EXISTS")
            .arg(&watched)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!marked, "a missing context was marked watched");

        store.store_context(id, Watched { n: 0 }).await.unwrap();
        let w1 = store.watch_context::<Watched>(id).await.unwrap();
        let w2 = store.watch_context::<Watched>(id).await.unwrap();
        assert_eq!(registered(&store), (1, 2));
        let marked: bool = redis::cmd("EXISTS")
            .arg(&watched)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(marked);
        drop(w1);
        assert_eq!(registered(&store), (1, 1));
        drop(w2);
        assert_eq!(registered(&store), (0, 0));
    }
}
