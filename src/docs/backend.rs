//! # Writing a backend: the contract
//!
//! A backend is a type that implements [`ContextStorage`]: a handful of
//! type-erased methods. Users never call them; they call the typed methods
//! of [`ContextStorageExt`], which every `ContextStorage` gets for free
//! (also as `Arc<dyn ContextStorage>`), and [`ContextGuard`],
//! [`Snapshot`] and [`ContextWatch`] are the same types on every backend.
//! This page is what those methods must do and must never do. The crate's
//! Redis and PostgreSQL backends follow it; so does the template
//! `examples/custom_backend.rs` (in the crate's sources), a small
//! remote-style store (encoded bytes, versions and lease tokens behind an
//! async mutex, watch through a channel per context) written only against
//! the public API, that passes the conformance kit. Copy it.
//!
//! To check a backend, run the conformance kit (cargo feature
//! `conformance`) against it: `ctxstore::conformance_tests!(make)` for one
//! test per case, or `ctxstore::conformance::run_all(make).await`. See the
//! `ctxstore::conformance` module (built with the feature).
//!
//! ## Contents
//!
//! 1. [The shape of a backend](#the-shape-of-a-backend)
//! 2. [Keys, values and `ContextType`](#keys-values-and-contexttype)
//! 3. [Versions](#versions)
//! 4. [Errors](#errors)
//! 5. [The methods](#the-methods), one by one
//! 6. [`RawGuard` and `Lease`](#rawguard-and-lease)
//! 7. [Watching: `watch_raw` and `RawWatch`](#watching-watch_raw-and-rawwatch)
//! 8. [Cancellation](#cancellation)
//! 9. [What a backend may weaken](#what-a-backend-may-weaken), and must then document
//! 10. [Testing with the conformance kit](#testing-with-the-conformance-kit)
//!
//! ## The shape of a backend
//!
//! ```text
//! impl ContextStorage for MyStore {
//!     store_raw      write a value (waits for a lock holder)         -> new version
//!     lock_raw       take the key's lock as Wait allows             -> RawGuard::Remote { value, version, lease }
//!     snapshot_raw   read the committed value, never waiting          -> RawSnapshot
//!     delete_raw     remove the context (waits for a lock holder)
//!     store_if_raw   write only at an expected version (0: create)   -> new version
//!     delete_if_raw  delete only at an expected version
//!     contains_raw   is the context there?
//!     ids_raw        the ids of one type
//!     watch_raw      optional: first snapshot + a RawWatch            (default: a Backend error)
//!     backend_name   "mystore", for logs and errors
//! }
//! impl Lease for MyLease { commit, (release), (lost) } + Drop (the release)
//! impl RawWatch for MyWatch { poll_changed }
//! ```
//!
//! Every method takes the type's `&'static` [`ContextType`] and returns a
//! boxed `Send` future ([`BoxFuture`]) that may borrow `&self`. Leave
//! `as_in_memory` alone (it is the in-memory engine's fast path; a
//! decorator that forwards to an [`InMemoryContextStorage`] must keep the
//! default `None`, or its own methods are bypassed).
//!
//! ## Keys, values and `ContextType`
//!
//! A context's key is (type, id). A remote backend stores it under
//! `(ty.kind(), id)`: [`Context::kind`] is the stable name users give a
//! type for exactly this purpose (its default, the full type path, changes
//! when code moves). An in-process backend may key by
//! [`ContextType::type_id`] instead. Either way `(T, id)` and `(U, id)`
//! are different contexts: a value is never read back as another type.
//!
//! Values arrive type-erased ([`ErasedValue`], a `Box<T>`); the descriptor
//! converts them without generics:
//!
//! * [`ContextType::encode`]`(Some(id), &*value)` gives the bytes (JSON)
//!   to store. Call it **before writing anything**: it refuses, as a
//!   `Codec` error naming the key, a value of another type and a value JSON
//!   cannot carry back (NaN or infinite floats, `\0` in strings), so every
//!   backend refuses the same values and a refused write changes nothing.
//! * [`ContextType::decode`]`(Some(id), &bytes)` gives the `Box<T>` for a
//!   [`RawGuard::Remote`]; bad bytes are a `Codec` error naming the key,
//!   never a panic.
//! * [`ContextType::decode_snapshot`]`(id, &bytes, version)` gives the
//!   [`RawSnapshot`] for `snapshot_raw` and `RawWatch`.
//!   [`ContextType::snapshot_of`]`(value, version)` wraps an already
//!   decoded value instead.
//!
//! A backend may store the bytes as it likes (a column, a hash field, a
//! file) as long as it hands back the same bytes; it must not change the
//! encoding (the decoders expect what `encode` made).
//!
//! ## Versions
//!
//! Every write of a context (a store, a guard's commit, a successful
//! conditional store) gives it a new version, a `u64`:
//!
//! * always **≥ 1** (0 means "absent" to `store_if_raw`);
//! * strictly **increasing** per key, also for a commit that changed
//!   nothing;
//! * **never reused**, also across delete and re-create: a context created
//!   again under the same key starts above every version it had. Keep a
//!   floor (per kind, as Redis does; a sequence, as Postgres does), a
//!   store-wide counter (the template), or the server's clock.
//!
//! That makes "write only at version v" ABA-free, which conditional writes
//! and watching rely on. Versions of different keys need not be related.
//!
//! ## Errors
//!
//! Build every error with the descriptor, so that it carries the kind, the
//! type's name and the id, and displays as users expect:
//!
//! | Situation | Constructor |
//! |---|---|
//! | no such context | [`ContextType::not_found`]`(id)` (displays `no ConfJob context known for <id>`) |
//! | `Wait::Never` and the key is held | [`ContextType::would_block`]`(id)` |
//! | `Wait::Until(_, asked)` passed | [`ContextType::timeout`]`(id, asked)` |
//! | a conditional write at the wrong version | [`ContextType::conflict`]`(id, expected, found)` |
//! | a commit whose lock was lost (lease expired, taken over) | [`ContextType::lease_lost`]`(id)` |
//! | bytes that do not decode, values that do not encode | [`ContextType::codec_error`] (`encode`/`decode` already do it) |
//! | anything else: an outage, a refused query, a corrupt version | [`ContextType::backend_error`]`(Some(id), source)` |
//!
//! `source` is a [`BoxError`] (an `Arc<dyn Error + Send + Sync>`): pass the
//! driver's error as `Arc::new(err) as BoxError`, or use
//! [`ContextType::backend_message`](crate::ContextType::backend_message)`(Some(id), "...")` for a failure with no
//! driver error. A backend never panics on what the server returns: a
//! poisoned or corrupt value is an error for that key only.
//!
//! ## The methods
//!
//! "Waits for a holder" means: while some guard holds the key's lock
//! (here or in another process), the call parks until the lock is
//! released, **then** acts; it never writes under a holder, and never
//! spins in a tight loop (wait for a notification: pub/sub, a `Notify`, a
//! row lock). A backend's waiting must be cancel-safe (see
//! [Cancellation](#cancellation)).
//!
//! **[`store_raw`](crate::ContextStorage::store_raw)`(ty, id, value)`**: encodes
//! `value`; waits for a holder; writes it as the next version, creating
//! the context if absent; returns the version. Must never: write over a
//! holder, reuse a version, write anything when encoding fails.
//!
//! **[`lock_raw`](crate::ContextStorage::lock_raw)`(ty, id, wait)`**: takes the
//! key's exclusive lock and returns the value as committed, its version and
//! a [`Lease`] ([`RawGuard::Remote`]). `NotFound` for an absent key,
//! whatever `wait` is. With the key held:
//!
//! * [`Wait::Forever`]: waits until it gets the lock (the holder commits,
//!   rolls back, or is dropped). If the context is deleted meanwhile, the
//!   waiter re-resolves the key: `NotFound`, or the lock of a context
//!   created again.
//! * [`Wait::Never`]: fails at once with `WouldBlock`; never waits, never
//!   queues anything.
//! * [`Wait::Until`]`(deadline, asked)`: waits until `deadline`, then fails
//!   with `Timeout` carrying `asked` (the duration the caller gave). A
//!   deadline already passed (a zero timeout) takes a free lock and fails
//!   at once on a held one; it is still `Timeout`, not `WouldBlock`.
//!
//! The lock is not reentrant: a second `lock_raw` by the same task waits
//! like anyone else. Must never: hand the lock to two holders, leave a
//! lock taken when it returns an error or is cancelled, return a value
//! other than the one committed at `version`.
//!
//! **[`snapshot_raw`](crate::ContextStorage::snapshot_raw)`(ty, id)`**: the
//! committed value and its version, `NotFound` if absent. Must never wait
//! for the lock holder (read the committed state; a remote round trip is
//! fine), never show a holder's uncommitted draft, never show a half
//! written value.
//!
//! **[`delete_raw`](crate::ContextStorage::delete_raw)`(ty, id)`**: waits for a
//! holder, then removes the context; `NotFound` if absent. Afterwards
//! every read is `NotFound`, the ids no longer list it, waiters on the key
//! re-resolve it, watches of it end with `NotFound`, and a later create
//! gets a higher version. It frees what the key used (the version floor
//! may stay).
//!
//! **[`store_if_raw`](crate::ContextStorage::store_if_raw)`(ty, id, expected,
//! value)`**: a writer (waits for a holder), then compares and writes in
//! **one atomic step** on the backend (a Lua script, one `UPDATE … WHERE
//! version = $1`, a held mutex). `expected == 0` means "only if absent":
//! under concurrent creates exactly one succeeds. Mismatch:
//! `conflict(id, expected, found)` with `found` the committed version;
//! absent with `expected != 0`: `NotFound`. A refused write changes
//! nothing (no value, no version, no holder, no watcher woken).
//!
//! **[`delete_if_raw`](crate::ContextStorage::delete_if_raw)`(ty, id,
//! expected)`**: as `store_if_raw`, deleting. Absent is `NotFound`
//! whatever `expected` is (also 0); present at another version (or
//! `expected == 0`) is a conflict. A successful one is a delete in every
//! respect.
//!
//! **[`contains_raw`](crate::ContextStorage::contains_raw)`(ty, id)`** and
//! **[`ids_raw`](crate::ContextStorage::ids_raw)`(ty)`**: whether the context
//! exists, and the ids of every context of this type (no other type's, in
//! any order, each once). Neither waits for a holder.
//!
//! **[`backend_name`](crate::ContextStorage::backend_name)**: a short constant
//! name for logs and messages (`"memory"`, `"redis"`, `"postgres"`).
//!
//! ## `RawGuard` and `Lease`
//!
//! A backend's `lock_raw` returns [`RawGuard::Remote`] `{ value, version,
//! lease }`: the decoded value (`ty.decode`), the version it was committed
//! at, and a boxed [`Lease`] that owns the lock. The crate wraps it into a
//! [`ContextGuard<T>`](crate::ContextGuard) that works on a private copy;
//! [`RawGuard::Local`] is for guards that are already typed (the in-memory
//! engine's), which only a decorator forwarding to the engine has.
//!
//! A `Lease` promises:
//!
//! * **Commit is fenced by the lock.**
//!   [`commit`](crate::Lease::commit)`(self, value)` writes `value` (a `&T`) as
//!   the next version **only if the lock is still this lease's**, in the
//!   same atomic step as the write (compare the lease token in the script
//!   or the transaction), then releases the lock and returns the version.
//!   A lease that expired or was taken over gets `LeaseLost` and writes
//!   nothing, so a paused or partitioned holder never overwrites a newer
//!   value. It encodes `value` **before returning** the future (the future
//!   owns everything it needs; `value` is not borrowed past the call); a
//!   value that does not encode is a `Codec` error, writes nothing and
//!   releases the lock.
//! * **Release is prompt and never blocks.** Dropping a lease is the
//!   release: `Drop` starts giving the lock back at once (spawn the
//!   release script or `ROLLBACK`, or release in place if that cannot
//!   block) and returns. [`release`](crate::Lease::release) (a rollback) may keep
//!   its default, `drop(self)`. Waiters must learn of the release by a
//!   notification, not by noticing an expiry. Never rely on a lease
//!   running out while the server is reachable.
//! * **Nothing is released twice.** `commit` takes what the lease holds
//!   before it starts (a commit ends the lock); a commit future dropped
//!   before it finishes releases the lock as a drop does; a commit whose
//!   outcome is unknown (the reply was lost) gives the lock up as a drop
//!   does.
//! * **A lock cannot outlive its holder.** If the release cannot run (the
//!   runtime is gone, the server unreachable), the server-side lock must
//!   still end on its own: a lease expiry, a closed connection.
//! * [`lost`](crate::Lease::lost) resolves once the backend knows the lock is
//!   gone (an expired lease), so a holder can stop early. Its default
//!   never resolves, for locks that cannot be lost.
//!
//! ## Watching: `watch_raw` and `RawWatch`
//!
//! Optional. [`watch_raw`](crate::ContextStorage::watch_raw)`(ty, id)` returns
//! the committed version now (a `RawSnapshot`) and a [`RawWatch`]; the
//! default fails with a `Backend` error saying the backend cannot watch.
//! One that implements it must:
//!
//! * be `NotFound` for an absent key;
//! * subscribe to changes **before** reading the first version (or do both
//!   in one step), so that a commit in between is reported, not lost;
//! * from [`poll_changed`](crate::RawWatch::poll_changed)`(cx, after)`, return
//!   only a version `> after`, and then the **newest** committed one (a
//!   slow watcher skips versions, never gets an old one); otherwise
//!   register `cx`'s waker and return `Pending`, waking it when a newer
//!   version may exist (spurious wake-ups are fine);
//! * once the context is deleted, return `NotFound`, and keep doing so: a
//!   context created again under the key is another context and is not
//!   followed (tell them apart by a creation stamp, or by having seen the
//!   delete);
//! * report an outage as `Backend`, and recover when polled again, so a
//!   commit made meanwhile is reported;
//! * never hold the key's lock or otherwise delay writers; free what it
//!   registered when dropped.
//!
//! Rollbacks and refused conditional writes commit nothing, so they must
//! not produce a new version for watchers.
//!
//! ## Cancellation
//!
//! Any future a backend returns may be dropped at any `.await` (a timeout,
//! `select!`, an aborted task). Dropping one must leave no lock taken, no
//! waiter queued, no wake-up swallowed (a waiter that was handed a wake-up
//! passes it on), and no half-made write: a remote call already sent may
//! still be applied, but whole. In practice: take the lock as the last
//! step of `lock_raw` (nothing awaited after it), or arm a guard whose
//! `Drop` releases it; register for wake-ups in a way that a dropped
//! waiter unregisters.
//!
//! ## What a backend may weaken
//!
//! The guarantees of the crate (`DESIGN.md` §2, the crate docs'
//! *Guarantees*) hold on every backend, except where a backend cannot give
//! one; then the difference must be **documented** (in the backend's docs,
//! as `docs::redis` and `docs::postgres` do) and, where it can be, tested.
//!
//! | Guarantee | A backend may | A backend must not |
//! |---|---|---|
//! | 1. Typed keys | key by `kind()`: two types that share a kind share contexts remotely (the user's choice of `kind()`) | mix up types of different kinds |
//! | 2. Exclusive mutation | hold the lock as an expiring lease; a holder whose lease ended gets `LeaseLost` at commit | let two holders commit, or commit under a holder |
//! | 3. All-or-nothing commit | — | publish part of a commit, or anything from a dropped guard |
//! | 4. Snapshots never wait, consistent, zero-copy | cost a round trip and a decode (a copy): "never wait" means never for the lock holder | wait for the lock holder, or show a draft or a half-written value |
//! | 5. Versions | — | reuse a version, go backwards, or return 0 |
//! | 6. Fair, parking, cancel-safe waiting | give weaker fairness (say which: FIFO per process, none) | spin in a tight loop, or lose a wake-up or a lock on cancel |
//! | 7. Bounded memory | keep a small version floor per kind after deletes | keep a lock or a value per deleted context |
//! | 8. Clear errors, never a panic | map its outages to `Backend`, its corrupt data to `Codec` | panic on anything the server returns |
//! | 9. Same semantics | skip the watch cases when it cannot watch | skip any other case |
//!
//! The in-memory engine gives everything. Redis leases expire (a holder
//! that stalls past the lease loses the lock and gets `LeaseLost`), and
//! waiters queue FIFO per process, woken across processes by pub/sub;
//! Postgres snapshots read committed rows (MVCC), and a dead connection
//! ends its lock.
//!
//! ## Testing with the conformance kit
//!
//! ```toml
//! [dev-dependencies]
//! ctxstore = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! ```ignore
//! // tests/conformance.rs
//! async fn make() -> std::sync::Arc<dyn ctxstore::ContextStorage> {
//!     // A fresh, isolated store per case (its own namespace, table, ...):
//!     // cases run in parallel.
//!     std::sync::Arc::new(MyStore::connect_fresh().await)
//! }
//!
//! ctxstore::conformance_tests!(make); // one #[test] per case
//! // For a backend without watch_raw:
//! // ctxstore::conformance_tests!(make, ctxstore::conformance::Config::new().skip_watch());
//! ```
//!
//! The 43 cases cover every rule above that a test can see from outside:
//! typed keys, not-found messages, commit and rollback, a snapshot during
//! a held lock, `WouldBlock` and `Timeout`, writers waiting for a holder,
//! versions across delete and re-create, cancelled waiters, exact counts
//! under contention, delete and re-create with tasks queued, conditional
//! writes and their races, and the watch rules. Each case is bounded in
//! time (120 s by default): a backend that hangs fails that case.
//!
//! [`ContextStorage`]: crate::ContextStorage
//! [`ContextStorageExt`]: crate::ContextStorageExt
//! [`ContextGuard`]: crate::ContextGuard
//! [`Snapshot`]: crate::Snapshot
//! [`ContextWatch`]: crate::ContextWatch
//! [`ContextType`]: crate::ContextType
//! [`BoxFuture`]: crate::BoxFuture
//! [`BoxError`]: crate::BoxError
//! [`ErasedValue`]: crate::ErasedValue
//! [`RawSnapshot`]: crate::RawSnapshot
//! [`RawGuard::Remote`]: crate::RawGuard::Remote
//! [`RawGuard::Local`]: crate::RawGuard::Local
//! [`Lease`]: crate::Lease
//! [`RawWatch`]: crate::RawWatch
//! [`Wait::Forever`]: crate::Wait::Forever
//! [`Wait::Never`]: crate::Wait::Never
//! [`Wait::Until`]: crate::Wait::Until
//! [`InMemoryContextStorage`]: crate::InMemoryContextStorage
//! [`Context::kind`]: crate::Context::kind
//! [`ContextType::type_id`]: crate::ContextType::type_id
//! [`ContextType::encode`]: crate::ContextType::encode
//! [`ContextType::decode`]: crate::ContextType::decode
//! [`ContextType::decode_snapshot`]: crate::ContextType::decode_snapshot
//! [`ContextType::snapshot_of`]: crate::ContextType::snapshot_of
//! [`ContextType::not_found`]: crate::ContextType::not_found
//! [`ContextType::would_block`]: crate::ContextType::would_block
//! [`ContextType::timeout`]: crate::ContextType::timeout
//! [`ContextType::conflict`]: crate::ContextType::conflict
//! [`ContextType::lease_lost`]: crate::ContextType::lease_lost
//! [`ContextType::codec_error`]: crate::ContextType::codec_error
//! [`ContextType::backend_error`]: crate::ContextType::backend_error
//! [`ContextStorage::store_raw`]: crate::ContextStorage::store_raw
//! [`Lease::commit`]: crate::Lease::commit
//! [`Lease::release`]: crate::Lease::release
//! [`Lease::lost`]: crate::Lease::lost
//! [`RawWatch::poll_changed`]: crate::RawWatch::poll_changed
