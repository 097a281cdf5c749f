//! What the remote backends (Redis, PostgreSQL) share.
//!
//! * [`RemoteGuard`]: the remote variant of
//!   [`ContextGuard`](crate::ContextGuard), a decoded working copy plus the
//!   backend's [`Lease`](crate::Lease). Always compiled: a backend written
//!   outside this crate hands its leases to it too.
//! * [`Gates`]: the per-process per-key FIFO gate both backends queue on
//!   before they ask the server for a key, so that waiters on a hot key
//!   queue in the process, not on pooled connections or the server.

#[cfg(any(feature = "redis", feature = "postgres"))]
mod gate;
mod guard;

#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use gate::{Gate, Gates};
pub(crate) use guard::RemoteGuard;
