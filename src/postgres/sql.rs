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

/// Every statement, built once for the configured table.
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
}

impl Sql {
    pub(super) fn new(table: &str) -> Self {
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
            create_once: format!(
                "INSERT INTO {t} (kind, id, version, value, updated_at) \
                 VALUES ($1, $2, nextval('{seq}'), $3::text::jsonb, now()) \
                 ON CONFLICT (kind, id) DO NOTHING RETURNING version"
            ),
            delete_if: format!(
                "DELETE FROM {t} WHERE kind = $1 AND id = $2 AND version = $3 RETURNING version"
            ),
            version_share: format!(
                "SELECT version FROM {t} WHERE kind = $1 AND id = $2 FOR SHARE"
            ),
            contains: format!("SELECT EXISTS (SELECT 1 FROM {t} WHERE kind = $1 AND id = $2)"),
            ids: format!("SELECT id FROM {t} WHERE kind = $1"),
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
