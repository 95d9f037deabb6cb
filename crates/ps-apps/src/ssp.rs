//! The bounded-staleness check (invariant 2) as a real job: every worker runs
//! `clocks` iterations of push (+1 on every key of a dense and a sparse table)
//! -> pull -> `clock()`, while worker 0 sleeps `slow_ms` at the start of each
//! iteration (a straggler). A read at clock c must show every worker's pushes
//! of its first c - s clocks (s: the staleness) and this worker's own c + 1
//! (c under `sequential`, where a push shows from the next clock), so every
//! value must be at least max(W (c - s), c + 1). Any read below that fails
//! the job. Each worker also adds 1 per clock to a witness key of its own, so a
//! read of the witnesses says exactly how many clocks of each worker it saw:
//! each must be at least c - s. At the end every value must equal W x clocks
//! exactly (invariant 1).
//!
//! `"check"` names the model the reads are held to (default: the table's), so a
//! job whose tables are `eventual` but checked as `bounded` shows the check can
//! fail. Each worker reports the staleness its reads saw (c minus the fewest
//! clocks of any worker in its read of the witnesses) and the time it spent
//! waiting in reads.

use std::time::{Duration, Instant};

use ps_core::clock::Consistency;
use ps_core::keys::{KeyRange, TableId};
use ps_core::rng::mix64;
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use serde_json::json;

use super::param;
use ps_node::WorkerCtx;

use crate::error::AppError;

#[derive(Clone, Debug)]
struct Params {
    clocks: u64,
    keys: u64,
    model: Consistency,
    check: Consistency,
    slow_ms: u64,
}

fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    let model: Consistency =
        param::<String>(p, "model", "bounded:1".into())?.parse().map_err(|e| AppError::consistency("model", e))?;
    let check = match param::<Option<String>>(p, "check", None)? {
        Some(c) => c.parse().map_err(|e| AppError::consistency("check", e))?,
        None => model,
    };
    Ok(Params {
        clocks: param(p, "clocks", 20)?,
        keys: param(p, "keys", 4096)?,
        model,
        check,
        slow_ms: param(p, "slow_ms", 20)?,
    })
}

const DENSE: u32 = 0;
const SPARSE: u32 = 1;
/// witness keys after the bulk keys of the dense table, one per worker rank
const WITNESSES: u64 = 256;

pub(crate) fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let r = params(p)?;
    if r.keys == 0 || r.clocks == 0 {
        return Err(AppError::params("ssp", "keys and clocks must be at least 1"));
    }
    if r.check.staleness().is_none() {
        return Err(AppError::params("ssp", "\"check\" must be a bounded model (sequential, bounded or essp)"));
    }
    let tables = vec![
        TableSpec::dense(DENSE, "dense-ssp", KeyRange::new(0, r.keys + WITNESSES), 1, RuleSpec::Sum)
            .with_consistency(r.model),
        TableSpec::sparse(SPARSE, "sparse-ssp", KeyRange::FULL, 1, RuleSpec::Sum).with_consistency(r.model),
    ];
    Ok((
        tables,
        json!({"clocks": r.clocks, "keys": r.keys, "model": r.model.to_string(), "check": r.check.to_string(),
               "slow_ms": r.slow_ms}),
    ))
}

pub(crate) fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let w = ctx.workers() as u64;
    if w > WITNESSES {
        return Err(AppError::Shape { app: "ssp", why: format!("at most {WITNESSES} workers") });
    }
    let n = p.keys as usize;
    let mut sparse: Vec<u64> = (0..p.keys).map(|i| mix64(i ^ 0x55AA) % (u64::MAX - 1)).collect();
    sparse.sort_unstable();
    sparse.dedup();
    let ones = vec![1.0f32; n];
    let ones_s = vec![1.0f32; sparse.len()];
    let (mut dense_buf, mut sparse_buf, mut wit_buf) = (Vec::new(), Vec::new(), Vec::new());
    let mut staleness_seen = vec![0u64; 2 + p.check.staleness().unwrap_or(0) as usize];
    let mut waited = Duration::ZERO;
    let started = Instant::now();
    for c in 0..p.clocks {
        if ctx.rank == 0 && p.slow_ms > 0 {
            std::thread::sleep(Duration::from_millis(p.slow_ms));
        }
        let a = ctx.ps.push_range(TableId(DENSE), 0, &ones)?;
        let b = ctx.ps.push(TableId(SPARSE), &sparse, &ones_s)?;
        let d = ctx.ps.push_range(TableId(DENSE), p.keys + ctx.rank as u64, &[1.0])?;
        for t in [a, b, d] {
            ctx.ps.wait(t)?;
        }
        let t = Instant::now();
        let ts = ctx.ps.pull_range(TableId(DENSE), 0, p.keys, std::mem::take(&mut dense_buf))?;
        dense_buf = ctx.ps.wait_pull(ts)?;
        ctx.ps.pull_into(TableId(SPARSE), &sparse, &mut sparse_buf)?;
        let ts = ctx.ps.pull_range(TableId(DENSE), p.keys, w, std::mem::take(&mut wit_buf))?;
        wit_buf = ctx.ps.wait_pull(ts)?;
        waited += t.elapsed();
        let needed = p.check.needed(c).unwrap_or(0);
        // a sequential table shows my own pushes of this clock from the next one
        let mine = if p.model == Consistency::Sequential { c } else { c + 1 };
        let floor = (w * needed).max(mine) as f32;
        let least = dense_buf.iter().chain(&sparse_buf).copied().fold(f32::INFINITY, f32::min);
        if least < floor {
            return Err(AppError::check(format!(
                "worker {} at clock {c} read {least} < {floor}: the pushes of clocks < {needed} from all {w} workers \
                 are not all there, which breaks {}",
                ctx.rank, p.check
            )));
        }
        // the witnesses: how many clocks of each worker this read saw
        let fewest = wit_buf.iter().copied().fold(f32::INFINITY, f32::min) as u64;
        if fewest < needed || wit_buf[ctx.rank as usize] as u64 != mine {
            return Err(AppError::check(format!(
                "worker {} at clock {c} saw clocks {wit_buf:?} of the workers: {} needs {needed} of each and \
                 {mine} of mine",
                ctx.rank, p.check,
            )));
        }
        let seen = c.saturating_sub(fewest) as usize;
        let last = staleness_seen.len() - 1;
        staleness_seen[seen.min(last)] += 1;
        let t = ctx.ps.clock()?;
        ctx.ps.wait(t)?;
    }
    // reads the process cache answered (before it is turned off below)
    let hits: u64 = [DENSE, SPARSE].iter().filter_map(|&t| ctx.ps.core().cache_stats(TableId(t))).map(|c| c.hits).sum();
    ctx.barrier("ssp-done")?;
    // the exact check wants every push: read the shards, not the process cache
    for t in [TableId(DENSE), TableId(SPARSE)] {
        ctx.ps.core_mut().set_cache(t, false)?;
    }
    let want = (w * p.clocks) as f32;
    let ts = ctx.ps.pull_range(TableId(DENSE), 0, p.keys, dense_buf)?;
    let dense_buf = ctx.ps.wait_pull(ts)?;
    ctx.ps.pull_into(TableId(SPARSE), &sparse, &mut sparse_buf)?;
    if let Some(v) = dense_buf.iter().chain(&sparse_buf).find(|&&v| v != want) {
        return Err(AppError::check(format!(
            "after the job a value is {v}, want {want} (= {w} workers x {} clocks)",
            p.clocks
        )));
    }
    let report = json!({"rank": ctx.rank, "clocks": p.clocks, "model": p.model.to_string(), "check": p.check.to_string(),
        "cache_hits": hits,
        "staleness_seen": staleness_seen, "read_wait_ms": waited.as_secs_f64() * 1e3,
        "seconds": started.elapsed().as_secs_f64()});
    ctx.emit("ssp", report.clone());
    Ok(format!(
        "ssp: the reads of all {} clocks kept the bound of {}; staleness seen (0, 1, ...) {:?}; {:.0} ms waiting in reads; all {} values = {want}",
        p.clocks,
        p.check,
        staleness_seen,
        waited.as_secs_f64() * 1e3,
        n + sparse.len()
    ))
}
