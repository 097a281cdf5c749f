//! A worker process for the Postgres multi-process tests (and a small demo of
//! several processes sharing contexts through `PostgresContextStorage`).
//!
//! ```text
//! cargo run --example pg_workers --features postgres -- increment \
//!     --url postgres://postgres@127.0.0.1:5432/test --table ctxstore_demo --id <uuid> --count 2000
//! cargo run --example pg_workers --features postgres -- hold --table ctxstore_demo --id <uuid>
//! ```
//!
//! `increment` adds 1 to the counter `count` times, one guard each, and
//! prints `done <count>`. `optimistic` does the same with
//! `update_context_optimistic` (no row lock held while the change runs; a
//! conditional write, retried on conflict) and prints
//! `done <count> attempts <n>`, `n` being how often the change ran. `hold`
//! takes the counter's lock, changes it without committing, prints `locked`
//! and sleeps until it is killed: the fault test SIGKILLs it to show
//! Postgres releasing a dead process's row lock. `init` stores a counter at
//! 0. `create-once` (no `--id`) prints `ready`, then for each context id
//! read on stdin tries `store_context_if(id, 0, ..)` with `n = tag` and
//! prints `created <id> <version>` or `conflict <id> <expected> <found>`,
//! until the end of stdin.

use std::io::Write;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ctxstore::{Context, ContextError, ContextStorageExt, PostgresContextStorage, Uuid};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The shared counter (the tests use the same `kind`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Counter {
    n: u64,
}

impl Context for Counter {
    fn kind() -> &'static str {
        "ctxstore.pg_workers.counter"
    }
}

#[derive(Parser)]
struct Args {
    /// Postgres URL (default: `CTXSTORE_POSTGRES_URL`, else the local test
    /// server).
    #[arg(long)]
    url: Option<String>,
    /// Table of the store.
    #[arg(long, default_value = "ctxstore_demo")]
    table: String,
    /// The counter's id (every command but `create-once`).
    #[arg(long)]
    id: Option<Uuid>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store the counter at 0.
    Init,
    /// Add 1, `count` times.
    Increment {
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
    /// Add 1, `count` times, with `update_context_optimistic`.
    Optimistic {
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
    /// Lock the counter, change it, never commit; sleep until killed.
    Hold,
    /// Race to create each context id read on stdin, storing `n = tag`.
    CreateOnce {
        #[arg(long)]
        tag: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let url = args.url.unwrap_or_else(|| {
        std::env::var("CTXSTORE_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    });
    let store = PostgresContextStorage::builder(url)
        .table(&args.table)
        .pool_size(2)
        .connect()
        .await?;
    let id = || args.id.ok_or("--id is required for this command");
    match args.cmd {
        Cmd::Init => {
            let id = id()?;
            let v = store.store_context(id, Counter { n: 0 }).await?;
            println!("stored version {v}");
        }
        Cmd::Increment { count } => {
            let id = id()?;
            for _ in 0..count {
                store.update_context(id, |c: &mut Counter| c.n += 1).await?;
            }
            println!("done {count}");
        }
        Cmd::Optimistic { count } => {
            let id = id()?;
            let mut attempts = 0u64;
            for _ in 0..count {
                store
                    .update_context_optimistic(id, |c: &mut Counter| {
                        attempts += 1;
                        c.n += 1;
                    })
                    .await?;
            }
            println!("done {count} attempts {attempts}");
        }
        Cmd::Hold => {
            let id = id()?;
            let mut guard = store.get_context::<Counter>(id).await?;
            guard.n += 1_000_000;
            println!("locked at version {}", guard.version());
            std::io::stdout().flush()?;
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        Cmd::CreateOnce { tag } => {
            // Open a pooled connection first, so that the race is between
            // the writes rather than between connection set-ups.
            store.contains_context::<Counter>(Uuid::nil()).await?;
            println!("ready");
            std::io::stdout().flush()?;
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await? {
                let id: Uuid = line.trim().parse()?;
                match store.store_context_if(id, 0, Counter { n: tag }).await {
                    Ok(v) => println!("created {id} {v}"),
                    Err(ContextError::Conflict {
                        expected, found, ..
                    }) => println!("conflict {id} {expected} {found}"),
                    Err(e) => return Err(e.into()),
                }
                std::io::stdout().flush()?;
            }
        }
    }
    Ok(())
}
