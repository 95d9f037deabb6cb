//! `pslab bench`: runs a local cluster with the bench app, then the raw-TCP
//! baseline in the same run, and prints a perftest-like table (size, ops/s,
//! GB/s, p50/p99 latency, ratio to raw TCP); `--json` and `--plot` write the
//! same numbers for machines and eyes.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};

use serde_json::json;

pub use crate::benchrow::Row;
use crate::local::{self, ClusterSpec, Event};

pub struct BenchOpts {
    pub servers: u32,
    pub shards: u32,
    pub workers: u32,
    pub params: serde_json::Value,
    pub baseline: bool,
    pub json: Option<String>,
    pub plot: Option<String>,
    pub pin: bool,
    /// Runs of the whole bench (cluster and baseline); the table shows medians.
    pub repeat: u32,
    /// Copies of every shard (chain replication): 1 measures the data path
    /// alone, as ps-lite and perftest do; 2 what replication costs.
    pub copies: u32,
}

fn baseline_of(op: &str) -> &'static str {
    match op {
        "push" => "copy",
        "pull" => "fetch",
        // pipelined: the raw-TCP baseline is one exchange at a time, no match
        "push_win" | "pull_win" => "none",
        _ => "exchange",
    }
}

pub fn run(o: BenchOpts) -> Result<(), String> {
    let mut runs: Vec<Vec<Row>> = Vec::new();
    for r in 0..o.repeat.max(1) {
        if o.repeat > 1 {
            eprintln!("bench: run {} of {}", r + 1, o.repeat);
        }
        runs.push(run_once(&o)?);
    }
    let rows = median_rows(runs);
    print_table(&rows, &o);
    if let Some(path) = &o.json {
        let doc = json!({"servers": o.servers, "shards": o.shards, "workers": o.workers, "repeat": o.repeat,
                         "params": o.params, "rows": rows});
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json")).map_err(|e| format!("{path}: {e}"))?;
        eprintln!("bench: wrote {path}");
    }
    if let Some(path) = &o.plot {
        match crate::plot::bench_png(path, &rows) {
            Ok(()) => eprintln!("bench: wrote {path}"),
            Err(e) => eprintln!("bench: no plot: {e}"),
        }
    }
    Ok(())
}

/// Per row, the median of every measured field over the runs (the runs share the phase list).
fn median_rows(mut runs: Vec<Vec<Row>>) -> Vec<Row> {
    let first = runs.remove(0);
    if runs.is_empty() {
        return first;
    }
    fn med(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    first
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let all: Vec<Row> =
                std::iter::once(r.clone()).chain(runs.iter().filter_map(|run| run.get(i).cloned())).collect();
            let m = |f: fn(&Row) -> f64| med(all.iter().map(f).collect());
            let mo = |f: fn(&Row) -> Option<f64>| {
                let v: Vec<f64> = all.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| med(v))
            };
            r.ops = all.iter().map(|x| x.ops).sum();
            r.ops_per_s = m(|x| x.ops_per_s);
            r.gb_per_s = m(|x| x.gb_per_s);
            r.p50_us = m(|x| x.p50_us);
            r.p99_us = m(|x| x.p99_us);
            r.baseline_gb_per_s = mo(|x| x.baseline_gb_per_s);
            r.baseline_p50_us = mo(|x| x.baseline_p50_us);
            r.ratio_gb_per_s = mo(|x| x.ratio_gb_per_s);
            r.ratio_p50 = mo(|x| x.ratio_p50);
            r
        })
        .collect()
}

/// One cluster run and its raw-TCP baseline, in that order.
fn run_once(o: &BenchOpts) -> Result<Vec<Row>, String> {
    let spec = ClusterSpec {
        servers: o.servers,
        shards: o.shards,
        workers: o.workers,
        app: "bench".into(),
        params: o.params.clone(),
        pin: o.pin,
        copies: o.copies,
        kills: Vec::new(),
        managers: 1,
    };
    eprintln!(
        "bench: {} server(s) x {} shard(s), {} worker(s), {} cop{} of every shard, one op in flight per worker",
        o.servers,
        o.shards,
        o.workers,
        o.copies.min(o.servers),
        if o.copies.min(o.servers) == 1 { "y" } else { "ies" }
    );
    // (layout, op, size) -> per-worker reports
    let mut reports: BTreeMap<(String, String, u64), Vec<serde_json::Value>> = BTreeMap::new();
    local::run(&spec, &mut |e| match e {
        Event::At { kind, value, .. } if kind == "bench" => {
            let key = (
                value["layout"].as_str().unwrap_or("").to_string(),
                value["op"].as_str().unwrap_or("").to_string(),
                value["size"].as_u64().unwrap_or(0),
            );
            eprintln!(
                "  measured {} {} {} B: p50 {:.1} us",
                key.0,
                key.1,
                key.2,
                value["p50_us"].as_f64().unwrap_or(0.0)
            );
            reports.entry(key).or_default().push(value);
        }
        Event::At { .. } => {}
        Event::Line { role, line } => {
            if line.contains("ERROR") || line.contains("WARN") {
                eprintln!("[{role}] {line}");
            }
        }
    })?;
    let mut rows: Vec<Row> = reports
        .iter()
        .map(|((layout, op, size), rs)| {
            let ops: u64 = rs.iter().map(|r| r["ops"].as_u64().unwrap_or(0)).sum();
            // workers ran concurrently: throughput adds up
            let ops_per_s: f64 =
                rs.iter().map(|r| r["ops"].as_f64().unwrap_or(0.0) / r["secs"].as_f64().unwrap_or(1.0)).sum();
            let bytes = rs[0]["bytes_per_op"].as_f64().unwrap_or(0.0);
            Row {
                layout: layout.clone(),
                op: op.clone(),
                size: *size,
                keys: rs[0]["keys"].as_u64().unwrap_or(0),
                ops,
                ops_per_s,
                gb_per_s: ops_per_s * bytes / 1e9,
                p50_us: rs.iter().map(|r| r["p50_us"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max),
                p99_us: rs.iter().map(|r| r["p99_us"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max),
                baseline: None,
                baseline_gb_per_s: None,
                baseline_p50_us: None,
                ratio_gb_per_s: None,
                ratio_p50: None,
            }
        })
        .collect();
    if o.baseline {
        let seconds = ps_apps::param(&o.params, "seconds", 2.0f64).map_err(|e| e.to_string())?;
        let warmup = ps_apps::param(&o.params, "warmup_seconds", 0.5f64).map_err(|e| e.to_string())?;
        let mut sizes: Vec<u64> = rows.iter().map(|r| r.size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        eprintln!("bench: raw TCP baseline (same sizes, same run, two processes on 127.0.0.1)");
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child =
            Command::new(exe).arg("tcp-baseline-server").stdout(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line.trim().strip_prefix("@listening ").ok_or("baseline server did not start")?.to_string();
        let mut c = crate::baseline::Client::connect(&addr)?;
        let mut base: BTreeMap<(&str, u64), (f64, f64)> = BTreeMap::new();
        for &size in &sizes {
            for op in ["copy", "fetch", "exchange"] {
                let (mut lat, wall) = c.run(op, size as usize, seconds, warmup)?;
                lat.sort_unstable();
                let moved = if op == "exchange" { 2 * size } else { size } as f64;
                let gbps = lat.len() as f64 * moved / wall.as_secs_f64() / 1e9;
                let p50 = lat[lat.len() / 2].as_secs_f64() * 1e6;
                eprintln!("  raw tcp {op} {size} B: {gbps:.2} GB/s, p50 {p50:.1} us");
                base.insert((op, size), (gbps, p50));
            }
        }
        drop(c);
        let _ = child.wait();
        for r in &mut rows {
            let b = baseline_of(&r.op);
            if let Some(&(g, p)) = base.get(&(b, r.size)) {
                r.baseline = Some(b.to_string());
                r.baseline_gb_per_s = Some(g);
                r.baseline_p50_us = Some(p);
            }
        }
    }
    rows.sort_by(|a, b| {
        (a.layout.as_str(), a.size, op_order(&a.op)).cmp(&(b.layout.as_str(), b.size, op_order(&b.op)))
    });
    for r in &mut rows {
        r.ratio_gb_per_s = r.baseline_gb_per_s.map(|g| r.gb_per_s / g);
        r.ratio_p50 = r.baseline_p50_us.map(|p| r.p50_us / p);
    }
    Ok(rows)
}

/// Redraws the PNG of a saved `--json` result.
pub fn replot(json_path: &str, png_path: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(json_path).map_err(|e| format!("{json_path}: {e}"))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{json_path}: {e}"))?;
    let rows: Vec<Row> = serde_json::from_value(doc["rows"].clone()).map_err(|e| format!("{json_path}: rows: {e}"))?;
    crate::plot::bench_png(png_path, &rows)
}

fn op_order(op: &str) -> usize {
    ps_apps::bench::OPS.iter().position(|o| *o == op).unwrap_or(9)
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

fn print_table(rows: &[Row], o: &BenchOpts) {
    let line = "-".repeat(104);
    println!("{line}");
    println!(
        " pslab bench: {} server(s) x {} shard(s), {} worker(s) on 127.0.0.1, --transport {} (the workers' logs say what it chose), one op in flight per worker (*_win: {} in flight)",
        o.servers,
        o.shards,
        o.workers,
        std::env::var("PS_TRANSPORT").unwrap_or_else(|_| "auto".into()),
        o.params["window"].as_u64().unwrap_or(1)
    );
    println!(" bytes = value bytes per op (push->pull and fused move them both ways: 2x); raw = plain socket, same bytes, same run");
    if o.repeat > 1 {
        println!(" median of {} runs (each ratio is taken within its run, then the median)", o.repeat);
    }
    println!("{line}");
    println!(
        " {:<7} {:<10} {:>7} {:>9} {:>11} {:>8} {:>10} {:>10}   {:>9} {:>8} {:>7}",
        "layout", "op", "bytes", "keys", "ops/s", "GB/s", "p50[us]", "p99[us]", "raw GB/s", "xGB/s", "p50/raw"
    );
    for r in rows {
        let (bg, ratio, lat) = match (r.baseline_gb_per_s, r.ratio_gb_per_s, r.ratio_p50) {
            (Some(g), Some(x), Some(l)) => (format!("{g:.2}"), format!("{x:.2}"), format!("{l:.2}")),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            " {:<7} {:<10} {:>7} {:>9} {:>11.1} {:>8.3} {:>10.1} {:>10.1}   {:>9} {:>8} {:>7}",
            r.layout,
            r.op,
            human(r.size),
            r.keys,
            r.ops_per_s,
            r.gb_per_s,
            r.p50_us,
            r.p99_us,
            bg,
            ratio,
            lat
        );
    }
    println!("{line}");
}
