//! The PostgreSQL backend (cargo feature `postgres`): durable contexts, one
//! row per context, exclusive access through row locks.
//!
//! # Protocol
//!
//! * **Table** `(kind text, id uuid, version bigint, value jsonb,
//!   updated_at timestamptz, primary key (kind, id))`, plus a sequence
//!   `<table>_version_seq` that every version is drawn from.
//! * **Guard** (`get_context`): a pooled connection runs `BEGIN` and
//!   `SELECT version, value::text … FOR UPDATE` (pipelined: one round trip)
//!   and keeps the transaction open for as long as the guard lives.
//! * **Commit**: `UPDATE … SET value, version = nextval(seq) … WHERE version
//!   = <read version> RETURNING version` + `COMMIT` (pipelined: one round
//!   trip). **Drop / rollback**: `ROLLBACK`, spawned so that dropping never
//!   blocks; the connection goes back to the pool only once the rollback
//!   succeeded, and is closed otherwise.
//! * `try_get_context` uses `FOR UPDATE NOWAIT` (`WouldBlock`);
//!   `get_context_timeout` uses `SET LOCAL lock_timeout` (`Timeout`).
//! * **Snapshots** are a plain autocommit `SELECT`: MVCC never makes a reader
//!   wait for a row lock.
//! * A process that dies while holding a guard closes its socket; Postgres
//!   aborts its transaction and the row lock passes to the next waiter.
//!
//! # Versions
//!
//! Versions are drawn from the table's sequence, and always *after* the
//! drawing transaction holds the row lock (a store that creates the row
//! inserts it first, then draws with an `UPDATE` of its own, still
//! uncommitted row). Every version an earlier incarnation of the key ever
//! had was drawn by a transaction that committed before that lock was
//! granted, so versions strictly increase per key, also across delete and
//! re-create, without keeping tombstones. The sequence must keep the
//! default `CACHE 1` (a per-session cache would break the ordering).
//!
//! # Cancellation
//!
//! A connection that is dropped with a transaction open or a request in
//! flight (a cancelled `get_context`, a guard dropped outside any runtime)
//! is never returned to the pool: its running statement is cancelled and
//! the connection closed, which makes Postgres release whatever it held.

use std::any::Any;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::context::ContextType;
use crate::error::{boxed, message, BoxError, ContextError};
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, Lease, RawGuard, RawSnapshot, Wait};
use crate::Result;

const DEFAULT_TABLE: &str = "ctxstore_contexts";
const DEFAULT_POOL_SIZE: usize = 16;
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest table name: leaves room for the `_version_seq` suffix within
/// Postgres' 63-byte identifiers.
const MAX_TABLE_LEN: usize = 50;
/// Recorded as the table's comment; bumped by future schema migrations.
const SCHEMA_VERSION: u32 = 1;

/// Contexts stored in PostgreSQL, locked with row locks.
///
/// Cheap to clone (an `Arc`); every clone shares one connection pool. A
/// held [`ContextGuard`](crate::ContextGuard) owns one pooled connection
/// (with its transaction open) until it is committed or dropped, so the
/// pool size bounds how many guards one store can hold at once; a task that
/// holds `pool_size` guards and asks for another waits for itself.
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
    pool: Pool,
    table: String,
    sql: Sql,
    // Where releases are spawned when the dropping thread is not inside a
    // runtime (a guard dropped on a plain thread).
    handle: tokio::runtime::Handle,
}

/// Every statement, built once for the configured table.
struct Sql {
    lock: String,
    lock_nowait: String,
    commit: String,
    insert: String,
    update: String,
    snapshot: String,
    delete: String,
    contains: String,
    ids: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        let seq = format!("{t}_version_seq");
        Sql {
            lock: format!("SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2 FOR UPDATE"),
            lock_nowait: format!(
                "SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2 FOR UPDATE NOWAIT"
            ),
            commit: format!(
                "UPDATE {t} SET value = $3::text::jsonb, version = nextval('{seq}'), updated_at = now() \
                 WHERE kind = $1 AND id = $2 AND version = $4 RETURNING version"
            ),
            insert: format!(
                "INSERT INTO {t} (kind, id, version, value, updated_at) \
                 VALUES ($1, $2, 0, $3::text::jsonb, now()) ON CONFLICT (kind, id) DO NOTHING"
            ),
            update: format!(
                "UPDATE {t} SET value = $3::text::jsonb, version = nextval('{seq}'), updated_at = now() \
                 WHERE kind = $1 AND id = $2 RETURNING version"
            ),
            snapshot: format!("SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2"),
            delete: format!("DELETE FROM {t} WHERE kind = $1 AND id = $2"),
            contains: format!("SELECT EXISTS (SELECT 1 FROM {t} WHERE kind = $1 AND id = $2)"),
            ids: format!("SELECT id FROM {t} WHERE kind = $1"),
        }
    }
}

/// Options for [`PostgresContextStorage`]; start with
/// [`PostgresContextStorage::builder`].
#[derive(Debug, Clone)]
#[must_use = "call connect() to open the store"]
pub struct PostgresContextStorageBuilder {
    url: String,
    table: String,
    pool_size: usize,
    statement_timeout: Duration,
    create_schema: bool,
}

impl PostgresContextStorageBuilder {
    /// The table contexts live in (default `ctxstore_contexts`): lowercase
    /// ASCII letters, digits and `_`, starting with a letter or `_`, at most
    /// 50 bytes. Its sequence is `<table>_version_seq`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections the pool opens (default 16). Each held guard
    /// keeps one.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The server-side `statement_timeout` for every statement that does
    /// not wait for a lock holder (default 30 s; `Duration::ZERO` disables
    /// it). Lock waits are bounded only by the [`Wait`] the caller asked
    /// for: `get_context`, `store_context` and `delete_context` wait as
    /// long as the holder holds, like the in-memory engine.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether `connect` creates the table and sequence when missing
    /// (default `true`). With `false`, `connect` only checks that they exist.
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// Opens the pool, checks the connection and creates (or checks) the
    /// schema. Must be called inside a tokio runtime.
    pub async fn connect(self) -> Result<PostgresContextStorage> {
        validate_table(&self.table)?;
        let mut config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|e| setup_error(format!("invalid Postgres URL: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name(format!("ctxstore:{}", self.table));
        }
        // Whole milliseconds, rounded up: 0 would mean "no timeout".
        let timeout_ms = self
            .statement_timeout
            .as_micros()
            .div_ceil(1000)
            .min(i32::MAX as u128);
        config.options(format!("-c statement_timeout={timeout_ms}"));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .build()
            .map_err(|e| setup_error(format!("cannot build the connection pool: {e}")))?;
        let client = pool
            .get()
            .await
            .map_err(|e| setup_error(format!("cannot connect to Postgres: {}", pool_error(e))))?;
        ensure_schema(&client, &self.table, self.create_schema).await?;
        drop(client);
        Ok(PostgresContextStorage {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&self.table),
                table: self.table,
                handle: tokio::runtime::Handle::current(),
            }),
        })
    }
}

fn setup_error(msg: impl Into<String>) -> ContextError {
    ContextError::Backend {
        kind: "postgres",
        type_name: "PostgresContextStorage",
        id: None,
        source: message(msg),
    }
}

fn validate_table(table: &str) -> Result<()> {
    let mut chars = table.chars();
    let first_ok = matches!(chars.next(), Some('a'..='z' | '_'));
    let rest_ok = chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if first_ok && rest_ok && table.len() <= MAX_TABLE_LEN {
        Ok(())
    } else {
        Err(setup_error(format!(
            "invalid table name {table:?}: use 1 to {MAX_TABLE_LEN} lowercase ASCII letters, \
             digits or '_', not starting with a digit"
        )))
    }
}

/// Creates the table and its sequence if missing, under an advisory lock so
/// that processes connecting at once do not race; checks an existing table's
/// columns. See `docs/postgres.md` for the migration path.
async fn ensure_schema(client: &Object, table: &str, create: bool) -> Result<()> {
    let seq = format!("{table}_version_seq");
    if !create {
        check_columns(client, table).await?;
        let has_seq = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&seq])
            .await
            .map_err(|e| schema_error(table, "inspect sequence", e))?;
        if !has_seq.get::<_, bool>(0) {
            return Err(setup_error(format!(
                "sequence {seq} is missing; connect once with create_schema(true)"
            )));
        }
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "BEGIN; \
             SELECT pg_advisory_xact_lock(hashtext('ctxstore schema {table}')); \
             CREATE TABLE IF NOT EXISTS {table} ( \
                 kind text NOT NULL, \
                 id uuid NOT NULL, \
                 version bigint NOT NULL, \
                 value jsonb NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT now(), \
                 PRIMARY KEY (kind, id));"
        ))
        .await
        .map_err(|e| schema_error(table, "create table", e))?;
    let migrated = async {
        check_columns(client, table).await?;
        // A table from before the sequence existed (or made by hand): start
        // the new sequence above every stored version. Only when the
        // sequence is new, so that a running writer's sequence never moves
        // back.
        let missing = client
            .query_one("SELECT to_regclass($1) IS NULL", &[&seq])
            .await
            .map_err(|e| schema_error(table, "inspect sequence", e))?;
        if missing.get::<_, bool>(0) {
            client
                .batch_execute(&format!(
                    "CREATE SEQUENCE {seq} AS bigint MINVALUE 1 CACHE 1; \
                     SELECT setval('{seq}', GREATEST(1, (SELECT max(version) FROM {table})));"
                ))
                .await
                .map_err(|e| schema_error(table, "create sequence", e))?;
        }
        client
            .batch_execute(&format!(
                "COMMENT ON TABLE {table} IS 'ctxstore contexts, schema {SCHEMA_VERSION}'; COMMIT"
            ))
            .await
            .map_err(|e| schema_error(table, "commit", e))
    }
    .await;
    if migrated.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    migrated
}

fn schema_error(table: &str, what: &str, e: tokio_postgres::Error) -> ContextError {
    setup_error(format!(
        "cannot prepare table {table} ({what}): {}",
        PgError(e)
    ))
}

/// Checks that `table` exists with the columns this backend uses.
async fn check_columns(client: &Object, table: &str) -> Result<()> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
             AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(|e| schema_error(table, "inspect columns", e))?;
    let columns: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (name, ty) in [
        ("kind", "text"),
        ("id", "uuid"),
        ("version", "bigint"),
        ("value", "jsonb"),
        ("updated_at", "timestamp with time zone"),
    ] {
        if !columns.iter().any(|(n, t)| n == name && t == ty) {
            return Err(setup_error(format!(
                "table {table} is missing column `{name} {ty}` (found {columns:?}); \
                 see docs/postgres.md for the schema and its migrations"
            )));
        }
    }
    Ok(())
}

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
    /// Connects with the default options (table `ctxstore_contexts`, 16
    /// connections, 30 s statement timeout), creating the schema if missing.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// A builder for the table name, pool size and statement timeout.
    pub fn builder(url: impl Into<String>) -> PostgresContextStorageBuilder {
        PostgresContextStorageBuilder {
            url: url.into(),
            table: DEFAULT_TABLE.to_owned(),
            pool_size: DEFAULT_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            create_schema: true,
        }
    }

    /// The table this store uses.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// A pooled connection; bounded by the deadline of `wait`, if any.
    async fn conn(&self, ty: &'static ContextType, id: Option<Uuid>, wait: Wait) -> Result<Conn> {
        let got = match wait {
            Wait::Until(deadline, asked) => {
                match tokio::time::timeout_at(deadline.into(), self.inner.pool.get()).await {
                    Ok(got) => got,
                    Err(_) => {
                        return Err(match id {
                            Some(id) => ty.timeout(id, asked),
                            None => ty.backend_error(None, message("connection pool timed out")),
                        })
                    }
                }
            }
            Wait::Forever | Wait::Never => self.inner.pool.get().await,
        };
        match got {
            Ok(obj) => Ok(Conn {
                obj: Some(obj),
                clean: false,
                handle: self.inner.handle.clone(),
            }),
            Err(e) => Err(ty.backend_error(id, message(pool_error(e)))),
        }
    }

    async fn lock(&self, ty: &'static ContextType, id: Uuid, wait: Wait) -> Result<RawGuard> {
        let sql = &self.inner.sql;
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
        let stmt = client
            .prepare_cached(query)
            .await
            .map_err(|e| ty.backend_error(Some(id), pg(e)))?;
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 2] = [&kind, &id];
        let (began, row) = in_order(
            client.batch_execute(&begin),
            client.query_opt(&stmt, &params),
        )
        .await;
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
            lease: Box::new(PgLease {
                store: self.inner.clone(),
                ty,
                id,
                version,
                conn,
            }),
        })
    }

    async fn store(&self, ty: &'static ContextType, id: Uuid, value: ErasedValue) -> Result<u64> {
        let bytes = ty.encode(Some(id), &*value)?;
        let json = json_text(ty, id, &bytes)?;
        let sql = &self.inner.sql;
        let kind = ty.kind();
        loop {
            let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
            let client = conn.client();
            let err = |e| ty.backend_error(Some(id), pg(e));
            let insert = client.prepare_cached(&sql.insert).await.map_err(err)?;
            let update = client.prepare_cached(&sql.update).await.map_err(err)?;
            // One round trip. The INSERT creates the row if missing (with a
            // placeholder version nobody else can see) and does not wait for
            // a holder; the UPDATE then takes the row lock, waiting for a
            // holder, and only then draws the version.
            let params: [&(dyn ToSql + Sync); 3] = [&kind, &id, &json];
            let (began, (inserted, (updated, committed))) = in_order(
                client.batch_execute("BEGIN; SET LOCAL statement_timeout = 0"),
                in_order(
                    client.execute(&insert, &params),
                    in_order(
                        client.query_opt(&update, &params),
                        client.batch_execute("COMMIT"),
                    ),
                ),
            )
            .await;
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
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let stmt = client
            .prepare_cached(&self.inner.sql.snapshot)
            .await
            .map_err(err)?;
        let row = client
            .query_opt(&stmt, &[&ty.kind(), &id])
            .await
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
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let stmt = client
            .prepare_cached(&self.inner.sql.delete)
            .await
            .map_err(err)?;
        // The DELETE waits for a holder's row lock (statement timeout off).
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 2] = [&kind, &id];
        let (began, (deleted, committed)) = in_order(
            client.batch_execute("BEGIN; SET LOCAL statement_timeout = 0"),
            in_order(
                client.execute(&stmt, &params),
                client.batch_execute("COMMIT"),
            ),
        )
        .await;
        conn.clean = committed.is_ok();
        match (began, deleted, committed) {
            (Ok(()), Ok(0), Ok(())) => Err(ty.not_found(id)),
            (Ok(()), Ok(_), Ok(())) => Ok(()),
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => Err(err(e)),
        }
    }

    async fn contains(&self, ty: &'static ContextType, id: Uuid) -> Result<bool> {
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let stmt = client
            .prepare_cached(&self.inner.sql.contains)
            .await
            .map_err(err)?;
        let row = client
            .query_one(&stmt, &[&ty.kind(), &id])
            .await
            .map_err(err)?;
        conn.clean = true;
        row.try_get(0).map_err(err)
    }

    async fn ids(&self, ty: &'static ContextType) -> Result<Vec<Uuid>> {
        let mut conn = self.conn(ty, None, Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(None, pg(e));
        let stmt = client
            .prepare_cached(&self.inner.sql.ids)
            .await
            .map_err(err)?;
        let rows = client.query(&stmt, &[&ty.kind()]).await.map_err(err)?;
        conn.clean = true;
        rows.iter().map(|r| r.try_get(0).map_err(err)).collect()
    }
}

/// Runs two futures concurrently, always polling `a` before `b`.
///
/// This is how requests are pipelined: `tokio_postgres` queues a request
/// on its connection when the request's future is first polled, so the
/// first poll's order is the order the statements reach the server, all in
/// one write. (`tokio::join!` rotates its polling order; nest `in_order`
/// for more than two.)
async fn in_order<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let (mut out_a, mut out_b) = (None, None);
    poll_fn(|cx| {
        if out_a.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                out_a = Some(v);
            }
        }
        if out_b.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                out_b = Some(v);
            }
        }
        match (out_a.take(), out_b.take()) {
            (Some(a), Some(b)) => Poll::Ready((a, b)),
            (a, b) => {
                (out_a, out_b) = (a, b);
                Poll::Pending
            }
        }
    })
    .await
}

fn row_version(ty: &'static ContextType, id: Uuid, row: &tokio_postgres::Row) -> Result<u64> {
    let v: i64 = row
        .try_get(0)
        .map_err(|e| ty.backend_error(Some(id), pg(e)))?;
    u64::try_from(v)
        .map_err(|_| ty.backend_error(Some(id), message(format!("stored version {v} is negative"))))
}

/// A driver error whose message includes the server's (`tokio_postgres`
/// displays a server error as just "db error").
#[derive(Debug)]
struct PgError(tokio_postgres::Error);

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::error::Error as _;
        match (self.0.as_db_error(), self.0.source()) {
            (Some(db), _) => write!(
                f,
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            ),
            (None, Some(source)) => write!(f, "{}: {source}", self.0),
            (None, None) => write!(f, "{}", self.0),
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn pg(e: tokio_postgres::Error) -> BoxError {
    boxed(PgError(e))
}

fn pool_error(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => {
            format!("cannot open a connection: {}", PgError(e))
        }
        e => format!("connection pool: {e}"),
    }
}

/// `encode` produces JSON, which is UTF-8; sent as text and cast to jsonb
/// by the server (the same parse a binary jsonb parameter gets).
fn json_text<'a>(ty: &'static ContextType, id: Uuid, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| ty.codec_error(Some(id), boxed(e) as BoxError))
}

/// A pooled connection that goes back to the pool only when `clean` (no
/// transaction open, no request in flight); otherwise it is taken out of
/// the pool, its running statement cancelled and the connection closed, so
/// that Postgres releases whatever its session held.
struct Conn {
    obj: Option<Object>,
    clean: bool,
    handle: tokio::runtime::Handle,
}

impl Conn {
    fn client(&self) -> &Object {
        // Invariant: `obj` is `Some` until drop.
        self.obj.as_ref().expect("connection present until drop")
    }

    /// Ends the open transaction; the connection is clean if that worked.
    async fn rollback(&mut self) {
        self.clean = self.client().batch_execute("ROLLBACK").await.is_ok();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.clean {
            return; // `obj` drops: back to the pool.
        }
        if let Some(obj) = self.obj.take() {
            let token = obj.cancel_token();
            let client = Object::take(obj);
            spawn(&self.handle, async move {
                let _ = token.cancel_query(NoTls).await;
                drop(client);
            });
        }
    }
}

/// Spawns on the current runtime, or on the store's when the caller is a
/// plain thread. If that runtime is gone the future is dropped, which for
/// every future spawned here is still safe (see [`Conn`]).
fn spawn(
    fallback: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = ()> + Send + 'static,
) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => drop(handle.spawn(fut)),
        Err(_) => drop(fallback.spawn(fut)),
    }
}

/// A held row lock: the connection with its transaction open.
struct PgLease {
    store: Arc<Inner>,
    ty: &'static ContextType,
    id: Uuid,
    version: u64,
    conn: Conn,
}

impl PgLease {
    async fn commit_bytes(mut self, bytes: Result<Vec<u8>>) -> Result<u64> {
        let (ty, id) = (self.ty, self.id);
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) => {
                self.conn.rollback().await;
                return Err(e);
            }
        };
        let json = match json_text(ty, id, &bytes) {
            Ok(json) => json,
            Err(e) => {
                self.conn.rollback().await;
                return Err(e);
            }
        };
        let client = self.conn.client();
        if client.is_closed() {
            // The session ended (server restart, terminated backend): its
            // transaction, and our lock with it, is gone.
            return Err(ty.lease_lost(id));
        }
        let err = |e| ty.backend_error(Some(id), pg(e));
        let stmt = client
            .prepare_cached(&self.store.sql.commit)
            .await
            .map_err(err)?;
        let version = self.version as i64;
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 4] = [&kind, &id, &json, &version];
        let (updated, committed) = in_order(
            client.query_opt(&stmt, &params),
            client.batch_execute("COMMIT"),
        )
        .await;
        // COMMIT answered: the transaction is over (committed, or rolled
        // back if the UPDATE failed), so the connection is reusable.
        self.conn.clean = committed.is_ok();
        match (updated, committed) {
            (Ok(Some(row)), Ok(())) => row_version(ty, id, &row),
            // Under the row lock the version cannot have moved; if it did,
            // the lock was not ours and nothing was written.
            (Ok(None), Ok(())) => Err(ty.lease_lost(id)),
            (Err(e), _) | (_, Err(e)) => Err(err(e)),
        }
    }
}

impl Lease for PgLease {
    fn commit(self: Box<Self>, value: &(dyn Any + Send + Sync)) -> BoxFuture<'static, Result<u64>> {
        let bytes = self.ty.encode(Some(self.id), value);
        Box::pin((*self).commit_bytes(bytes))
    }

    fn release(self: Box<Self>) {
        let PgLease { mut conn, .. } = *self;
        let handle = conn.handle.clone();
        // If the spawned task never runs, `conn` drops unclean: closed.
        spawn(&handle, async move { conn.rollback().await });
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

    fn contains_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.contains(ty, id))
    }

    fn ids_raw(&self, ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        Box::pin(self.ids(ty))
    }

    fn backend_name(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked() {
        for ok in ["ctx", "_t", "ctx_test_123", &"a".repeat(MAX_TABLE_LEN)] {
            assert!(validate_table(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Ctx",
            "ctx;drop table x",
            "ctx-x",
            "schema.t",
            &"a".repeat(MAX_TABLE_LEN + 1),
        ] {
            let e = validate_table(bad).unwrap_err();
            assert!(
                e.is_backend() && e.to_string().contains("invalid table name"),
                "{bad}: {e}"
            );
        }
    }
}
