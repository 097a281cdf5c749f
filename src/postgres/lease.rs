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
use crate::error::boxed;
use crate::storage::{BoxFuture, Lease};
use crate::Result;

/// A held row lock: the connection with its transaction open, and the
/// key's local gate, passed on once the transaction is over.
///
/// Follows the lease convention of `crate::remote`: dropping it is the
/// release (`ROLLBACK`, spawned); `commit` takes what it holds first.
pub(super) struct PgLease {
    store: Arc<Inner>,
    ty: &'static ContextType,
    id: Uuid,
    version: u64,
    // Invariant: `Some` until `commit` takes it or `Drop` releases it.
    held: Option<Held>,
}

/// What a lease holds until its transaction ends. Field order matters: the
/// connection goes (back to the pool, or closed) before the gate opens.
struct Held {
    conn: Conn,
    gate: PgGate,
}

impl PgLease {
    /// The lease of a row lock taken on `conn`'s open transaction.
    pub(super) fn new(
        store: Arc<Inner>,
        ty: &'static ContextType,
        id: Uuid,
        version: u64,
        conn: Conn,
        gate: PgGate,
    ) -> Self {
        Self {
            store,
            ty,
            id,
            version,
            held: Some(Held { conn, gate }),
        }
    }
}

impl Held {
    /// Commits `bytes` at `version` and ends the transaction. The gate
    /// opens when `self` drops, after the `COMMIT` answered (or the
    /// connection was given up).
    async fn commit(
        mut self,
        store: Arc<Inner>,
        ty: &'static ContextType,
        id: Uuid,
        version: u64,
        bytes: Result<Vec<u8>>,
    ) -> Result<u64> {
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
        let response = store.timeouts.response;
        let (stmt, notify) = bounded(
            response,
            in_order(
                client.prepare_cached(&store.sql.commit),
                client.prepare_cached(&store.sql.notify),
            ),
        )
        .await
        .map_err(|limit| no_reply(ty, Some(id), "prepare commit", limit))?;
        let (stmt, notify) = (stmt.map_err(err)?, notify.map_err(err)?);
        let version = version as i64;
        let kind = ty.kind();
        let params: [&(dyn ToSql + Sync); 4] = [&kind, &id, &json, &version];
        // The lock's transaction turned the statement timeout off to wait
        // for the row; the commit runs under it again, and under the
        // client-side bound (a network that stopped answering).
        let restore = format!(
            "SET LOCAL statement_timeout = {}",
            store.timeouts.statement_ms
        );
        // The notify statement runs after the UPDATE (see `watch.rs`).
        let (restored, (updated, (notified, committed))) = bounded(
            response,
            in_order(
                client.batch_execute(&restore),
                in_order(
                    client.query_opt(&stmt, &params),
                    in_order(
                        client.execute(&notify, &params[..2]),
                        client.batch_execute("COMMIT"),
                    ),
                ),
            ),
        )
        .await
        .map_err(|limit| {
            ty.backend_message(
                Some(id),
                format!(
                    "no reply to COMMIT within {limit:?}: the commit may or may not have been \
                     applied (whole or not at all); the connection is closed"
                ),
            )
        })?;
        let updated = restored.and(updated).and_then(|row| notified.map(|_| row));
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
    fn commit(
        mut self: Box<Self>,
        value: &(dyn Any + Send + Sync),
    ) -> BoxFuture<'static, Result<u64>> {
        let (ty, id, version) = (self.ty, self.id, self.version);
        let bytes = ty.encode(Some(id), value);
        let store = self.store.clone();
        // The lease is inert from here: its drop has nothing to release.
        let Some(held) = self.held.take() else {
            return Box::pin(std::future::ready(Err(ty.lease_lost(id))));
        };
        drop(self);
        // On the store's runtime: the client-side timeout needs its timer,
        // and `commit_blocking` polls this from a plain thread.
        let handle = store.handle.clone();
        let task = handle.spawn(held.commit(store, ty, id, version, bytes));
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                Err(e) => Err(ty.backend_error(Some(id), boxed(e))),
            }
        })
    }

    // `release` is the trait's default, `drop(self)`: dropping is the
    // release (the lease convention of `crate::remote`).
}

impl Drop for PgLease {
    fn drop(&mut self) {
        let Some(Held { mut conn, gate }) = self.held.take() else {
            return; // committed: the commit ends the transaction.
        };
        let handle = conn.handle.clone();
        // Never block in drop. If the spawned task never runs, `conn` drops
        // unclean: closed, which ends the session's transaction. The gate
        // opens once the row lock is gone.
        spawn(&handle, async move {
            conn.rollback().await;
            drop(conn);
            drop(gate);
        });
    }
}
