//! Shared helpers of the Postgres tests: the server URL, a fresh table per
//! store, and a direct connection for poking at rows.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use ctxstore::PostgresContextStorage;

/// `CTXSTORE_POSTGRES_URL`, or the local test server.
pub fn url() -> String {
    std::env::var("CTXSTORE_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A table name no other test uses: `ctx_test_<unix secs>_<random>`.
pub fn fresh_table() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let rand = ctxstore::Uuid::new_v4().simple().to_string();
    format!("ctx_test_{secs}_{}", &rand[..12])
}

/// A plain connection to the test server (its task runs on the current
/// runtime).
pub async fn client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .expect("connect to Postgres (is it running? see docs/postgres.md)");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Drops test tables (and their sequences) left by runs more than an hour
/// old: cheap, and never touches a table a running test may still use.
pub async fn drop_stale_tables(client: &tokio_postgres::Client) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let rows = client
        .query(
            "SELECT tablename::text FROM pg_tables \
             WHERE schemaname = current_schema() AND tablename LIKE 'ctx\\_test\\_%'",
            &[],
        )
        .await
        .expect("list test tables");
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .split('_')
            .nth(2)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(now);
        if now.saturating_sub(created) > 3600 {
            // Another run may drop it at the same time: ignore errors.
            let _ = client
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {name}; DROP SEQUENCE IF EXISTS {name}_version_seq;"
                ))
                .await;
        }
    }
}

/// A store on a fresh table.
pub async fn fresh_store() -> PostgresContextStorage {
    store_on(&fresh_table()).await
}

/// A store on `table` (created if missing).
pub async fn store_on(table: &str) -> PostgresContextStorage {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    let mut first = false;
    CLEANED.call_once(|| first = true);
    if first {
        drop_stale_tables(&client().await).await;
    }
    PostgresContextStorage::builder(url())
        .table(table)
        .pool_size(24)
        .connect()
        .await
        .expect("connect to Postgres (is it running? see docs/postgres.md)")
}
