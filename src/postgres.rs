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
//!   wait for a row lock. They (and `contains`, ids) take a free connection
//!   of the main pool if there is one, else one of a small separate read
//!   pool, so they never wait for guards to give a connection back.
//! * **Local gate**: guards, stores and deletes first pass a per-process
//!   per-key FIFO gate, so tasks of one process waiting for the same key
//!   queue in memory, not in `SELECT … FOR UPDATE` on pooled connections
//!   (which could exhaust, and deadlock, the pool). `try_get_context` and
//!   `get_context_timeout` bound the gate and the pool wait too.
//! * **Timeouts**: connect (TCP, startup, auth), pool wait, and a
//!   client-side response timeout on every round trip that does not wait
//!   for a lock holder (commit included: the lock's transaction turns the
//!   statement timeout off to wait, and the commit turns it back on).
//!   Identifiers are quoted (a table may be named `user`), and URL
//!   `options` are kept (the statement timeout is appended to them).
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
use std::collections::HashMap;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
    Timeouts,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::context::ContextType;
use crate::error::{boxed, message, BoxError, ContextError, ContextKey};
use crate::storage::{BoxFuture, ContextStorage, ErasedValue, Lease, RawGuard, RawSnapshot, Wait};
use crate::Result;

const DEFAULT_TABLE: &str = "ctxstore_contexts";
const DEFAULT_POOL_SIZE: usize = 16;
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_READ_POOL_SIZE: usize = 2;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to the statement timeout for the default client-side response
/// timeout: the server gives up first and says so; this only catches a
/// network that stopped answering.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);
/// TCP keepalive defaults (unless the URL sets them), so that a peer that
/// vanished is noticed within about a minute even during a lock wait.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
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
/// holds `pool_size` guards and asks for another waits for itself, until
/// the pool wait timeout (default 30 s) fails it with a `Backend` error.
/// Tasks waiting for a key held in this process queue on a per-key gate
/// and hold no connection; snapshots use a free connection or a small
/// separate read pool, so they never wait for guards.
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
    gates: Arc<Gates>,
    timeouts: ClientTimeouts,
}

/// Client-side bounds (the server-side one is `statement_timeout`).
#[derive(Debug, Clone, Copy)]
struct ClientTimeouts {
    /// Opening a connection: TCP connect, startup and authentication.
    connect: Duration,
    /// Waiting for a free pooled connection (`Wait::Forever` operations).
    pool_wait: Option<Duration>,
    /// One round trip that does not wait for a lock holder.
    response: Option<Duration>,
    /// The statement timeout in whole ms (0: none), restored for commits.
    statement_ms: u128,
}

impl ClientTimeouts {
    fn pool(&self, wait: Option<Duration>) -> Timeouts {
        Timeouts {
            wait,
            create: Some(self.connect),
            recycle: Some(self.connect),
        }
    }
}

/// A key of the gate: (kind, id).
type GateKey = (&'static str, Uuid);

/// One key's FIFO queue (tokio's mutex is fair) and its live tickets.
type GateEntry = (Arc<tokio::sync::Mutex<()>>, usize);

/// The per-key FIFO gates of one store.
#[derive(Default)]
struct Gates {
    // Invariant: an entry exists while at least one `GateTicket` for it
    // lives; the count is the number of live tickets.
    keys: Mutex<HashMap<GateKey, GateEntry>>,
}

/// A registration in a key's gate (held while queued and while passed).
struct GateTicket {
    gates: Arc<Gates>,
    key: GateKey,
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        let mut keys = self.gates.keys.lock().unwrap_or_else(|p| p.into_inner());
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
struct Gate {
    // Field order matters: the lock is released before the ticket goes.
    _pass: tokio::sync::OwnedMutexGuard<()>,
    _ticket: GateTicket,
}

impl Gates {
    async fn pass(
        self: &Arc<Self>,
        ty: &'static ContextType,
        id: Uuid,
        wait: Wait,
    ) -> Result<Gate> {
        let key = (ty.kind(), id);
        let gate = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let entry = keys
                .entry(key)
                .or_insert_with(|| (Arc::new(tokio::sync::Mutex::new(())), 0));
            entry.1 += 1;
            entry.0.clone()
        };
        let ticket = GateTicket {
            gates: self.clone(),
            key,
        };
        let pass = match wait {
            Wait::Never => gate.try_lock_owned().map_err(|_| ty.would_block(id))?,
            Wait::Forever => gate.lock_owned().await,
            // `timeout_at` polls the lock first: a free gate is passed
            // even when the deadline is already over.
            Wait::Until(deadline, asked) => {
                tokio::time::timeout_at(deadline.into(), gate.lock_owned())
                    .await
                    .map_err(|_| ty.timeout(id, asked))?
            }
        };
        Ok(Gate {
            _pass: pass,
            _ticket: ticket,
        })
    }
}

/// `ident` as a quoted SQL identifier (table names may be reserved words).
fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
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
    fn new(table: &str) -> Self {
        let t = quote(table);
        // A regclass literal: the quoted name inside a string literal.
        let seq = quote(&format!("{table}_version_seq"));
        let t = t.as_str();
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
    read_pool_size: usize,
    statement_timeout: Duration,
    create_schema: bool,
    connect_timeout: Duration,
    pool_wait_timeout: Option<Duration>,
    /// `None`: derived from the statement timeout.
    response_timeout: Option<Option<Duration>>,
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
    /// keeps one; tasks waiting for a key held in this process do not (they
    /// queue in the process, on a per-key FIFO gate).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The most connections of the separate read pool (default 2), used by
    /// snapshots, `contains_context` and `context_ids` only when the main
    /// pool has no connection free, so that reads never wait for guards to
    /// give a connection back. The store opens at most `pool_size +
    /// read_pool_size` connections.
    pub fn read_pool_size(mut self, size: usize) -> Self {
        self.read_pool_size = size.max(1);
        self
    }

    /// How long opening one connection may take, TCP connect, startup and
    /// authentication together (default 10 s); also applies to `connect`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an operation that may wait forever (`get_context`,
    /// `store_context`, `delete_context`, reads) waits for a free pooled
    /// connection before failing with a `Backend` error (default 30 s;
    /// `None` waits forever). Pooled connections are held by guards, so
    /// this bounds what a task holding `pool_size` guards that asks for one
    /// more waits for itself. `get_context_timeout` waits at most its own
    /// timeout and `try_get_context` not at all (`WouldBlock`).
    pub fn pool_wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_wait_timeout = timeout;
        self
    }

    /// The client-side bound on one round trip that does not wait for a
    /// lock holder: commit, rollback, reads, `try_get_context` (default:
    /// the statement timeout plus 5 s, none if the statement timeout is
    /// disabled; `None` waits forever). The server ends slow statements
    /// first and says so; this catches a network that stopped answering.
    /// A commit cut off by it fails with `Backend` and may still have
    /// been applied (see *Faults*).
    pub fn response_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.response_timeout = Some(timeout);
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
        // Appended: `options` replaces, and the URL's own (a search_path,
        // say) must stay in force. A later `-c` wins over an earlier one.
        let ours = format!("-c statement_timeout={timeout_ms}");
        let options = match config.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
            _ => ours,
        };
        config.options(options);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        if config.get_keepalives()
            && config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60)
        {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(KEEPALIVE_INTERVAL);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        let timeouts = ClientTimeouts {
            connect: self.connect_timeout,
            pool_wait: self.pool_wait_timeout,
            response: self.response_timeout.unwrap_or_else(|| {
                (!self.statement_timeout.is_zero())
                    .then(|| self.statement_timeout.saturating_add(RESPONSE_MARGIN))
            }),
            statement_ms: timeout_ms,
        };
        let build = |size: usize| {
            let manager = Manager::from_config(
                config.clone(),
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(timeouts.pool_wait)
                .create_timeout(Some(timeouts.connect))
                .recycle_timeout(Some(timeouts.connect))
                .build()
                .map_err(|e| setup_error(format!("cannot build the connection pool: {e}")))
        };
        let pool = build(self.pool_size)?;
        let read_pool = build(self.read_pool_size)?;
        let client = pool
            .get()
            .await
            .map_err(|e| setup_error(format!("cannot connect to Postgres: {}", pool_error(e))))?;
        let schema = ensure_schema(&client, &self.table, self.create_schema);
        match timeouts.response {
            None => schema.await?,
            Some(limit) => match tokio::time::timeout(limit, schema).await {
                Ok(done) => done?,
                Err(_) => {
                    // Possibly inside the schema transaction: close it.
                    drop(Object::take(client));
                    return Err(setup_error(format!(
                        "cannot prepare table {}: no reply from Postgres within {limit:?}",
                        self.table
                    )));
                }
            },
        }
        drop(client);
        Ok(PostgresContextStorage {
            inner: Arc::new(Inner {
                pool,
                read_pool,
                sql: Sql::new(&self.table),
                table: self.table,
                handle: tokio::runtime::Handle::current(),
                gates: Arc::default(),
                timeouts,
            }),
        })
    }
}

fn setup_error(msg: impl Into<String>) -> ContextError {
    ContextError::Backend {
        key: ContextKey::of_backend("postgres", "PostgresContextStorage"),
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

/// What exists of the schema: (table, sequence, table comment).
async fn inspect_schema(client: &Object, table: &str) -> Result<(bool, bool, Option<String>)> {
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, \
             obj_description(to_regclass($1), 'pg_class')",
            &[&quote(table), &quote(&format!("{table}_version_seq"))],
        )
        .await
        .map_err(|e| schema_error(table, "inspect schema", e))?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

fn schema_comment() -> String {
    format!("ctxstore contexts, schema {SCHEMA_VERSION}")
}

/// Creates the table and its sequence if missing, under an advisory lock so
/// that processes connecting at once do not race; checks an existing table's
/// columns. Looks first and changes only what is missing, so a role that
/// may only read and write rows connects fine to a table made by its owner
/// (DDL and `COMMENT ON` need privileges it lacks). See `docs/postgres.md`
/// for the migration path.
async fn ensure_schema(client: &Object, table: &str, create: bool) -> Result<()> {
    let seq = format!("{table}_version_seq");
    let (has_table, has_seq, comment) = inspect_schema(client, table).await?;
    if has_table {
        check_columns(client, table).await?;
    }
    if has_table && has_seq {
        if create && comment.as_deref() != Some(schema_comment().as_str()) {
            // Only a marker for future migrations: set it if we may.
            let sql = format!(
                "COMMENT ON TABLE {} IS '{}'",
                quote(table),
                schema_comment()
            );
            if let Err(e) = client.batch_execute(&sql).await {
                tracing::debug!(table, error = %PgError(e), "cannot record the schema version comment");
            }
        }
        return Ok(());
    }
    if !create {
        if !has_table {
            check_columns(client, table).await?;
        }
        return Err(setup_error(format!(
            "sequence {seq} is missing; connect once with create_schema(true)"
        )));
    }
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('ctxstore schema {table}'));"
        ))
        .await
        .map_err(|e| schema_error(table, "lock schema", e))?;
    let migrated = async {
        // Something is missing, so this role needs DDL rights anyway. `IF
        // NOT EXISTS`: another process may have just made it (and the
        // statement, unlike a catalog lookup right after an advisory lock,
        // is sure to see that).
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} ( \
                         kind text NOT NULL, \
                         id uuid NOT NULL, \
                         version bigint NOT NULL, \
                         value jsonb NOT NULL, \
                         updated_at timestamptz NOT NULL DEFAULT now(), \
                         PRIMARY KEY (kind, id));",
                quote(table)
            ))
            .await
            .map_err(|e| schema_error(table, "create table", e))?;
        check_columns(client, table).await?;
        let (_, has_seq, _) = inspect_schema(client, table).await?;
        // A table from before the sequence existed (or made by hand): start
        // the new sequence above every stored version. Only when the
        // sequence is new, so that a running writer's sequence never moves
        // back.
        if !has_seq {
            client
                .batch_execute(&format!(
                    "CREATE SEQUENCE {qseq} AS bigint MINVALUE 1 CACHE 1; \
                     SELECT setval('{qseq}', GREATEST(1, (SELECT max(version) FROM {qt})));",
                    qseq = quote(&seq),
                    qt = quote(table),
                ))
                .await
                .map_err(|e| schema_error(table, "create sequence", e))?;
        }
        client
            .batch_execute(&format!(
                "COMMENT ON TABLE {} IS '{}'",
                quote(table),
                schema_comment()
            ))
            .await
            .map_err(|e| schema_error(table, "comment", e))?;
        client
            .batch_execute("COMMIT")
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
            &[&quote(table)],
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
            read_pool_size: DEFAULT_READ_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            create_schema: true,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_wait_timeout: Some(DEFAULT_POOL_WAIT_TIMEOUT),
            response_timeout: None,
        }
    }

    /// The table this store uses.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    fn wrap(&self, obj: Object) -> Conn {
        Conn {
            obj: Some(obj),
            clean: false,
            handle: self.inner.handle.clone(),
            response: self.inner.timeouts.response,
        }
    }

    /// A connection of the main pool. Waits as `wait` allows: not at all
    /// for `Never` (`WouldBlock`), until the deadline for `Until`
    /// (`Timeout`), and at most the pool wait timeout for `Forever`.
    async fn conn(&self, ty: &'static ContextType, id: Option<Uuid>, wait: Wait) -> Result<Conn> {
        let t = &self.inner.timeouts;
        let bound = match wait {
            Wait::Never => Some(Duration::ZERO),
            Wait::Until(deadline, _) => Some(deadline.saturating_duration_since(Instant::now())),
            Wait::Forever => t.pool_wait,
        };
        match self.inner.pool.timeout_get(&t.pool(bound)).await {
            Ok(obj) => Ok(self.wrap(obj)),
            Err(PoolError::Timeout(TimeoutType::Wait)) => Err(match (wait, id) {
                (Wait::Never, Some(id)) => ty.would_block(id),
                (Wait::Until(_, asked), Some(id)) => ty.timeout(id, asked),
                _ => self.pool_exhausted(ty, id, bound),
            }),
            Err(e) => Err(ty.backend_error(id, message(pool_error(e)))),
        }
    }

    fn pool_exhausted(
        &self,
        ty: &'static ContextType,
        id: Option<Uuid>,
        waited: Option<Duration>,
    ) -> ContextError {
        let status = self.inner.pool.status();
        ty.backend_error(
            id,
            message(format!(
                "no pooled connection became free within {waited:?} \
                 (pool_size {}, every connection in use: held guards keep theirs)",
                status.max_size
            )),
        )
    }

    /// A connection for a read: a free one of the main pool if there is
    /// one, else one of the read pool, so that reads never wait for guards
    /// to give a connection back.
    async fn read_conn(&self, ty: &'static ContextType, id: Option<Uuid>) -> Result<Conn> {
        let t = &self.inner.timeouts;
        match self
            .inner
            .pool
            .timeout_get(&t.pool(Some(Duration::ZERO)))
            .await
        {
            Ok(obj) => return Ok(self.wrap(obj)),
            Err(PoolError::Timeout(TimeoutType::Wait)) => {}
            Err(e) => return Err(ty.backend_error(id, message(pool_error(e)))),
        }
        match self.inner.read_pool.timeout_get(&t.pool(t.pool_wait)).await {
            Ok(obj) => Ok(self.wrap(obj)),
            Err(PoolError::Timeout(TimeoutType::Wait)) => Err(ty.backend_error(
                id,
                message(format!(
                    "no connection of the read pool became free within {:?}",
                    t.pool_wait
                )),
            )),
            Err(e) => Err(ty.backend_error(id, message(pool_error(e)))),
        }
    }

    /// `fut` bounded by the response timeout; on expiry a `Backend` error
    /// (the connection, left unclean, is then closed).
    async fn bounded<F: Future>(
        &self,
        ty: &'static ContextType,
        id: Option<Uuid>,
        what: &str,
        fut: F,
    ) -> Result<F::Output> {
        bounded(self.inner.timeouts.response, fut)
            .await
            .map_err(|limit| no_reply(ty, id, what, limit))
    }

    async fn lock(&self, ty: &'static ContextType, id: Uuid, wait: Wait) -> Result<RawGuard> {
        let sql = &self.inner.sql;
        // Queue in the process first: only one task per key and process
        // asks Postgres (and holds a connection) at a time.
        let gate = self.inner.gates.pass(ty, id, wait).await?;
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
            lease: Box::new(PgLease {
                store: self.inner.clone(),
                ty,
                id,
                version,
                conn,
                gate: Some(gate),
            }),
        })
    }

    async fn store(&self, ty: &'static ContextType, id: Uuid, value: ErasedValue) -> Result<u64> {
        let bytes = ty.encode(Some(id), &*value)?;
        let json = json_text(ty, id, &bytes)?;
        let sql = &self.inner.sql;
        let kind = ty.kind();
        let _gate = self.inner.gates.pass(ty, id, Wait::Forever).await?;
        loop {
            let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
            let client = conn.client();
            let err = |e| ty.backend_error(Some(id), pg(e));
            let (insert, update) = self
                .bounded(
                    ty,
                    Some(id),
                    "prepare",
                    in_order(
                        client.prepare_cached(&sql.insert),
                        client.prepare_cached(&sql.update),
                    ),
                )
                .await?;
            let (insert, update) = (insert.map_err(err)?, update.map_err(err)?);
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
        let _gate = self.inner.gates.pass(ty, id, Wait::Forever).await?;
        let mut conn = self.conn(ty, Some(id), Wait::Forever).await?;
        let client = conn.client();
        let err = |e| ty.backend_error(Some(id), pg(e));
        let stmt = self
            .bounded(
                ty,
                Some(id),
                "prepare",
                client.prepare_cached(&self.inner.sql.delete),
            )
            .await?
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

/// `fut`, or `Err(limit)` if it takes longer than `limit`.
async fn bounded<F: Future>(
    limit: Option<Duration>,
    fut: F,
) -> std::result::Result<F::Output, Duration> {
    match limit {
        None => Ok(fut.await),
        Some(limit) => tokio::time::timeout(limit, fut).await.map_err(|_| limit),
    }
}

fn no_reply(
    ty: &'static ContextType,
    id: Option<Uuid>,
    what: &str,
    limit: Duration,
) -> ContextError {
    ty.backend_error(
        id,
        message(format!(
            "no reply from Postgres within {limit:?} ({what}); the connection is closed"
        )),
    )
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
    /// The client-side bound on a round trip (the store's response timeout).
    response: Option<Duration>,
}

impl Conn {
    fn client(&self) -> &Object {
        // Invariant: `obj` is `Some` until drop.
        self.obj.as_ref().expect("connection present until drop")
    }

    /// Ends the open transaction; the connection is clean if that worked.
    async fn rollback(&mut self) {
        let rolled_back = bounded(self.response, self.client().batch_execute("ROLLBACK")).await;
        self.clean = matches!(rolled_back, Ok(Ok(())));
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

/// A held row lock: the connection with its transaction open, and the
/// key's local gate, passed on once the transaction is over.
struct PgLease {
    store: Arc<Inner>,
    ty: &'static ContextType,
    id: Uuid,
    version: u64,
    conn: Conn,
    gate: Option<Gate>,
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
        let response = self.store.timeouts.response;
        let stmt = bounded(response, client.prepare_cached(&self.store.sql.commit))
            .await
            .map_err(|limit| no_reply(ty, Some(id), "prepare commit", limit))?
            .map_err(err)?;
        let version = self.version as i64;
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 4] = [&kind, &id, &json, &version];
        // The lock's transaction turned the statement timeout off to wait
        // for the row; the commit runs under it again, and under the
        // client-side bound (a network that stopped answering).
        let restore = format!(
            "SET LOCAL statement_timeout = {}",
            self.store.timeouts.statement_ms
        );
        let (restored, (updated, committed)) = bounded(
            response,
            in_order(
                client.batch_execute(&restore),
                in_order(
                    client.query_opt(&stmt, &params),
                    client.batch_execute("COMMIT"),
                ),
            ),
        )
        .await
        .map_err(|limit| {
            ty.backend_error(
                Some(id),
                message(format!(
                    "no reply to COMMIT within {limit:?}: the commit may or may not have been \
                     applied (whole or not at all); the connection is closed"
                )),
            )
        })?;
        let updated = restored.and(updated);
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
        let (ty, id) = (self.ty, self.id);
        let bytes = ty.encode(Some(id), value);
        // On the store's runtime: the client-side timeout needs its timer,
        // and `commit_blocking` polls this from a plain thread.
        let handle = self.store.handle.clone();
        let task = handle.spawn((*self).commit_bytes(bytes));
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(ty.backend_error(Some(id), boxed(e))),
            }
        })
    }

    fn release(self: Box<Self>) {
        let PgLease { mut conn, gate, .. } = *self;
        let handle = conn.handle.clone();
        // If the spawned task never runs, `conn` drops unclean: closed.
        // The gate opens once the row lock is gone.
        spawn(&handle, async move {
            conn.rollback().await;
            drop(conn);
            drop(gate);
        });
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
