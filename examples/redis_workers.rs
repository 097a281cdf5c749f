//! Many OS processes sharing one context store through Redis.
//!
//! ```text
//! # 4 worker processes x 2,000 increments of one counter -> exactly 8,000
//! cargo run --release --example redis_workers --features redis -- demo --processes 4 --count 2000
//! ```
//!
//! The `increment`, `optimistic`, `create-once`, `hold` and `spread`
//! subcommands are the worker roles; `demo` spawns `increment` workers of
//! this same binary. The multi-process and fault tests
//! (`tests/redis_processes.rs`, and on a Redis Cluster
//! `tests/redis_cluster_processes.rs` and `tests/redis_cluster_failover.rs`)
//! drive the roles directly.
//! Redis is taken from `--url`, else `CTXSTORE_REDIS_URL`, else
//! `redis://127.0.0.1:6379`; with `--cluster <seed,seed,...>` the workers
//! use a Redis Cluster instead:
//!
//! ```text
//! cargo run --release --example redis_workers --features redis -- \
//!     --cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001 demo
//! ```

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ctxstore::{Context, ContextError, ContextStorageExt, RedisContextStorage, Uuid};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The shared counter. The explicit `kind` keeps its Redis key stable.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Counter {
    n: u64,
}

impl Context for Counter {
    fn kind() -> &'static str {
        "ctxstore.example.counter"
    }
}

#[derive(Parser)]
#[command(about = "ctxstore: many processes, one Redis-backed context")]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    role: Role,
}

#[derive(Args, Clone)]
struct Conn {
    /// Redis URL (default: $CTXSTORE_REDIS_URL or redis://127.0.0.1:6379).
    #[arg(long, global = true, conflicts_with = "cluster")]
    url: Option<String>,
    /// Use a Redis Cluster through these seed nodes (comma-separated
    /// `redis://host:port` URLs) instead of one server.
    #[arg(long, global = true, value_delimiter = ',')]
    cluster: Option<Vec<String>>,
    /// Key namespace shared by the cooperating processes.
    #[arg(long, global = true, default_value = "ctxstore-example")]
    namespace: String,
    /// Lease length in milliseconds.
    #[arg(long, global = true, default_value_t = 5000)]
    lease_ms: u64,
    /// Lease renewal interval in milliseconds (default: a third of the lease).
    #[arg(long, global = true)]
    renew_ms: Option<u64>,
}

#[derive(Subcommand)]
enum Role {
    /// Increment the counter `count` times, one `update_context` each.
    Increment {
        #[arg(long)]
        id: Uuid,
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
    /// Increment the counter `count` times with `update_context_optimistic`
    /// (no lock: read, change, conditional write, retry on conflict); prints
    /// `DONE <attempts>`, the number of times the change ran (`count` plus
    /// the retries).
    Optimistic {
        #[arg(long)]
        id: Uuid,
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
    /// Create-once race: prints `READY`, then for each line read on stdin
    /// (a context id) tries `store_context_if(id, 0, Counter { n: tag })` and
    /// prints `CREATED <id> <version>` or `CONFLICT <id> <expected> <found>`.
    /// Exits 0 at the end of stdin.
    CreateOnce {
        #[arg(long)]
        tag: u64,
    },
    /// Lock the counter, print `LOCKED <version>`, keep the guard for
    /// `hold_ms`, then increment and commit: prints `COMMITTED <version>`
    /// (exit 0) or `LEASE_LOST` (exit 3).
    Hold {
        #[arg(long)]
        id: Uuid,
        #[arg(long)]
        hold_ms: u64,
    },
    /// Increment `count` times a counter picked at random among `ids`, each
    /// through a guard (`get_context`, change, `commit`). Every attempt
    /// prints one line: `ok <id> <version>` (committed), `lost <id> <error>`
    /// (the lease was lost: not applied), `conflict <id> <error>` (the
    /// version moved: not applied), `unknown <id> <error>` (the commit
    /// failed with a backend error: it may or may not have been applied) or
    /// `err <id> <error>` (the lock or read failed: nothing applied). A
    /// failed attempt is retried (on another random counter; after a short
    /// pause on a backend error), so `count` increments are committed in
    /// the end; then it prints `done <ok count>`. Errors that a retry
    /// cannot cure (a missing counter, a bad value) end the worker
    /// (exit 1) after their `err` line.
    Spread {
        /// The counters: a comma-separated list of ids, or a file with one
        /// id per line.
        #[arg(long)]
        ids: String,
        #[arg(long, default_value_t = 2000)]
        count: u64,
        /// The pause after a backend error, in milliseconds.
        #[arg(long, default_value_t = 100)]
        backoff_ms: u64,
    },
    /// Create a counter, run `processes` increment workers of this binary on
    /// it and check the total.
    Demo {
        #[arg(long, default_value_t = 4)]
        processes: u64,
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
}

impl Conn {
    fn url(&self) -> String {
        self.url.clone().unwrap_or_else(|| {
            std::env::var("CTXSTORE_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
        })
    }

    async fn connect(&self) -> ctxstore::Result<RedisContextStorage> {
        let builder = match &self.cluster {
            Some(nodes) => RedisContextStorage::cluster_builder(nodes.clone()),
            None => RedisContextStorage::builder(self.url()),
        };
        let mut builder = builder
            .namespace(self.namespace.clone())
            .lease(Duration::from_millis(self.lease_ms));
        if let Some(ms) = self.renew_ms {
            builder = builder.renewal_interval(Duration::from_millis(ms));
        }
        builder.connect().await
    }

    fn args(&self) -> Vec<String> {
        let mut args = match &self.cluster {
            Some(nodes) => vec!["--cluster".to_owned(), nodes.join(",")],
            None => vec!["--url".to_owned(), self.url()],
        };
        args.extend([
            "--namespace".to_owned(),
            self.namespace.clone(),
            "--lease-ms".to_owned(),
            self.lease_ms.to_string(),
        ]);
        if let Some(ms) = self.renew_ms {
            args.extend(["--renew-ms".to_owned(), ms.to_string()]);
        }
        args
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (the parent went away) is not worth a panic.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("redis_workers: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> ctxstore::Result<ExitCode> {
    let store = cli.conn.connect().await?;
    match cli.role {
        Role::Increment { id, count } => {
            for _ in 0..count {
                store.update_context(id, |c: &mut Counter| c.n += 1).await?;
            }
            say("DONE");
            Ok(ExitCode::SUCCESS)
        }
        Role::Optimistic { id, count } => {
            let mut attempts = 0u64;
            for _ in 0..count {
                store
                    .update_context_optimistic(id, |c: &mut Counter| {
                        attempts += 1;
                        c.n += 1;
                    })
                    .await?;
            }
            say(&format!("DONE {attempts}"));
            Ok(ExitCode::SUCCESS)
        }
        Role::CreateOnce { tag } => {
            say("READY");
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await.expect("read stdin") {
                let id: Uuid = line.trim().parse().expect("stdin lines are context ids");
                match store.store_context_if(id, 0, Counter { n: tag }).await {
                    Ok(v) => say(&format!("CREATED {id} {v}")),
                    Err(ContextError::Conflict {
                        expected, found, ..
                    }) => say(&format!("CONFLICT {id} {expected} {found}")),
                    Err(e) => return Err(e),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Role::Hold { id, hold_ms } => {
            let mut guard = store.get_context::<Counter>(id).await?;
            say(&format!("LOCKED {}", guard.version()));
            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
            guard.n += 1;
            match guard.commit().await {
                Ok(v) => {
                    say(&format!("COMMITTED {v}"));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if e.is_lease_lost() => {
                    say("LEASE_LOST");
                    Ok(ExitCode::from(3))
                }
                Err(e) => Err(e),
            }
        }
        Role::Spread {
            ids,
            count,
            backoff_ms,
        } => {
            let ids = parse_ids(&ids);
            if ids.is_empty() {
                eprintln!("redis_workers: spread needs at least one id");
                return Ok(ExitCode::from(2));
            }
            let ok = spread(&store, &ids, count, Duration::from_millis(backoff_ms)).await?;
            say(&format!("done {ok}"));
            Ok(ExitCode::SUCCESS)
        }
        Role::Demo { processes, count } => {
            let id = Uuid::new_v4();
            store.store_context(id, Counter { n: 0 }).await?;
            let exe = std::env::current_exe().expect("the path of this executable");
            let started = Instant::now();
            let mut children = Vec::new();
            for _ in 0..processes {
                let child = Command::new(&exe)
                    .args(cli.conn.args())
                    .args(["increment", "--id", &id.to_string(), "--count"])
                    .arg(count.to_string())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn a worker process");
                children.push(child);
            }
            let mut failed = 0;
            for mut child in children {
                if !child.wait().map(|s| s.success()).unwrap_or(false) {
                    failed += 1;
                }
            }
            let elapsed = started.elapsed();
            let total = store.get_context_snapshot::<Counter>(id).await?.n;
            store.delete_context::<Counter>(id).await?;
            println!(
                "{processes} processes x {count} increments: counter = {total} (expected {}), \
                 {failed} failed workers, {:.0} increments/s",
                processes * count,
                (processes * count) as f64 / elapsed.as_secs_f64()
            );
            Ok(if failed == 0 && total == processes * count {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

/// `ids` as a comma-separated list of ids, or else as the path of a file
/// with one id per line.
fn parse_ids(ids: &str) -> Vec<Uuid> {
    let text = if ids.contains(',') || ids.trim().parse::<Uuid>().is_ok() {
        ids.to_owned()
    } else {
        std::fs::read_to_string(ids)
            .unwrap_or_else(|e| panic!("spread --ids {ids}: neither ids nor a readable file: {e}"))
    };
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|e| panic!("bad id {s:?}: {e}")))
        .collect()
}

/// One line of output: no line breaks inside an error's text.
fn one_line(e: &ContextError) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// The `spread` role: `count` committed increments, one outcome line per
/// attempt. Returns the number of `ok` lines.
async fn spread(
    store: &RedisContextStorage,
    ids: &[Uuid],
    count: u64,
    backoff: Duration,
) -> ctxstore::Result<u64> {
    let mut ok = 0;
    while ok < count {
        let id = ids[rand::random_range(0..ids.len())];
        let mut guard = match store.get_context::<Counter>(id).await {
            Ok(guard) => guard,
            Err(e) => {
                say(&format!("err {id} {}", one_line(&e)));
                if e.is_backend() {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                if e.is_timeout() || e.is_would_block() {
                    continue;
                }
                return Err(e);
            }
        };
        guard.n += 1;
        match guard.commit().await {
            Ok(version) => {
                ok += 1;
                say(&format!("ok {id} {version}"));
            }
            Err(e) if e.is_lease_lost() => say(&format!("lost {id} {}", one_line(&e))),
            Err(e) if e.is_conflict() => say(&format!("conflict {id} {}", one_line(&e))),
            Err(e) if e.is_backend() => {
                say(&format!("unknown {id} {}", one_line(&e)));
                tokio::time::sleep(backoff).await;
            }
            Err(e) => {
                say(&format!("err {id} {}", one_line(&e)));
                return Err(e);
            }
        }
    }
    Ok(ok)
}
