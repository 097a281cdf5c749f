//! What the remote backends (Redis, PostgreSQL) share.
//!
//! * [`RemoteGuard`]: the remote variant of
//!   [`ContextGuard`](crate::ContextGuard), a decoded working copy plus the
//!   backend's [`Lease`](crate::Lease). Always compiled: a backend written
//!   outside this crate hands its leases to it too.
//! * `Gates`: the per-process per-key FIFO gate both backends queue on
//!   before they ask the server for a key, so that waiters on a hot key
//!   queue in the process, not on pooled connections or the server.
//!
//! # Lease convention
//!
//! A remote guard's lock is a [`Lease`](crate::Lease) (Redis: a `PX` key
//! carrying a random token; Postgres: a transaction holding the row lock on
//! a pooled connection). Both backends' leases follow one rule:
//!
//! 1. **Dropping the lease is the release.** `Drop` starts giving the
//!    server-side lock back at once and never blocks: it spawns the I/O
//!    (Redis: the token-checked release script; Postgres: `ROLLBACK`) and
//!    returns. It never waits for the lock to expire on its own.
//! 2. **`Lease::release` is `drop(self)`**, nothing more, so a lease that is
//!    dropped without `release` (a `RawGuard` never turned into a guard, an
//!    acquisition that failed after the lock was taken) is released the
//!    same way as a rolled-back guard.
//! 3. **`commit` takes what the lease holds first**, leaving an inert lease
//!    whose drop does nothing; the commit itself ends the lock (Redis: the
//!    commit script deletes the lease; Postgres: `COMMIT`). A commit whose
//!    reply never came gives the lock up as rule 1 does, without blocking
//!    (Redis: the release script, sent after the commit script; Postgres:
//!    the connection is closed).
//! 4. **The per-process gate opens last.** A lease holds its key's
//!    `Gate` and drops it only after the server answered the release or
//!    the commit, so the next task of the process does not find the key
//!    still held. Where no answer can come (a commit whose reply was lost),
//!    the gate opens once the release or the close is on its way; the next
//!    task then waits for the server like any other process would.
//! 5. **Nothing leaks when the release cannot run** (the runtime is shut
//!    down, the server unreachable): the server-side lock still ends on its
//!    own — the Redis lease expires within one lease period, and a Postgres
//!    connection dropped with its transaction open is closed, which ends
//!    the transaction.
//!
//! The trait's own documentation states the rule for every backend (rule 1
//! and "`release` rolls back"); rules 2–5 are how this crate's backends
//! meet it.

#[cfg(any(feature = "redis", feature = "postgres"))]
mod gate;
mod guard;

#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) use gate::{Gate, Gates};
pub(crate) use guard::RemoteGuard;
