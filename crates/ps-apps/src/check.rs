//! The invariant-1 check as a real job: every worker pushes concurrently into
//! dense and sparse tables (dims 1 and 8, the sum and SGD rules), by key lists
//! and by ranges, with several operations in flight; afterwards every parameter
//! must equal the sum of the acknowledged updates, exactly.
//!
//! Updates are small integers (and SGD rates powers of two), so every partial
//! sum is exact in f32 whatever order the shards merge in: any difference is a
//! lost, doubled or misplaced update, not rounding. Every worker derives every
//! worker's updates from the seed, so each can check the whole result.
//!
//! Each worker also owns a private key range of `dense1` that only it writes;
//! after each acknowledged push there it pulls the range back and must see its
//! own sum (read-your-writes across processes).

use std::collections::{BTreeMap, VecDeque};

use ps_core::keys::{KeyRange, TableId};
use ps_core::rng::{mix64, SplitMix64};
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use serde_json::json;

use super::param;
use ps_node::WorkerCtx;

use crate::error::AppError;

#[derive(Clone, Debug)]
struct Params {
    rounds: u32,
    keys: usize,
    window: usize,
    seed: u64,
    workers_max: u64,
    /// Fault injection for the test that shows this check can fail: worker 0
    /// pushes one update it leaves out of the expected sums.
    inject_stray_push: bool,
    /// filters on the two sparse sum tables (their residuals are flushed
    /// before the check, so the sums must still be exact)
    filters: Vec<ps_core::filter::FilterSpec>,
    /// a value may differ from the exact sum by this much relative (at least
    /// absolute 1 x this): for lossy-then-corrected filters (quantisation
    /// sends its rounding error later, in f32 arithmetic); a lost update of
    /// these integer values is off by 1 or more
    tolerance: f32,
}

fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    Ok(Params {
        rounds: param(p, "rounds", 30)?,
        keys: param(p, "keys", 2000)?,
        window: param(p, "window", 8)?,
        seed: param(p, "seed", 7)?,
        workers_max: 64,
        inject_stray_push: param(p, "inject_stray_push", false)?,
        filters: param(p, "filters", Vec::new())?,
        tolerance: param(p, "tolerance", 0.0)?,
    })
}

/// (id, name, dim, dense key count or 0 for sparse, SGD rate or 0 for sum)
const TABLES: [(u32, &str, u32, u64, f32); 5] = [
    (0, "sparse1-sum", 1, 0, 0.0),
    (1, "sparse8-sum", 8, 0, 0.0),
    (2, "dense1-sum", 1, 50_000 + 64 * 1000, 0.0),
    (3, "dense8-sgd", 8, 6_000, 0.5),
    (4, "sparse8-sgd", 8, 0, 0.25),
];
const UNIVERSE: u64 = 20_000;
const PRIVATE_BASE: u64 = 50_000;
const PRIVATE_KEYS: u64 = 1000;

pub(crate) fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let r = params(p)?;
    let tables = TABLES
        .iter()
        .map(|&(id, name, dim, dense, lr)| {
            let rule = if lr > 0.0 { RuleSpec::Sgd { lr } } else { RuleSpec::Sum };
            if dense > 0 {
                TableSpec::dense(id, name, KeyRange::new(0, dense), dim, rule)
            } else if lr == 0.0 {
                TableSpec::sparse(id, name, KeyRange::FULL, dim, rule).with_filters(r.filters.clone())
            } else {
                TableSpec::sparse(id, name, KeyRange::FULL, dim, rule)
            }
        })
        .collect();
    Ok((
        tables,
        json!({"rounds": r.rounds, "keys": r.keys, "window": r.window, "seed": r.seed, "inject_stray_push": r.inject_stray_push,
               "filters": r.filters, "tolerance": r.tolerance}),
    ))
}

fn sparse_key(u: u64) -> u64 {
    mix64(u ^ 0xC0FFEE) % (u64::MAX - 1)
}

enum Keys {
    List(Vec<u64>),
    Range(u64, u64),
}

/// The push worker `w` makes in round `i` to table `t`: keys and integer values.
fn update(p: &Params, w: u64, i: u32, t: usize) -> (Keys, Vec<f32>) {
    let (_, _, dim, dense, _) = TABLES[t];
    let mut r = SplitMix64::new(mix64(p.seed ^ mix64(w << 40 ^ (i as u64) << 8 ^ t as u64)));
    let keys = if dense > 0 && i % 2 == 1 {
        let count = (p.keys as u64 / 4).clamp(1, PRIVATE_BASE);
        Keys::Range(r.below(PRIVATE_BASE.min(dense) - count + 1), count)
    } else {
        let space = if dense > 0 { PRIVATE_BASE.min(dense) } else { UNIVERSE };
        let mut k: Vec<u64> =
            (0..p.keys).map(|_| r.below(space)).map(|u| if dense > 0 { u } else { sparse_key(u) }).collect();
        k.sort_unstable();
        k.dedup();
        Keys::List(k)
    };
    let n = match &keys {
        Keys::List(k) => k.len(),
        Keys::Range(_, c) => *c as usize,
    };
    let vals = (0..n * dim as usize).map(|_| r.below(9) as f32 - 4.0).collect();
    (keys, vals)
}

pub(crate) fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let (rank, workers) = (ctx.rank as u64, ctx.workers() as u64);
    if workers > p.workers_max {
        return Err(AppError::Shape { app: "check", why: format!("supports at most {} workers", p.workers_max) });
    }
    let total = p.rounds as u64 * TABLES.len() as u64;
    ctx.emit("progress", json!({"rank": rank, "done": 0, "total": total, "unit": "pushes"}));
    let mut window: VecDeque<u64> = VecDeque::new();
    let (mut issued, mut acked) = (0u64, 0u64);
    let mut private_sum = vec![0f32; PRIVATE_KEYS as usize];
    let mut ryw_checks = 0u64;
    for i in 0..p.rounds {
        for (t, &(id, ..)) in TABLES.iter().enumerate() {
            let (keys, vals) = update(&p, rank, i, t);
            let table = TableId(id);
            let ts = match &keys {
                Keys::List(k) => ctx.ps.push(table, k, &vals),
                Keys::Range(first, _) => ctx.ps.push_range(table, *first, &vals),
            }
            .map_err(|source| AppError::PsAt { what: format!("push round {i} table {t}").into(), source })?;
            issued += 1;
            window.push_back(ts);
            if window.len() > p.window {
                ctx.ps.wait(window.pop_front().expect("non-empty")).map_err(AppError::ps_at("wait"))?;
                acked += 1;
            }
        }
        // read-your-writes on my private range
        let mut r = SplitMix64::new(mix64(p.seed ^ rank ^ (i as u64) << 20));
        let first = r.below(PRIVATE_KEYS / 2);
        let count = 1 + r.below(PRIVATE_KEYS / 2);
        let vals: Vec<f32> = (0..count).map(|_| r.below(9) as f32 - 4.0).collect();
        let base = PRIVATE_BASE + rank * PRIVATE_KEYS;
        let ts = ctx.ps.push_range(TableId(2), base + first, &vals)?;
        ctx.ps.wait(ts)?;
        for (j, v) in vals.iter().enumerate() {
            private_sum[first as usize + j] += v;
        }
        let ts = ctx.ps.pull_range(TableId(2), base, PRIVATE_KEYS, Vec::new())?;
        let got = ctx.ps.wait_pull(ts)?;
        if got != private_sum {
            let j = got.iter().zip(&private_sum).position(|(a, b)| a != b).unwrap_or(0);
            return Err(AppError::check(format!(
                "read-your-writes broken: after my acknowledged push, key {} reads {} but I pushed {} in total",
                base + j as u64,
                got[j],
                private_sum[j]
            )));
        }
        ryw_checks += 1;
        ctx.emit(
            "progress",
            json!({"rank": rank, "done": (i as u64 + 1) * TABLES.len() as u64, "total": total, "unit": "pushes"}),
        );
    }
    while let Some(ts) = window.pop_front() {
        ctx.ps.wait(ts).map_err(AppError::ps_at("wait"))?;
        acked += 1;
    }
    if p.inject_stray_push && rank == 0 {
        let ts = ctx.ps.push(TableId(0), &[sparse_key(3)], &[1.0])?;
        ctx.ps.wait(ts)?;
    }
    if acked != issued {
        return Err(AppError::check(format!("{issued} pushes issued but {acked} acknowledged")));
    }
    for t in [TableId(0), TableId(1)] {
        ctx.ps.flush_filters(t).map_err(AppError::ps_at("flush filters"))?;
    }
    ctx.barrier("pushed")?;
    // the expected sums assume every worker pushed every round: with a worker
    // left behind that is unknown, and a mismatch would be a false alarm
    let lost = ctx.dead_workers();
    if !lost.is_empty() {
        return Err(AppError::check(format!(
            "cannot check invariant 1: worker(s) {lost:?} were lost mid-job, so which of their pushes were acknowledged is unknown"
        )));
    }

    // expected values: everyone's updates, from the seed
    let mut mismatches = 0u64;
    let mut first_bad: Vec<String> = Vec::new();
    let mut checked = 0u64;
    for (t, &(id, name, dim, dense, lr)) in TABLES.iter().enumerate() {
        let dim = dim as usize;
        let scale = if lr > 0.0 { -lr } else { 1.0 };
        let mut expect: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
        for w in 0..workers {
            for i in 0..p.rounds {
                let (keys, vals) = update(&p, w, i, t);
                let ks: Vec<u64> = match keys {
                    Keys::List(k) => k,
                    Keys::Range(f, c) => (f..f + c).collect(),
                };
                for (j, k) in ks.iter().enumerate() {
                    let e = expect.entry(*k).or_insert_with(|| vec![0.0; dim]);
                    for d in 0..dim {
                        e[d] += scale * vals[j * dim + d];
                    }
                }
            }
        }
        let (keys, got) = if dense > 0 {
            let ts = ctx.ps.pull_range(TableId(id), 0, PRIVATE_BASE.min(dense), Vec::new())?;
            ((0..PRIVATE_BASE.min(dense)).collect::<Vec<u64>>(), ctx.ps.wait_pull(ts)?)
        } else {
            let mut all: Vec<u64> = (0..UNIVERSE).map(sparse_key).collect();
            all.sort_unstable();
            all.dedup();
            let ts = ctx.ps.pull(TableId(id), &all, Vec::new())?;
            let got = ctx.ps.wait_pull(ts)?;
            (all, got)
        };
        for (j, k) in keys.iter().enumerate() {
            let want = expect.get(k).cloned().unwrap_or_else(|| vec![0.0; dim]);
            for d in 0..dim {
                checked += 1;
                let off = (got[j * dim + d] - want[d]).abs();
                if off > p.tolerance * want[d].abs().max(1.0) || off.is_nan() {
                    mismatches += 1;
                    if first_bad.len() < 5 {
                        first_bad.push(format!("{name} key {k}[{d}]: {} != expected {}", got[j * dim + d], want[d]));
                    }
                }
            }
        }
    }
    ctx.emit("check", json!({"rank": rank, "values_checked": checked, "mismatches": mismatches, "pushes_acked": acked, "ryw_checks": ryw_checks}));
    if mismatches > 0 {
        return Err(AppError::check(format!(
            "invariant 1 broken: {mismatches} of {checked} values differ from the sum of acknowledged pushes: {}",
            first_bad.join("; ")
        )));
    }
    Ok(format!("invariant 1 holds: {checked} values equal the sum of {} acknowledged pushes from {workers} workers; {ryw_checks} read-your-writes checks", acked * workers))
}
