//! Connections: taking one from the pools, bounding round trips,
//! pipelining, driver errors, and the hygiene that never returns a
//! connection with a transaction open to the pool.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, PoolError, TimeoutType, Timeouts};
use tokio_postgres::NoTls;
use uuid::Uuid;

use super::PostgresContextStorage;
use crate::context::ContextType;
use crate::error::{boxed, BoxError, ContextError};
use crate::storage::Wait;
use crate::Result;

/// Client-side bounds (the server-side one is `statement_timeout`).
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientTimeouts {
    /// Opening a connection: TCP connect, startup and authentication.
    pub(super) connect: Duration,
    /// Waiting for a free pooled connection (`Wait::Forever` operations).
    pub(super) pool_wait: Option<Duration>,
    /// One round trip that does not wait for a lock holder.
    pub(super) response: Option<Duration>,
    /// The statement timeout in whole ms (0: none), restored for commits.
    pub(super) statement_ms: u128,
}

impl ClientTimeouts {
    pub(super) fn pool(&self, wait: Option<Duration>) -> Timeouts {
        Timeouts {
            wait,
            create: Some(self.connect),
            recycle: Some(self.connect),
        }
    }
}

impl PostgresContextStorage {
    pub(super) fn wrap(&self, obj: Object) -> Conn {
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
    pub(super) async fn conn(
        &self,
        ty: &'static ContextType,
        id: Option<Uuid>,
        wait: Wait,
    ) -> Result<Conn> {
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
            Err(e) => Err(ty.backend_message(id, pool_error(e))),
        }
    }

    fn pool_exhausted(
        &self,
        ty: &'static ContextType,
        id: Option<Uuid>,
        waited: Option<Duration>,
    ) -> ContextError {
        let status = self.inner.pool.status();
        ty.backend_message(
            id,
            format!(
                "no pooled connection became free within {waited:?} \
                 (pool_size {}, every connection in use: held guards keep theirs)",
                status.max_size
            ),
        )
    }

    /// A connection for a read: a free one of the main pool if there is
    /// one, else one of the read pool, so that reads never wait for guards
    /// to give a connection back.
    pub(super) async fn read_conn(
        &self,
        ty: &'static ContextType,
        id: Option<Uuid>,
    ) -> Result<Conn> {
        let t = &self.inner.timeouts;
        match self
            .inner
            .pool
            .timeout_get(&t.pool(Some(Duration::ZERO)))
            .await
        {
            Ok(obj) => return Ok(self.wrap(obj)),
            Err(PoolError::Timeout(TimeoutType::Wait)) => {}
            Err(e) => return Err(ty.backend_message(id, pool_error(e))),
        }
        match self.inner.read_pool.timeout_get(&t.pool(t.pool_wait)).await {
            Ok(obj) => Ok(self.wrap(obj)),
            Err(PoolError::Timeout(TimeoutType::Wait)) => Err(ty.backend_message(
                id,
                format!(
                    "no connection of the read pool became free within {:?}",
                    t.pool_wait
                ),
            )),
            Err(e) => Err(ty.backend_message(id, pool_error(e))),
        }
    }

    /// `fut` bounded by the response timeout; on expiry a `Backend` error
    /// (the connection, left unclean, is then closed).
    pub(super) async fn bounded<F: Future>(
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
}

/// `fut`, or `Err(limit)` if it takes longer than `limit`.
pub(super) async fn bounded<F: Future>(
    limit: Option<Duration>,
    fut: F,
) -> std::result::Result<F::Output, Duration> {
    match limit {
        None => Ok(fut.await),
        Some(limit) => tokio::time::timeout(limit, fut).await.map_err(|_| limit),
    }
}

pub(super) fn no_reply(
    ty: &'static ContextType,
    id: Option<Uuid>,
    what: &str,
    limit: Duration,
) -> ContextError {
    ty.backend_message(
        id,
        format!("no reply from Postgres within {limit:?} ({what}); the connection is closed"),
    )
}

/// Runs two futures concurrently, always polling `a` before `b`.
///
/// This is how requests are pipelined: `tokio_postgres` queues a request
/// on its connection when the request's future is first polled, so the
/// first poll's order is the order the statements reach the server, all in
/// one write. (`tokio::join!` rotates its polling order; nest `in_order`
/// for more than two.)
pub(super) async fn in_order<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
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

/// A driver error whose message includes the server's (`tokio_postgres`
/// displays a server error as just "db error").
#[derive(Debug)]
pub(super) struct PgError(pub(super) tokio_postgres::Error);

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

pub(super) fn pg(e: tokio_postgres::Error) -> BoxError {
    boxed(PgError(e))
}

pub(super) fn pool_error(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => {
            format!("cannot open a connection: {}", PgError(e))
        }
        e => format!("connection pool: {e}"),
    }
}

/// A pooled connection that goes back to the pool only when `clean` (no
/// transaction open, no request in flight); otherwise it is taken out of
/// the pool, its running statement cancelled and the connection closed, so
/// that Postgres releases whatever its session held.
pub(super) struct Conn {
    pub(super) obj: Option<Object>,
    pub(super) clean: bool,
    pub(super) handle: tokio::runtime::Handle,
    /// The client-side bound on a round trip (the store's response timeout).
    pub(super) response: Option<Duration>,
}

impl Conn {
    pub(super) fn client(&self) -> &Object {
        // Invariant: `obj` is `Some` until drop.
        self.obj.as_ref().expect("connection present until drop")
    }

    /// Ends the open transaction; the connection is clean if that worked.
    pub(super) async fn rollback(&mut self) {
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
pub(super) fn spawn(
    fallback: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = ()> + Send + 'static,
) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => drop(handle.spawn(fut)),
        Err(_) => drop(fallback.spawn(fut)),
    }
}
