//! Watching contexts: one `LISTEN` connection per store, fanned out to the
//! watches of each key, and [`PgWatch`], one watch's re-reads.
//!
//! # Protocol
//!
//! Every write statement notifies `ctxstore.<table>` with `'<id> <kind>'`
//! from inside its transaction (see [`Sql`](super::sql::Sql)), so a
//! notification is delivered only after its write committed, never for a
//! rollback or a refused conditional write.
//!
//! The [`Listener`] owns one connection of its own (not pooled), started by
//! the store's first watch. A watch registers a [`Waiter`] under its key
//! *before* its first read, and the listener's `LISTEN` has completed
//! before that read starts; so every commit that read did not see notifies
//! a listening session, and bumps the waiter's event count. A watch
//! re-reads the row whenever that count moved since its last read began
//! (spurious wake-ups only cost a read), and returns it only if the
//! version is above the caller's and the creation stamp (`created`) is the
//! one it began with; no row, or another stamp, is `NotFound`.
//!
//! # Outages
//!
//! When the listening connection fails, the listener counts a failure and
//! wakes every waiter; each watch reports every failure once as a
//! `Backend` error, then waits. The listener reconnects with backoff
//! (100 ms doubling to 5 s; each failed attempt is a failure too),
//! `LISTEN`s again, bumps its epoch and wakes every waiter; a watch that
//! sees a new epoch re-reads, so a commit made while nobody listened is
//! reported, not lost.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use super::conn::{bounded, no_reply, pg, PgError};
use super::sql::row_version;
use super::{Inner, PostgresContextStorage};
use crate::context::ContextType;
use crate::error::message;
use crate::storage::{BoxFuture, RawSnapshot};
use crate::watch::{RawWatch, RawWatchStart};
use crate::Result;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still
    // consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One watch's registration: an event count bumped (and its waker woken)
/// for every notification of its key and every change of the listener's
/// state.
#[derive(Default)]
struct Waiter {
    state: Mutex<WaiterState>,
}

#[derive(Default)]
struct WaiterState {
    events: u64,
    waker: Option<Waker>,
}

impl Waiter {
    fn wake(&self) {
        let waker = {
            let mut s = lock(&self.state);
            s.events += 1;
            s.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Registers `waker` and returns the event count: any event after this
    /// call wakes `waker`.
    fn register(&self, waker: &Waker) -> u64 {
        let mut s = lock(&self.state);
        match &mut s.waker {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
        s.events
    }
}

/// The store's `LISTEN` connection and the watches of each key.
pub(super) struct Listener {
    table: String,
    state: Mutex<ListenerState>,
    task: OnceLock<AbortHandle>,
}

#[derive(Default)]
struct ListenerState {
    /// The waiters of each id, with the kind they watch.
    keys: HashMap<Uuid, Vec<(&'static str, Arc<Waiter>)>>,
    /// `LISTEN` is in force on a live connection.
    up: bool,
    /// Bumped by every successful `LISTEN`.
    epoch: u64,
    /// Bumped by every lost connection and failed connection attempt.
    failures: u64,
    /// What the last failure was.
    last_error: String,
}

/// The listener's state as a watch sees it.
#[derive(Clone, Copy)]
struct Status {
    up: bool,
    epoch: u64,
    failures: u64,
}

impl ListenerState {
    fn status(&self) -> Status {
        Status {
            up: self.up,
            epoch: self.epoch,
            failures: self.failures,
        }
    }

    fn wake_all(&self) {
        for waiter in self.keys.values().flatten() {
            waiter.1.wake();
        }
    }
}

impl Listener {
    /// Starts the listener of `inner`'s table on the store's runtime.
    fn start(inner: &Inner) -> Arc<Listener> {
        let listener = Arc::new(Listener {
            table: inner.table.clone(),
            state: Mutex::default(),
            task: OnceLock::new(),
        });
        let task = inner.handle.spawn(listener.clone().run(
            inner.listen_config.clone(),
            inner.sql.listen.clone(),
            inner.timeouts.connect,
        ));
        let _ = listener.task.set(task.abort_handle());
        listener
    }

    /// Stops listening (the store is gone).
    pub(super) fn stop(&self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }

    fn status(&self) -> Status {
        lock(&self.state).status()
    }

    fn last_error(&self) -> String {
        lock(&self.state).last_error.clone()
    }

    fn register(&self, kind: &'static str, id: Uuid, waiter: Arc<Waiter>) {
        lock(&self.state)
            .keys
            .entry(id)
            .or_default()
            .push((kind, waiter));
    }

    fn unregister(&self, id: Uuid, waiter: &Arc<Waiter>) {
        let mut state = lock(&self.state);
        if let Some(waiters) = state.keys.get_mut(&id) {
            waiters.retain(|(_, w)| !Arc::ptr_eq(w, waiter));
            if waiters.is_empty() {
                state.keys.remove(&id);
            }
        }
    }

    /// A notification: wakes the waiters of its key. The payload is
    /// `'<id> <kind>'`; anything else is ignored.
    fn notified(&self, payload: &str) {
        let Some((id, kind)) = payload.split_once(' ') else {
            return;
        };
        let Ok(id) = Uuid::parse_str(id) else {
            return;
        };
        let state = lock(&self.state);
        for (k, waiter) in state.keys.get(&id).into_iter().flatten() {
            if *k == kind {
                waiter.wake();
            }
        }
    }

    fn listening(&self) {
        let mut state = lock(&self.state);
        state.up = true;
        state.epoch += 1;
        state.wake_all();
    }

    fn failed(&self, error: String) {
        let mut state = lock(&self.state);
        state.up = false;
        state.failures += 1;
        state.last_error = error;
        state.wake_all();
    }

    /// Connects, listens and dispatches notifications until the connection
    /// fails; then again, with backoff. Runs until aborted.
    async fn run(
        self: Arc<Self>,
        config: tokio_postgres::Config,
        listen: String,
        connect: Duration,
    ) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let (was_up, error) = self.session(&config, &listen, connect).await;
            if was_up {
                backoff = MIN_BACKOFF;
            }
            tracing::warn!(
                table = %self.table,
                error = %error,
                retry_in = ?backoff,
                "the watch listener's connection failed; reconnecting"
            );
            self.failed(error);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: returns whether `LISTEN` took effect, and why it
    /// ended.
    async fn session(
        &self,
        config: &tokio_postgres::Config,
        listen: &str,
        connect: Duration,
    ) -> (bool, String) {
        // `config` carries the connect timeout; this bounds the rest of
        // the startup too.
        let (client, mut connection) = match bounded(Some(connect), config.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return (false, format!("cannot connect: {}", PgError(e))),
            Err(limit) => return (false, format!("cannot connect within {limit:?}")),
        };
        let mut listening = pin!(bounded(Some(connect), client.batch_execute(listen)));
        let mut up = false;
        // Poll `LISTEN` before the connection, so that the connection sends
        // it; then dispatch whatever the connection delivers.
        let error = poll_fn(|cx| {
            if !up {
                match listening.as_mut().poll(cx) {
                    Poll::Ready(Ok(Ok(()))) => {
                        up = true;
                        self.listening();
                        tracing::debug!(table = %self.table, "the watch listener is listening");
                    }
                    Poll::Ready(Ok(Err(e))) => {
                        return Poll::Ready(format!("LISTEN failed: {}", PgError(e)))
                    }
                    Poll::Ready(Err(limit)) => {
                        return Poll::Ready(format!("no reply to LISTEN within {limit:?}"))
                    }
                    Poll::Pending => {}
                }
            }
            loop {
                match connection.poll_message(cx) {
                    Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                        self.notified(n.payload())
                    }
                    Poll::Ready(Some(Ok(_))) => {} // a notice
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(format!("connection lost: {}", PgError(e)))
                    }
                    Poll::Ready(None) => return Poll::Ready("connection closed".to_owned()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        (up, error)
    }
}

/// A row as a watch reads it.
struct WatchRow {
    version: u64,
    text: String,
    created: Option<i64>,
}

impl PostgresContextStorage {
    fn listener(&self) -> Arc<Listener> {
        self.inner
            .listener
            .get_or_init(|| Listener::start(&self.inner))
            .clone()
    }

    /// Reads the row as a watch needs it (a plain read: MVCC, never waits
    /// for a lock holder).
    async fn watch_read(&self, ty: &'static ContextType, id: Uuid) -> Result<Option<WatchRow>> {
        let mut conn = self.read_conn(ty, Some(id)).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let row = self
            .bounded(ty, Some(id), "watch read", async {
                let stmt = client.prepare_cached(&self.inner.sql.watch_read).await?;
                client.query_opt(&stmt, &[&ty.kind(), &id]).await
            })
            .await?
            .map_err(err)?;
        conn.clean = true;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(WatchRow {
            version: row_version(ty, id, &row)?,
            text: row.try_get(1).map_err(err)?,
            created: row.try_get(2).map_err(err)?,
        }))
    }

    /// `watch_raw`: registers, waits until the listener listens, then reads
    /// the first version.
    pub(super) async fn watch(&self, ty: &'static ContextType, id: Uuid) -> Result<RawWatchStart> {
        if !self.inner.watchable {
            return Err(ty.backend_error(
                Some(id),
                message(format!(
                    "table {} has no `created` column (schema 1), which watching needs; \
                     connect once with a role that may ALTER the table to add it \
                     (see \"Schema and migrations\" in ctxstore::docs::postgres)",
                    self.inner.table
                )),
            ));
        }
        let listener = self.listener();
        let failures = listener.status().failures;
        // Registered first (a commit after this point wakes it); dropping
        // this future unregisters.
        let registration = Registration::new(listener, ty.kind(), id);
        let status = bounded(
            Some(self.inner.timeouts.connect.saturating_mul(2)),
            poll_fn(|cx| {
                let _ = registration.waiter.register(cx.waker());
                let status = registration.listener.status();
                if status.up {
                    Poll::Ready(Ok(status))
                } else if status.failures > failures {
                    Poll::Ready(Err(registration.listener.last_error()))
                } else {
                    Poll::Pending
                }
            }),
        )
        .await
        .map_err(|limit| no_reply(ty, Some(id), "LISTEN", limit))?
        .map_err(|e| ty.backend_error(Some(id), message(listener_error(&self.inner.table, &e))))?;
        let seen = lock(&registration.waiter.state).events;
        let row = self
            .watch_read(ty, id)
            .await?
            .ok_or_else(|| ty.not_found(id))?;
        let first = ty.decode_snapshot(id, row.text.as_bytes(), row.version)?;
        let watch = PgWatch {
            store: self.clone(),
            ty,
            id,
            created: row.created,
            registration,
            seen,
            epoch: status.epoch,
            failures: status.failures,
            stale: false,
            read: None,
        };
        Ok((first, Box::new(watch)))
    }
}

fn listener_error(table: &str, error: &str) -> String {
    format!("the watch listener of table {table} is not listening ({error}); it reconnects")
}

/// A waiter registered under its key until dropped.
struct Registration {
    listener: Arc<Listener>,
    id: Uuid,
    waiter: Arc<Waiter>,
}

impl Registration {
    fn new(listener: Arc<Listener>, kind: &'static str, id: Uuid) -> Self {
        let waiter = Arc::new(Waiter::default());
        listener.register(kind, id, waiter.clone());
        Self {
            listener,
            id,
            waiter,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.listener.unregister(self.id, &self.waiter);
    }
}

/// One watch: re-reads its row when notified (see the module docs).
struct PgWatch {
    store: PostgresContextStorage,
    ty: &'static ContextType,
    id: Uuid,
    /// The creation stamp of the incarnation watched.
    created: Option<i64>,
    registration: Registration,
    /// The waiter's event count when the last read began.
    seen: u64,
    /// The listener epoch the last read began in.
    epoch: u64,
    /// Listener failures reported so far.
    failures: u64,
    /// A read is due whatever the counts say (the last one failed).
    stale: bool,
    /// The read in flight.
    read: Option<BoxFuture<'static, Result<Option<WatchRow>>>>,
}

impl RawWatch for PgWatch {
    fn poll_changed(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<RawSnapshot>> {
        let (ty, id) = (self.ty, self.id);
        loop {
            if let Some(read) = self.read.as_mut() {
                let Poll::Ready(read) = read.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                self.read = None;
                match read {
                    Err(e) => {
                        self.stale = true;
                        return Poll::Ready(Err(e));
                    }
                    Ok(None) => return Poll::Ready(Err(ty.not_found(id))),
                    // Deleted and created again: another context.
                    Ok(Some(row)) if row.created != self.created => {
                        return Poll::Ready(Err(ty.not_found(id)))
                    }
                    Ok(Some(row)) if row.version > after => {
                        let snap = ty.decode_snapshot(id, row.text.as_bytes(), row.version);
                        if snap.is_err() {
                            self.stale = true;
                        }
                        return Poll::Ready(snap);
                    }
                    Ok(Some(_)) => {} // nothing newer: wait
                }
            }
            // Register before looking: whatever happens after this wakes us.
            let events = self.registration.waiter.register(cx.waker());
            let status = self.registration.listener.status();
            if status.failures > self.failures {
                self.failures = status.failures;
                self.stale = true;
                let error = self.registration.listener.last_error();
                return Poll::Ready(Err(ty.backend_error(
                    Some(id),
                    message(listener_error(&self.store.inner.table, &error)),
                )));
            }
            if !status.up {
                return Poll::Pending; // woken when it listens again
            }
            if status.epoch != self.epoch || events != self.seen || self.stale {
                // Commits may have happened unnoticed (a new connection)
                // or been notified: read, noting first what this read
                // covers.
                self.epoch = status.epoch;
                self.seen = events;
                self.stale = false;
                let store = self.store.clone();
                self.read = Some(Box::pin(async move { store.watch_read(ty, id).await }));
                continue;
            }
            return Poll::Pending;
        }
    }
}
