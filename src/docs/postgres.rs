#![doc = include_str!("../../docs/postgres.md")]
