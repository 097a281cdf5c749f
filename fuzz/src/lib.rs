//! Support for the `ctxstore` fuzz targets.
//!
//! [`model`] is the op-sequence model (shared, by `#[path]`, with
//! `tests/model.rs`, which drives it with proptest on stable). This crate
//! adds the `arbitrary` glue the fuzz targets use.

pub mod model;

use arbitrary::{Arbitrary, Result, Unstructured};

use crate::model::{BlockingOp, Key, Op, Ty, Via};

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

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u.int_in_range(0u8..=16)? {
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
                op: *u.choose(&[
                    BlockingOp::Store,
                    BlockingOp::Get,
                    BlockingOp::Update,
                    BlockingOp::Delete,
                    BlockingOp::Try,
                    BlockingOp::Timeout0,
                ])?,
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
            _ => Op::Ids {
                ty: ty(u)?,
                via: via(u)?,
            },
        })
    }
}
