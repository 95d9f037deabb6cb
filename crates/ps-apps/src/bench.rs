//! The push/pull benchmark, worker side. For each value size and each operation
//! (push, pull, push then pull, fused push+pull) every worker runs one operation
//! at a time for at least `seconds` after a warm-up, and reports its operation
//! count and latency percentiles as an `@bench` line; the launcher (`pslab
//! bench`) adds the raw-TCP baseline measured in the same run and prints the table.
//!
//! - dense: one key per server holding `size / servers` bytes (ps-lite's bench
//!   layout): a push of `size` bytes is one range push per server, split into
//!   chunks on the wire;
//! - sparse: `size / 4` keys x 1 f32 spread over the whole u64 key space.
//!
//! Bytes per op: the value bytes moved (push or pull: `size`; push->pull and
//! fused: `2 x size`). Keys are not counted (the sparse line also reports keys/s).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ps_core::keys::{KeyRange, TableId};
use ps_core::ring::{Ring, RingServer};
use ps_core::rng::SplitMix64;
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use ps_core::worker::Timestamp;
use serde_json::json;

use super::param;
use ps_node::WorkerCtx;

use crate::error::AppError;

/// The operations a run measures one at a time, in the order reports list them.
pub const OPS: [&str; 4] = ["push", "pull", "push_pull", "fused"];
/// With `window` > 1: dense pushes (or pulls) kept `window` in flight, a new one
/// issued as the oldest is answered (a sliding window, as perftest's tx depth):
/// the goodput of a full pipeline, as `ib_write_bw` measures it.
pub const OPS_WINDOWED: [&str; 2] = ["push_win", "pull_win"];
const SPARSE_TABLE: u32 = 1000;

#[derive(Clone, Debug)]
struct Params {
    dense_sizes: Vec<u64>,
    sparse_sizes: Vec<u64>,
    seconds: f64,
    warmup_seconds: f64,
    window: usize,
    /// only the windowed ops
    window_only: bool,
}

fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    let kib = |k: u64| k * 1024;
    let r = Params {
        dense_sizes: param(
            p,
            "dense_sizes",
            vec![kib(4), kib(64), kib(256), kib(1024), kib(4096), kib(16384), kib(65536)],
        )?,
        sparse_sizes: param(p, "sparse_sizes", vec![kib(4), kib(64), kib(1024), kib(4096)])?,
        seconds: param(p, "seconds", 2.0)?,
        warmup_seconds: param(p, "warmup_seconds", 0.5)?,
        window: param(p, "window", 1)?,
        window_only: param(p, "window_only", false)?,
    };
    for &s in r.dense_sizes.iter().chain(&r.sparse_sizes) {
        if s < 4 || s % 4 != 0 {
            return Err(AppError::params(
                "bench",
                format!("size {s} must be a positive multiple of 4 bytes (dense_sizes, sparse_sizes)"),
            ));
        }
    }
    Ok(r)
}

/// Smallest dense key count n such that keys 0..n of a table with range 0..n
/// include one key on every server; returns n and the chosen key per server.
fn keys_per_server(servers: u32, partitions: u32) -> Result<(u64, Vec<u64>), AppError> {
    let ring = Ring::new(&(0..servers).map(|id| RingServer { id, nr_shards: 1 }).collect::<Vec<_>>(), partitions)?;
    for n in servers as u64..(64 * servers as u64).max(64) {
        let t = TableSpec::dense(0, "probe", KeyRange::new(0, n), 1, RuleSpec::Sum);
        let mut pick = vec![None; servers as usize];
        for k in 0..n {
            let s = ring.owner(&t, k).server as usize;
            pick[s].get_or_insert(k);
        }
        if pick.iter().all(|p| p.is_some()) {
            return Ok((n, pick.into_iter().map(|p| p.expect("all some")).collect()));
        }
    }
    Err(AppError::Shape { app: "bench", why: "no small dense table spreads one key to every server".into() })
}

pub(crate) fn tables(
    p: &serde_json::Value,
    servers: u32,
    partitions: u32,
) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let r = params(p)?;
    let (n, _) = keys_per_server(servers, partitions)?;
    let mut tables = Vec::new();
    for (i, &size) in r.dense_sizes.iter().enumerate() {
        let dim = (size / 4).div_ceil(servers as u64).max(1);
        tables.push(TableSpec::dense(
            i as u32,
            &format!("dense-{size}"),
            KeyRange::new(0, n),
            dim as u32,
            RuleSpec::Sum,
        ));
    }
    tables.push(TableSpec::sparse(SPARSE_TABLE, "sparse", KeyRange::FULL, 1, RuleSpec::Sum));
    let filled = json!({"dense_sizes": r.dense_sizes, "sparse_sizes": r.sparse_sizes, "seconds": r.seconds, "warmup_seconds": r.warmup_seconds, "window": r.window, "window_only": r.window_only});
    Ok((tables, filled))
}

/// One operation of a phase: returns when it is acknowledged / answered.
fn dense_op(
    ctx: &mut WorkerCtx,
    op: &str,
    table: TableId,
    keys: &[u64],
    vals: &[f32],
    bufs: &mut [Vec<f32>],
) -> Result<(), AppError> {
    let per = vals.len() / keys.len();
    let mut ts = Vec::with_capacity(keys.len());
    match op {
        "push" | "push_pull" => {
            for (i, &k) in keys.iter().enumerate() {
                ts.push(ctx.ps.push_range(table, k, &vals[i * per..(i + 1) * per])?);
            }
            for t in ts.drain(..) {
                ctx.ps.wait(t)?;
            }
            if op == "push_pull" {
                for (i, &k) in keys.iter().enumerate() {
                    ts.push(ctx.ps.pull_range(table, k, 1, std::mem::take(&mut bufs[i]))?);
                }
                for (i, t) in ts.drain(..).enumerate() {
                    bufs[i] = ctx.ps.wait_pull(t)?;
                }
            }
        }
        "pull" => {
            for (i, &k) in keys.iter().enumerate() {
                ts.push(ctx.ps.pull_range(table, k, 1, std::mem::take(&mut bufs[i]))?);
            }
            for (i, t) in ts.drain(..).enumerate() {
                bufs[i] = ctx.ps.wait_pull(t)?;
            }
        }
        "fused" => {
            for (i, &k) in keys.iter().enumerate() {
                ts.push(ctx.ps.push_pull_range(
                    table,
                    k,
                    &vals[i * per..(i + 1) * per],
                    std::mem::take(&mut bufs[i]),
                )?);
            }
            for (i, t) in ts.drain(..).enumerate() {
                bufs[i] = ctx.ps.wait_pull(t)?;
            }
        }
        _ => unreachable!("op names are fixed"),
    }
    Ok(())
}

fn sparse_op(ctx: &mut WorkerCtx, op: &str, keys: &[u64], vals: &[f32], buf: &mut Vec<f32>) -> Result<(), AppError> {
    let t = TableId(SPARSE_TABLE);
    match op {
        "push" => {
            let ts = ctx.ps.push(t, keys, vals)?;
            Ok(ctx.ps.wait(ts)?)
        }
        "pull" => Ok(ctx.ps.pull_into(t, keys, buf)?),
        "push_pull" => {
            let ts = ctx.ps.push(t, keys, vals)?;
            ctx.ps.wait(ts)?;
            Ok(ctx.ps.pull_into(t, keys, buf)?)
        }
        "fused" => {
            let ts = ctx.ps.push_pull(t, keys, vals, std::mem::take(buf))?;
            *buf = ctx.ps.wait_pull(ts)?;
            Ok(())
        }
        _ => unreachable!("op names are fixed"),
    }
}

/// Dense ops kept `window` in flight across calls of [`Pipe::step`]; each step
/// issues `window` ops and retires as many (once the window is full), so a step
/// moves `window x size` bytes and the pipeline never drains between steps.
struct Pipe {
    /// one entry per range request: (timestamp, pull buffer)
    inflight: VecDeque<(Timestamp, Option<usize>)>,
    bufs: Vec<Vec<f32>>,
    free: Vec<usize>,
    window: usize,
}

impl Pipe {
    fn new(window: usize, keys: usize) -> Pipe {
        Pipe {
            inflight: VecDeque::new(),
            bufs: vec![Vec::new(); window * keys],
            free: (0..window * keys).collect(),
            window,
        }
    }

    fn step(
        &mut self,
        ctx: &mut WorkerCtx,
        push: bool,
        table: TableId,
        keys: &[u64],
        vals: &[f32],
    ) -> Result<(), AppError> {
        let per = vals.len() / keys.len();
        for _ in 0..self.window {
            for (i, &k) in keys.iter().enumerate() {
                if self.inflight.len() >= self.window * keys.len() {
                    self.retire(ctx)?;
                }
                let entry = if push {
                    (ctx.ps.push_range(table, k, &vals[i * per..(i + 1) * per])?, None)
                } else {
                    let b = self.free.pop().expect("one buffer per request in flight");
                    let out = std::mem::take(&mut self.bufs[b]);
                    (ctx.ps.pull_range(table, k, 1, out)?, Some(b))
                };
                self.inflight.push_back(entry);
            }
        }
        Ok(())
    }

    fn retire(&mut self, ctx: &mut WorkerCtx) -> Result<(), AppError> {
        let Some((ts, buf)) = self.inflight.pop_front() else { return Ok(()) };
        match buf {
            None => Ok(ctx.ps.wait(ts)?),
            Some(b) => {
                self.bufs[b] = ctx.ps.wait_pull(ts)?;
                self.free.push(b);
                Ok(())
            }
        }
    }

    /// Waits for everything in flight (outside the timed part).
    fn drain(&mut self, ctx: &mut WorkerCtx) -> Result<(), AppError> {
        while !self.inflight.is_empty() {
            self.retire(ctx)?;
        }
        Ok(())
    }
}

/// Runs `f` for the warm-up, then for at least `seconds` and 5 ops; returns latencies.
fn timed(p: &Params, mut f: impl FnMut() -> Result<(), AppError>) -> Result<(Vec<Duration>, Duration), AppError> {
    let w = Instant::now();
    let mut n = 0;
    while w.elapsed().as_secs_f64() < p.warmup_seconds || n < 2 {
        f()?;
        n += 1;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < p.seconds || lat.len() < 5 {
        let t = Instant::now();
        f()?;
        lat.push(t.elapsed());
    }
    Ok((lat, start.elapsed()))
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &WorkerCtx,
    layout: &str,
    op: &str,
    size: u64,
    keys: u64,
    window: usize,
    lat: &mut [Duration],
    wall: Duration,
) {
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    let moved = match op {
        "push" | "pull" => size,
        "push_win" | "pull_win" => size * window as u64,
        _ => 2 * size,
    };
    ctx.emit(
        "bench",
        json!({"rank": ctx.rank, "layout": layout, "op": op, "size": size, "keys": keys, "ops": lat.len(),
               "secs": wall.as_secs_f64(), "bytes_per_op": moved, "p50_us": pct(0.5), "p99_us": pct(0.99)}),
    );
}

pub(crate) fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let servers = ctx.view.servers.len() as u32;
    let (_, keys) = keys_per_server(servers, ctx.view.job.partitions)?;
    let mut phases = 0;
    for (i, &size) in p.dense_sizes.iter().enumerate() {
        let table = TableId(i as u32);
        let dim = ctx.view.job.tables[i].dim as usize;
        let vals: Vec<f32> = (0..dim * keys.len()).map(|j| (j % 7) as f32).collect();
        let mut bufs = vec![Vec::new(); keys.len()];
        for op in OPS.into_iter().filter(|_| !p.window_only) {
            ctx.barrier(&format!("dense-{size}-{op}"))?;
            let (mut lat, wall) = timed(&p, || dense_op(ctx, op, table, &keys, &vals, &mut bufs))?;
            report(ctx, "dense", op, size, keys.len() as u64, 1, &mut lat, wall);
            phases += 1;
        }
        if p.window > 1 {
            for op in OPS_WINDOWED {
                ctx.barrier(&format!("dense-{size}-{op}"))?;
                let mut pipe = Pipe::new(p.window, keys.len());
                let push = op == "push_win";
                let (mut lat, wall) = timed(&p, || pipe.step(ctx, push, table, &keys, &vals))?;
                pipe.drain(ctx)?;
                report(ctx, "dense", op, size, keys.len() as u64, p.window, &mut lat, wall);
                phases += 1;
            }
        }
    }
    for &size in &p.sparse_sizes {
        let n = size / 4;
        let mut r = SplitMix64::new(size ^ (ctx.rank as u64) << 48);
        let mut keys: Vec<u64> = (0..n).map(|_| r.below(u64::MAX - 1)).collect();
        keys.sort_unstable();
        keys.dedup();
        let vals = vec![1.0f32; keys.len()];
        let mut buf = Vec::new();
        for op in OPS {
            ctx.barrier(&format!("sparse-{size}-{op}"))?;
            let (mut lat, wall) = timed(&p, || sparse_op(ctx, op, &keys, &vals, &mut buf))?;
            report(ctx, "sparse", op, size, keys.len() as u64, 1, &mut lat, wall);
            phases += 1;
        }
    }
    Ok(format!("{phases} phases"))
}
