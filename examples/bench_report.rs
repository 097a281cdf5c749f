//! Turns the results of `cargo bench --bench compare` into `docs/bench.md`
//! (tables: workload × contender, ratios to ctxstore, the issue's targets)
//! and `docs/bench.svg` (a plot of the same).
//!
//! ```text
//! cargo bench --bench compare -- --quick
//! cargo run --release --example bench_report -- \
//!     --machine "2-core shared sandbox" \
//!     --command "cargo bench --bench compare -- --quick"
//! ```
//!
//! Options: `--criterion DIR` (default `$CRITERION_HOME`, else
//! `$CARGO_TARGET_DIR/criterion`, else `target/criterion`), `--out DIR`
//! (default `docs`), `--machine TEXT`, `--command TEXT`, `--date TEXT`
//! (default: today, UTC).
//!
//! It reads what criterion wrote (`<group>/<bench>/new/benchmark.json` and
//! `estimates.json`: the median time of one iteration and the elements in
//! it) and what the bench wrote under `ctxstore-extras/` (W3, W1 fairness,
//! W6 memory). Results are the latest run of each benchmark.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

const WORKLOADS: &[(&str, &str)] = &[
    ("W1_hot_key", "W1 hot key (64 tasks, 1 key), mutations/s"),
    (
        "W2_spread",
        "W2 spread (64 tasks, 10,000 keys), mutations/s",
    ),
    (
        "W2F_spread_clone_from",
        "W2F spread, field-wise `clone_from`, mutations/s",
    ),
    ("W4_snapshot", "W4 snapshots (10,000 keys), snapshots/s"),
    (
        "W4_snapshot_4KiB",
        "W4 snapshots, 4 KiB payload, snapshots/s",
    ),
    ("W5_mixed", "W5 mixed 90/9/1, ops/s"),
    ("W6_lifecycle", "W6 lifecycle churn, lifecycles/s"),
    (
        "W7_threads_tasks",
        "W7 2 threads + 32 tasks, 100 keys, mutations/s",
    ),
];

const CONTENDERS: &[&str] = &[
    "ctxstore",
    "ctxstore_guard",
    "ctxstore_optimistic",
    "dashmap_mutex",
    "scc",
    "papaya_mutex",
    "papaya_arcswap",
    "rwlock_mutex",
];

/// ctxstore's own rows (`ctxstore`, `ctxstore_guard`,
/// `ctxstore_optimistic`): never "best other".
fn is_ours(name: &str) -> bool {
    name.starts_with("ctxstore")
}

/// The engine v2 issue's throughput targets, as ctxstore ÷ best other.
fn target_ratio(group: &str) -> f64 {
    match group {
        "W2_spread" => 0.6,
        "W2F_spread_clone_from" => 0.9,
        "W6_lifecycle" => 0.7,
        _ => 1.0,
    }
}

const LIMITS: &[&str] = &["limit_cas", "limit_papaya_load_full"];

/// One criterion result: throughput in elements per second.
#[derive(Debug, Clone)]
struct Row {
    group: String,
    function: String,
    parameter: Option<String>,
    per_s: f64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_report: {e}");
        std::process::exit(1);
    }
}

struct Options {
    criterion: PathBuf,
    out: PathBuf,
    machine: String,
    command: String,
    date: String,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        criterion: default_criterion_home(),
        out: PathBuf::from("docs"),
        machine: "unspecified machine".into(),
        command: "cargo bench --bench compare -- --quick".into(),
        date: today_utc(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--criterion" => o.criterion = PathBuf::from(value()?),
            "--out" => o.out = PathBuf::from(value()?),
            "--machine" => o.machine = value()?,
            "--command" => o.command = value()?,
            "--date" => o.date = value()?,
            "-h" | "--help" => {
                return Err("usage: bench_report [--criterion DIR] [--out DIR] \
                            [--machine TEXT] [--command TEXT] [--date TEXT]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(o)
}

fn default_criterion_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(h);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("criterion")
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil-from-days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

/// Every `.../new/benchmark.json` under `dir` (criterion nests
/// group/function[/parameter]).
fn find_benchmarks(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        if p.file_name().is_some_and(|n| n == "new") {
            let b = p.join("benchmark.json");
            if b.is_file() {
                out.push(b);
            }
        } else {
            find_benchmarks(&p, depth + 1, out);
        }
    }
}

fn load_rows(home: &Path) -> Result<Vec<Row>, String> {
    let mut files = Vec::new();
    find_benchmarks(home, 0, &mut files);
    let mut rows = Vec::new();
    for b in files {
        let bench = read_json(&b)?;
        let est = read_json(&b.with_file_name("estimates.json"))?;
        let elements = bench["throughput"]["Elements"].as_f64();
        let ns = est["median"]["point_estimate"]
            .as_f64()
            .or_else(|| est["mean"]["point_estimate"].as_f64());
        let (Some(elements), Some(ns)) = (elements, ns) else {
            continue;
        };
        if ns <= 0.0 {
            continue;
        }
        let s = |k: &str| bench[k].as_str().map(str::to_owned);
        // `BenchmarkId::from_parameter(name)` leaves `function_id` null and
        // puts the name in `value_str`.
        let (function, parameter) = match (s("function_id"), s("value_str")) {
            (Some(f), p) => (f, p),
            (None, Some(p)) => (p, None),
            (None, None) => continue,
        };
        rows.push(Row {
            group: s("group_id").unwrap_or_default(),
            function,
            parameter,
            per_s: elements / (ns * 1e-9),
        });
    }
    Ok(rows)
}

fn load_extras(home: &Path, name: &str) -> Vec<Value> {
    let path = home.join("ctxstore-extras").join(format!("{name}.json"));
    match read_json(&path) {
        Ok(v) => v["rows"].as_array().cloned().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

fn human(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn find<'a>(rows: &'a [Row], group: &str, function: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.group == group && r.function == function && r.parameter.is_none())
}

fn extra<'a>(rows: &'a [Value], contender: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["contender"] == contender)
}

fn run() -> Result<(), String> {
    let o = options()?;
    let rows = load_rows(&o.criterion)?;
    let w3 = load_extras(&o.criterion, "W3_snapshot_under_lock");
    let fair = load_extras(&o.criterion, "W1_fairness");
    let rss = load_extras(&o.criterion, "W6_rss");
    if rows.is_empty() && w3.is_empty() {
        return Err(format!(
            "no results under {} (run `cargo bench --bench compare -- --quick` first)",
            o.criterion.display()
        ));
    }

    let mut md = String::new();
    let mut targets: Vec<(String, bool, String)> = Vec::new();
    writeln!(md, "# ctxstore benchmarks\n").unwrap();
    writeln!(
        md,
        "- Date: {}\n- Machine: {}\n- Command: `{}`\n- Report: `cargo run --release --example bench_report`\n",
        o.date, o.machine, o.command
    )
    .unwrap();
    writeln!(
        md,
        "Throughput is the median of criterion's samples (each sample a fixed batch of \
         operations spread over the tasks of a multi-thread Tokio runtime). Each cell: \
         ops/s and, in brackets, the ratio to ctxstore (> 1× = faster than ctxstore). \
         *best other* is the fastest contender that is not ctxstore and not a limit line; \
         *ctxstore ÷ best* is compared with the issue's target for that workload (see Targets below).\n"
    )
    .unwrap();

    // ---- throughput table
    let mut header = String::from("| workload | ");
    let mut rule = String::from("|---|");
    for c in CONTENDERS.iter().chain(LIMITS) {
        write!(header, "{c} | ").unwrap();
        rule.push_str("---:|");
    }
    header.push_str("best other | ctxstore ÷ best |");
    rule.push_str("---|---:|");
    writeln!(md, "{header}\n{rule}").unwrap();
    for (group, title) in WORKLOADS {
        let ctx = find(&rows, group, "ctxstore").map(|r| r.per_s);
        let mut line = format!("| {title} | ");
        let mut best: Option<(&str, f64)> = None;
        for c in CONTENDERS.iter().chain(LIMITS) {
            match find(&rows, group, c) {
                Some(r) => {
                    match ctx {
                        Some(x) if !is_ours(c) => {
                            write!(line, "{} ({:.2}×) | ", human(r.per_s), r.per_s / x).unwrap()
                        }
                        _ => write!(line, "{} | ", human(r.per_s)).unwrap(),
                    }
                    if CONTENDERS.contains(c)
                        && !is_ours(c)
                        && best.is_none_or(|(_, b)| r.per_s > b)
                    {
                        best = Some((c, r.per_s));
                    }
                }
                None => line.push_str("– | "),
            }
        }
        match (ctx, best) {
            (Some(x), Some((name, b))) => {
                let ratio = x / b;
                let want = target_ratio(group);
                write!(line, "{name} | **{ratio:.2}** |").unwrap();
                targets.push((
                    format!("{group}: ≥ {want}× the best contender"),
                    ratio >= want,
                    format!("{ratio:.3}× of {name}"),
                ));
            }
            _ => line.push_str("– | – |"),
        }
        writeln!(md, "{line}").unwrap();
    }

    // ---- W3
    if !w3.is_empty() {
        let hold = w3[0]["hold_ms"].as_u64().unwrap_or(20);
        writeln!(
            md,
            "\n## W3: snapshot latency while a writer holds the key ({hold} ms at a time)\n\n\
             4 tasks snapshot one key in a loop (a `yield_now` every 32 snapshots); each \
             snapshot is timed on its own (`Instant::now()` around it, ≈ 20–40 ns of the \
             figure is the clock). *max* on a shared machine includes the OS descheduling \
             the reader.\n\n\
             | contender | p50 | p99 | p99.9 | max | snapshots/s | writer commits |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        )
        .unwrap();
        for c in CONTENDERS {
            if let Some(r) = extra(&w3, c) {
                let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
                writeln!(
                    md,
                    "| {c} | {} | {} | {} | {} | {} | {} |",
                    human_ns(f("p50_ns")),
                    human_ns(f("p99_ns")),
                    human_ns(f("p999_ns")),
                    human_ns(f("max_ns")),
                    human(f("rate_per_s")),
                    r["writer_commits"]
                )
                .unwrap();
            }
        }
        if let Some(r) = extra(&w3, "ctxstore") {
            let p99 = r["p99_ns"].as_f64().unwrap_or(f64::MAX);
            targets.push((
                "W3: snapshot p99 < 1 µs under a held lock".into(),
                p99 < 1_000.0,
                format!("p99 = {}", human_ns(p99)),
            ));
        }
    }

    // ---- fairness
    if !fair.is_empty() {
        let ops = fair[0]["ops"].as_u64().unwrap_or(0);
        writeln!(
            md,
            "\n## W1 fairness: wait per mutation under the hot key\n\n\
             64 tasks, {ops} mutations in all, each timed from the lock call to the \
             release. The run also checks that the counter equals the number of \
             mutations (no lost update) for every contender. *retries per commit*: how \
             often `ctxstore_optimistic`'s change started over after a version conflict.\n\n\
             | contender | p50 | p99 | p99.9 | max | mutations/s | retries per commit |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        )
        .unwrap();
        for c in CONTENDERS.iter().chain(&["ctxstore_fifo"]) {
            if let Some(r) = extra(&fair, c) {
                let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
                let retries = r["retries_per_commit"]
                    .as_f64()
                    .map_or_else(|| "–".to_string(), |x| format!("{x:.3}"));
                writeln!(
                    md,
                    "| {c} | {} | {} | {} | {} | {} | {retries} |",
                    human_ns(f("p50_ns")),
                    human_ns(f("p99_ns")),
                    human_ns(f("p999_ns")),
                    human_ns(f("max_ns")),
                    human(f("rate_per_s"))
                )
                .unwrap();
            }
        }
        for (ours, how) in [
            ("ctxstore", "bounded fairness (default)"),
            ("ctxstore_fifo", "strict FIFO (`with_fairness_bound(ZERO)`)"),
        ] {
            let (Some(ours), Some(tokio)) = (extra(&fair, ours), extra(&fair, "dashmap_mutex"))
            else {
                continue;
            };
            let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::MAX);
            let ok = f(ours, "p999_ns") <= f(tokio, "p999_ns")
                && f(ours, "max_ns") <= f(tokio, "max_ns");
            targets.push((
                format!("W1 fairness, {how}: p99.9 and max wait ≤ tokio's mutex (dashmap_mutex)"),
                ok,
                format!(
                    "p99.9 {} vs {}, max {} vs {}",
                    human_ns(f(ours, "p999_ns")),
                    human_ns(f(tokio, "p999_ns")),
                    human_ns(f(ours, "max_ns")),
                    human_ns(f(tokio, "max_ns"))
                ),
            ));
        }
    }

    // ---- W6 memory
    if !rss.is_empty() {
        writeln!(
            md,
            "\n## W6: resident memory across lifecycles\n\n\
             Each contender in a fresh process: RSS (`/proc/self/statm`) after creating the \
             store and the runtime, and after the lifecycles (store still alive, every \
             context deleted).\n\n\
             | contender | lifecycles | RSS before | RSS after | Δ | lifecycles/s |\n\
             |---|---:|---:|---:|---:|---:|"
        )
        .unwrap();
        let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
        for c in CONTENDERS {
            if let Some(r) = extra(&rss, c) {
                writeln!(
                    md,
                    "| {c} | {} | {:.1} MiB | {:.1} MiB | {:+.1} MiB | {} |",
                    r["lifecycles"],
                    mib(&r["rss_before_bytes"]),
                    mib(&r["rss_after_bytes"]),
                    mib(&r["rss_delta_bytes"]),
                    human(r["lifecycles_per_s"].as_f64().unwrap_or(0.0))
                )
                .unwrap();
            }
        }
        if let Some(r) = extra(&rss, "ctxstore") {
            let d = mib(&r["rss_delta_bytes"]);
            targets.push((
                format!("W6: RSS within 10 MiB after {} lifecycles", r["lifecycles"]),
                d.abs() <= 10.0,
                format!("Δ = {d:+.1} MiB"),
            ));
        }
    }

    // ---- scaling
    let scale: Vec<&Row> = rows
        .iter()
        .filter(|r| r.group.starts_with("scale_") && r.parameter.is_some())
        .collect();
    if !scale.is_empty() {
        let mut workers: Vec<usize> = scale
            .iter()
            .filter_map(|r| r.parameter.as_deref()?.parse().ok())
            .collect();
        workers.sort_unstable();
        workers.dedup();
        writeln!(
            md,
            "\n## Thread scaling (`CTXSTORE_BENCH_THREADS`)\n\nops/s by Tokio worker count.\n"
        )
        .unwrap();
        let mut h = String::from("| workload | contender |");
        let mut rule = String::from("|---|---|");
        for w in &workers {
            write!(h, " {w} |").unwrap();
            rule.push_str("---:|");
        }
        writeln!(md, "{h}\n{rule}").unwrap();
        let mut groups: Vec<&str> = scale.iter().map(|r| r.group.as_str()).collect();
        groups.sort_unstable();
        groups.dedup();
        for g in groups {
            for c in CONTENDERS {
                let mut line = format!("| {g} | {c} |");
                let mut any = false;
                for w in &workers {
                    let cell = scale.iter().find(|r| {
                        r.group == g
                            && r.function == *c
                            && r.parameter.as_deref() == Some(w.to_string().as_str())
                    });
                    match cell {
                        Some(r) => {
                            any = true;
                            write!(line, " {} |", human(r.per_s)).unwrap();
                        }
                        None => line.push_str(" – |"),
                    }
                }
                if any {
                    writeln!(md, "{line}").unwrap();
                }
            }
        }
    }

    // ---- targets
    writeln!(
        md,
        "\n## Targets (issue #10, engine v2)\n\n| target | met | measured |\n|---|---|---|"
    )
    .unwrap();
    for (t, ok, m) in &targets {
        writeln!(md, "| {t} | {} | {m} |", if *ok { "yes" } else { "**no**" }).unwrap();
    }

    std::fs::create_dir_all(&o.out)
        .map_err(|e| format!("cannot create {}: {e}", o.out.display()))?;
    let md_path = o.out.join("bench.md");
    std::fs::write(&md_path, &md)
        .map_err(|e| format!("cannot write {}: {e}", md_path.display()))?;
    let svg_path = o.out.join("bench.svg");
    plot(&rows, &w3, &o, &svg_path).map_err(|e| format!("plot: {e}"))?;
    println!("wrote {} and {}", md_path.display(), svg_path.display());
    Ok(())
}

const COLORS: &[RGBColor] = &[
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
    RGBColor(227, 119, 194),
];

fn plot(
    rows: &[Row],
    w3: &[Value],
    o: &Options,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(520);

    // Throughput: one cluster of bars per workload, log scale.
    let present: Vec<(&str, BTreeMap<&str, f64>)> = WORKLOADS
        .iter()
        .map(|(g, _)| {
            let m = CONTENDERS
                .iter()
                .filter_map(|c| find(rows, g, c).map(|r| (*c, r.per_s)))
                .collect();
            (*g, m)
        })
        .filter(|(_, m): &(&str, BTreeMap<&str, f64>)| !m.is_empty())
        .collect();
    let (lo, hi) = present
        .iter()
        .flat_map(|(_, m)| m.values().copied())
        .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo / 2.0, hi * 2.0)
    } else {
        (1.0, 10.0)
    };
    let n = present.len().max(1);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "ctxstore vs contenders: throughput (ops/s, log) — {}, {}",
                o.date, o.machine
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())?;
    let names: Vec<&str> = present.iter().map(|(g, _)| *g).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].to_string()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| human(*y))
        .draw()?;
    let width = 0.8 / CONTENDERS.len() as f64;
    for (ci, c) in CONTENDERS.iter().enumerate() {
        let color = COLORS[ci % COLORS.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = present
            .iter()
            .enumerate()
            .filter_map(|(wi, (_, m))| {
                let v = *m.get(c)?;
                let x0 = wi as f64 + 0.1 + ci as f64 * width;
                Some(Rectangle::new(
                    [(x0, lo), (x0 + width * 0.9, v)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(*c)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    // W3: snapshot latency p50 / p99 per contender, log scale.
    let lat: Vec<(&str, f64, f64)> = CONTENDERS
        .iter()
        .filter_map(|c| {
            let r = extra(w3, c)?;
            Some((
                *c,
                r["p50_ns"].as_f64()?.max(1.0),
                r["p99_ns"].as_f64()?.max(1.0),
            ))
        })
        .collect();
    if !lat.is_empty() {
        let hi = lat.iter().map(|l| l.2).fold(10.0, f64::max) * 3.0;
        let m = lat.len();
        let mut chart = ChartBuilder::on(&bottom)
            .caption(
                "W3: snapshot latency while a writer holds the key 20 ms (ns, log; light = p50, dark = p99)",
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..m as f64, (1f64..hi).log_scale())?;
        let names: Vec<&str> = lat.iter().map(|l| l.0).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(m * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].to_string()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| human_ns(*y))
            .draw()?;
        for (i, (c, p50, p99)) in lat.iter().enumerate() {
            let ci = CONTENDERS.iter().position(|x| x == c).unwrap_or(0);
            let color = COLORS[ci % COLORS.len()];
            let x = i as f64;
            chart.draw_series([
                Rectangle::new(
                    [(x + 0.15, 1.0), (x + 0.48, *p50)],
                    color.mix(0.45).filled(),
                ),
                Rectangle::new([(x + 0.52, 1.0), (x + 0.85, *p99)], color.filled()),
            ])?;
        }
    }
    root.present()?;
    Ok(())
}
