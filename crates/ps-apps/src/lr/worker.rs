//! The worker program ([`run`]): delayed block proximal gradient with its
//! reads in flight and the per-sweep reports, the streaming FTRL solver, and
//! worker 0's end (the exact objective, the test metrics, the model file).

use std::time::Instant;

use serde_json::json;

use super::{
    evaluate, kkt_drops, logloss, params, read_rows, regulariser, scores, sigmoid, test_path, train_path, Local,
    Params, METRICS, SLOTS, WEIGHTS,
};
use crate::data::Rows;
use crate::error::AppError;
use crate::param;
use ps_node::WorkerCtx;

/// Writes the model: `#` header lines, then `key weight` per non-zero weight.
fn save(path: &str, p: &Params, wg: &[f32], objective: f64) -> Result<(), AppError> {
    use std::io::Write;
    let e = |source| AppError::Model { path: path.to_string(), source };
    let tmp = format!("{path}.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(e)?);
    writeln!(f, "# pslab lr model: logistic regression, score = sum of weight(key) * value(key)").map_err(e)?;
    writeln!(f, "# features {} l1 {} l2 {} objective {objective:.6}", p.features, p.l1, p.l2).map_err(e)?;
    for (i, pair) in wg.chunks_exact(2).enumerate() {
        if pair[0] != 0.0 {
            writeln!(f, "{} {}", i + 1, pair[0]).map_err(e)?;
        }
    }
    f.flush().map_err(e)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(e)
}

/// A read in flight: a block's fresh values, or (worker 0) a sweep's report.
enum Read {
    /// a push or clock: only its acknowledgement
    Ack(u64),
    Block {
        block: usize,
        ts: u64,
    },
    Report {
        sweep: u64,
        metrics: u64,
        model: u64,
    },
}

/// One lr worker: its part of the data, then sweeps of delayed block
/// proximal steps (or FTRL minibatches) until `sweeps`; worker 0 reports.
pub fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let p = Params { features: param(&ctx.view.job.params, "features", 0)?, ..p };
    let (rank, workers) = (ctx.rank as usize, ctx.workers() as usize);
    let started = Instant::now();
    let rows = read_rows(&p, &train_path(&p), rank, workers)?;
    if rows.is_empty() {
        tracing::warn!("lr: worker {rank} has no rows of {} (more workers than lines?)", train_path(&p).display());
    }
    if rows.keys.iter().any(|&k| k == 0 || k > p.features) {
        return Err(AppError::params(
            "lr",
            format!(
                "the train file has keys outside 1..={} (raise features, or leave it out to take it from the file)",
                p.features
            ),
        ));
    }
    ctx.ps.core_mut().set_cache(METRICS, false)?;
    if p.solver == "ftrl" {
        return run_ftrl(ctx, &p, &rows, started);
    }
    let mut local = Local::new(&rows, p.blocks);
    let total = p.sweeps * p.blocks;
    ctx.emit("progress", json!({"rank": rank, "done": 0, "total": total, "unit": "iterations"}));
    let (mut keys, mut vals) = (Vec::new(), Vec::new());
    let (mut pushed, mut filtered) = (0u64, 0u64);
    let mut bytes_before = ctx.ps.core().bytes_sent();
    // reads in flight, oldest first, with the iteration that issued them
    let mut reads: std::collections::VecDeque<(u64, Read)> = Default::default();
    let mut jitter = ps_core::rng::SplitMix64::new(ps_core::rng::mix64(0x6a69_7474 ^ rank as u64));
    let first = p.resume_sweep * p.blocks;
    if first > 0 {
        // resumed: the servers hold the checkpoint's tables; the margins
        // are rebuilt from every block of them
        for b in 0..p.blocks as usize {
            let mut fresh = Vec::new();
            ctx.ps.pull_into(WEIGHTS, &local.blocks[b].keys, &mut fresh)?;
            local.take(b, &fresh);
        }
        ctx.emit("resumed", json!({"rank": rank, "sweep": p.resume_sweep}));
    }
    for t in first..=total {
        // iteration t may use every step up to t − τ − 1: take those reads
        while reads.front().is_some_and(|(at, _)| *at + (p.tau as u64) < t || t == total) {
            let (_, r) = reads.pop_front().expect("looked at");
            take_read(ctx, &p, &mut local, r, started)?;
        }
        if t == total {
            break;
        }
        let (b, sweep) = ((t % p.blocks) as usize, t / p.blocks);
        if p.jitter_ms > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(jitter.next_f64() * p.jitter_ms / 1e3));
        }
        let full = !p.kkt || sweep + 1 == p.sweeps || (p.kkt_every > 0 && sweep % p.kkt_every == 0);
        local.gradient(b, |w, g| !full && kkt_drops(w, g, p.l1, p.kkt_delta), &mut keys, &mut vals);
        let damp = 1.0 + p.damping * p.tau as f32;
        vals.iter_mut().skip(1).step_by(2).for_each(|u| *u *= damp);
        pushed += keys.len() as u64;
        filtered += (local.blocks[b].keys.len() - keys.len()) as u64;
        if !keys.is_empty() {
            reads.push_back((t, Read::Ack(ctx.ps.push(WEIGHTS, &keys, &vals)?)));
        }
        let sweep_ends = b as u64 + 1 == p.blocks;
        if sweep_ends {
            let bytes = ctx.ps.core().bytes_sent();
            let m = [
                local.loss() as f32,
                local.labels.len() as f32,
                pushed as f32,
                filtered as f32,
                (bytes - bytes_before) as f32,
            ];
            bytes_before = bytes;
            (pushed, filtered) = (0, 0);
            reads.push_back((t, Read::Ack(ctx.ps.push_range(METRICS, sweep * SLOTS, &m)?)));
        }
        reads.push_back((t, Read::Ack(ctx.ps.clock()?)));
        // read at clock t + 1: the shard answers once every worker has
        // finished clock t, after the step on their pushes
        let ts = ctx.ps.pull(WEIGHTS, &local.blocks[b].keys, Vec::new())?;
        reads.push_back((t, Read::Block { block: b, ts }));
        if rank == 0 && sweep_ends {
            let metrics = ctx.ps.pull_range(METRICS, sweep * SLOTS, SLOTS, Vec::new())?;
            let model = ctx.ps.pull_range(WEIGHTS, 1, p.features, Vec::new())?;
            reads.push_back((t, Read::Report { sweep, metrics, model }));
        }
        if (t + 1) % 16 == 0 || t + 1 == total {
            ctx.emit("progress", json!({"rank": rank, "done": t + 1, "total": total, "unit": "iterations"}));
        }
        let done = sweep + 1;
        if sweep_ends && p.checkpoint_every > 0 && done % p.checkpoint_every == 0 && done < p.sweeps {
            // a consistent state: every worker's steps of every clock so far
            // settled (each waited for its clock's acknowledgements), nothing
            // of a later clock pushed yet
            while let Some((_, r)) = reads.pop_front() {
                take_read(ctx, &p, &mut local, r, started)?;
            }
            ctx.barrier(&format!("lr-checkpoint-{done}"))?;
            if rank == 0 {
                ctx.ps.checkpoint(done)?;
                ctx.emit("checkpoint", json!({"sweep": done}));
            }
            ctx.barrier(&format!("lr-checkpointed-{done}"))?;
        }
    }
    // what the filters held back goes now, and one more clock settles it
    ctx.ps.flush_filters(WEIGHTS)?;
    ctx.ps.clock()?;
    if rank != 0 {
        return Ok(format!("trained on {} rows", rows.len()));
    }
    // a read at clock T sees every step
    let mut wg = Vec::new();
    ctx.ps.pull_into_range(WEIGHTS, 1, p.features, &mut wg)?;
    finish(ctx, &p, &wg, started)
}

/// Asynchronous minibatch FTRL-proximal (the streaming mode): each worker
/// passes over its rows in a seeded order, `batch` rows at a time: pulls the
/// weights of the batch's keys, pushes the summed log-loss gradient, which the
/// servers' `ftrl` rule turns into new weights; one push in flight while the
/// next batch is read (no clocks, eventual consistency).
fn run_ftrl(ctx: &mut WorkerCtx, p: &Params, rows: &Rows, started: Instant) -> Result<String, AppError> {
    let rank = ctx.rank as u64;
    let batches = rows.len().div_ceil(p.batch) as u64;
    let total = batches * p.sweeps;
    ctx.emit("progress", json!({"rank": rank, "done": 0, "total": total, "unit": "minibatches"}));
    let (mut keys, mut w, mut grad) = (Vec::new(), Vec::new(), Vec::new());
    let mut in_flight = None;
    let mut done = 0u64;
    for pass in 0..p.sweeps {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        let mut r = ps_core::rng::SplitMix64::new(ps_core::rng::mix64(rank << 32 ^ pass));
        for i in (1..order.len()).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        for batch in order.chunks(p.batch) {
            keys.clear();
            batch.iter().for_each(|&i| keys.extend_from_slice(rows.row(i).0));
            keys.sort_unstable();
            keys.dedup();
            ctx.ps.pull_into(WEIGHTS, &keys, &mut w)?;
            grad.clear();
            grad.resize(keys.len(), 0f32);
            for &i in batch {
                let (ks, xs) = rows.row(i);
                let at: Vec<usize> = ks.iter().map(|k| keys.binary_search(k).expect("a batch key")).collect();
                let z: f64 = at.iter().zip(xs).map(|(&j, &x)| w[j] as f64 * x as f64).sum();
                let y = rows.labels[i] as f64;
                let g = -y * (1.0 - sigmoid(y * z));
                at.iter().zip(xs).for_each(|(&j, &x)| grad[j] += (g * x as f64) as f32);
            }
            if let Some(ts) = in_flight.take() {
                ctx.ps.wait(ts)?;
            }
            in_flight = Some(ctx.ps.push(WEIGHTS, &keys, &grad)?);
            done += 1;
            if done.is_multiple_of(32) || done == total {
                ctx.emit("progress", json!({"rank": rank, "done": done, "total": total, "unit": "minibatches"}));
            }
        }
    }
    if let Some(ts) = in_flight.take() {
        ctx.ps.wait(ts)?;
    }
    ctx.ps.flush_filters(WEIGHTS)?;
    ctx.barrier("lr-ftrl-trained")?;
    if rank != 0 {
        return Ok(format!("trained on {} rows", rows.len()));
    }
    let mut w = Vec::new();
    ctx.ps.pull_into_range(WEIGHTS, 1, p.features, &mut w)?;
    let wg: Vec<f32> = w.iter().flat_map(|&x| [x, 0.0]).collect();
    finish(ctx, p, &wg, started)
}

/// Worker 0's end: the exact objective over the whole train file (f64), the
/// test metrics, the model file and the `@result` line.
fn finish(ctx: &WorkerCtx, p: &Params, wg: &[f32], started: Instant) -> Result<String, AppError> {
    let all = read_rows(p, &train_path(p), 0, 1)?;
    let loss: f64 = scores(&all, wg).iter().zip(&all.labels).map(|(&z, &y)| logloss(z, y)).sum();
    let objective = loss + regulariser(wg, p.l1, p.l2);
    let nnz = wg.chunks_exact(2).filter(|p| p[0] != 0.0).count();
    let test = read_rows(p, &test_path(p), 0, 1)?;
    let (acc, ll, auc) = evaluate(&test, wg);
    if !p.model.is_empty() {
        save(&p.model, p, wg, objective)?;
    }
    ctx.emit(
        "result",
        json!({"objective": objective, "nonzeros": nnz, "test_accuracy": acc, "test_logloss": ll, "auc": auc,
               "train_secs": started.elapsed().as_secs_f64(), "model": p.model}),
    );
    if objective > p.objective_max {
        return Err(AppError::check(format!(
            "lr: objective {objective:.4} is above objective_max {}",
            p.objective_max
        )));
    }
    Ok(format!("objective {objective:.4}, {nnz} non-zeros, test accuracy {acc:.5}, AUC {auc:.5}"))
}

/// Waits for a read in flight and takes it: an acknowledgement, a block's
/// fresh values into the margins, or a report line.
fn take_read(ctx: &mut WorkerCtx, p: &Params, local: &mut Local, r: Read, started: Instant) -> Result<(), AppError> {
    match r {
        Read::Ack(ts) => ctx.ps.wait(ts)?,
        Read::Block { block, ts } => {
            let fresh = ctx.ps.wait_pull(ts)?;
            local.take(block, &fresh);
        }
        Read::Report { sweep, metrics, model } => {
            let m = ctx.ps.wait_pull(metrics)?;
            let wg = ctx.ps.wait_pull(model)?;
            report(ctx, p, sweep, &m, &wg, started);
        }
    }
    Ok(())
}

/// Worker 0's line for sweep `s`: the sums every worker pushed at its end
/// (`m`) and the model read after it (`wg`).
fn report(ctx: &WorkerCtx, p: &Params, s: u64, m: &[f32], wg: &[f32], started: Instant) {
    let objective = m[0] as f64 + regulariser(wg, p.l1, p.l2);
    let nnz = wg.chunks_exact(2).filter(|p| p[0] != 0.0).count();
    let (kept, dropped) = (m[2] as f64, m[3] as f64);
    ctx.emit(
        "iter",
        json!({"sweep": s + 1, "sweeps": p.sweeps, "objective": objective, "nonzeros": nnz,
               "filtered_pct": 100.0 * dropped / (kept + dropped).max(1.0), "bytes": m[4] as u64,
               "secs": started.elapsed().as_secs_f64()}),
    );
}
