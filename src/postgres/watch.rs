//! Watching contexts: one `LISTEN` connection per store, which keeps this
//! store's rows of the watch registry and fans notifications out to the
//! watches of each key, and [`PgWatch`], one watch's re-reads.
//!
//! # Protocol
//!
//! Writers notify only for keys somebody watches. The watch registry
//! `<table>_watch (kind, id, pid)` lists, per key, the listening sessions
//! (`pid` = `pg_backend_pid()`) of the stores that watch it. Every write
//! runs, after its row statement and in the same transaction and round
//! trip, the separate statement [`Sql::notify`](super::sql::Sql):
//! `SELECT pg_notify(<channel>, '<id> <kind>') FROM <table>_watch WHERE
//! kind = $1 AND id = $2 AND <this transaction wrote> LIMIT 1`. A write on
//! an unwatched key adds one index lookup and no `NOTIFY` (Postgres
//! serializes the commits of all notifying transactions database-wide). A
//! notification is delivered only after its write committed, never for a
//! rollback or a refused conditional write.
//!
//! A watch first registers a [`Waiter`] under its key in memory, waits
//! until the [`Listener`] listens, and asks it to register the key (the
//! first watch of the key in this store inserts the registry row and
//! commits; later ones find it registered). Only then does it read the row,
//! with `FOR SHARE`, which waits for a writer holding the row lock.
//!
//! **Why no wake-up is lost.** Let R be the commit of the registration and
//! W a writer that commits a version the watch's first read did not see.
//! Under READ COMMITTED, W's notify statement takes its snapshot when it
//! starts, after W's row statement, so while W holds the row lock (which
//! it keeps until it commits). If that snapshot is after R, it sees the
//! registry row and W notifies; its commit comes after `LISTEN` (which was
//! in force before R), so the listener gets it. If the snapshot is before
//! R, W already held the row lock at R; the read started after R, so
//! `FOR SHARE` waited for W to commit and returned W's version (or no row:
//! W deleted it), contradicting the assumption. At most one writer holds
//! the row lock at R, so one locking read covers them all; every later
//! re-read after a notification is a plain read.
//!
//! `FOR SHARE`, not `FOR KEY SHARE`: an `UPDATE` that changes no key
//! column takes `FOR NO KEY UPDATE`, which conflicts with `FOR SHARE` but
//! not with `FOR KEY SHARE`, so only `FOR SHARE` waits for it.
//!
//! The first read does not wait for a guard: it is `FOR SHARE NOWAIT`. If
//! the row lock is held (a guard, or a writer about to commit), it reads
//! the row plainly instead and the watch's next `changed()` makes the
//! waiting `FOR SHARE` read (which is allowed to wait for the holder's
//! commit, like any `changed()`), so the argument above holds with that
//! read in place of the first. Waiting reads pass the key's local gate, so
//! that at most one pooled connection per key waits for a holder.
//!
//! A watch re-reads the row whenever its event count moved since its last
//! read began (spurious wake-ups only cost a read), and returns it only if
//! the version is above the caller's and the creation stamp (`created`) is
//! the one it began with; no row, or another stamp, is `NotFound`.
//!
//! The last watch of a key in this store makes the listener delete the
//! registry row (best effort: a leftover row only costs the key's writers a
//! `NOTIFY`). The listener runs registry statements one at a time, in the
//! order the watches asked, so a delete and a later insert of the same key
//! never swap.
//!
//! # Outages
//!
//! When the listening connection fails, the listener counts a failure and
//! wakes every waiter; each watch reports every failure once as a
//! `Backend` error, then waits. The listener reconnects with backoff
//! (100 ms doubling to 5 s; each failed attempt is a failure too),
//! `LISTEN`s again, deletes the registry rows of its previous session, of
//! its new one and of every session that no longer exists
//! (`pg_stat_activity`), registers every key watched now (committed), and
//! only then bumps its epoch and wakes every waiter. A watch that sees a
//! new epoch re-reads with the waiting `FOR SHARE` read (the argument
//! above, with the re-registration as R), so a commit made while nobody
//! listened is reported, not lost.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};
use uuid::Uuid;

use super::conn::{bounded, in_order, no_reply, pg, PgError};
use super::sql::{row_version, RegistrySql};
use super::{Inner, PostgresContextStorage};
use crate::context::ContextType;
use crate::storage::{BoxFuture, RawSnapshot, Wait};
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

/// A key of the watch registry.
type Key = (&'static str, Uuid);

/// What a watch asks the listener's session to do with the registry.
enum Command {
    /// Make sure the key's row of this session is committed, then reply.
    Register {
        key: Key,
        reply: oneshot::Sender<std::result::Result<(), String>>,
    },
    /// The key's last watch is gone: delete its row (unless a watch of the
    /// key came back meanwhile).
    Unregister { key: Key },
    /// The store is gone: delete this session's rows and end.
    Shutdown,
}

/// The store's `LISTEN` connection and the watches of each key.
pub(super) struct Listener {
    table: String,
    state: Mutex<ListenerState>,
    /// To the session, which runs them in order.
    commands: mpsc::UnboundedSender<Command>,
    stopping: AtomicBool,
    stopped: Notify,
}

#[derive(Default)]
struct ListenerState {
    /// The waiters of each id, with the kind they watch.
    keys: HashMap<Uuid, Vec<(&'static str, Arc<Waiter>)>>,
    /// `LISTEN` is in force on a live connection and every watched key is
    /// registered by its session.
    up: bool,
    /// Bumped each time the listener is up on a new session.
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

    fn watches(&self, (kind, id): Key) -> bool {
        self.keys
            .get(&id)
            .is_some_and(|waiters| waiters.iter().any(|(k, _)| *k == kind))
    }
}

/// What the listener's session needs of [`Sql`](super::sql::Sql).
struct ListenSql {
    listen: String,
    registry: RegistrySql,
}

/// The registry statements, prepared on the listening session.
struct Prepared {
    register: Statement,
    unregister: Statement,
    unregister_all: Statement,
}

/// How one listening session ended.
enum Ended {
    /// Told to stop.
    Stopped,
    /// Lost or never set up; `was_up`: it got as far as listening.
    Failed { was_up: bool, error: String },
}

/// What a finished registry statement asks of the session.
enum Step {
    Done,
    /// The key's insert failed: it is not registered.
    NotRegistered(Key),
    Stop,
}

impl Listener {
    /// Starts the listener of `inner`'s table on the store's runtime.
    fn start(inner: &Inner) -> Arc<Listener> {
        let (commands, rx) = mpsc::unbounded_channel();
        let listener = Arc::new(Listener {
            table: inner.table.clone(),
            state: Mutex::default(),
            commands,
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
        });
        let sql = ListenSql {
            listen: inner.sql.listen.clone(),
            registry: inner.sql.registry.clone(),
        };
        drop(inner.handle.spawn(listener.clone().run(
            rx,
            inner.listen_config.clone(),
            sql,
            inner.timeouts.connect,
        )));
        listener
    }

    /// Stops listening (the store is gone): the session runs what the
    /// watches asked before, deletes its registry rows and ends; a listener
    /// that is not connected ends at once.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stopped.notify_one();
        let _ = self.commands.send(Command::Shutdown);
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

    fn unregister(&self, kind: &'static str, id: Uuid, waiter: &Arc<Waiter>) {
        let mut state = lock(&self.state);
        if let Some(waiters) = state.keys.get_mut(&id) {
            waiters.retain(|(_, w)| !Arc::ptr_eq(w, waiter));
            if waiters.is_empty() {
                state.keys.remove(&id);
            }
        }
        if !state.watches((kind, id)) {
            // Sent under the state lock: a watch of the key that comes
            // after this sends its `Register` after this `Unregister`.
            let _ = self.commands.send(Command::Unregister { key: (kind, id) });
        }
    }

    /// Asks the session to register `key`; the reply comes once its row is
    /// committed.
    fn register_key(&self, key: Key) -> oneshot::Receiver<std::result::Result<(), String>> {
        let (reply, rx) = oneshot::channel();
        // If the task is gone, `reply` drops with the command: the watch
        // sees the channel closed.
        let _ = self.commands.send(Command::Register { key, reply });
        rx
    }

    /// Every key watched now.
    fn watched(&self) -> Vec<Key> {
        let state = lock(&self.state);
        let mut keys: Vec<Key> = state
            .keys
            .iter()
            .flat_map(|(id, waiters)| waiters.iter().map(|(kind, _)| (*kind, *id)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
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

    /// Connects, listens, keeps the registry and dispatches notifications
    /// until the connection fails; then again, with backoff. Runs until
    /// stopped.
    async fn run(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Command>,
        config: tokio_postgres::Config,
        sql: ListenSql,
        connect: Duration,
    ) {
        let mut backoff = MIN_BACKOFF;
        let mut pid = None;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let (was_up, error) = match self
                .session(&config, &sql, connect, &mut rx, &mut pid)
                .await
            {
                Ended::Stopped => return,
                Ended::Failed { was_up, error } => (was_up, error),
            };
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
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.stopped.notified() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Sets a new session up: `LISTEN`, purge the registry (this session's
    /// and the previous one's rows, and those of sessions that no longer
    /// exist), register every key watched now. Returns the session's pid,
    /// the keys it registered and its prepared statements.
    async fn setup(
        &self,
        client: &Client,
        sql: &ListenSql,
        previous: Option<i32>,
    ) -> std::result::Result<(i32, HashSet<Key>, Prepared), tokio_postgres::Error> {
        client.batch_execute(&sql.listen).await?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        client.execute(&sql.registry.purge, &[&previous]).await?;
        let prepared = Prepared {
            register: client.prepare(&sql.registry.register).await?,
            unregister: client.prepare(&sql.registry.unregister).await?,
            unregister_all: client.prepare(&sql.registry.unregister_all).await?,
        };
        // Watches registered in memory after this look-up send their own
        // `Register`, which the session runs once it is up.
        let keys = self.watched();
        let (kinds, ids): (Vec<&str>, Vec<Uuid>) = keys.iter().copied().unzip();
        client
            .execute(&sql.registry.register_all, &[&kinds, &ids])
            .await?;
        Ok((pid, keys.into_iter().collect(), prepared))
    }

    /// One registry command: decides at once (against the keys this
    /// session registered and the watches in memory) and returns the
    /// statement to run, if any.
    fn command<'a>(
        &self,
        command: Command,
        client: &'a Client,
        prepared: &Prepared,
        registered: &mut HashSet<Key>,
        limit: Duration,
    ) -> Option<BoxFuture<'a, Step>> {
        match command {
            Command::Register { key, reply } => {
                if !registered.insert(key) {
                    let _ = reply.send(Ok(()));
                    return None;
                }
                let stmt = prepared.register.clone();
                Some(Box::pin(async move {
                    let params: [&(dyn ToSql + Sync); 2] = [&key.0, &key.1];
                    match bounded(Some(limit), client.execute(&stmt, &params)).await {
                        Ok(Ok(_)) => {
                            let _ = reply.send(Ok(()));
                            Step::Done
                        }
                        Ok(Err(e)) => {
                            let _ = reply
                                .send(Err(format!("cannot register the watch: {}", PgError(e))));
                            Step::NotRegistered(key)
                        }
                        Err(limit) => {
                            let _ = reply.send(Err(format!(
                                "no reply to the watch registration within {limit:?}"
                            )));
                            Step::NotRegistered(key)
                        }
                    }
                }))
            }
            Command::Unregister { key } => {
                if lock(&self.state).watches(key) || !registered.remove(&key) {
                    return None;
                }
                let stmt = prepared.unregister.clone();
                let table = self.table.clone();
                Some(Box::pin(async move {
                    let params: [&(dyn ToSql + Sync); 2] = [&key.0, &key.1];
                    if let Ok(Err(e)) = bounded(Some(limit), client.execute(&stmt, &params)).await {
                        // Best effort: a leftover row costs writers a NOTIFY.
                        tracing::debug!(table, error = %PgError(e), "cannot unregister a watch");
                    }
                    Step::Done
                }))
            }
            Command::Shutdown => {
                let stmt = prepared.unregister_all.clone();
                Some(Box::pin(async move {
                    let _ = bounded(Some(limit), client.execute(&stmt, &[])).await;
                    Step::Stop
                }))
            }
        }
    }

    /// One connection: sets it up, then runs registry commands and
    /// dispatches notifications until it fails or is told to stop.
    async fn session(
        &self,
        config: &tokio_postgres::Config,
        sql: &ListenSql,
        connect: Duration,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        pid: &mut Option<i32>,
    ) -> Ended {
        let failed = |was_up, error| Ended::Failed { was_up, error };
        // `config` carries the connect timeout; this bounds the rest of
        // the startup too.
        let (client, mut connection) = match bounded(Some(connect), config.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return failed(false, format!("cannot connect: {}", PgError(e))),
            Err(limit) => return failed(false, format!("cannot connect within {limit:?}")),
        };
        let client = &client;
        let mut setup = pin!(bounded(
            Some(connect.saturating_mul(2)),
            self.setup(client, sql, *pid)
        ));
        let mut prepared = None;
        let mut registered = HashSet::new();
        let mut current: Option<BoxFuture<'_, Step>> = None;
        // Poll the setup and the registry statements before the
        // connection, so that the connection sends them; then dispatch
        // whatever the connection delivers.
        poll_fn(|cx| {
            if prepared.is_none() {
                match setup.as_mut().poll(cx) {
                    Poll::Ready(Ok(Ok((new_pid, keys, statements)))) => {
                        *pid = Some(new_pid);
                        registered = keys;
                        prepared = Some(statements);
                        self.listening();
                        tracing::debug!(table = %self.table, pid = new_pid, "the watch listener is listening");
                    }
                    Poll::Ready(Ok(Err(e))) => {
                        return Poll::Ready(failed(
                            false,
                            format!("cannot set up listening: {}", PgError(e)),
                        ))
                    }
                    Poll::Ready(Err(limit)) => {
                        return Poll::Ready(failed(
                            false,
                            format!("no reply to LISTEN and the registry set-up within {limit:?}"),
                        ))
                    }
                    Poll::Pending => {}
                }
            }
            if let Some(statements) = &prepared {
                loop {
                    if let Some(step) = current.as_mut() {
                        match step.as_mut().poll(cx) {
                            Poll::Ready(Step::Done) => current = None,
                            Poll::Ready(Step::NotRegistered(key)) => {
                                registered.remove(&key);
                                current = None;
                            }
                            Poll::Ready(Step::Stop) => return Poll::Ready(Ended::Stopped),
                            Poll::Pending => break,
                        }
                    }
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(command)) => {
                            current =
                                self.command(command, client, statements, &mut registered, connect)
                        }
                        // Every sender is gone with the listener: stop.
                        Poll::Ready(None) => return Poll::Ready(Ended::Stopped),
                        Poll::Pending => break,
                    }
                }
            }
            loop {
                match connection.poll_message(cx) {
                    Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                        self.notified(n.payload())
                    }
                    Poll::Ready(Some(Ok(_))) => {} // a notice
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(failed(
                            prepared.is_some(),
                            format!("connection lost: {}", PgError(e)),
                        ))
                    }
                    Poll::Ready(None) => {
                        return Poll::Ready(failed(
                            prepared.is_some(),
                            "connection closed".to_owned(),
                        ))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}

/// A row as a watch reads it.
struct WatchRow {
    version: u64,
    text: String,
    created: Option<i64>,
}

/// What a `FOR SHARE NOWAIT` read found.
enum Nowait {
    Read(Option<WatchRow>),
    /// A writer or guard holds the row lock.
    Busy,
}

fn watch_row(
    ty: &'static ContextType,
    id: Uuid,
    row: Option<tokio_postgres::Row>,
) -> Result<Option<WatchRow>> {
    let err = |e| ty.backend_error(Some(id), pg(e));
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(WatchRow {
        version: row_version(ty, id, &row)?,
        text: row.try_get(1).map_err(err)?,
        created: row.try_get(2).map_err(err)?,
    }))
}

impl PostgresContextStorage {
    fn listener(&self) -> Arc<Listener> {
        self.inner
            .listener
            .get_or_init(|| Listener::start(&self.inner))
            .clone()
    }

    /// Reads the row as a watch needs it: a plain read (MVCC, never waits
    /// for a lock holder), or with `nowait`, `FOR SHARE NOWAIT`.
    async fn watch_read_now(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        nowait: bool,
    ) -> Result<Nowait> {
        let mut conn = self.read_conn(ty, Some(id)).await?;
        let client = conn.client();
        let sql = &self.inner.sql;
        let query = if nowait {
            &sql.watch_read_share_nowait
        } else {
            &sql.watch_read
        };
        let row = self
            .bounded(ty, Some(id), "watch read", async {
                let stmt = client.prepare_cached(query).await?;
                client.query_opt(&stmt, &[&ty.kind(), &id]).await
            })
            .await?;
        let busy =
            |e: &tokio_postgres::Error| nowait && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
        // A statement of its own (no transaction): the connection is clean
        // after a result or a refused lock; after another error it is
        // closed, to be safe.
        conn.clean = row.as_ref().map_or_else(busy, |_| true);
        match row {
            Ok(row) => Ok(Nowait::Read(watch_row(ty, id, row)?)),
            Err(e) if busy(&e) => Ok(Nowait::Busy),
            Err(e) => Err(ty.backend_error(Some(id), pg(e))),
        }
    }

    /// A plain read.
    async fn watch_read(&self, ty: &'static ContextType, id: Uuid) -> Result<Option<WatchRow>> {
        match self.watch_read_now(ty, id, false).await? {
            Nowait::Read(row) => Ok(row),
            Nowait::Busy => unreachable!("a plain read never reports a held lock"),
        }
    }

    /// The read `FOR SHARE` that waits for a writer holding the row lock
    /// (statement timeout off, like every lock wait). Passes the key's
    /// local gate first, so that at most one pooled connection per key
    /// waits for a holder (and none for a guard of this process).
    async fn watch_read_share(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> Result<Option<WatchRow>> {
        let _gate = self.pass_gate(ty, id, Wait::Forever).await?;
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let stmt = self
            .bounded(
                ty,
                Some(id),
                "prepare",
                client.prepare_cached(&self.inner.sql.watch_read_share),
            )
            .await?
            .map_err(err)?;
        let kind = ty.kind();
        let key: [&(dyn ToSql + Sync); 2] = [&kind, &id];
        let (began, (row, committed)) = in_order(
            client.batch_execute("BEGIN; SET LOCAL statement_timeout = 0"),
            in_order(
                client.query_opt(&stmt, &key),
                client.batch_execute("COMMIT"),
            ),
        )
        .await;
        conn.clean = committed.is_ok();
        match (began, row, committed) {
            (Ok(()), Ok(row), Ok(())) => watch_row(ty, id, row),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => Err(err(e)),
        }
    }

    /// `watch_raw`: registers in memory, waits until the listener listens,
    /// has the key registered in the watch registry, then reads the first
    /// version with `FOR SHARE NOWAIT` (see the module docs).
    pub(super) async fn watch(&self, ty: &'static ContextType, id: Uuid) -> Result<RawWatchStart> {
        let schema = self.inner.schema;
        if !schema.watchable() {
            let why = if !schema.created {
                format!(
                    "table {} has no `created` column (schema 1), which watching needs",
                    self.inner.table
                )
            } else {
                format!(
                    "the watch registry {}_watch is missing or this role may not SELECT, \
                     INSERT and DELETE its rows",
                    self.inner.table
                )
            };
            return Err(ty.backend_message(
                Some(id),
                format!(
                    "{why}; connect once with a role that may ALTER the table and CREATE \
                     tables to migrate it, or grant the privileges \
                     (see \"Schema and migrations\" in ctxstore::docs::postgres)"
                ),
            ));
        }
        let listener = self.listener();
        let failures = listener.status().failures;
        let limit = self.inner.timeouts.connect.saturating_mul(2);
        // Registered in memory first (a notification after this point
        // wakes it); dropping this future unregisters.
        let registration = Registration::new(listener, ty.kind(), id);
        let status = bounded(
            Some(limit),
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
        .map_err(|e| ty.backend_message(Some(id), listener_error(&self.inner.table, &e)))?;
        // The key's registry row, committed (the first watch of the key in
        // this store inserts it).
        let mut reply = registration.listener.register_key((ty.kind(), id));
        bounded(
            Some(limit),
            poll_fn(|cx| {
                let _ = registration.waiter.register(cx.waker());
                if let Poll::Ready(done) = Pin::new(&mut reply).poll(cx) {
                    return Poll::Ready(done.unwrap_or_else(|_| {
                        Err("the listener stopped before registering the watch".to_owned())
                    }));
                }
                if registration.listener.status().failures > status.failures {
                    return Poll::Ready(Err(registration.listener.last_error()));
                }
                Poll::Pending
            }),
        )
        .await
        .map_err(|limit| no_reply(ty, Some(id), "watch registration", limit))?
        .map_err(|e| ty.backend_message(Some(id), listener_error(&self.inner.table, &e)))?;
        let seen = lock(&registration.waiter.state).events;
        let status = registration.listener.status();
        // After the registration committed: waits for no one, but if a
        // writer holds the row lock the next `changed()` reads again,
        // waiting for it (see the module docs).
        let (row, locking) = match self.watch_read_now(ty, id, true).await? {
            Nowait::Read(row) => (row, false),
            Nowait::Busy => (self.watch_read(ty, id).await?, true),
        };
        let row = row.ok_or_else(|| ty.not_found(id))?;
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
            locking,
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
    kind: &'static str,
    id: Uuid,
    waiter: Arc<Waiter>,
}

impl Registration {
    fn new(listener: Arc<Listener>, kind: &'static str, id: Uuid) -> Self {
        let waiter = Arc::new(Waiter::default());
        listener.register(kind, id, waiter.clone());
        Self {
            listener,
            kind,
            id,
            waiter,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.listener.unregister(self.kind, self.id, &self.waiter);
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
    /// The next read must wait for a holder of the row lock (`FOR SHARE`):
    /// the first read found it held, or the key was registered anew (a new
    /// epoch). Cleared by a waiting read that succeeded.
    locking: bool,
    /// The read in flight, and whether it is a waiting one.
    read: Option<(bool, BoxFuture<'static, Result<Option<WatchRow>>>)>,
}

impl RawWatch for PgWatch {
    fn poll_changed(&mut self, cx: &mut TaskContext<'_>, after: u64) -> Poll<Result<RawSnapshot>> {
        let (ty, id) = (self.ty, self.id);
        loop {
            if let Some((locking, read)) = self.read.as_mut() {
                let Poll::Ready(read) = read.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let locking = *locking;
                self.read = None;
                if locking && read.is_ok() {
                    self.locking = false;
                }
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
                return Poll::Ready(Err(ty.backend_message(
                    Some(id),
                    listener_error(&self.store.inner.table, &error),
                )));
            }
            if !status.up {
                return Poll::Pending; // woken when it listens again
            }
            if status.epoch != self.epoch {
                // Registered anew by a new session: the read after that
                // must wait for a writer holding the row lock.
                self.locking = true;
            }
            if status.epoch != self.epoch || events != self.seen || self.stale || self.locking {
                // Commits may have happened unnoticed (a new connection)
                // or been notified: read, noting first what this read
                // covers.
                self.epoch = status.epoch;
                self.seen = events;
                self.stale = false;
                let store = self.store.clone();
                let locking = self.locking;
                let read: BoxFuture<'static, _> = if locking {
                    Box::pin(async move { store.watch_read_share(ty, id).await })
                } else {
                    Box::pin(async move { store.watch_read(ty, id).await })
                };
                self.read = Some((locking, read));
                continue;
            }
            return Poll::Pending;
        }
    }
}
