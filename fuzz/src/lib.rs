//! Support for the `ctxstore` fuzz targets.
//!
//! [`model`] is the op-sequence model and [`scenarios`] its hand-written
//! sequences (both shared, by `#[path]`, with `tests/model.rs`, which
//! drives the model with proptest on stable). This crate adds the
//! `arbitrary` glue the fuzz targets use, and [`encode`], its inverse, which
//! turns the scenarios into seeds.

pub mod model;
pub mod scenarios;

use arbitrary::{Arbitrary, Result, Unstructured};

use crate::model::{BlockingOp, Expected, Key, Op, Ty, Via};

fn ty(u: &mut Unstructured<'_>) -> Result<Ty> {
    Ok(if bool::arbitrary(u)? { Ty::B } else { Ty::A })
}

fn key(u: &mut Unstructured<'_>) -> Result<Key> {
    Ok(Key::new(ty(u)?, u8::arbitrary(u)?))
}

fn via(u: &mut Unstructured<'_>) -> Result<Via> {
    Ok(*u.choose(&[Via::Inherent, Via::Dyn, Via::Raw])?)
}

fn task(u: &mut Unstructured<'_>) -> Result<u8> {
    u.int_in_range(0..=model::TASKS - 1)
}

fn expected(u: &mut Unstructured<'_>) -> Result<Expected> {
    Ok(*u.choose(&[
        Expected::Zero,
        Expected::Current,
        Expected::Stale,
        Expected::Next,
    ])?)
}

fn blocking_op(u: &mut Unstructured<'_>) -> Result<BlockingOp> {
    Ok(match u.int_in_range(0u8..=8)? {
        0 => BlockingOp::Store,
        1 => BlockingOp::Get,
        2 => BlockingOp::Update,
        3 => BlockingOp::Delete,
        4 => BlockingOp::Try,
        5 => BlockingOp::Timeout0,
        6 => BlockingOp::StoreIf(expected(u)?),
        7 => BlockingOp::DeleteIf(expected(u)?),
        _ => BlockingOp::Optimistic,
    })
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u.int_in_range(0u8..=19)? {
            0 => Op::Store {
                task: task(u)?,
                key: key(u)?,
                val: u8::arbitrary(u)?,
                via: via(u)?,
            },
            1 => Op::Get {
                task: task(u)?,
                key: key(u)?,
                via: via(u)?,
            },
            2 => Op::GetMax {
                task: task(u)?,
                key: key(u)?,
                via: via(u)?,
            },
            3 => Op::Update {
                task: task(u)?,
                key: key(u)?,
                val: u8::arbitrary(u)?,
                via: via(u)?,
            },
            4 => Op::Delete {
                task: task(u)?,
                key: key(u)?,
                via: via(u)?,
            },
            5 => Op::Try {
                task: task(u)?,
                key: key(u)?,
                via: via(u)?,
            },
            6 => Op::Timeout0 {
                task: task(u)?,
                key: key(u)?,
                via: via(u)?,
            },
            7 => Op::Blocking {
                task: task(u)?,
                key: key(u)?,
                op: blocking_op(u)?,
                val: u8::arbitrary(u)?,
            },
            8 => Op::Poll { task: task(u)? },
            9 => Op::Drop { task: task(u)? },
            10 => Op::Mutate {
                task: task(u)?,
                val: u8::arbitrary(u)?,
            },
            11 => Op::Read { task: task(u)? },
            12 => Op::Commit {
                task: task(u)?,
                blocking: bool::arbitrary(u)?,
            },
            13 => Op::Rollback { task: task(u)? },
            14 => Op::Snapshot {
                key: key(u)?,
                via: via(u)?,
                keep: bool::arbitrary(u)?,
            },
            15 => Op::Contains {
                key: key(u)?,
                via: via(u)?,
            },
            16 => Op::Ids {
                ty: ty(u)?,
                via: via(u)?,
            },
            17 => Op::StoreIf {
                task: task(u)?,
                key: key(u)?,
                val: u8::arbitrary(u)?,
                expected: expected(u)?,
            },
            18 => Op::DeleteIf {
                task: task(u)?,
                key: key(u)?,
                expected: expected(u)?,
            },
            _ => Op::Optimistic {
                task: task(u)?,
                key: key(u)?,
                val: u8::arbitrary(u)?,
            },
        })
    }
}

/// The bytes that `Vec<Op>::arbitrary_take_rest` (what `fuzz_target!`
/// calls) decodes into `ops`: for each op a "keep going" byte, the tag and
/// the fields in the order [`Op::arbitrary`] reads them, then a stop byte.
/// Fields must already be in range (`task < TASKS`, `key.id < IDS`).
pub fn encode(ops: &[Op]) -> Vec<u8> {
    fn key(out: &mut Vec<u8>, k: Key) {
        out.extend([u8::from(k.ty == Ty::B), k.id]);
    }
    fn via(v: Via) -> u8 {
        match v {
            Via::Inherent => 0,
            Via::Dyn => 1,
            Via::Raw => 2,
        }
    }
    fn expected(e: Expected) -> u8 {
        match e {
            Expected::Zero => 0,
            Expected::Current => 1,
            Expected::Stale => 2,
            Expected::Next => 3,
        }
    }
    let mut out = Vec::new();
    for op in ops {
        out.push(1);
        match *op {
            Op::Store {
                task,
                key: k,
                val,
                via: v,
            } => {
                out.extend([0, task]);
                key(&mut out, k);
                out.extend([val, via(v)]);
            }
            Op::Get {
                task,
                key: k,
                via: v,
            }
            | Op::GetMax {
                task,
                key: k,
                via: v,
            }
            | Op::Delete {
                task,
                key: k,
                via: v,
            }
            | Op::Try {
                task,
                key: k,
                via: v,
            }
            | Op::Timeout0 {
                task,
                key: k,
                via: v,
            } => {
                let tag = match op {
                    Op::Get { .. } => 1,
                    Op::GetMax { .. } => 2,
                    Op::Delete { .. } => 4,
                    Op::Try { .. } => 5,
                    _ => 6,
                };
                out.extend([tag, task]);
                key(&mut out, k);
                out.push(via(v));
            }
            Op::Update {
                task,
                key: k,
                val,
                via: v,
            } => {
                out.extend([3, task]);
                key(&mut out, k);
                out.extend([val, via(v)]);
            }
            Op::Blocking {
                task,
                key: k,
                op: b,
                val,
            } => {
                out.extend([7, task]);
                key(&mut out, k);
                match b {
                    BlockingOp::Store => out.push(0),
                    BlockingOp::Get => out.push(1),
                    BlockingOp::Update => out.push(2),
                    BlockingOp::Delete => out.push(3),
                    BlockingOp::Try => out.push(4),
                    BlockingOp::Timeout0 => out.push(5),
                    BlockingOp::StoreIf(e) => out.extend([6, expected(e)]),
                    BlockingOp::DeleteIf(e) => out.extend([7, expected(e)]),
                    BlockingOp::Optimistic => out.push(8),
                }
                out.push(val);
            }
            Op::Poll { task } => out.extend([8, task]),
            Op::Drop { task } => out.extend([9, task]),
            Op::Mutate { task, val } => out.extend([10, task, val]),
            Op::Read { task } => out.extend([11, task]),
            Op::Commit { task, blocking } => out.extend([12, task, u8::from(blocking)]),
            Op::Rollback { task } => out.extend([13, task]),
            Op::Snapshot {
                key: k,
                via: v,
                keep,
            } => {
                out.push(14);
                key(&mut out, k);
                out.extend([via(v), u8::from(keep)]);
            }
            Op::Contains { key: k, via: v } => {
                out.push(15);
                key(&mut out, k);
                out.push(via(v));
            }
            Op::Ids { ty, via: v } => out.extend([16, u8::from(ty == Ty::B), via(v)]),
            Op::StoreIf {
                task,
                key: k,
                val,
                expected: e,
            } => {
                out.extend([17, task]);
                key(&mut out, k);
                out.extend([val, expected(e)]);
            }
            Op::DeleteIf {
                task,
                key: k,
                expected: e,
            } => {
                out.extend([18, task]);
                key(&mut out, k);
                out.push(expected(e));
            }
            Op::Optimistic { task, key: k, val } => {
                out.extend([19, task]);
                key(&mut out, k);
                out.push(val);
            }
        }
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scenarios decode back from their encoding, and the committed
    /// seeds are their current encoding (`CTXSTORE_WRITE_SEEDS=1 cargo
    /// test` in `fuzz/` rewrites them).
    #[test]
    fn scenario_seeds_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/ops_vs_model");
        let write = std::env::var_os("CTXSTORE_WRITE_SEEDS").is_some_and(|v| v == "1");
        for (name, ops) in scenarios::conditional() {
            let bytes = encode(&ops);
            let back: Vec<Op> = Arbitrary::arbitrary_take_rest(Unstructured::new(&bytes))
                .expect("an encoding decodes");
            assert_eq!(format!("{back:?}"), format!("{ops:?}"), "{name}");
            let path = dir.join(format!("cond-{name}"));
            if write {
                std::fs::write(&path, &bytes).expect("write a seed");
            } else {
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(
                    committed == bytes,
                    "{} is stale: run `CTXSTORE_WRITE_SEEDS=1 cargo test` in fuzz/",
                    path.display()
                );
            }
            model::run(&ops);
        }
    }
}
