//! [`PostgresContextStorageBuilder`]: options and connecting.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::conn::{pool_error, ClientTimeouts};
use super::schema::ensure_schema;
use super::sql::Sql;
use super::{Inner, PostgresContextStorage};
use crate::error::{message, ContextError, ContextKey};
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
    /// it). Lock waits are bounded only by the [`Wait`](crate::Wait) the caller asked
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
        // The watch listener's own connection is told apart by name (for
        // `pg_stat_activity`), unless the URL chose one.
        let mut listen_name = None;
        if config.get_application_name().is_none() {
            config.application_name(format!("ctxstore:{}", self.table));
            listen_name = Some(format!("ctxstore:{}:listen", self.table));
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
        let schema = match timeouts.response {
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
        };
        drop(client);
        let mut listen_config = config.clone();
        if let Some(name) = listen_name {
            listen_config.application_name(name);
        }
        Ok(PostgresContextStorage {
            inner: Arc::new(Inner {
                pool,
                read_pool,
                sql: Sql::new(&self.table, schema.registry_readable),
                table: self.table,
                handle: tokio::runtime::Handle::current(),
                gates: Arc::default(),
                timeouts,
                listen_config,
                schema,
                listener: std::sync::OnceLock::new(),
            }),
        })
    }
}

pub(super) fn setup_error(msg: impl Into<String>) -> ContextError {
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
