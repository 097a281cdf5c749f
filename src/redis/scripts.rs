//! The Lua scripts, one file each in `scripts/`, loaded with `include_str!`.
//!
//! Each file opens with what it takes (`KEYS`, `ARGV`) and what it returns.
//! `num.lua` is prepended to every script that reads a stored number: every
//! script validates every number it reads *before its first write* (Lua
//! scripts are not rolled back) and otherwise refuses with
//! `{-3, what, found}`, which the client turns into a `Codec` error naming
//! the key.

use std::sync::LazyLock;

use redis::Script;

/// `num.lua` followed by the script at `$path`.
macro_rules! with_num {
    ($path:literal) => {
        concat!(include_str!("scripts/num.lua"), include_str!($path))
    };
}

/// Takes the lease if nobody holds it, reading value and version.
pub(super) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_num!("scripts/acquire.lua")));

/// `store_context`: writes unless a lease is held; repairs a corrupt version.
pub(super) static STORE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_num!("scripts/store.lua")));

/// `delete_context`: deletes unless a lease is held; raises the kind's floor.
pub(super) static DELETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_num!("scripts/delete.lua")));

/// `store_context_if`: compares the version, then writes, unless a lease
/// is held.
pub(super) static STORE_IF: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_num!("scripts/store_if.lua")));

/// `delete_context_if`: compares the version, then deletes (raising the
/// kind's floor), unless a lease is held.
pub(super) static DELETE_IF: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_num!("scripts/delete_if.lua")));

/// A guard's commit: token and version checked, then write, release, wake.
pub(super) static COMMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(with_num!("scripts/commit.lua")));

/// Gives a lease back (token-checked) and wakes waiters.
pub(super) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));

/// A watch's read: marks the key watched, reads value, version and
/// creation stamp.
pub(super) static WATCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/watch.lua")));

/// Extends a lease that is still ours (never re-creates one).
pub(super) static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/renew.lua")));

#[cfg(test)]
mod tests {
    use super::*;

    /// Every script compiles on the server: `SCRIPT LOAD` parses it (and
    /// caches it) without running it. Needs the Redis at
    /// `CTXSTORE_REDIS_URL` (default `redis://127.0.0.1:6379`).
    #[tokio::test]
    async fn every_script_loads() {
        let url = std::env::var("CTXSTORE_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let client = redis::Client::open(url).expect("a valid Redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis must be running for the redis tests (see CTXSTORE_REDIS_URL)");
        for (name, script) in [
            ("acquire", &ACQUIRE),
            ("store", &STORE),
            ("delete", &DELETE),
            ("store_if", &STORE_IF),
            ("delete_if", &DELETE_IF),
            ("commit", &COMMIT),
            ("release", &RELEASE),
            ("renew", &RENEW),
            ("watch", &WATCH),
        ] {
            let sha: String = script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{name}.lua does not load: {e}"));
            assert_eq!(sha, script.get_hash(), "{name}.lua");
        }
    }
}
