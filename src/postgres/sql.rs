//! Every statement, built once per table, and the conversions of their
//! parameters and rows.

use uuid::Uuid;

use super::conn::pg;
use crate::context::ContextType;
use crate::error::{boxed, BoxError};
use crate::Result;

/// `ident` as a quoted SQL identifier (table names may be reserved words).
pub(super) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The `LISTEN`/`NOTIFY` channel of a table: `ctxstore.<table>` (at most
/// 59 bytes: table names are at most 50).
pub(super) fn channel(table: &str) -> String {
    format!("ctxstore.{table}")
}

/// The watch registry of a table: `<table>_watch`, one row per (key,
/// listening session) that watches it.
pub(super) fn registry(table: &str) -> String {
    format!("{table}_watch")
}

/// The transaction-local setting a write statement sets when it changed a
/// row, and the notify statement after it checks.
const WROTE: &str = "ctxstore.wrote";

/// Every statement, built once for the configured table.
///
/// Every statement that changes a committed row (`commit`, `update`,
/// `create_once`, `delete`, `delete_if`) is a data-modifying CTE whose
/// outer `SELECT` sets the transaction-local `ctxstore.wrote` once per row
/// it changed (column 0 stays the version). The writer then runs
/// [`notify`](Sql::notify), a separate statement in the same transaction
/// and round trip, which notifies watchers only if the transaction wrote
/// and the key is in the watch registry: no row changed or nobody watches,
/// no `NOTIFY` (so no commit serialization, see `watch.rs`); and a
/// notification is delivered only if its transaction commits.
pub(super) struct Sql {
    pub(super) lock: String,
    pub(super) lock_nowait: String,
    pub(super) commit: String,
    pub(super) insert: String,
    pub(super) update: String,
    pub(super) snapshot: String,
    pub(super) delete: String,
    /// Create-once: inserts with the next sequence value, or nothing.
    pub(super) create_once: String,
    /// Conditional delete (`$3`: the expected version).
    pub(super) delete_if: String,
    /// The committed version, waiting for a holder's row lock.
    pub(super) version_share: String,
    pub(super) contains: String,
    pub(super) ids: String,
    /// After every write, in its transaction (`$1` kind, `$2` id):
    /// `pg_notify` if this transaction wrote and the key is watched (or,
    /// without a usable registry, whenever it wrote).
    pub(super) notify: String,
    /// A watcher's read: version, value and creation stamp.
    pub(super) watch_read: String,
    /// The same, `FOR SHARE`: waits for a writer holding the row lock.
    pub(super) watch_read_share: String,
    /// The same, `FOR SHARE NOWAIT`.
    pub(super) watch_read_share_nowait: String,
    /// `LISTEN` on the table's channel.
    pub(super) listen: String,
    /// The listener's registry statements (its own session's rows).
    pub(super) registry: RegistrySql,
}

/// The statements of the watch registry, run by the listening session;
/// `pid` is always that session's `pg_backend_pid()`.
#[derive(Clone)]
pub(super) struct RegistrySql {
    /// Registers a key (`$1` kind, `$2` id).
    pub(super) register: String,
    /// Registers many keys at once (`$1` kinds, `$2` ids).
    pub(super) register_all: String,
    /// Unregisters a key (`$1` kind, `$2` id).
    pub(super) unregister: String,
    /// Deletes the rows of this session, of `$1` (the previous session of
    /// this listener, or NULL) and of every session that no longer exists.
    pub(super) purge: String,
    /// Deletes this session's rows (the store is gone).
    pub(super) unregister_all: String,
}

impl Sql {
    /// `registry`: writers may read the watch registry (else they notify
    /// on every write, see [`crate::docs::postgres`]).
    pub(super) fn new(table: &str, registry: bool) -> Self {
        let t = quote(table);
        // A regclass literal: the quoted name inside a string literal.
        let seq = quote(&format!("{table}_version_seq"));
        let w = quote(&self::registry(table));
        let t = t.as_str();
        // The channel is a string literal here (the table name is checked
        // to be `[a-z0-9_]`, nothing to escape) and a quoted identifier in
        // `LISTEN`.
        let chan = channel(table);
        let marking = |write: String, returns: &str| {
            format!(
                "WITH w AS ({write} RETURNING version) \
                 SELECT {returns}set_config('{WROTE}', 'on', true) FROM w"
            )
        };
        let wrote = format!("current_setting('{WROTE}', true) = 'on'");
        let notify_call = format!("pg_notify('{chan}', $2::uuid::text || ' ' || $1::text)");
        let notify = if registry {
            format!(
                "SELECT {notify_call} FROM {w} \
                 WHERE kind = $1::text AND id = $2::uuid AND {wrote} LIMIT 1"
            )
        } else {
            format!("SELECT {notify_call} WHERE {wrote}")
        };
        let watch_read =
            format!("SELECT version, value::text, created FROM {t} WHERE kind = $1 AND id = $2");
        Sql {
            lock: format!(
                "SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2 FOR UPDATE"
            ),
            lock_nowait: format!(
                "SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2 FOR UPDATE NOWAIT"
            ),
            commit: marking(
                format!(
                    "UPDATE {t} SET value = $3::text::jsonb, version = nextval('{seq}'), \
                     updated_at = now() WHERE kind = $1 AND id = $2 AND version = $4"
                ),
                "version, ",
            ),
            insert: format!(
                "INSERT INTO {t} (kind, id, version, value, updated_at) \
                 VALUES ($1, $2, 0, $3::text::jsonb, now()) ON CONFLICT (kind, id) DO NOTHING"
            ),
            update: marking(
                format!(
                    "UPDATE {t} SET value = $3::text::jsonb, version = nextval('{seq}'), \
                     updated_at = now() WHERE kind = $1 AND id = $2"
                ),
                "version, ",
            ),
            snapshot: format!("SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2"),
            // `execute` counts the outer SELECT's rows: the deleted ones.
            delete: marking(format!("DELETE FROM {t} WHERE kind = $1 AND id = $2"), ""),
            create_once: marking(
                format!(
                    "INSERT INTO {t} (kind, id, version, value, updated_at) \
                     VALUES ($1, $2, nextval('{seq}'), $3::text::jsonb, now()) \
                     ON CONFLICT (kind, id) DO NOTHING"
                ),
                "version, ",
            ),
            delete_if: marking(
                format!("DELETE FROM {t} WHERE kind = $1 AND id = $2 AND version = $3"),
                "version, ",
            ),
            version_share: format!("SELECT version FROM {t} WHERE kind = $1 AND id = $2 FOR SHARE"),
            contains: format!("SELECT EXISTS (SELECT 1 FROM {t} WHERE kind = $1 AND id = $2)"),
            ids: format!("SELECT id FROM {t} WHERE kind = $1"),
            notify,
            watch_read_share: format!("{watch_read} FOR SHARE"),
            watch_read_share_nowait: format!("{watch_read} FOR SHARE NOWAIT"),
            watch_read,
            listen: format!("LISTEN {}", quote(&chan)),
            registry: RegistrySql {
                register: format!(
                    "INSERT INTO {w} (kind, id, pid) VALUES ($1, $2, pg_backend_pid()) \
                     ON CONFLICT DO NOTHING"
                ),
                register_all: format!(
                    "INSERT INTO {w} (kind, id, pid) \
                     SELECT k, i, pg_backend_pid() FROM unnest($1::text[], $2::uuid[]) AS u(k, i) \
                     ON CONFLICT DO NOTHING"
                ),
                unregister: format!(
                    "DELETE FROM {w} WHERE kind = $1 AND id = $2 AND pid = pg_backend_pid()"
                ),
                purge: format!(
                    "DELETE FROM {w} r WHERE r.pid = pg_backend_pid() OR r.pid = $1::int4 \
                     OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid)"
                ),
                unregister_all: format!("DELETE FROM {w} WHERE pid = pg_backend_pid()"),
            },
        }
    }
}

pub(super) fn row_version(
    ty: &'static ContextType,
    id: Uuid,
    row: &tokio_postgres::Row,
) -> Result<u64> {
    let v: i64 = row
        .try_get(0)
        .map_err(|e| ty.backend_error(Some(id), pg(e)))?;
    u64::try_from(v)
        .map_err(|_| ty.backend_message(Some(id), format!("stored version {v} is negative")))
}

/// `encode` produces JSON, which is UTF-8; sent as text and cast to jsonb
/// by the server (the same parse a binary jsonb parameter gets).
pub(super) fn json_text<'a>(
    ty: &'static ContextType,
    id: Uuid,
    bytes: &'a [u8],
) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| ty.codec_error(Some(id), boxed(e) as BoxError))
}
