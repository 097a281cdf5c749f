//! Arbitrary bytes as a stored value, through every path that decodes one:
//! `ContextType::decode` and `decode_snapshot` (the codec remote backends
//! use), and the typed API over a minimal remote backend that keeps raw
//! bytes (`get_context_snapshot`, `get_context` -> `RemoteGuard` -> commit,
//! which re-encodes). Undecodable bytes must give `ContextError::Codec`
//! naming the type and the key, never a panic; decodable ones must
//! round-trip, except those `encode` refuses (a `\u0000` in a string),
//! whose commit is a Codec error that writes nothing.
#![no_main]

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskCx, Poll, Waker};

use ctxstore::{
    BoxFuture, Context, ContextError, ContextStorage, ContextStorageExt, ContextType, ErasedValue,
    Lease, RawGuard, RawSnapshot, Result, Uuid, Wait,
};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    name: String,
    processed: u64,
    ratio: f64,
    tags: Vec<String>,
    owner: Option<Uuid>,
    state: State,
    extra: BTreeMap<String, i32>,
    flag: bool,
    initial: char,
    pair: (u8, i64),
}
impl Context for Job {
    fn kind() -> &'static str {
        "fuzz.job"
    }
}

/// Recursive: deep nesting must hit serde_json's recursion limit, not the
/// stack's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum State {
    Idle,
    Running { step: u32 },
    Done(String),
    Failed(Option<Box<State>>),
}
impl Context for State {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum Tagged {
    A { x: u8 },
    B { y: String, z: Vec<i16> },
}
impl Context for Tagged {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Loose {
    N(u64),
    S(String),
    L(Vec<Loose>),
}
impl Context for Loose {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Strict {
    a: u8,
    #[serde(default)]
    b: Option<i8>,
}
impl Context for Strict {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct WithValue {
    v: serde_json::Value,
}
impl Context for WithValue {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct Count(u64);
impl Context for Count {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Marker;
impl Context for Marker {}

// ------------------------------------------------------- a bytes backend

/// What a remote backend keeps for one context: bytes and a version.
#[derive(Default)]
struct Cell {
    bytes: Option<Vec<u8>>,
    version: u64,
}

/// A minimal "remote" backend: one context per type, stored as bytes.
#[derive(Default)]
struct BytesBackend {
    cell: Arc<Mutex<Cell>>,
}

struct BytesLease {
    ty: &'static ContextType,
    id: Uuid,
    cell: Arc<Mutex<Cell>>,
}

impl Lease for BytesLease {
    fn commit(self: Box<Self>, value: &(dyn Any + Send + Sync)) -> BoxFuture<'static, Result<u64>> {
        let encoded = self.ty.encode(Some(self.id), value);
        Box::pin(async move {
            let bytes = encoded?;
            let mut cell = self.cell.lock().unwrap();
            cell.bytes = Some(bytes);
            cell.version += 1;
            Ok(cell.version)
        })
    }

    fn release(self: Box<Self>) {}
}

fn ready<'a, T: Send + 'a>(v: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

impl ContextStorage for BytesBackend {
    fn store_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        let r = ty.encode(Some(id), &*value).map(|bytes| {
            let mut cell = self.cell.lock().unwrap();
            cell.bytes = Some(bytes);
            cell.version += 1;
            cell.version
        });
        ready(r)
    }

    fn lock_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        _wait: Wait,
    ) -> BoxFuture<'_, Result<RawGuard>> {
        let cell = self.cell.lock().unwrap();
        let r = match &cell.bytes {
            None => Err(ty.not_found(id)),
            Some(bytes) => ty.decode(Some(id), bytes).map(|value| RawGuard::Remote {
                value,
                version: cell.version,
                lease: Box::new(BytesLease {
                    ty,
                    id,
                    cell: self.cell.clone(),
                }),
            }),
        };
        ready(r)
    }

    fn snapshot_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
    ) -> BoxFuture<'_, Result<RawSnapshot>> {
        let cell = self.cell.lock().unwrap();
        let r = match &cell.bytes {
            None => Err(ty.not_found(id)),
            Some(bytes) => ty.decode_snapshot(id, bytes, cell.version),
        };
        ready(r)
    }

    fn delete_raw(&self, ty: &'static ContextType, id: Uuid) -> BoxFuture<'_, Result<()>> {
        let mut cell = self.cell.lock().unwrap();
        ready(match cell.bytes.take() {
            Some(_) => Ok(()),
            None => Err(ty.not_found(id)),
        })
    }

    fn store_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
        value: ErasedValue,
    ) -> BoxFuture<'_, Result<u64>> {
        let found = {
            let cell = self.cell.lock().unwrap();
            cell.bytes.as_ref().map(|_| cell.version)
        };
        match found {
            None if expected != 0 => ready(Err(ty.not_found(id))),
            Some(found) if found != expected => ready(Err(ty.conflict(id, expected, found))),
            _ => self.store_raw(ty, id, value),
        }
    }

    fn delete_if_raw(
        &self,
        ty: &'static ContextType,
        id: Uuid,
        expected: u64,
    ) -> BoxFuture<'_, Result<()>> {
        let found = {
            let cell = self.cell.lock().unwrap();
            cell.bytes.as_ref().map(|_| cell.version)
        };
        match found {
            None => ready(Err(ty.not_found(id))),
            Some(found) if found != expected => ready(Err(ty.conflict(id, expected, found))),
            Some(_) => self.delete_raw(ty, id),
        }
    }

    fn contains_raw(&self, _ty: &'static ContextType, _id: Uuid) -> BoxFuture<'_, Result<bool>> {
        ready(Ok(self.cell.lock().unwrap().bytes.is_some()))
    }

    fn ids_raw(&self, _ty: &'static ContextType) -> BoxFuture<'_, Result<Vec<Uuid>>> {
        ready(Ok(Vec::new()))
    }

    fn backend_name(&self) -> &'static str {
        "fuzz-bytes"
    }
}

/// Every future here completes at its first poll.
fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut TaskCx::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the bytes backend never waits"),
    }
}

// ------------------------------------------------------------- the checks

/// Whether `ContextType::encode` takes `v`: it refuses `\0` in strings,
/// chars and map keys (and non-finite floats, which decoding JSON never
/// produces), so a decoded `"\u0000"` cannot be committed back.
fn portable<T: Serialize>(v: &T) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => !s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().all(walk),
            serde_json::Value::Object(m) => m.iter().all(|(k, v)| !k.contains('\0') && walk(v)),
            _ => true,
        }
    }
    serde_json::to_value(v).map_or(true, |v| walk(&v))
}

fn check_codec_error<T: Context>(e: &ContextError, id: Option<Uuid>, path: &str) {
    assert!(e.is_codec(), "{path}: expected a Codec error, got {e}");
    assert_eq!(e.id(), id, "{path}: error names another id: {e}");
    assert_eq!(e.kind(), T::kind(), "{path}: error names another kind: {e}");
    assert_eq!(e.type_name(), std::any::type_name::<T>(), "{path}: {e}");
    let msg = e.to_string();
    match id {
        Some(id) => assert!(msg.contains(&id.to_string()), "{path}: no id in: {msg}"),
        None => assert!(msg.contains("contexts"), "{path}: {msg}"),
    }
    assert!(
        std::error::Error::source(e).is_some(),
        "{path}: no source: {e}"
    );
}

/// Decodes `bytes` as `T` on every path; returns the value if it decodes.
fn check<T: Context + PartialEq + Debug>(bytes: &[u8], id: Uuid, version: u64) {
    let ty = ContextType::of::<T>();

    // The raw codec, with and without an id.
    let direct = ty.decode(Some(id), bytes);
    let anonymous = ty.decode(None, bytes);
    let snap = ty.decode_snapshot(id, bytes, version);
    assert_eq!(
        direct.is_ok(),
        anonymous.is_ok(),
        "decode depends on the id"
    );
    assert_eq!(
        direct.is_ok(),
        snap.is_ok(),
        "decode and decode_snapshot disagree"
    );
    let value: Option<T> = match direct {
        Ok(v) => Some(*v.downcast::<T>().expect("decode gives a value of its type")),
        Err(e) => {
            check_codec_error::<T>(&e, Some(id), "decode");
            check_codec_error::<T>(&anonymous.err().unwrap(), None, "decode(None)");
            check_codec_error::<T>(&snap.err().unwrap(), Some(id), "decode_snapshot");
            None
        }
    };

    // The typed API over a backend that stores these bytes.
    let backend = BytesBackend::default();
    *backend.cell.lock().unwrap() = Cell {
        bytes: Some(bytes.to_vec()),
        version,
    };
    let store: &dyn ContextStorage = &backend;
    match (now(store.get_context_snapshot::<T>(id)), &value) {
        (Ok(s), Some(v)) => {
            assert_eq!(&*s, v, "snapshot");
            assert_eq!(s.version(), version);
        }
        (Err(e), None) => check_codec_error::<T>(&e, Some(id), "get_context_snapshot"),
        (got, want) => panic!("get_context_snapshot gave {got:?}, decode gave {want:?}"),
    }
    match (now(store.get_context::<T>(id)), &value) {
        (Ok(guard), Some(v)) if !portable(v) => {
            // Decodable but refused at write time (`\u0000` in a string):
            // the commit is a Codec error and writes nothing.
            assert_eq!(&*guard, v, "guard");
            let e = now(guard.commit()).expect_err("committing a value with \\0");
            check_codec_error::<T>(&e, Some(id), "commit");
            let cell = backend.cell.lock().unwrap();
            assert_eq!(cell.bytes.as_deref(), Some(bytes), "a refused commit wrote");
            assert_eq!(cell.version, version, "a refused commit bumped the version");
        }
        (Ok(guard), Some(v)) => {
            assert_eq!(&*guard, v, "guard");
            assert_eq!(guard.version(), version);
            // Commit re-encodes; the result must decode to the same value.
            let committed = now(guard.commit()).expect("re-encoding a decoded value");
            assert_eq!(committed, version + 1);
            let again = now(store.get_context_snapshot::<T>(id)).expect("re-encoded bytes decode");
            assert_eq!(&*again, v, "round trip through commit");
        }
        (Err(e), None) => check_codec_error::<T>(&e, Some(id), "get_context"),
        (got, want) => panic!(
            "get_context gave {:?}, decode gave {want:?}",
            got.map(|g| g.version())
        ),
    }

    // Encoding a value of another type is a Codec error too.
    let e = ty.encode(Some(id), &Marker).err();
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<Marker>() {
        check_codec_error::<T>(&e.expect("type confusion"), Some(id), "encode");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first bytes pick the id and version; the rest is the stored value.
    let (head, bytes) = data.split_at(data.len().min(9));
    let id = Uuid::from_u128(u128::from(head.first().copied().unwrap_or(0)));
    let mut v = [0u8; 8];
    v[..head.len().saturating_sub(1)].copy_from_slice(&head[1.min(head.len())..]);
    // Leave room for the commit's `version + 1`.
    let version = u64::from_le_bytes(v) >> 1;
    check::<Job>(bytes, id, version);
    check::<State>(bytes, id, version);
    check::<Tagged>(bytes, id, version);
    check::<Loose>(bytes, id, version);
    check::<Strict>(bytes, id, version);
    check::<WithValue>(bytes, id, version);
    check::<Count>(bytes, id, version);
    check::<Marker>(bytes, id, version);
});
