//! Slots of the Redis Cluster moved between masters while 4 worker
//! processes spread guarded increments over 1,000 contexts (issue #14:
//! `MOVED`/`ASK` redirections are survived): `redis-cli --cluster
//! reshard` moves a block of 100 slots, keys and all, one key per
//! `MIGRATE`, from one master to another and back, over and over, until
//! the workers are done. Half the counters live in 5 of those slots, so
//! that many attempts meet a slot while it migrates: a script on it gets
//! `ASK` from the old master as soon as one of its keys is not there (a
//! `:lock` or `:waiting` key that does not exist counts), and `TRYAGAIN`
//! from the new one while some of its keys are still on the old; once the
//! slot has moved, `MOVED`. The driver follows or retries all three.
//!
//! The workers finish; no master dies, so no acknowledged commit may be
//! lost (every counter is at least its `ok` commits and at most its `ok` +
//! `unknown` ones); no version is acknowledged twice; and the cluster ends
//! as it started: the same slots on the same masters, `cluster_state:ok`,
//! every slot covered, none left migrating or importing. Printed: the
//! reshards, the outcome counts, the kinds of the errors the workers saw,
//! the longest attempt, and the error replies the nodes sent during the
//! run (`INFO errorstats`/`commandstats`: the redirections and `TRYAGAIN`s
//! the driver handled by itself).
//!
//! Needs the local cluster of `scripts/redis-cluster.sh start` (ports
//! 7000-7005): the test reshards it (`scripts/redis-cluster.sh reshard`),
//! and however it ends, a drop guard closes any slot left open
//! (`redis-cli --cluster fix`) and moves the slots back, and another one
//! removes every key of the test's namespace. It is its own test binary so
//! that it never runs alongside the other cluster tests. The workers are
//! the `redis_workers` example, run by the harness of
//! `redis_cluster_common` as in `tests/redis_cluster_processes.rs`.
#![cfg(all(feature = "redis", unix))]

mod redis_cluster_common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ctxstore::{ContextStorageExt, RedisContextStorage, Uuid};
use redis_cluster_common::{
    first_seed, ids_file, masters, namespace, seeds, store, values, Counter, Tally, Workers,
    CONTEXTS, COUNT, NEEDS_CLUSTER, PROCESSES,
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh");
const HOST: &str = "127.0.0.1";

const LEASE_MS: u64 = 5000;
const RENEW_MS: u64 = 1000;
/// Slots moved per reshard (at most; fewer if the source master serves
/// fewer below the target's first slot).
const SLOTS: usize = 100;
/// Keys per `MIGRATE` (`redis-cli --cluster-pipeline`): one at a time
/// keeps each slot migrating longest.
const PIPELINE: &str = "1";
/// Of the `CONTEXTS` counters, this many live in `HOT_SLOTS` of the slots
/// that move (the rest anywhere), so that many attempts meet a slot while
/// it migrates, not only after it has moved.
const HOT: usize = 500;
const HOT_SLOTS: usize = 5;
/// The resharding starts once the workers have committed this many.
const RESHARD_AFTER_OKS: u64 = 300;
/// The hang guard.
const DEADLINE: Duration = Duration::from_secs(180);

/// `scripts/redis-cluster.sh <args>`: its stdout, trimmed, or why it failed.
fn cluster_script(args: &[&str]) -> Result<String, String> {
    let out = Command::new(SCRIPT)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run scripts/redis-cluster.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/redis-cluster.sh {args:?} failed: {}",
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn connect(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// `CLUSTER NODES` as the node `url` sees it.
fn cluster_nodes(url: &str) -> String {
    redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut connect(url))
        .unwrap_or_else(|e| panic!("CLUSTER NODES on {url}: {e}"))
}

/// `CLUSTER INFO` of the node `url` as `field -> value`.
fn cluster_info(url: &str) -> BTreeMap<String, String> {
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut connect(url))
        .unwrap_or_else(|e| panic!("CLUSTER INFO on {url}: {e}"));
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The slots each master (`host:port`) serves, from the first seed that
/// answers; open slots (`[slot->-id]`, `[slot-<-id]`) are not counted.
fn slot_map() -> BTreeMap<String, BTreeSet<u16>> {
    let url = first_seed();
    let mut map = BTreeMap::new();
    for line in cluster_nodes(&url).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || !fields[2].split(',').any(|f| f == "master") {
            continue;
        }
        let addr = fields[1].split(['@', ',']).next().unwrap().to_owned();
        let slots: &mut BTreeSet<u16> = map.entry(addr).or_default();
        for range in &fields[8..] {
            if range.starts_with('[') {
                continue;
            }
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let (lo, hi): (u16, u16) = (lo.parse().unwrap(), hi.parse().unwrap());
            slots.extend(lo..=hi);
        }
    }
    map.retain(|_, slots| !slots.is_empty());
    map
}

/// The slot of a key with the hash tag `tag` (CRC16/XMODEM mod 16384).
fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &byte in tag.as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// `CONTEXTS` new counters at 0, `HOT` of them spread evenly over the
/// slots `hot` (the others anywhere), and a file listing their ids.
async fn counters(store: &RedisContextStorage, hot: &[u16]) -> (Vec<Uuid>, std::path::PathBuf) {
    let mut per_slot: BTreeMap<u16, usize> = hot.iter().map(|&s| (s, 0)).collect();
    let per_hot_slot = HOT.div_ceil(hot.len());
    let mut ids = Vec::with_capacity(CONTEXTS);
    while ids.len() < HOT {
        let id = Uuid::new_v4();
        if let Some(n) = per_slot.get_mut(&slot_of(&id.to_string())) {
            if *n < per_hot_slot {
                *n += 1;
                ids.push(id);
            }
        }
    }
    ids.extend((HOT..CONTEXTS).map(|_| Uuid::new_v4()));
    for &id in &ids {
        store.store_context(id, Counter { n: 0 }).await.unwrap();
    }
    let file = ids_file(store, &ids);
    (ids, file)
}

/// The error replies every seed node has sent so far, summed over the
/// nodes: by error code (`INFO errorstats`: `ASK`, `TRYAGAIN`, ...), and
/// by command the calls refused before they ran (`rejected <command>`:
/// redirections, `TRYAGAIN`, `CROSSSLOT`) or that failed as they ran
/// (`failed <command>`), from `INFO commandstats`.
fn error_replies() -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for url in seeds() {
        let mut con = connect(&url);
        for section in ["errorstats", "commandstats"] {
            let info: String = redis::cmd("INFO")
                .arg(section)
                .query(&mut con)
                .unwrap_or_else(|e| panic!("INFO {section} on {url}: {e}"));
            for line in info.lines() {
                // errorstat_ASK:count=12
                // cmdstat_evalsha:calls=9,usec=1,usec_per_call=0.1,rejected_calls=2,failed_calls=0
                let Some((name, fields)) = line.trim().split_once(':') else {
                    continue;
                };
                let fields = fields.split(',').filter_map(|f| f.split_once('='));
                if let Some(code) = name.strip_prefix("errorstat_") {
                    for (field, n) in fields {
                        if field == "count" {
                            *total.entry(code.to_owned()).or_default() += n.parse().unwrap_or(0);
                        }
                    }
                } else if let Some(command) = name.strip_prefix("cmdstat_") {
                    for (field, n) in fields {
                        let n: u64 = n.parse().unwrap_or(0);
                        let key = match field {
                            "rejected_calls" => format!("rejected {command}"),
                            "failed_calls" => format!("failed {command}"),
                            _ => continue,
                        };
                        *total.entry(key).or_default() += n;
                    }
                }
            }
        }
    }
    total
}

/// `redis-cli --cluster fix`: closes every slot left migrating or
/// importing (and covers any slot left without a master).
fn fix() {
    let status = Command::new("redis-cli")
        .args(["--cluster", "fix", &format!("{HOST}:7000"), "--cluster-yes"])
        .stdout(Stdio::null())
        .status();
    eprintln!("redis-cli --cluster fix: {status:?}");
}

fn port(addr: &str) -> String {
    addr.rsplit(':').next().unwrap().to_owned()
}

/// The lines of `CLUSTER NODES`, as every seed sees it, that show a slot
/// migrating (`->-`) or importing (`-<-`).
fn open_slots() -> Vec<String> {
    seeds()
        .iter()
        .flat_map(|url| {
            cluster_nodes(url)
                .lines()
                .filter(|l| l.contains("->-") || l.contains("-<-"))
                .map(|l| format!("{url}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One reshard the mover made: which way, how many slots, when it started
/// and how long it took (from the start of the run).
struct Move {
    from: String,
    to: String,
    slots: usize,
    at: Duration,
    took: Duration,
}

/// Moves `slots` slots from master `a` to master `b` and back, again and
/// again, until told to stop (always after a whole round trip, so that the
/// slots end where they started), in a thread of its own. However the test
/// ends, dropping it stops the thread and, unless disarmed, closes any
/// slot left open (`redis-cli --cluster fix`) and moves back what is
/// missing from `a`.
struct Mover {
    a: String,
    b: String,
    slots_of_a: usize,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Move>, String>>>,
    armed: bool,
}

impl Mover {
    fn start(a: String, b: String, slots: usize, started: Instant) -> Mover {
        let slots_of_a = slot_map().get(&a).map_or(0, BTreeSet::len);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (a, b, stop) = (port(&a), port(&b), stop.clone());
            let n = slots.to_string();
            std::thread::spawn(move || {
                let mut moves = Vec::new();
                while moves.is_empty() || !stop.load(Ordering::SeqCst) {
                    for (from, to) in [(&a, &b), (&b, &a)] {
                        let at = started.elapsed();
                        cluster_script(&["reshard", from, to, &n, PIPELINE])?;
                        moves.push(Move {
                            from: from.clone(),
                            to: to.clone(),
                            slots,
                            at,
                            took: started.elapsed() - at,
                        });
                    }
                }
                Ok(moves)
            })
        };
        Mover {
            a,
            b,
            slots_of_a,
            stop,
            thread: Some(thread),
            armed: true,
        }
    }

    /// Stops after the current round trip; the moves made.
    fn finish(&mut self) -> Result<Vec<Move>, String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().expect("finish called once").join() {
            Ok(result) => result,
            Err(_) => Err("the mover thread panicked".to_owned()),
        }
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if !self.armed {
            return;
        }
        eprintln!("reshard guard: closing open slots and moving the slots back");
        fix();
        let now = slot_map().get(&self.a).map_or(0, BTreeSet::len);
        if now < self.slots_of_a {
            let missing = (self.slots_of_a - now).to_string();
            let back = cluster_script(&["reshard", &port(&self.b), &port(&self.a), &missing]);
            eprintln!("reshard guard: moved {missing} slots back: {back:?}");
        }
    }
}

/// Removes every key of the namespace `ns` from every master, and the ids
/// file, however the test ends.
struct Sweep {
    ns: String,
    ids_file: std::path::PathBuf,
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ids_file);
        for m in masters() {
            let Ok(mut con) =
                redis::Client::open(format!("redis://{m}")).and_then(|c| c.get_connection())
            else {
                continue;
            };
            let mut cursor = 0u64;
            loop {
                let Ok((next, keys)) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{}:*", self.ns))
                    .arg("COUNT")
                    .arg(1000)
                    .query::<(u64, Vec<String>)>(&mut con)
                else {
                    break;
                };
                let mut unlink = redis::pipe();
                for key in &keys {
                    unlink.cmd("UNLINK").arg(key).ignore();
                }
                let _ = unlink.query::<()>(&mut con);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
}

/// What kind of error a worker's line reports, from its text.
fn error_kind(line: &str) -> &'static str {
    let lower = line.to_ascii_lowercase();
    if lower.contains("tryagain") || lower.contains("try again") {
        "TRYAGAIN"
    } else if line.contains("ASK") || lower.contains("askredirect") || lower.contains(" ask ") {
        "ASK"
    } else if line.contains("MOVED") || lower.contains("moved") {
        "MOVED"
    } else if lower.contains("clusterdown") {
        "CLUSTERDOWN"
    } else if lower.contains("timed out") || lower.contains("timeout") {
        "timeout"
    } else if lower.contains("lease") && lower.contains("lost") {
        "LeaseLost"
    } else if lower.contains("version conflict") {
        "conflict"
    } else if lower.contains("connection")
        || lower.contains("broken pipe")
        || lower.contains("refused")
        || lower.contains("reset")
    {
        "connection"
    } else {
        "other"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_moved_between_masters_mid_run_lose_no_commit() {
    let started = Instant::now();
    // Whole and settled before we start (a previous run may have been
    // interrupted).
    cluster_script(&["revive"]).expect(NEEDS_CLUSTER);
    if !open_slots().is_empty() {
        eprintln!("slots open before the test: {:?}; fixing", open_slots());
        fix();
        cluster_script(&["revive"]).expect(NEEDS_CLUSTER);
        let open = open_slots();
        assert!(open.is_empty(), "slots still open after the fix: {open:?}");
    }
    let before = slot_map();
    assert!(before.len() >= 2, "masters: {:?}", before.keys());
    // `a` serves slot 0; `b` is the master with the most slots above a's
    // lowest. reshard takes a source's lowest slots, so moving a's lowest
    // slots to b and then as many of b's lowest back returns exactly
    // those, as long as they are all below b's first slot.
    let a = before
        .iter()
        .find(|(_, s)| s.contains(&0))
        .map(|(m, _)| m.clone())
        .expect("slot 0 is served");
    let (b, slots) = before
        .iter()
        .filter(|(m, _)| **m != a)
        .map(|(m, s)| {
            let first = *s.first().unwrap();
            (m.clone(), before[&a].range(..first).count().min(SLOTS))
        })
        .max_by_key(|(_, n)| *n)
        .unwrap();
    assert!(
        slots >= 100,
        "too few slots to move from {a} to {b}: {before:?}"
    );
    let moved: HashSet<u16> = before[&a].iter().take(slots).copied().collect();

    // The hot slots: evenly over the moving ones.
    let hot: Vec<u16> = before[&a]
        .iter()
        .take(slots)
        .step_by(slots / HOT_SLOTS)
        .take(HOT_SLOTS)
        .copied()
        .collect();

    let ns = namespace();
    let store = store(&ns, LEASE_MS, RENEW_MS).await;
    let (ids, ids_file) = counters(&store, &hot).await;
    // Whatever the test leaves of its namespace goes at the end, passed or
    // not: counters left behind would crowd the hot slots of later runs.
    let _sweep = Sweep {
        ns: ns.clone(),
        ids_file: ids_file.clone(),
    };
    // The counters whose slot moves (our CRC16 agrees with the server's).
    let mut con = connect(&seeds()[0]);
    for id in ids.iter().take(3) {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("ns:{{{id}}}:kind"))
            .query(&mut con)
            .unwrap();
        assert_eq!(slot, slot_of(&id.to_string()), "the slot of {id}");
    }
    let moving: HashSet<_> = ids
        .iter()
        .filter(|id| moved.contains(&slot_of(&id.to_string())))
        .copied()
        .collect();
    let errors_before = error_replies();

    let file = ids_file.to_str().unwrap().to_owned();
    let (a2, b2) = (a.clone(), b.clone());
    let (tally, failures, mover, moves, workers_took, stall) =
        tokio::task::spawn_blocking(move || {
            let deadline = started + DEADLINE;
            let run = Instant::now();
            let mut workers = Workers::spread(&ns, LEASE_MS, RENEW_MS, &file, COUNT);
            let mut tally = Tally::new();
            let mut mover: Option<Mover> = None;
            // Per (outcome, error kind): count, and the first lines with their
            // time since the run began.
            let mut failures: BTreeMap<(String, &str), (u64, Vec<String>)> = BTreeMap::new();
            // The longest a worker went without a line after the resharding
            // began (an attempt that long): (gap, worker, when it ended).
            let mut last_line = [run; PROCESSES];
            let mut stall = (Duration::ZERO, 0, Duration::ZERO);
            while let Some((w, line)) = workers.next(deadline, &tally) {
                let gap = last_line[w].elapsed();
                last_line[w] = Instant::now();
                if mover.is_some() && gap > stall.0 {
                    stall = (gap, w, run.elapsed());
                }
                tally.add(w, &line);
                let outcome = line.split_whitespace().next().unwrap_or_default();
                if outcome != "ok" && outcome != "done" {
                    let entry = failures
                        .entry((outcome.to_owned(), error_kind(&line)))
                        .or_default();
                    entry.0 += 1;
                    if entry.1.len() < 3 {
                        entry
                            .1
                            .push(format!("+{:.2?} worker {w}: {line}", run.elapsed()));
                    }
                }
                if mover.is_none() && tally.ok >= RESHARD_AFTER_OKS {
                    mover = Some(Mover::start(a2.clone(), b2.clone(), slots, run));
                }
            }
            let workers_took = run.elapsed();
            let mut mover = mover.expect("the workers finished before the resharding began");
            let moves = mover.finish();
            for s in workers.wait(deadline) {
                assert!(s.success(), "a worker failed: {s}; {}", tally.summary());
            }
            (tally, failures, mover, moves, workers_took, stall)
        })
        .await
        .unwrap();
    let mut mover = mover;
    let moves = moves.unwrap_or_else(|e| panic!("resharding failed: {e}"));
    let errors_after = error_replies();

    // What happened.
    let during = moves
        .iter()
        .filter(|m| m.at + m.took <= workers_took)
        .count();
    let mut took: Vec<Duration> = moves.iter().map(|m| m.took).collect();
    took.sort_unstable();
    eprintln!(
        "{} masters; {slots} slots moved {a} <-> {b} ({} of the {CONTEXTS} counters in them, \
         {HOT} of those in the {HOT_SLOTS} slots {hot:?}, {PIPELINE} key(s) per MIGRATE): \
         {} reshards, {during} of them ended while the workers ran; each took {:.2?} .. \
         {:.2?} (median {:.2?}); the first and the last:",
        before.len(),
        moving.len(),
        moves.len(),
        took[0],
        took[took.len() - 1],
        took[took.len() / 2],
    );
    let shown = moves
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < 4 || *i + 2 >= moves.len())
        .map(|(_, m)| m);
    for m in shown {
        eprintln!(
            "  +{:.2?} {} -> {}: {} slots in {:.2?}{}",
            m.at,
            m.from,
            m.to,
            m.slots,
            m.took,
            if m.at + m.took <= workers_took {
                ""
            } else {
                " (ended after the workers)"
            }
        );
    }
    eprintln!(
        "the workers finished at +{workers_took:.2?} ({:.0} ok/s); {}; the longest attempt \
         while resharding: {:.2?} (worker {}, ended at +{:.2?})",
        tally.ok as f64 / workers_took.as_secs_f64(),
        tally.summary(),
        stall.0,
        stall.1,
        stall.2
    );
    eprintln!("failed attempts by outcome and error kind:");
    if failures.is_empty() {
        eprintln!("  none");
    }
    for ((outcome, kind), (n, samples)) in &failures {
        eprintln!("  {outcome} / {kind}: {n}");
        for s in samples {
            eprintln!("      {s}");
        }
    }
    let replies: BTreeMap<&String, u64> = errors_after
        .iter()
        .map(|(code, n)| (code, n - errors_before.get(code).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!(
        "error replies the nodes sent during the run (INFO errorstats and commandstats, \
         all nodes; what the driver redirected or retried by itself; ERR: Redis < 7.2 refuses \
         the driver's CLIENT SETINFO on every new connection): {replies:?}"
    );
    let moving_oks: u64 = moving
        .iter()
        .map(|id| tally.per_id.get(id).map_or(0, |c| c.0))
        .sum();
    eprintln!("ok commits on counters of the moving slots: {moving_oks}");

    // The resharding overlapped the run.
    assert!(
        moves.iter().any(|m| m.at + m.took <= workers_took),
        "no reshard ended while the workers ran"
    );
    for (w, done) in tally.done.iter().enumerate() {
        assert_eq!(*done, Some(COUNT), "worker {w}: {}", tally.summary());
    }
    assert_eq!(tally.ok, PROCESSES as u64 * COUNT, "{}", tally.summary());

    // No commit lost (no master died), none applied unreported.
    let values = values(&store, &ids).await;
    let mut sum = 0;
    for (id, n) in &values {
        let (ok, unknown) = tally.per_id.get(id).copied().unwrap_or_default();
        assert!(
            ok <= *n && *n <= ok + unknown,
            "counter {id} = {n}, outside its {ok} ok .. {ok} + {unknown} unknown commits \
             (moving slot: {}; {})",
            moving.contains(id),
            tally.summary()
        );
        sum += n;
    }
    eprintln!(
        "sum {sum} = {} ok + {} of the {} unknown commits applied",
        tally.ok,
        sum - tally.ok,
        tally.unknown
    );
    assert!(tally.ok <= sum && sum <= tally.ok + tally.unknown);
    let repeated = tally.repeated_versions();
    assert!(
        repeated.is_empty(),
        "versions acknowledged twice: {repeated:?}"
    );

    // The cluster ends as it started, settled.
    let open = open_slots();
    assert!(open.is_empty(), "slots left open: {open:?}");
    for url in seeds() {
        let info = cluster_info(&url);
        assert_eq!(
            info.get("cluster_state").map(String::as_str),
            Some("ok"),
            "{url}: {info:?}"
        );
        assert_eq!(
            info.get("cluster_slots_ok").map(String::as_str),
            Some("16384"),
            "{url}: {info:?}"
        );
    }
    assert_eq!(slot_map(), before, "the slot map differs from the start");
    mover.armed = false;

    for &id in &ids {
        store.delete_context::<Counter>(id).await.unwrap();
    }
    eprintln!("test took {:.2?}", started.elapsed());
}
