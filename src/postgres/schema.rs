//! The schema: DDL, checks and migrations, run at `connect`.

use deadpool_postgres::Object;

use super::builder::setup_error;
use super::conn::PgError;
use super::sql::quote;
use crate::{ContextError, Result};

/// Recorded as the table's comment; bumped by future schema migrations.
///
/// 1: the table and its sequence. 2: adds `created bigint DEFAULT
/// nextval(<sequence>)`, the creation stamp watches tell incarnations of a
/// key apart by (NULL on rows created before the migration).
const SCHEMA_VERSION: u32 = 2;

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
/// (DDL and `COMMENT ON` need privileges it lacks). See
/// [`crate::docs::postgres`] (*Schema and migrations*) for the migration
/// path.
///
/// Returns whether the table has the `created` column that watching needs
/// (a table of schema 1 that this role may not alter keeps working for
/// everything else).
pub(super) async fn ensure_schema(client: &Object, table: &str, create: bool) -> Result<bool> {
    let seq = format!("{table}_version_seq");
    let (has_table, has_seq, comment) = inspect_schema(client, table).await?;
    let mut has_created = false;
    if has_table {
        has_created = check_columns(client, table).await?;
    }
    if has_table && has_seq && !has_created && create {
        // Schema 1 -> 2. Additive, so that processes of the previous
        // release keep working; if this role may not, everything but
        // watching still works.
        match add_created(client, table).await {
            Ok(()) => return Ok(true),
            Err(e) => {
                tracing::warn!(
                    table,
                    error = %e,
                    "cannot add the `created` column: watching contexts is unavailable \
                     until a role that may ALTER the table connects once"
                );
                return Ok(false);
            }
        }
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
        return Ok(has_created);
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
            .batch_execute(&created_ddl(table))
            .await
            .map_err(|e| schema_error(table, "add column created", e))?;
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
    migrated.map(|()| true)
}

/// Adds the creation stamp (schema 2): a nullable column, so adding it is a
/// catalog change only (no table rewrite), whose default draws from the
/// sequence for every row inserted from then on, by any process (an older
/// release's inserts, which do not name it, included). Setting a default
/// leaves existing rows NULL. Idempotent.
fn created_ddl(table: &str) -> String {
    format!(
        "ALTER TABLE {qt} ADD COLUMN IF NOT EXISTS created bigint; \
         ALTER TABLE {qt} ALTER COLUMN created SET DEFAULT nextval('{qseq}');",
        qt = quote(table),
        qseq = quote(&format!("{table}_version_seq")),
    )
}

/// Migrates an existing schema-1 table to schema 2 under the schema's
/// advisory lock. `ALTER TABLE` needs the table's exclusive lock, which
/// waits for running transactions (held guards) and blocks everyone queued
/// behind it, so it gives up after 5 s (and the next `connect` tries again).
async fn add_created(client: &Object, table: &str) -> Result<()> {
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '5s'; \
         SELECT pg_advisory_xact_lock(hashtext('ctxstore schema {table}')); \
         {ddl} COMMENT ON TABLE {qt} IS '{comment}'; COMMIT;",
        ddl = created_ddl(table),
        qt = quote(table),
        comment = schema_comment(),
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(schema_error(table, "add column created", e));
    }
    Ok(())
}

fn schema_error(table: &str, what: &str, e: tokio_postgres::Error) -> ContextError {
    setup_error(format!(
        "cannot prepare table {table} ({what}): {}",
        PgError(e)
    ))
}

/// Checks that `table` exists with the columns this backend uses; returns
/// whether it also has the `created` column of schema 2.
async fn check_columns(client: &Object, table: &str) -> Result<bool> {
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
                 see \"Schema and migrations\" in the ctxstore docs (ctxstore::docs::postgres)"
            )));
        }
    }
    Ok(columns.iter().any(|(n, t)| n == "created" && t == "bigint"))
}
