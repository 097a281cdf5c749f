//! The schema: DDL, checks and migrations, run at `connect`.

use deadpool_postgres::Object;

use super::builder::setup_error;
use super::conn::PgError;
use super::sql::{quote, registry};
use crate::{ContextError, Result};

/// Recorded as the table's comment; bumped by future schema migrations.
///
/// 1: the table and its sequence. 2: adds `created bigint DEFAULT
/// nextval(<sequence>)`, the creation stamp watches tell incarnations of a
/// key apart by (NULL on rows created before the migration). 3: adds the
/// watch registry `<table>_watch`, which writers consult before notifying.
const SCHEMA_VERSION: u32 = 3;

/// What of the schema this role can use, beyond reading and writing rows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schema {
    /// The table has the `created` column watching needs (schema 2).
    pub(super) created: bool,
    /// The watch registry exists and this role may read it: writers
    /// consult it (else they notify on every write).
    pub(super) registry_readable: bool,
    /// ... and may insert and delete its rows: watching is possible.
    pub(super) registry_writable: bool,
}

impl Schema {
    /// Everything watching needs.
    pub(super) fn watchable(&self) -> bool {
        self.created && self.registry_readable && self.registry_writable
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

/// Creates the table, its sequence and its watch registry if missing,
/// under an advisory lock so that processes connecting at once do not race;
/// checks an existing table's columns. Looks first and changes only what is
/// missing, so a role that may only read and write rows connects fine to a
/// table made by its owner (DDL and `COMMENT ON` need privileges it lacks).
/// See [`crate::docs::postgres`] (*Schema and migrations*) for the
/// migration path.
///
/// Returns what this role can use of the schema: a table of schema 1 or 2
/// that this role may not migrate keeps working for everything but
/// watching.
pub(super) async fn ensure_schema(client: &Object, table: &str, create: bool) -> Result<Schema> {
    let seq = format!("{table}_version_seq");
    let (has_table, has_seq, comment) = inspect_schema(client, table).await?;
    if has_table && has_seq {
        let mut created = check_columns(client, table).await?;
        if !created && create {
            // Schema 1 -> 2. Additive, so that processes of the previous
            // release keep working; if this role may not, everything but
            // watching still works.
            match add_created(client, table).await {
                Ok(()) => created = true,
                Err(e) => tracing::warn!(
                    table,
                    error = %e,
                    "cannot add the `created` column: watching contexts is unavailable \
                     until a role that may ALTER the table connects once"
                ),
            }
        }
        let mut schema = inspect_registry(client, table).await?;
        schema.created = created;
        if !schema.registry_exists && create {
            // Schema 2 -> 3: a new table, nothing of the old one changes.
            match add_registry(client, table).await {
                Ok(()) => schema = inspect_registry(client, table).await?,
                Err(e) => tracing::warn!(
                    table,
                    error = %e,
                    "cannot create the watch registry: watching contexts is unavailable, \
                     and this process notifies on every write, until a role that may \
                     CREATE tables connects once"
                ),
            }
            schema.created = created;
        }
        if create
            && created
            && schema.registry_exists
            && comment.as_deref() != Some(schema_comment().as_str())
        {
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
        return Ok(schema.usable());
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
            .batch_execute(&registry_ddl(table))
            .await
            .map_err(|e| schema_error(table, "create watch registry", e))?;
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
    migrated?;
    let mut schema = inspect_registry(client, table).await?;
    schema.created = true;
    Ok(schema.usable())
}

/// What exists of the watch registry and what this role may do with it.
struct RegistryState {
    registry_exists: bool,
    registry_readable: bool,
    registry_writable: bool,
    created: bool,
}

impl RegistryState {
    fn usable(&self) -> Schema {
        Schema {
            created: self.created,
            registry_readable: self.registry_exists && self.registry_readable,
            registry_writable: self.registry_exists && self.registry_writable,
        }
    }
}

/// Looks for the watch registry, checks its columns if it exists, and
/// this role's privileges on it (`created` is left false).
async fn inspect_registry(client: &Object, table: &str) -> Result<RegistryState> {
    let name = quote(&registry(table));
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, \
             COALESCE(has_table_privilege(to_regclass($1), 'SELECT'), false), \
             COALESCE(has_table_privilege(to_regclass($1), 'INSERT') \
                  AND has_table_privilege(to_regclass($1), 'DELETE'), false)",
            &[&name],
        )
        .await
        .map_err(|e| schema_error(table, "inspect watch registry", e))?;
    let state = RegistryState {
        registry_exists: row.get(0),
        registry_readable: row.get(1),
        registry_writable: row.get(2),
        created: false,
    };
    if state.registry_exists {
        let columns = columns_of(client, table, &registry(table)).await?;
        for (col, ty) in [("kind", "text"), ("id", "uuid"), ("pid", "integer")] {
            if !columns.iter().any(|(n, t)| n == col && t == ty) {
                return Err(setup_error(format!(
                    "table {} (the watch registry of {table}) is missing column `{col} {ty}` \
                     (found {columns:?}); is it another application's table?",
                    registry(table)
                )));
            }
        }
    }
    Ok(state)
}

/// The watch registry (schema 3): one row per key and listening session
/// watching it. Unlogged: it lists live sessions only, which a crash ends
/// anyway (Postgres empties unlogged tables after one). Idempotent.
fn registry_ddl(table: &str) -> String {
    format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {} ( \
             kind text NOT NULL, \
             id uuid NOT NULL, \
             pid integer NOT NULL, \
             PRIMARY KEY (kind, id, pid));",
        quote(&registry(table))
    )
}

/// Creates the watch registry of an existing table (schema 2 -> 3) under
/// the schema's advisory lock (5 s lock timeout, like the schema 1 -> 2
/// step: the next `connect` tries again).
async fn add_registry(client: &Object, table: &str) -> Result<()> {
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '5s'; \
         SELECT pg_advisory_xact_lock(hashtext('ctxstore schema {table}')); \
         {ddl} COMMIT;",
        ddl = registry_ddl(table),
    );
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(schema_error(table, "create watch registry", e));
    }
    Ok(())
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
/// advisory lock (the caller then records the schema version). `ALTER TABLE` needs the table's exclusive lock, which
/// waits for running transactions (held guards) and blocks everyone queued
/// behind it, so it gives up after 5 s (and the next `connect` tries again).
async fn add_created(client: &Object, table: &str) -> Result<()> {
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '5s'; \
         SELECT pg_advisory_xact_lock(hashtext('ctxstore schema {table}')); \
         {ddl} COMMIT;",
        ddl = created_ddl(table),
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
    let columns = columns_of(client, table, table).await?;
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

/// The (name, type) of each column of `relation` (errors name `table`).
async fn columns_of(client: &Object, table: &str, relation: &str) -> Result<Vec<(String, String)>> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
             AND NOT a.attisdropped",
            &[&quote(relation)],
        )
        .await
        .map_err(|e| schema_error(table, "inspect columns", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
