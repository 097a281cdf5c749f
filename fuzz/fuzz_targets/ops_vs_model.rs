//! An `Arbitrary` sequence of store / get / mutate / commit / rollback /
//! drop / snapshot / try / timeout(0) / delete / contains / ids operations,
//! interleaved over several simulated tasks, applied to
//! `InMemoryContextStorage` and to a sequential model; every result must
//! agree (see `src/model.rs`).
#![no_main]

use ctxstore_fuzz::model::{self, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Vec<Op>| {
    // Long sequences add little beyond what shorter ones reach.
    let ops = &ops[..ops.len().min(512)];
    model::run(ops);
});
