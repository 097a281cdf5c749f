//! [`PostgresContextStorage`]: durable contexts, one row per context,
//! exclusive access through row locks (cargo feature `postgres`).
//!
//! What the backend does and why — the SQL of each operation, timeouts,
//! schema and migrations, versions, faults, measurements — is written
//! once, for users, in [`crate::docs::postgres`] (`docs/postgres.md`). The
//! code:
//!
//! * `mod.rs`: the store and the `ContextStorage` methods. Guards, stores
//!   and deletes pass the key's local FIFO gate (the shared one of
//!   `crate::remote`) before they take a pooled connection.
//! * `builder.rs`: options and `connect` (URL options, statement timeout,
//!   keepalives, the two pools).
//! * `schema.rs`: creating, checking and migrating the table, its
//!   sequence and its watch registry under an advisory lock.
//! * `sql.rs`: every statement, built once per table with quoted
//!   identifiers, and the conversions of their parameters and rows.
//! * `conn.rs`: taking connections from the pools, the client-side bound on
//!   a round trip, pipelining (`in_order`), driver errors, and `Conn`,
//!   which never returns a connection with a transaction open or a request
//!   in flight to the pool: it cancels the statement and closes the
//!   connection, which makes Postgres release whatever the session held.
//! * `watch.rs`: watching a context: the store's `LISTEN` connection,
//!   started by the first watch, which keeps the store's rows of the watch
//!   registry (writers notify only for registered keys) and fans
//!   notifications out to the watches of each key, and `PgWatch`, one
//!   watch's re-reads; the argument why no wake-up is lost.
//! * `lease.rs`: `PgLease`, a held row lock (the connection with its
//!   transaction open) that commits, or rolls back when dropped (the lease
//!   convention of `crate::remote`).

mod builder;
mod conn;
mod lease;
mod schema;
mod sql;
mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

pub use builder::PostgresContextStorageBuilder;
use conn::{bounded, in_order, no_reply, pg, ClientTimeouts};
use lease::PgLease;
use sql::{json_text, row_version, Sql};

use crate::context::ContextType;
use crate::remote::{Gate, Gates};
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, RawGuard, RawSnapshot, Wait};
use crate::watch::RawWatchStart;
use crate::Result;

/// Contexts stored in PostgreSQL, locked with row locks.
///
/// Cheap to clone (an `Arc`); every clone shares one connection pool. A
/// held [`ContextGuard`](crate::ContextGuard) owns one pooled connection
/// (with its transaction open) until it is committed or dropped, so the
/// pool size bounds how many guards one store can hold at once; a task that
/// holds `pool_size` guards and asks for another waits for itself, until
/// the pool wait timeout (default 30 s) fails it with a `Backend` error.
/// Tasks waiting for a key held in this process queue on a per-key gate
/// and hold no connection; snapshots use a free connection or a small
/// separate read pool, so they never wait for guards.
/// See [`crate::docs::postgres`] for the SQL of each operation, timeouts,
/// the schema and its migrations, and faults.
///
/// ```no_run
/// # async fn demo() -> Result<(), ctxstore::ContextError> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use ctxstore::{ContextStorage, PostgresContextStorage};
///
/// let store = PostgresContextStorage::builder("postgres://postgres@127.0.0.1/app")
///     .table("job_contexts")
///     .pool_size(32)
///     .statement_timeout(Duration::from_secs(10))
///     .connect()
///     .await?;
/// let store: Arc<dyn ContextStorage> = Arc::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresContextStorage {
    inner: Arc<Inner>,
}

struct Inner {
    /// Guards, stores, deletes; and reads when it has a connection free.
    pool: Pool,
    /// Reads (snapshots, `contains`, ids) when `pool` has none free, so that
    /// they never queue behind guards for a connection.
    read_pool: Pool,
    table: String,
    sql: Sql,
    // Where releases are spawned when the dropping thread is not inside a
    // runtime (a guard dropped on a plain thread).
    handle: tokio::runtime::Handle,
    /// The per-process per-key FIFO gate: tasks of this process that want
    /// the same key queue here, not on pooled connections.
    gates: Arc<PgGates>,
    timeouts: ClientTimeouts,
    /// For the watch listener's connection (its own, not pooled).
    listen_config: tokio_postgres::Config,
    /// What this role can use of the schema (watching needs schema 3).
    schema: schema::Schema,
    /// The watch listener, started by the first watch.
    listener: std::sync::OnceLock<Arc<watch::Listener>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle of the store (watches hold one) is gone: stop
        // listening.
        if let Some(listener) = self.listener.get() {
            listener.stop();
        }
    }
}

/// The per-process per-key FIFO gates of one store (the shared gate of
/// `crate::remote`), keyed by (kind, id).
type PgGates = Gates<(&'static str, Uuid)>;

/// A passed gate of this store, held by a lease until its transaction ended.
pub(super) type PgGate = Gate<(&'static str, Uuid)>;

impl fmt::Debug for PostgresContextStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("PostgresContextStorage")
            .field("table", &self.inner.table)
            .field("pool_size", &status.max_size)
            .field("connections", &status.size)
            .finish_non_exhaustive()
    }
}

impl PostgresContextStorage {
    /// The table this store uses.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Passes the key's local gate, waiting as `wait` allows.
    async fn pass_gate(&self, ty: &'static ContextType, id: Uuid, wait: Wait) -> Result<PgGate> {
        let ticket = self.inner.gates.register((ty.kind(), id));
        ticket.pass(ty, id, wait).await
    }

    async fn lock(&self, ty: &'static ContextType, id: Uuid, wait: Wait) -> Result<RawGuard> {
        let sql = &self.inner.sql;
        // Queue in the process first: only one task per key and process
        // asks Postgres (and holds a connection) at a time.
        let gate = self.pass_gate(ty, id, wait).await?;
        let mut conn = self.conn(ty, Some(id), wait).await?;
        let (begin, query) = match wait {
            Wait::Forever => (
                "BEGIN; SET LOCAL statement_timeout = 0".to_owned(),
                &sql.lock,
            ),
            Wait::Never => ("BEGIN".to_owned(), &sql.lock_nowait),
            Wait::Until(deadline, _) => {
                // lock_timeout is in whole milliseconds and 0 means "none":
                // round up, and use NOWAIT once the deadline has passed.
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128);
                if ms == 0 {
                    ("BEGIN".to_owned(), &sql.lock_nowait)
                } else {
                    (
                        format!(
                            "BEGIN; SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = {ms}"
                        ),
                        &sql.lock,
                    )
                }
            }
        };
        let client = conn.client();
        let stmt = self
            .bounded(ty, Some(id), "prepare", client.prepare_cached(query))
            .await?
            .map_err(|e| ty.backend_error(Some(id), pg(e)))?;
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 2] = [&kind, &id];
        let round_trip = in_order(
            client.batch_execute(&begin),
            client.query_opt(&stmt, &params),
        );
        // Waiting for a holder is bounded by `wait` alone; a NOWAIT lock is
        // one plain round trip.
        let (began, row) = match wait {
            Wait::Forever => round_trip.await,
            Wait::Never => self.bounded(ty, Some(id), "lock", round_trip).await?,
            Wait::Until(deadline, _) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let limit = self.inner.timeouts.response.map(|r| r.saturating_add(left));
                bounded(limit, round_trip)
                    .await
                    .map_err(|limit| no_reply(ty, Some(id), "lock", limit))?
            }
        };
        let row = match (began, row) {
            (Ok(()), Ok(Some(row))) => row,
            (Ok(()), Ok(None)) => {
                conn.rollback().await;
                return Err(ty.not_found(id));
            }
            (Ok(()), Err(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                conn.rollback().await;
                return Err(match wait {
                    Wait::Until(_, asked) => ty.timeout(id, asked),
                    Wait::Never | Wait::Forever => ty.would_block(id),
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                conn.rollback().await;
                return Err(ty.backend_error(Some(id), pg(e)));
            }
        };
        let version = row_version(ty, id, &row)?;
        let text: &str = row
            .try_get(1)
            .map_err(|e| ty.backend_error(Some(id), pg(e)))?;
        let value = match ty.decode(Some(id), text.as_bytes()) {
            Ok(value) => value,
            Err(e) => {
                conn.rollback().await;
                return Err(e);
            }
        };
        Ok(RawGuard::Remote {
            value,
            version,
            lease: Box::new(PgLease::new(
                self.inner.clone(),
                ty,
                id,
                version,
                conn,
                gate,
            )),
        })
    }

    async fn store(&self, ty: &'static ContextType, id: Uuid, value: ErasedValue) -> Result<u64> {
        let bytes = ty.encode(Some(id), &*value)?;
        let json = json_text(ty, id, &bytes)?;
        let sql = &self.inner.sql;
        let kind = ty.kind();
        let _gate = self.pass_gate(ty, id, Wait::Forever).await?;
        loop {
            let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
            let client = conn.client();
            let err = |e| ty.backend_error(Some(id), pg(e));
            let (insert, (update, notify)) = self
                .bounded(
                    ty,
                    Some(id),
                    "prepare",
                    in_order(
                        client.prepare_cached(&sql.insert),
                        in_order(
                            client.prepare_cached(&sql.update),
                            client.prepare_cached(&sql.notify),
                        ),
                    ),
                )
                .await?;
            let (insert, update, notify) = (
                insert.map_err(err)?,
                update.map_err(err)?,
                notify.map_err(err)?,
            );
            // One round trip. The INSERT creates the row if missing (with a
            // placeholder version nobody else can see) and does not wait for
            // a holder; the UPDATE then takes the row lock, waiting for a
            // holder, and only then draws the version; the notify statement
            // runs once the UPDATE holds the lock (see `watch.rs`).
            let params: [&(dyn ToSql + Sync); 3] = [&kind, &id, &json];
            let (began, (inserted, (updated, (notified, committed)))) = in_order(
                client.batch_execute("BEGIN; SET LOCAL statement_timeout = 0"),
                in_order(
                    client.execute(&insert, &params),
                    in_order(
                        client.query_opt(&update, &params),
                        in_order(
                            client.execute(&notify, &params[..2]),
                            client.batch_execute("COMMIT"),
                        ),
                    ),
                ),
            )
            .await;
            let updated = updated.and_then(|row| notified.map(|_| row));
            let committed_ok = committed.is_ok();
            match (began, inserted, updated, committed) {
                (Ok(()), Ok(_), Ok(Some(row)), Ok(())) => {
                    conn.clean = true;
                    return row_version(ty, id, &row);
                }
                // The row existed at the INSERT and was deleted before the
                // UPDATE could lock it: nothing was written; go again.
                (Ok(()), Ok(_), Ok(None), Ok(())) => conn.clean = true,
                (Err(e), ..) | (_, Err(e), ..) | (.., Err(e), _) => {
                    // COMMIT of an aborted transaction rolls back: the
                    // connection is clean if it answered.
                    conn.clean = committed_ok;
                    return Err(err(e));
                }
                (.., Err(e)) => return Err(err(e)),
            }
        }
    }

    async fn snapshot(&self, ty: &'static ContextType, id: Uuid) -> Result<RawSnapshot> {
        let mut conn = self.read_conn(ty, Some(id)).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let row = self
            .bounded(ty, Some(id), "snapshot", async {
                let stmt = client.prepare_cached(&self.inner.sql.snapshot).await?;
                client.query_opt(&stmt, &[&ty.kind(), &id]).await
            })
            .await?
            .map_err(err)?;
        conn.clean = true;
        let Some(row) = row else {
            return Err(ty.not_found(id));
        };
        let version = row_version(ty, id, &row)?;
        let text: &str = row.try_get(1).map_err(err)?;
        ty.decode_snapshot(id, text.as_bytes(), version)
    }

    async fn delete(&self, ty: &'static ContextType, id: Uuid) -> Result<()> {
        let _gate = self.pass_gate(ty, id, Wait::Forever).await?;
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let (stmt, notify) = self
            .bounded(
                ty,
                Some(id),
                "prepare",
                in_order(
                    client.prepare_cached(&self.inner.sql.delete),
                    client.prepare_cached(&self.inner.sql.notify),
                ),
            )
            .await?;
        let (stmt, notify) = (stmt.map_err(err)?, notify.map_err(err)?);
        // The DELETE waits for a holder's row lock (statement timeout off);
        // then the notify statement (see `watch.rs`).
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 2] = [&kind, &id];
        let (began, (deleted, (notified, committed))) = in_order(
            client.batch_execute("BEGIN; SET LOCAL statement_timeout = 0"),
            in_order(
                client.execute(&stmt, &params),
                in_order(
                    client.execute(&notify, &params),
                    client.batch_execute("COMMIT"),
                ),
            ),
        )
        .await;
        let deleted = deleted.and_then(|n| notified.map(|_| n));
        conn.clean = committed.is_ok();
        match (began, deleted, committed) {
            (Ok(()), Ok(0), Ok(())) => Err(ty.not_found(id)),
            (Ok(()), Ok(_), Ok(())) => Ok(()),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => Err(err(e)),
        }
    }

    /// One conditional write in one round trip: `BEGIN`, the write `query`
    /// (which returns the new version's row if it applied), the notify
    /// statement (see `watch.rs`), then the committed version read `FOR
    /// SHARE` (which waits for a guard's row lock, so a refusal reports the
    /// version the holder left), `COMMIT`, all pipelined. Returns (the write's row, the version row).
    async fn conditional(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        query: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Option<tokio_postgres::Row>, Option<tokio_postgres::Row>)> {
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let (write, (notify, version)) = self
            .bounded(
                ty,
                Some(id),
                "prepare",
                in_order(
                    client.prepare_cached(query),
                    in_order(
                        client.prepare_cached(&self.inner.sql.notify),
                        client.prepare_cached(&self.inner.sql.version_share),
                    ),
                ),
            )
            .await?;
        let (write, notify, version) = (
            write.map_err(err)?,
            notify.map_err(err)?,
            version.map_err(err)?,
        );
        let kind = ty.kind();
        let key: [&(dyn ToSql + Sync); 2] = [&kind, &id];
        // The write waits for a holder's row lock (statement timeout off)
        // and re-checks the version once it has it (READ COMMITTED).
        let (began, (written, (notified, (found, committed)))) = in_order(
            client.batch_execute("BEGIN; SET LOCAL statement_timeout = 0"),
            in_order(
                client.query_opt(&write, params),
                in_order(
                    client.execute(&notify, &key),
                    in_order(
                        client.query_opt(&version, &key),
                        client.batch_execute("COMMIT"),
                    ),
                ),
            ),
        )
        .await;
        let written = written.and_then(|row| notified.map(|_| row));
        conn.clean = committed.is_ok();
        match (began, written, found, committed) {
            (Ok(()), Ok(written), Ok(found), Ok(())) => Ok((written, found)),
            (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => Err(err(e)),
        }
    }

    async fn store_if(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> Result<u64> {
        let bytes = ty.encode(Some(id), &*value)?;
        let json = json_text(ty, id, &bytes)?;
        let sql = &self.inner.sql;
        let kind = ty.kind();
        // A version beyond i64 matches no row: the refusal reports the
        // committed one.
        let expected_i64 = i64::try_from(expected).unwrap_or(-1);
        let _gate = self.pass_gate(ty, id, Wait::Forever).await?;
        loop {
            let (written, found) = if expected == 0 {
                let params: [&(dyn ToSql + Sync); 3] = [&kind, &id, &json];
                self.conditional(ty, id, &sql.create_once, &params).await?
            } else {
                let params: [&(dyn ToSql + Sync); 4] = [&kind, &id, &json, &expected_i64];
                self.conditional(ty, id, &sql.commit, &params).await?
            };
            if let Some(row) = written {
                return row_version(ty, id, &row);
            }
            match found {
                Some(row) => {
                    let found = row_version(ty, id, &row)?;
                    // Recreated between the two statements at the expected
                    // version cannot happen (versions come from a sequence),
                    // but going again is the safe answer.
                    if found != expected {
                        return Err(ty.conflict(id, expected, found));
                    }
                }
                None if expected != 0 => return Err(ty.not_found(id)),
                // Create-once lost to a row that was deleted again before
                // the version read: nothing was written; go again.
                None => {}
            }
        }
    }

    async fn delete_if(&self, ty: &'static ContextType, id: Uuid, expected: u64) -> Result<()> {
        let kind = ty.kind();
        let expected_i64 = i64::try_from(expected).unwrap_or(-1);
        let _gate = self.pass_gate(ty, id, Wait::Forever).await?;
        loop {
            let params: [&(dyn ToSql + Sync); 3] = [&kind, &id, &expected_i64];
            let (deleted, found) = self
                .conditional(ty, id, &self.inner.sql.delete_if, &params)
                .await?;
            if deleted.is_some() {
                return Ok(());
            }
            match found {
                None => return Err(ty.not_found(id)),
                Some(row) => {
                    let found = row_version(ty, id, &row)?;
                    if found != expected {
                        return Err(ty.conflict(id, expected, found));
                    }
                }
            }
        }
    }

    async fn contains(&self, ty: &'static ContextType, id: Uuid) -> Result<bool> {
        let mut conn = self.read_conn(ty, Some(id)).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let row = self
            .bounded(ty, Some(id), "contains", async {
                let stmt = client.prepare_cached(&self.inner.sql.contains).await?;
                client.query_one(&stmt, &[&ty.kind(), &id]).await
            })
            .await?
            .map_err(err)?;
        conn.clean = true;
        row.try_get(0).map_err(err)
    }

    async fn ids(&self, ty: &'static ContextType) -> Result<Vec<Uuid>> {
        let mut conn = self.read_conn(ty, None).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(None, pg(e));
        let rows = self
            .bounded(ty, None, "ids", async {
                let stmt = client.prepare_cached(&self.inner.sql.ids).await?;
                client.query(&stmt, &[&ty.kind()]).await
            })
            .await?
            .map_err(err)?;
        conn.clean = true;
        rows.iter().map(|r| r.try_get(0).map_err(err)).collect()
    }
}

impl ContextStorage for PostgresContextStorage {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.store(ty, id, value))
    }

    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        Box::pin(self.lock(ty, id, wait))
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        Box::pin(self.snapshot(ty, id))
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.delete(ty, id))
    }

    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.store_if(ty, id, expected, value))
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.delete_if(ty, id, expected))
    }

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.contains(ty, id))
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        Box::pin(self.ids(ty))
    }

    fn watch_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawWatchStart>> {
        Box::pin(self.watch(ty, id))
    }

    fn backend_name(&self) -> &'static str {
        "postgres"
    }
}
