//! Every statement, built once per table, and the conversions of their
//! parameters and rows.

use uuid::Uuid;

use super::conn::pg;
use crate::context::ContextType;
use crate::error::{boxed, message, BoxError};
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

/// Every statement, built once for the configured table.
///
/// Every statement that changes a committed row (`commit`, `update`,
/// `create_once`, `delete`, `delete_if`) is a data-modifying CTE whose
/// outer `SELECT` calls `pg_notify(<channel>, '<id> <kind>')` once per row
/// it changed: no row changed, no notification; and a notification is
/// delivered only if its transaction commits. Column 0 stays the version.
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
    /// A watcher's read: version, value and creation stamp.
    pub(super) watch_read: String,
    /// `LISTEN` on the table's channel.
    pub(super) listen: String,
}

impl Sql {
    pub(super) fn new(table: &str) -> Self {
        let t = quote(table);
        // A regclass literal: the quoted name inside a string literal.
        let seq = quote(&format!("{table}_version_seq"));
        let t = t.as_str();
        // The channel is a string literal here (the table name is checked
        // to be `[a-z0-9_]`, nothing to escape) and a quoted identifier in
        // `LISTEN`.
        let chan = channel(table);
        let notify = format!("pg_notify('{chan}', $2::text || ' ' || $1)");
        let notifying = |write: String, returns: &str| {
            format!("WITH w AS ({write} RETURNING version) SELECT {returns}{notify} FROM w")
        };
        Sql {
            lock: format!(
                "SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2 FOR UPDATE"
            ),
            lock_nowait: format!(
                "SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2 FOR UPDATE NOWAIT"
            ),
            commit: notifying(
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
            update: notifying(
                format!(
                    "UPDATE {t} SET value = $3::text::jsonb, version = nextval('{seq}'), \
                     updated_at = now() WHERE kind = $1 AND id = $2"
                ),
                "version, ",
            ),
            snapshot: format!("SELECT version, value::text FROM {t} WHERE kind = $1 AND id = $2"),
            // `execute` counts the outer SELECT's rows: the deleted ones.
            delete: notifying(format!("DELETE FROM {t} WHERE kind = $1 AND id = $2"), ""),
            create_once: notifying(
                format!(
                    "INSERT INTO {t} (kind, id, version, value, updated_at) \
                     VALUES ($1, $2, nextval('{seq}'), $3::text::jsonb, now()) \
                     ON CONFLICT (kind, id) DO NOTHING"
                ),
                "version, ",
            ),
            delete_if: notifying(
                format!("DELETE FROM {t} WHERE kind = $1 AND id = $2 AND version = $3"),
                "version, ",
            ),
            version_share: format!("SELECT version FROM {t} WHERE kind = $1 AND id = $2 FOR SHARE"),
            contains: format!("SELECT EXISTS (SELECT 1 FROM {t} WHERE kind = $1 AND id = $2)"),
            ids: format!("SELECT id FROM {t} WHERE kind = $1"),
            watch_read: format!(
                "SELECT version, value::text, created FROM {t} WHERE kind = $1 AND id = $2"
            ),
            listen: format!("LISTEN {}", quote(&chan)),
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
        .map_err(|_| ty.backend_error(Some(id), message(format!("stored version {v} is negative"))))
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
