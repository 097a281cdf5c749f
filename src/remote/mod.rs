//! What the remote backends (Redis, PostgreSQL) share.
//!
//! * [`RemoteGuard`]: the remote variant of
//!   [`ContextGuard`](crate::ContextGuard), a decoded working copy plus the
//!   backend's [`Lease`](crate::Lease). Always compiled: a backend written
//!   outside this crate hands its leases to it too.

mod guard;

pub(crate) use guard::RemoteGuard;
