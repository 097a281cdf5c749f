//! Loom model checks of ctxstore's slot protocol. The models are in
//! `tests/slot_protocol.rs`; this library holds nothing.
