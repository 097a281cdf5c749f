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

/// What went wrong, and with which context.
///
/// Every variant carries the context type's [`kind`](crate::Context::kind)
/// and Rust type name and, where there is one, the context id. Messages use
/// the type's short name (`no JobContext context known for 6f1c…`), like the
/// Python original.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ContextError {
    /// No context of this type is stored under this id.
    NotFound {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name (`std::any::type_name`).
        type_name: &'static str,
        /// The id that was looked up.
        id: Uuid,
    },
    /// The lock was not acquired within the given time.
    Timeout {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name.
        type_name: &'static str,
        /// The context's id.
        id: Uuid,
        /// How long the caller was willing to wait.
        waited: Duration,
    },
    /// `try_get_context` found the context locked by another holder.
    WouldBlock {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name.
        type_name: &'static str,
        /// The context's id.
        id: Uuid,
    },
    /// The committed version was not the one the writer started from.
    Conflict {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name.
        type_name: &'static str,
        /// The context's id.
        id: Uuid,
        /// The version the writer read.
        expected: u64,
        /// The version found at commit (0 if the context was gone).
        found: u64,
    },
    /// A remote lease expired (or was taken over) before commit; the write
    /// was not applied.
    LeaseLost {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name.
        type_name: &'static str,
        /// The context's id.
        id: Uuid,
    },
    /// A value could not be encoded for, or decoded from, a backend.
    Codec {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name.
        type_name: &'static str,
        /// The context's id, when the failure concerns one context.
        id: Option<Uuid>,
        /// The codec's error.
        source: BoxError,
    },
    /// The backend failed (connection lost, server error, pool timeout...).
    Backend {
        /// The context type's `kind()`.
        kind: &'static str,
        /// The Rust type name.
        type_name: &'static str,
        /// The context's id, when the failure concerns one context.
        id: Option<Uuid>,
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
        let name = short_type_name(self.type_name());
        match self {
            Self::NotFound { id, .. } => write!(f, "no {name} context known for {id}"),
            Self::Timeout { id, waited, .. } => {
                write!(f, "timed out after {waited:?} waiting for the lock on {name} context {id}")
            }
            Self::WouldBlock { id, .. } => {
                write!(f, "{name} context {id} is locked by another holder")
            }
            Self::Conflict { id, expected, found, .. } => write!(
                f,
                "version conflict on {name} context {id}: expected version {expected}, found {found}"
            ),
            Self::LeaseLost { id, .. } => write!(
                f,
                "lease on {name} context {id} was lost before commit; the write was not applied"
            ),
            Self::Codec { kind, id, source, .. } => write!(
                f,
                "cannot encode or decode {name} {} (kind `{kind}`): {source}",
                IdOrAll(*id)
            ),
            Self::Backend { kind, id, source, .. } => write!(
                f,
                "backend error on {name} {} (kind `{kind}`): {source}",
                IdOrAll(*id)
            ),
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
    /// The context type's [`kind`](crate::Context::kind).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { kind, .. }
            | Self::Timeout { kind, .. }
            | Self::WouldBlock { kind, .. }
            | Self::Conflict { kind, .. }
            | Self::LeaseLost { kind, .. }
            | Self::Codec { kind, .. }
            | Self::Backend { kind, .. } => kind,
        }
    }

    /// The context type's Rust type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::NotFound { type_name, .. }
            | Self::Timeout { type_name, .. }
            | Self::WouldBlock { type_name, .. }
            | Self::Conflict { type_name, .. }
            | Self::LeaseLost { type_name, .. }
            | Self::Codec { type_name, .. }
            | Self::Backend { type_name, .. } => type_name,
        }
    }

    /// The context id, where the error concerns one context.
    pub fn id(&self) -> Option<Uuid> {
        match self {
            Self::NotFound { id, .. }
            | Self::Timeout { id, .. }
            | Self::WouldBlock { id, .. }
            | Self::Conflict { id, .. }
            | Self::LeaseLost { id, .. } => Some(*id),
            Self::Codec { id, .. } | Self::Backend { id, .. } => *id,
        }
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
