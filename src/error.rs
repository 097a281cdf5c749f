//! [`ContextError`]: every failure names the context it happened to.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

/// A shareable, type-erased error cause (from serde, a driver, ...).
pub type BoxError = Arc<dyn StdError + Send + Sync + 'static>;

/// Wraps an error as a [`BoxError`].
pub(crate) fn boxed<E: StdError + Send + Sync + 'static>(e: E) -> BoxError {
    Arc::new(e)
}

/// A [`BoxError`] carrying only a message.
pub(crate) fn message(msg: impl Into<String>) -> BoxError {
    Arc::from(Box::<dyn StdError + Send + Sync>::from(msg.into()))
}

/// The `Result` of every fallible ctxstore operation.
pub type Result<T, E = ContextError> = std::result::Result<T, E>;

/// Which context an error concerns: its type (by [`kind`](crate::Context::kind)
/// and Rust type name) and, where the error concerns one context, its id.
/// Every [`ContextError`] carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ContextKey {
    /// The context type's `kind()`.
    pub kind: &'static str,
    /// The Rust type name (`std::any::type_name`).
    pub type_name: &'static str,
    /// The context's id; `None` when the failure concerns the type as a
    /// whole (listing its ids, a backend error before any key).
    pub id: Option<Uuid>,
}

impl ContextKey {
    /// The key of a backend's own failure that concerns no context type
    /// (a refused connection or schema at setup): `kind` names the backend.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub(crate) fn of_backend(kind: &'static str, type_name: &'static str) -> Self {
        Self {
            kind,
            type_name,
            id: None,
        }
    }

    /// The key of a context of `ty`, or of the type as a whole (`id: None`).
    pub fn new(ty: &crate::ContextType, id: Option<Uuid>) -> Self {
        Self {
            kind: ty.kind(),
            type_name: ty.type_name(),
            id,
        }
    }
}

/// What went wrong, and with which context.
///
/// Every variant carries the [`ContextKey`] it happened to: the context
/// type's [`kind`](crate::Context::kind) and Rust type name and, where
/// there is one, the context id. Messages use the type's short name (`no
/// JobContext context known for 6f1c…`), like the Python original.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ContextError {
    /// No context of this type is stored under this id.
    NotFound {
        /// The context that was looked up.
        key: ContextKey,
    },
    /// The lock was not acquired within the given time.
    Timeout {
        /// The context.
        key: ContextKey,
        /// How long the caller was willing to wait.
        waited: Duration,
    },
    /// `try_get_context` found the context locked by another holder.
    WouldBlock {
        /// The context.
        key: ContextKey,
    },
    /// The committed version was not the one the writer expected (a
    /// conditional write, or a commit whose base moved).
    Conflict {
        /// The context.
        key: ContextKey,
        /// The version the writer expected (0: that no context exists).
        expected: u64,
        /// The committed version found (0 if the context was gone).
        found: u64,
    },
    /// A remote lease expired (or was taken over) before commit; the write
    /// was not applied.
    LeaseLost {
        /// The context.
        key: ContextKey,
    },
    /// A value could not be encoded for, or decoded from, a backend.
    Codec {
        /// The context, or its type when the failure concerns no one id.
        key: ContextKey,
        /// The codec's error.
        source: BoxError,
    },
    /// The backend failed (connection lost, server error, pool timeout...).
    Backend {
        /// The context, or its type when the failure concerns no one id.
        key: ContextKey,
        /// The driver's error.
        source: BoxError,
    },
}

/// `JobContext` for `my_app::jobs::JobContext`, `Wrapper<Inner>` for
/// `a::Wrapper<b::Inner>`: the type's name without module paths.
pub(crate) fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment_start = 0;
    for (i, c) in full.char_indices() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            continue;
        }
        push_last_segment(&mut out, &full[segment_start..i]);
        out.push(c);
        segment_start = i + c.len_utf8();
    }
    push_last_segment(&mut out, &full[segment_start..]);
    out
}

fn push_last_segment(out: &mut String, path: &str) {
    out.push_str(path.rsplit("::").next().unwrap_or(path));
}

struct IdOrAll(Option<Uuid>);

impl fmt::Display for IdOrAll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "context {id}"),
            None => f.write_str("contexts"),
        }
    }
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key();
        let name = short_type_name(key.type_name);
        let (kind, id) = (key.kind, IdOrAll(key.id));
        match self {
            Self::NotFound { .. } => write!(f, "no {name} context known for {}", Bare(key.id)),
            Self::Timeout { waited, .. } => {
                write!(
                    f,
                    "timed out after {waited:?} waiting for the lock on {name} {id}"
                )
            }
            Self::WouldBlock { .. } => write!(f, "{name} {id} is locked by another holder"),
            Self::Conflict {
                expected, found, ..
            } => write!(
                f,
                "version conflict on {name} {id}: expected version {expected}, found {found}"
            ),
            Self::LeaseLost { .. } => write!(
                f,
                "lease on {name} {id} was lost before commit; the write was not applied"
            ),
            Self::Codec { source, .. } => write!(
                f,
                "cannot encode or decode {name} {id} (kind `{kind}`): {source}"
            ),
            Self::Backend { source, .. } => {
                write!(f, "backend error on {name} {id} (kind `{kind}`): {source}")
            }
        }
    }
}

/// An id, or `?` where a variant that always has one was built without.
struct Bare(Option<Uuid>);

impl fmt::Display for Bare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("?"),
        }
    }
}

impl StdError for ContextError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Codec { source, .. } | Self::Backend { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

impl ContextError {
    /// The context this error concerns.
    pub fn key(&self) -> &ContextKey {
        match self {
            Self::NotFound { key }
            | Self::Timeout { key, .. }
            | Self::WouldBlock { key }
            | Self::Conflict { key, .. }
            | Self::LeaseLost { key }
            | Self::Codec { key, .. }
            | Self::Backend { key, .. } => key,
        }
    }

    /// The context type's [`kind`](crate::Context::kind).
    pub fn kind(&self) -> &'static str {
        self.key().kind
    }

    /// The context type's Rust type name.
    pub fn type_name(&self) -> &'static str {
        self.key().type_name
    }

    /// The context id, where the error concerns one context.
    pub fn id(&self) -> Option<Uuid> {
        self.key().id
    }

    /// `true` for [`ContextError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// `true` for [`ContextError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// `true` for [`ContextError::WouldBlock`].
    pub fn is_would_block(&self) -> bool {
        matches!(self, Self::WouldBlock { .. })
    }

    /// `true` for [`ContextError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }

    /// `true` for [`ContextError::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. })
    }

    /// `true` for [`ContextError::Codec`].
    pub fn is_codec(&self) -> bool {
        matches!(self, Self::Codec { .. })
    }

    /// `true` for [`ContextError::Backend`].
    pub fn is_backend(&self) -> bool {
        matches!(self, Self::Backend { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Job;
    impl crate::Context for Job {
        fn kind() -> &'static str {
            "job"
        }
    }

    #[test]
    fn every_variant_carries_its_key() {
        let ty = crate::ContextType::of::<Job>();
        let id = Uuid::new_v4();
        let errors = [
            ty.not_found(id),
            ty.timeout(id, Duration::from_millis(5)),
            ty.would_block(id),
            ty.conflict(id, 3, 4),
            ty.lease_lost(id),
            ty.codec_error(Some(id), message("bad")),
            ty.backend_error(Some(id), message("down")),
        ];
        for e in &errors {
            assert_eq!(*e.key(), ty.key(Some(id)), "{e:?}");
            assert_eq!((e.kind(), e.id()), ("job", Some(id)));
            assert!(e.type_name().ends_with("Job"));
            let msg = e.to_string();
            assert!(
                msg.contains("Job") && msg.contains(&id.to_string()),
                "{msg}"
            );
        }
        let whole = ty.backend_error(None, message("down"));
        assert_eq!(whole.id(), None);
        assert!(whole.to_string().contains("Job contexts"), "{whole}");
    }

    #[test]
    fn short_names_strip_every_path() {
        assert_eq!(short_type_name("my_app::jobs::JobContext"), "JobContext");
        assert_eq!(short_type_name("JobContext"), "JobContext");
        assert_eq!(
            short_type_name("a::Wrapper<b::c::Inner, u8>"),
            "Wrapper<Inner, u8>"
        );
        assert_eq!(
            short_type_name("alloc::vec::Vec<(a::X, [b::Y; 2])>"),
            "Vec<(X, [Y; 2])>"
        );
    }
}
