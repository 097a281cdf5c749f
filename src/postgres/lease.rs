//! [`PgLease`]: a held row lock (a pooled connection with its transaction
//! open) that commits or rolls back.

use std::any::Any;
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::conn::{bounded, in_order, no_reply, pg, spawn, Conn};
use super::sql::{json_text, row_version};
use super::{Inner, PgGate};
use crate::context::ContextType;
use crate::error::{boxed, message};
use crate::storage::{BoxFuture, Lease};
use crate::Result;

/// A held row lock: the connection with its transaction open, and the
/// key's local gate, passed on once the transaction is over.
pub(super) struct PgLease {
    pub(super) store: Arc<Inner>,
    pub(super) ty: &'static ContextType,
    pub(super) id: Uuid,
    pub(super) version: u64,
    pub(super) conn: Conn,
    pub(super) gate: Option<PgGate>,
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
