//! [`ContextWatch`]: wait for a context to change instead of polling it,
//! and [`RawWatch`], what a backend implements to support it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use uuid::Uuid;

use crate::context::{Context, ContextType};
use crate::memory::MemWatch;
use crate::snapshot::Snapshot;
use crate::storage::RawSnapshot;
use crate::Result;

/// A backend's watch on one context: what
/// [`ContextStorage::watch_raw`](crate::ContextStorage::watch_raw) returns
/// next to the first snapshot.
///
/// What must hold:
/// * [`poll_changed`](Self::poll_changed)`(cx, after)` is `Ready(Ok(s))`
///   only with `s.version > after`, and `s` is the **newest** committed
///   version the backend can see (a slow watcher skips versions, it never
///   gets an old one). Otherwise it registers `cx`'s waker and returns
///   `Pending`; the waker is woken once a newer version may exist
///   (spurious wake-ups are allowed: the caller polls again).
/// * Once the context the watch began on is deleted it returns
///   `Ready(Err(NotFound))`. A context created again under the same key is
///   another context: the watch must not follow it (tell them apart by a
///   creation stamp, or by having seen the delete).
/// * A failure (a lost connection) is `Ready(Err(Backend))`; the caller
///   may poll again, and the watch must then recover (reconnect,
///   re-read) so that a commit made meanwhile is reported, not lost.
/// * It must never delay writers: no lock of the key is held while
///   watching.
/// * Dropping it stops the watch and frees what it registered.
///
/// Rollbacks and refused conditional writes commit nothing and must not
/// show up as new versions. See
/// [`docs::backend`](crate::docs::backend#watching-watch_raw-and-rawwatch)
/// for the whole backend contract, and `examples/custom_backend.rs` for a
/// watch built on a `tokio::sync::watch` channel per context.
pub trait RawWatch: Send + 'static {
    /// Polls for a committed version newer than `after` (see the trait
    /// docs). The returned snapshot is of the watched type.
    fn poll_changed(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<RawSnapshot>>;
}

/// What [`ContextStorage::watch_raw`](crate::ContextStorage::watch_raw)
/// returns: the committed version when the watch began, and the watch.
pub type RawWatchStart = (RawSnapshot, Box<dyn RawWatch>);

/// Follows one context: each [`changed`](Self::changed) waits for a newer
/// committed version and returns the newest one.
///
/// Get one with
/// [`watch_context`](crate::ContextStorageExt::watch_context). It is owned
/// (`'static`) and `Send`: move it into a spawned task. It holds no lock
/// and never delays writers.
///
/// * The first `changed` returns the version that was committed when the
///   watch began, at once.
/// * Every later one waits for a version newer than the last one returned
///   and returns the newest committed version: a slow watcher skips
///   versions, never sees one twice, never goes backwards.
/// * Once the context is deleted it returns `NotFound`, and keeps doing
///   so: a context created again under the same id is another context and
///   is not followed.
/// * On a remote backend an outage gives `Backend` errors; once the server
///   is back, the next call returns the newest version.
///
/// It is also a [`Stream`](futures_core::Stream) of the same items that
/// ends after the `NotFound`.
///
/// # Cancel safety
/// `changed` is cancel-safe: dropping its future loses no update (the next
/// call returns what it would have).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ctxstore::ContextError> {
/// use ctxstore::{Context, InMemoryContextStorage, Uuid};
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Progress { done: u64 }
/// impl Context for Progress {}
///
/// let store = std::sync::Arc::new(InMemoryContextStorage::new());
/// let id = Uuid::new_v4();
/// store.store_context(id, Progress { done: 0 }).await?;
///
/// let mut watch = store.watch_context::<Progress>(id).await?;
/// assert_eq!(watch.changed().await?.done, 0); // the current version, at once
///
/// let writer = store.clone();
/// tokio::spawn(async move {
///     for _ in 0..3 {
///         writer.update_context(id, |p: &mut Progress| p.done += 1).await.unwrap();
///     }
/// });
/// let mut seen = 0;
/// while seen < 3 {
///     let p = watch.changed().await?; // the newest version; may skip some
///     assert!(p.done > seen);
///     seen = p.done;
/// }
/// store.delete_context::<Progress>(id).await?;
/// assert!(matches!(watch.changed().await, Err(e) if e.is_not_found()));
/// # Ok(()) }
/// ```
pub struct ContextWatch<T: Context> {
    id: Uuid,
    /// The version current when the watch began, until it is returned.
    first: Option<Snapshot<T>>,
    /// The version last returned (0 before the first).
    last: u64,
    /// `NotFound` was returned: the watch is over.
    ended: bool,
    source: Source<T>,
}

enum Source<T: Context> {
    Memory(MemWatch<T>),
    Raw(Box<dyn RawWatch>),
}

impl<T: Context> ContextWatch<T> {
    pub(crate) fn from_memory(id: Uuid, first: Snapshot<T>, watch: MemWatch<T>) -> Self {
        Self::new(id, first, Source::Memory(watch))
    }

    pub(crate) fn from_raw(id: Uuid, first: RawSnapshot, watch: Box<dyn RawWatch>) -> Result<Self> {
        let first = Snapshot::from_raw(ContextType::of::<T>(), id, first)?;
        Ok(Self::new(id, first, Source::Raw(watch)))
    }

    fn new(id: Uuid, first: Snapshot<T>, source: Source<T>) -> Self {
        Self {
            id,
            first: Some(first),
            last: 0,
            ended: false,
            source,
        }
    }

    /// The id of the watched context.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The version last returned by [`changed`](Self::changed) (0 before
    /// the first call).
    pub fn last_version(&self) -> u64 {
        self.last
    }

    /// Waits for a version newer than the last one returned and returns
    /// the newest committed version (the first call returns the version
    /// current when the watch began, at once). `NotFound` once the context
    /// is deleted, for good.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future loses no update.
    pub fn changed(&mut self) -> impl Future<Output = Result<Snapshot<T>>> + Send + '_ {
        Changed { watch: self }
    }

    /// The poll form of [`changed`](Self::changed), for hand-written
    /// futures and streams. A watch that returned `Pending` and is then
    /// kept without being polled delays nobody; it stays registered for a
    /// wake-up until it is polled, dropped, or
    /// [`cancel_wait`](Self::cancel_wait) is called.
    pub fn poll_changed(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Snapshot<T>>> {
        let ty = ContextType::of::<T>();
        if self.ended {
            return Poll::Ready(Err(ty.not_found(self.id)));
        }
        if let Some(first) = self.first.take() {
            self.last = first.version();
            return Poll::Ready(Ok(first));
        }
        let polled = match &mut self.source {
            Source::Memory(watch) => watch.poll_changed(cx, self.last),
            Source::Raw(watch) => match watch.poll_changed(cx, self.last) {
                Poll::Ready(Ok(raw)) => Poll::Ready(Snapshot::from_raw(ty, self.id, raw)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        };
        match polled {
            Poll::Ready(Ok(snap)) if snap.version() <= self.last => {
                // A backend that broke the contract: never go backwards.
                Poll::Ready(Err(ty.backend_message(
                    Some(self.id),
                    format!(
                        "watch returned version {} after {}",
                        snap.version(),
                        self.last
                    ),
                )))
            }
            Poll::Ready(Ok(snap)) => {
                self.last = snap.version();
                Poll::Ready(Ok(snap))
            }
            Poll::Ready(Err(e)) => {
                if e.is_not_found() {
                    self.ended = true;
                }
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

// Nothing in a watch is structurally pinned (the engine's waiter node is
// boxed), so it can be polled through `&mut`.
impl<T: Context> Unpin for ContextWatch<T> {}

impl<T: Context> ContextWatch<T> {
    /// Stops waiting (after a `poll_changed` that returned `Pending`):
    /// leaves the context's wait list, so later commits do not spend a
    /// wake-up on it. Loses no update; the next call works as usual.
    pub fn cancel_wait(&mut self) {
        if let Source::Memory(watch) = &mut self.source {
            watch.cancel();
        }
    }
}

/// The future of [`ContextWatch::changed`]: leaves the wait list when
/// dropped.
struct Changed<'a, T: Context> {
    watch: &'a mut ContextWatch<T>,
}

impl<T: Context> Future for Changed<'_, T> {
    type Output = Result<Snapshot<T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.get_mut().watch.poll_changed(cx)
    }
}

impl<T: Context> Drop for Changed<'_, T> {
    fn drop(&mut self) {
        self.watch.cancel_wait();
    }
}

impl<T: Context> futures_core::Stream for ContextWatch<T> {
    type Item = Result<Snapshot<T>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        this.poll_changed(cx).map(Some)
    }
}

impl<T: Context> fmt::Debug for ContextWatch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextWatch")
            .field("type", &ContextType::of::<T>().type_name())
            .field("id", &self.id)
            .field("last_version", &self.last)
            .field("ended", &self.ended)
            .finish()
    }
}
