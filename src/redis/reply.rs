//! Parsing the scripts' replies (`{code, ...}` arrays) into results.

use redis::Value;
use uuid::Uuid;

use super::{Acquired, Step};
use crate::context::ContextType;
use crate::error::message;
use crate::{ContextError, Result};

pub(super) fn bad_reply(ty: &'static ContextType, id: Uuid, what: &Value) -> ContextError {
    ty.backend_message(
        Some(id),
        format!("unexpected reply from a ctxstore script: {what:?}"),
    )
}

pub(super) fn reply_items<'v>(
    ty: &'static ContextType,
    id: Uuid,
    v: &'v Value,
) -> Result<(i64, &'v [Value])> {
    if let Value::Array(items) = v {
        if let Some(Value::Int(code)) = items.first() {
            return Ok((*code, &items[1..]));
        }
    }
    Err(bad_reply(ty, id, v))
}

pub(super) fn version_of(ty: &'static ContextType, id: Uuid, v: Option<&Value>) -> Result<u64> {
    let parsed = match v {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
        Some(Value::SimpleString(s)) => s.parse().ok(),
        Some(Value::Int(i)) => u64::try_from(*i).ok(),
        _ => None,
    };
    parsed.ok_or_else(|| {
        ty.codec_error(
            Some(id),
            message(format!("stored version is not a number: {v:?}")),
        )
    })
}

pub(super) fn held_ttl(rest: &[Value]) -> i64 {
    match rest.first() {
        Some(Value::Int(ms)) => *ms,
        _ => -1,
    }
}

pub(super) fn parse_acquire(
    ty: &'static ContextType,
    id: Uuid,
    (data, floor): (&str, &str),
    v: Value,
) -> Result<Step<Acquired>> {
    let (code, rest) = reply_items(ty, id, &v)?;
    match code {
        1 => {
            let version = version_of(ty, id, rest.first())?;
            let value = match rest.get(1) {
                Some(Value::BulkString(b)) => b.clone(),
                _ => Vec::new(),
            };
            Ok(Step::Done(Acquired {
                version,
                value,
                release: None,
            }))
        }
        0 => Ok(Step::Held(held_ttl(rest))),
        -1 => Ok(Step::Missing),
        -3 => Err(corrupt(ty, id, (data, floor), rest)),
        _ => Err(bad_reply(ty, id, &v)),
    }
}

/// The `Codec` error for a script's `{-3, what, found}`: a stored number
/// (the context's version, or its kind's floor) that is not a number.
pub(super) fn corrupt(
    ty: &'static ContextType,
    id: Uuid,
    (data, floor): (&str, &str),
    rest: &[Value],
) -> ContextError {
    let text = |v: Option<&Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    let found = text(rest.get(1));
    let detail = if text(rest.first()) == "floor" {
        format!(
            "the version floor of kind {:?} (hash {floor}, field {:?}) is not a number: {found:?}; \
             nothing was written. Set it to a number at least as high as any version of the kind",
            ty.kind(),
            ty.kind()
        )
    } else {
        format!(
            "the stored version of {data} is not a number: {found:?}; nothing was written \
             (store_context over it repairs it)"
        )
    };
    ty.codec_error(Some(id), message(detail))
}
