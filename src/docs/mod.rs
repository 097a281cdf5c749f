//! Design notes, shipped as documentation next to the code.
//!
//! [`backend`] is the contract a [`ContextStorage`](crate::ContextStorage)
//! implementation follows (what each method must and must never do).
//!
//! The backends' notes are the single source of `docs/redis.md` and
//! `docs/postgres.md` (the README summarizes and links to them); each is
//! built with its cargo feature, and always by `cargo doc`.

pub mod backend;
pub mod internals;
#[cfg(any(doc, feature = "postgres"))]
pub mod postgres;
#[cfg(any(doc, feature = "redis"))]
pub mod redis;
