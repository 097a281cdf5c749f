//! Design notes, shipped as documentation next to the code.

pub mod internals;
