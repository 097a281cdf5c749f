#![doc = include_str!("../../docs/redis.md")]
