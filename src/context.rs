//! The [`Context`] trait and the per-type descriptor ([`ContextType`]) that
//! lets type-erased backends encode, decode and name values without generics.

use std::any::{Any, TypeId};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::error::{boxed, message, BoxError, ContextError, ContextKey};
use crate::snapshot::Versioned;
use crate::storage::{ErasedValue, MemOps, RawSnapshot};

/// A value that can be stored as a context.
///
/// Implement it with an empty `impl`; serde is required so that every
/// backend can hold every context (the in-memory engine never serializes).
///
/// ```
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct JobContext { job_name: String, processed: u64 }
///
/// impl ctxstore::Context for JobContext {
///     // Remote backends key values by `kind()`: give it a stable name so a
///     // module move does not orphan stored contexts.
///     fn kind() -> &'static str { "job" }
/// }
/// ```
pub trait Context: Clone + Send + Sync + Serialize + DeserializeOwned + 'static {
    /// The name this type is stored under by remote backends. Defaults to
    /// the full type path (`std::any::type_name`); override it with a stable
    /// name for anything stored outside the process. In memory, types are
    /// told apart by `TypeId`, so two types sharing a kind never mix there.
    fn kind() -> &'static str {
        std::any::type_name::<Self>()
    }
}

/// The type-erased description of one [`Context`] type: its names and the
/// functions a backend needs to handle its values without knowing `T`.
///
/// Obtained with [`ContextType::of`]; one `'static` instance per type.
pub struct ContextType {
    type_id: fn() -> TypeId,
    kind: fn() -> &'static str,
    type_name: fn() -> &'static str,
    encode: fn(&(dyn Any + Send + Sync)) -> Result<Vec<u8>, BoxError>,
    decode: fn(&[u8]) -> Result<ErasedValue, BoxError>,
    decode_snapshot: fn(&[u8], u64) -> Result<RawSnapshot, BoxError>,
    snapshot_of: fn(ErasedValue, u64) -> Option<RawSnapshot>,
    pub(crate) mem: MemOps,
}

struct Describe<T>(std::marker::PhantomData<T>);

impl<T: Context> Describe<T> {
    const TYPE: &'static ContextType = &ContextType {
        type_id: TypeId::of::<T>,
        kind: T::kind,
        type_name: std::any::type_name::<T>,
        encode: encode::<T>,
        decode: decode::<T>,
        decode_snapshot: decode_snapshot::<T>,
        snapshot_of: snapshot_of::<T>,
        mem: MemOps::of::<T>(),
    };
}

fn encode<T: Context>(value: &(dyn Any + Send + Sync)) -> Result<Vec<u8>, BoxError> {
    match value.downcast_ref::<T>() {
        Some(v) => {
            // What JSON cannot carry back (NaN, infinities, `\0`) is
            // refused here, before any backend stores it.
            crate::portable::check(v).map_err(boxed)?;
            serde_json::to_vec(v).map_err(boxed)
        }
        None => Err(message(format!(
            "value is not a {} (type confusion between backend and caller)",
            std::any::type_name::<T>()
        ))),
    }
}

fn decode<T: Context>(bytes: &[u8]) -> Result<ErasedValue, BoxError> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) => Ok(Box::new(v)),
        Err(e) => Err(boxed(e)),
    }
}

fn decode_snapshot<T: Context>(bytes: &[u8], version: u64) -> Result<RawSnapshot, BoxError> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(value) => Ok(RawSnapshot::new(Versioned { version, value })),
        Err(e) => Err(boxed(e)),
    }
}

fn snapshot_of<T: Context>(value: ErasedValue, version: u64) -> Option<RawSnapshot> {
    let value = *value.downcast::<T>().ok()?;
    Some(RawSnapshot::new(Versioned { version, value }))
}

impl ContextType {
    /// The descriptor of `T`.
    #[inline]
    pub fn of<T: Context>() -> &'static ContextType {
        Describe::<T>::TYPE
    }

    /// `T::kind()`: the name remote backends store the type under.
    pub fn kind(&self) -> &'static str {
        (self.kind)()
    }

    /// The Rust type name (`std::any::type_name::<T>()`).
    pub fn type_name(&self) -> &'static str {
        (self.type_name)()
    }

    /// The `TypeId` of `T`.
    pub fn type_id(&self) -> TypeId {
        (self.type_id)()
    }

    /// Serializes a value of this type (JSON). A value of another type gives
    /// a `Codec` error, and so does one JSON cannot carry back: a
    /// non-finite float (NaN, ±infinity; serde_json would write `null`) or a
    /// string, char or map key containing `\0` (Postgres' `jsonb` cannot
    /// hold it), so that every backend refuses the same values before
    /// storing anything.
    pub fn encode(
        &self,
        id: Option<Uuid>,
        value: &(dyn Any + Send + Sync),
    ) -> crate::Result<Vec<u8>> {
        (self.encode)(value).map_err(|source| self.codec_error(id, source))
    }

    /// Deserializes a value of this type; bad bytes give a `Codec` error
    /// naming the key, never a panic.
    pub fn decode(&self, id: Option<Uuid>, bytes: &[u8]) -> crate::Result<ErasedValue> {
        (self.decode)(bytes).map_err(|source| self.codec_error(id, source))
    }

    /// Deserializes a committed value into a snapshot at `version`.
    pub fn decode_snapshot(
        &self,
        id: Uuid,
        bytes: &[u8],
        version: u64,
    ) -> crate::Result<RawSnapshot> {
        (self.decode_snapshot)(bytes, version).map_err(|source| self.codec_error(Some(id), source))
    }

    /// Wraps an already decoded value of this type as a snapshot at
    /// `version` (`None` if it is not a value of this type).
    pub fn snapshot_of(&self, value: ErasedValue, version: u64) -> Option<RawSnapshot> {
        (self.snapshot_of)(value, version)
    }

    /// The [`ContextKey`] of this type's context `id`, or of the type as a
    /// whole (`None`).
    pub fn key(&self, id: Option<Uuid>) -> ContextKey {
        ContextKey::new(self, id)
    }

    /// `ContextError::NotFound` for this type and `id`.
    pub fn not_found(&self, id: Uuid) -> ContextError {
        ContextError::NotFound {
            key: ContextKey::new(self, Some(id)),
        }
    }

    /// `ContextError::Codec` for this type.
    pub fn codec_error(&self, id: Option<Uuid>, source: BoxError) -> ContextError {
        ContextError::Codec {
            key: ContextKey::new(self, id),
            source,
        }
    }

    /// `ContextError::Backend` for this type.
    pub fn backend_error(&self, id: Option<Uuid>, source: impl Into<BoxError>) -> ContextError {
        ContextError::Backend {
            key: ContextKey::new(self, id),
            source: source.into(),
        }
    }

    /// `ContextError::Backend` for this type with a plain message as its
    /// source (for failures that carry no driver error of their own).
    pub fn backend_message(&self, id: Option<Uuid>, message: impl Into<String>) -> ContextError {
        self.backend_error(id, crate::error::message(message))
    }

    /// `ContextError::WouldBlock` for this type and `id`.
    pub fn would_block(&self, id: Uuid) -> ContextError {
        ContextError::WouldBlock {
            key: ContextKey::new(self, Some(id)),
        }
    }

    /// `ContextError::Timeout` for this type and `id`.
    pub fn timeout(&self, id: Uuid, waited: std::time::Duration) -> ContextError {
        ContextError::Timeout {
            key: ContextKey::new(self, Some(id)),
            waited,
        }
    }

    /// `ContextError::LeaseLost` for this type and `id`.
    pub fn lease_lost(&self, id: Uuid) -> ContextError {
        ContextError::LeaseLost {
            key: ContextKey::new(self, Some(id)),
        }
    }

    /// `ContextError::Conflict` for this type and `id`.
    pub fn conflict(&self, id: Uuid, expected: u64, found: u64) -> ContextError {
        ContextError::Conflict {
            key: ContextKey::new(self, Some(id)),
            expected,
            found,
        }
    }
}

impl fmt::Debug for ContextType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextType")
            .field("kind", &self.kind())
            .field("type_name", &self.type_name())
            .finish()
    }
}
