//! Sparse logistic regression by delayed block proximal gradient (Li et al.,
//! OSDI 2014 §5.1, Algorithm 3), the parameter server's flagship application.
//!
//! Objective (liblinear's primal): `Σ_train log(1 + exp(−y w·x)) + l1‖w‖₁ +
//! (l2/2)‖w‖²`; C = 1 is l1 = 1 (L1) or l2 = 1 (L2).
//!
//! Features are split into `blocks` by key (key k is in block k mod blocks).
//! Iteration t works on block b = t mod blocks, and is clock t:
//! 1. the worker pulls `[w, G]` of its keys of block b (bounded:τ: the read
//!    waits until every worker has finished clock t − τ, so it sees the steps
//!    of every iteration up to t − τ − 1) and moves its margins `w·x_i` by the
//!    change of w;
//! 2. it computes, over its rows, the block's loss gradient g and a diagonal
//!    bound u of the loss's curvature, `u_k = Σ_i σ_i(1 − σ_i)|x_ik| s_i` with
//!    `s_i = Σ_{j∈b}|x_ij|`, so that `½ Σ u_k d_k²` bounds `½ dᵀ H_b d` (Cauchy-
//!    Schwarz): a step on the whole block at once does not overshoot;
//! 3. the KKT filter drops key k when w_k = 0 and `|G_k| ≤ l1 − Δ` (G: the
//!    global gradient of k's last step): its step would leave it at zero;
//!    every `kkt_every`-th sweep and the last sweep push every key;
//! 4. it pushes `[g, u]` (through the table's filters) and calls `clock()`.
//!
//! The servers' `block_prox` rule sums a clock's pushes and, when every worker
//! has finished it, takes the proximal step `w ← soft(U·w − G, l1)/(U + l2)`
//! (at most `max_step` from w). Blocks outnumber τ, so all workers read the
//! same version of a block and make the same filter decisions.
//!
//! Each sweep (one pass over the blocks) every worker adds its loss and its
//! counters to a `metrics` table; worker 0 reads a sweep's sums τ iterations
//! into the next sweep and emits `@iter`. At the end all workers read the
//! whole model, compute the exact objective, and worker 0 evaluates on the
//! test file and writes the model (format in docs/env.md: text, one
//! `key weight` line per non-zero weight after `#` header lines).

use std::path::{Path, PathBuf};
use std::time::Instant;

use ps_core::clock::Consistency;
use ps_core::keys::{KeyRange, TableId, TableSpec};
use ps_core::rules::RuleSpec;
use serde_json::json;

use super::param;
use crate::data::{libsvm, Rows};
use ps_node::WorkerCtx;

const WEIGHTS: TableId = TableId(0);
const METRICS: TableId = TableId(1);
/// metrics slots per sweep: loss, rows, keys pushed, keys filtered, bytes sent
const SLOTS: u64 = 5;

pub const DEFAULT_DATA: &str = "data/clothing";

#[derive(Clone, Debug)]
pub struct Params {
    /// a directory with train.libsvm and test.libsvm
    pub data: String,
    /// features: keys 1..=features (0: the largest index of the train file)
    pub features: u64,
    pub l1: f32,
    pub l2: f32,
    pub blocks: u64,
    pub sweeps: u64,
    pub tau: u32,
    pub max_step: f32,
    /// the curvature bound is multiplied by 1 + damping·τ: stale margins
    /// call for shorter steps
    pub damping: f32,
    /// KKT filter: skip when |G| <= l1 - delta
    pub kkt: bool,
    pub kkt_delta: f32,
    pub kkt_every: u64,
    /// where worker 0 writes the model ("" = nowhere)
    pub model: String,
    /// parser threads per worker
    pub threads: usize,
    /// filters on the weights table's traffic (`ps_core::filter::FilterSpec`)
    pub filters: Vec<ps_core::filter::FilterSpec>,
    /// the data files' format: libsvm, or clicklog (hashed into `features` keys)
    pub format: String,
    /// each worker waits a seeded uniform 0..jitter_ms before each iteration's
    /// gradient (emulated stragglers: what a delay τ is there to hide)
    pub jitter_ms: f64,
    /// fail the job if the final objective is above this (a check for CI runs)
    pub objective_max: f64,
    /// dbpg (delayed block proximal gradient) or ftrl (asynchronous
    /// minibatch FTRL-proximal, for streaming data)
    pub solver: String,
    /// write a checkpoint every this many sweeps (0: never), labelled with the
    /// sweeps done; `resume_sweep` starts from such a checkpoint (the servers
    /// load it from `PS_RESUME`)
    pub checkpoint_every: u64,
    pub resume_sweep: u64,
    /// ftrl: the rule's alpha and beta, and examples per minibatch
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
}

pub fn params(p: &serde_json::Value) -> Result<Params, String> {
    let reg: String = param(p, "reg", "l1".to_string())?;
    let c: f32 = param(p, "c", 1.0)?;
    if !(c.is_finite() && c > 0.0) {
        return Err(format!("lr: c must be a positive number, got {c}"));
    }
    let (l1, l2) = match reg.as_str() {
        "l1" => (1.0 / c, 0.0),
        "l2" => (0.0, 1.0 / c),
        other => return Err(format!("lr: reg must be l1 or l2, got {other:?}")),
    };
    let solver: String = param(p, "solver", "dbpg".to_string())?;
    let r = Params {
        data: param(p, "data", DEFAULT_DATA.to_string())?,
        features: param(p, "features", 0)?,
        l1: param(p, "l1", l1)?,
        l2: param(p, "l2", l2)?,
        blocks: param(p, "blocks", 16)?,
        // passes over the data: a streaming solver makes few
        sweeps: param(p, "sweeps", if solver == "ftrl" { 3 } else { 150 })?,
        tau: param(p, "tau", 1)?,
        max_step: param(p, "max_step", 10.0)?,
        damping: param(p, "damping", 0.5)?,
        kkt: param(p, "kkt", true)?,
        kkt_delta: param(p, "kkt_delta", 0.1)?,
        kkt_every: param(p, "kkt_every", 10)?,
        model: param(p, "model", String::new())?,
        threads: param(p, "threads", 2)?,
        filters: param(p, "filters", vec![ps_core::filter::FilterSpec::KeyCache])?,
        format: param(p, "format", "libsvm".to_string())?,
        jitter_ms: param(p, "jitter_ms", 0.0)?,
        objective_max: param(p, "objective_max", f64::INFINITY)?,
        solver,
        checkpoint_every: param(p, "checkpoint_every", 0)?,
        resume_sweep: param(p, "resume_sweep", 0)?,
        alpha: param(p, "alpha", 0.3)?,
        beta: param(p, "beta", 1.0)?,
        batch: param(p, "batch", 64)?,
    };
    if r.solver != "dbpg" && r.solver != "ftrl" {
        return Err(format!("lr: solver must be dbpg or ftrl, got {:?}", r.solver));
    }
    if r.batch == 0 {
        return Err("lr: batch must be positive".into());
    }
    if r.resume_sweep >= r.sweeps {
        return Err(format!("lr: resume_sweep {} must be below sweeps {}", r.resume_sweep, r.sweeps));
    }
    if r.solver == "ftrl" && (r.checkpoint_every > 0 || r.resume_sweep > 0) {
        return Err("lr: checkpoints are for the dbpg solver".into());
    }
    if r.format != "libsvm" && r.format != "clicklog" {
        return Err(format!("lr: format must be libsvm or clicklog, got {:?}", r.format));
    }
    if r.format == "clicklog" && r.features == 0 {
        return Err("lr: a click log needs params.features, the key space its fields are hashed into".into());
    }
    if r.blocks == 0 || r.sweeps == 0 {
        return Err("lr: blocks and sweeps must be positive".into());
    }
    if r.tau as u64 >= r.blocks {
        return Err(format!(
            "lr: tau {} must be below blocks {}: a block's next step must not start before every worker has read its last",
            r.tau, r.blocks
        ));
    }
    Ok(r)
}

fn train_path(p: &Params) -> PathBuf {
    Path::new(&p.data).join(format!("train.{}", p.format))
}

fn test_path(p: &Params) -> PathBuf {
    Path::new(&p.data).join(format!("test.{}", p.format))
}

/// Part `rank` of `parts` of a data file in the job's format.
fn read_rows(p: &Params, path: &Path, rank: usize, parts: usize) -> Result<Rows, String> {
    match p.format.as_str() {
        "clicklog" => crate::data::clicklog::read(path, p.features, rank, parts, p.threads),
        _ => libsvm::read(path, rank, parts, p.threads),
    }
}

/// The tables: the weights (`[w, G]` per key, the block_prox rule, bounded:τ)
/// and the per-sweep metrics.
pub fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), String> {
    let mut r = params(p)?;
    if r.features == 0 {
        // the manager reads the file once for its largest index
        let rows = read_rows(&r, &train_path(&r), 0, 1)
            .map_err(|e| format!("lr: {e} (run scripts/fetch-clothing.sh, or give params.features)"))?;
        r.features = rows.key_bound().saturating_sub(1).max(1);
    }
    // the delay τ is the worker's: it reads each block after its step (bounded:0
    // makes the read wait for the step) and uses the value τ iterations later
    let model = Consistency::Bounded { staleness: 0 };
    let weights = if r.solver == "ftrl" {
        TableSpec::dense(
            WEIGHTS.0,
            "weights",
            KeyRange::new(1, r.features + 1),
            1,
            RuleSpec::Ftrl { alpha: r.alpha, beta: r.beta, l1: r.l1, l2: r.l2 },
        )
        .with_filters(r.filters.clone())
    } else {
        TableSpec::dense(
            WEIGHTS.0,
            "weights",
            KeyRange::new(1, r.features + 1),
            2,
            RuleSpec::BlockProx { l1: r.l1, l2: r.l2, max_step: r.max_step },
        )
        .with_consistency(model)
        .with_filters(r.filters.clone())
    };
    let tables = vec![
        weights,
        TableSpec::dense(METRICS.0, "metrics", KeyRange::new(0, r.sweeps * SLOTS), 1, RuleSpec::Sum)
            .with_consistency(model),
    ];
    let mut filled = p.clone();
    if !filled.is_object() {
        filled = json!({});
    }
    filled["features"] = json!(r.features);
    Ok((tables, filled))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// log(1 + exp(−y z)), stable.
pub fn logloss(z: f64, y: f32) -> f64 {
    let m = -(y as f64) * z;
    if m > 0.0 {
        m + (-m).exp().ln_1p()
    } else {
        m.exp().ln_1p()
    }
}

/// One worker's rows, arranged for block steps.
pub struct Local {
    pub labels: Vec<f32>,
    /// w·x_i at the weights this worker last read
    pub margins: Vec<f64>,
    pub blocks: Vec<Block>,
    /// Σ|x_ij| over the block's features of each row, for the block being worked on
    scale: Vec<f64>,
}

/// One block's part of a worker's data, by column.
pub struct Block {
    /// the block's keys that occur in this worker's rows, ascending
    pub keys: Vec<u64>,
    /// column j is `rows[col[j]..col[j + 1]]` with values `vals[..]`
    col: Vec<usize>,
    rows: Vec<u32>,
    vals: Vec<f32>,
    /// `[w, G]` per key as last read
    pub read: Vec<f32>,
}

impl Local {
    pub fn new(rows: &Rows, blocks: u64) -> Local {
        let mut cols: Vec<std::collections::BTreeMap<u64, Vec<(u32, f32)>>> =
            (0..blocks).map(|_| Default::default()).collect();
        for i in 0..rows.len() {
            let (keys, vals) = rows.row(i);
            for (&k, &v) in keys.iter().zip(vals) {
                cols[(k % blocks) as usize].entry(k).or_default().push((i as u32, v));
            }
        }
        let blocks = cols
            .into_iter()
            .map(|c| {
                let mut b =
                    Block { keys: Vec::new(), col: vec![0], rows: Vec::new(), vals: Vec::new(), read: Vec::new() };
                for (k, entries) in c {
                    b.keys.push(k);
                    for (i, v) in entries {
                        b.rows.push(i);
                        b.vals.push(v);
                    }
                    b.col.push(b.rows.len());
                }
                b.read = vec![0.0; 2 * b.keys.len()];
                b
            })
            .collect();
        Local { labels: rows.labels.clone(), margins: vec![0.0; rows.len()], blocks, scale: vec![0.0; rows.len()] }
    }

    /// Takes a fresh read of block `b` (`[w, G]` per key of `blocks[b].keys`)
    /// and moves the margins by the change of w.
    pub fn take(&mut self, b: usize, fresh: &[f32]) {
        let blk = &mut self.blocks[b];
        for j in 0..blk.keys.len() {
            let dw = fresh[2 * j] as f64 - blk.read[2 * j] as f64;
            if dw != 0.0 {
                for e in blk.col[j]..blk.col[j + 1] {
                    self.margins[blk.rows[e] as usize] += dw * blk.vals[e] as f64;
                }
            }
        }
        blk.read.copy_from_slice(fresh);
    }

    /// The block's keys and `[g, u]` per key into `keys` and `out`;
    /// `skip(w, G)` drops a key by what was last read of it (the KKT filter).
    pub fn gradient(&mut self, b: usize, skip: impl Fn(f32, f32) -> bool, keys: &mut Vec<u64>, out: &mut Vec<f32>) {
        let blk = &self.blocks[b];
        for e in 0..blk.rows.len() {
            self.scale[blk.rows[e] as usize] = 0.0;
        }
        for e in 0..blk.rows.len() {
            self.scale[blk.rows[e] as usize] += blk.vals[e].abs() as f64;
        }
        keys.clear();
        out.clear();
        for j in 0..blk.keys.len() {
            if skip(blk.read[2 * j], blk.read[2 * j + 1]) {
                continue;
            }
            let (mut g, mut u) = (0f64, 0f64);
            for e in blk.col[j]..blk.col[j + 1] {
                let i = blk.rows[e] as usize;
                let (x, y) = (blk.vals[e] as f64, self.labels[i] as f64);
                let s = sigmoid(y * self.margins[i]);
                g += -y * (1.0 - s) * x;
                u += s * (1.0 - s) * x.abs() * self.scale[i];
            }
            keys.push(blk.keys[j]);
            out.push(g as f32);
            out.push(u as f32);
        }
    }

    pub fn loss(&self) -> f64 {
        self.margins.iter().zip(&self.labels).map(|(&m, &y)| logloss(m, y)).sum()
    }
}

/// Whether the KKT filter drops a key read as `[w, G]`.
pub fn kkt_drops(w: f32, g: f32, l1: f32, delta: f32) -> bool {
    l1 > 0.0 && w == 0.0 && g.abs() <= l1 - delta
}

/// The regulariser of a model given as `[w, G]` pairs.
fn regulariser(wg: &[f32], l1: f32, l2: f32) -> f64 {
    wg.chunks_exact(2).map(|p| l1 as f64 * (p[0] as f64).abs() + 0.5 * l2 as f64 * (p[0] as f64).powi(2)).sum()
}

/// Scores of `rows` under `w` (`[w, G]` pairs, key k at 2(k − 1)).
fn scores(rows: &Rows, wg: &[f32]) -> Vec<f64> {
    (0..rows.len())
        .map(|i| {
            let (keys, vals) = rows.row(i);
            keys.iter()
                .zip(vals)
                .filter_map(|(&k, &v)| wg.get(2 * (k as usize).checked_sub(1)?).map(|&w| w as f64 * v as f64))
                .sum()
        })
        .collect()
}

/// Accuracy, mean log-loss and AUC of `rows` under `wg`.
pub fn evaluate(rows: &Rows, wg: &[f32]) -> (f64, f64, f64) {
    let z = scores(rows, wg);
    let n = rows.len().max(1) as f64;
    let acc = z.iter().zip(&rows.labels).filter(|(z, y)| (**z > 0.0) == (**y > 0.0)).count() as f64 / n;
    let ll = z.iter().zip(&rows.labels).map(|(&z, &y)| logloss(z, y)).sum::<f64>() / n;
    let mut scored: Vec<(f64, bool)> = z.iter().zip(&rows.labels).map(|(&z, &y)| (z, y > 0.0)).collect();
    (acc, ll, super::train_lr::auc(&mut scored))
}

/// Writes the model: `#` header lines, then `key weight` per non-zero weight.
fn save(path: &str, p: &Params, wg: &[f32], objective: f64) -> Result<(), String> {
    use std::io::Write;
    let e = |x: std::io::Error| format!("lr: model {path}: {x}");
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

pub fn run(ctx: &mut WorkerCtx) -> Result<String, String> {
    let p = params(&ctx.view.job.params)?;
    let p = Params { features: param(&ctx.view.job.params, "features", 0)?, ..p };
    let e = |e: ps_core::PsError| e.to_string();
    let (rank, workers) = (ctx.rank as usize, ctx.workers() as usize);
    let started = Instant::now();
    let rows = read_rows(&p, &train_path(&p), rank, workers)?;
    if rows.is_empty() {
        tracing::warn!("lr: worker {rank} has no rows of {} (more workers than lines?)", train_path(&p).display());
    }
    if rows.keys.iter().any(|&k| k == 0 || k > p.features) {
        return Err(format!("lr: the train file has keys outside 1..={}", p.features));
    }
    ctx.ps.core_mut().set_cache(METRICS, false).map_err(e)?;
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
            ctx.ps.pull_into(WEIGHTS, &local.blocks[b].keys, &mut fresh).map_err(e)?;
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
            reads.push_back((t, Read::Ack(ctx.ps.push(WEIGHTS, &keys, &vals).map_err(e)?)));
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
            reads.push_back((t, Read::Ack(ctx.ps.push_range(METRICS, sweep * SLOTS, &m).map_err(e)?)));
        }
        reads.push_back((t, Read::Ack(ctx.ps.clock().map_err(e)?)));
        // read at clock t + 1: the shard answers once every worker has
        // finished clock t, after the step on their pushes
        let ts = ctx.ps.pull(WEIGHTS, &local.blocks[b].keys, Vec::new()).map_err(e)?;
        reads.push_back((t, Read::Block { block: b, ts }));
        if rank == 0 && sweep_ends {
            let metrics = ctx.ps.pull_range(METRICS, sweep * SLOTS, SLOTS, Vec::new()).map_err(e)?;
            let model = ctx.ps.pull_range(WEIGHTS, 1, p.features, Vec::new()).map_err(e)?;
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
                ctx.ps.checkpoint(done).map_err(e)?;
                ctx.emit("checkpoint", json!({"sweep": done}));
            }
            ctx.barrier(&format!("lr-checkpointed-{done}"))?;
        }
    }
    // what the filters held back goes now, and one more clock settles it
    ctx.ps.flush_filters(WEIGHTS).map_err(e)?;
    ctx.ps.clock().map_err(e)?;
    if rank != 0 {
        return Ok(format!("trained on {} rows", rows.len()));
    }
    // a read at clock T sees every step
    let mut wg = Vec::new();
    ctx.ps.pull_into_range(WEIGHTS, 1, p.features, &mut wg).map_err(e)?;
    finish(ctx, &p, &wg, started)
}

/// Asynchronous minibatch FTRL-proximal (the streaming mode): each worker
/// passes over its rows in a seeded order, `batch` rows at a time: pulls the
/// weights of the batch's keys, pushes the summed log-loss gradient, which the
/// servers' `ftrl` rule turns into new weights; one push in flight while the
/// next batch is read (no clocks, eventual consistency).
fn run_ftrl(ctx: &mut WorkerCtx, p: &Params, rows: &Rows, started: Instant) -> Result<String, String> {
    let e = |e: ps_core::PsError| e.to_string();
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
            ctx.ps.pull_into(WEIGHTS, &keys, &mut w).map_err(e)?;
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
                ctx.ps.wait(ts).map_err(e)?;
            }
            in_flight = Some(ctx.ps.push(WEIGHTS, &keys, &grad).map_err(e)?);
            done += 1;
            if done.is_multiple_of(32) || done == total {
                ctx.emit("progress", json!({"rank": rank, "done": done, "total": total, "unit": "minibatches"}));
            }
        }
    }
    if let Some(ts) = in_flight.take() {
        ctx.ps.wait(ts).map_err(e)?;
    }
    ctx.ps.flush_filters(WEIGHTS).map_err(e)?;
    ctx.barrier("lr-ftrl-trained")?;
    if rank != 0 {
        return Ok(format!("trained on {} rows", rows.len()));
    }
    let mut w = Vec::new();
    ctx.ps.pull_into_range(WEIGHTS, 1, p.features, &mut w).map_err(e)?;
    let wg: Vec<f32> = w.iter().flat_map(|&x| [x, 0.0]).collect();
    finish(ctx, p, &wg, started)
}

/// Worker 0's end: the exact objective over the whole train file (f64), the
/// test metrics, the model file and the `@result` line.
fn finish(ctx: &WorkerCtx, p: &Params, wg: &[f32], started: Instant) -> Result<String, String> {
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
        return Err(format!("lr: objective {objective:.4} is above objective_max {}", p.objective_max));
    }
    Ok(format!("objective {objective:.4}, {nnz} non-zeros, test accuracy {acc:.5}, AUC {auc:.5}"))
}

/// Waits for a read in flight and takes it: an acknowledgement, a block's
/// fresh values into the margins, or a report line.
fn take_read(ctx: &mut WorkerCtx, p: &Params, local: &mut Local, r: Read, started: Instant) -> Result<(), String> {
    let e = |e: ps_core::PsError| e.to_string();
    match r {
        Read::Ack(ts) => ctx.ps.wait(ts).map_err(e)?,
        Read::Block { block, ts } => {
            let fresh = ctx.ps.wait_pull(ts).map_err(e)?;
            local.take(block, &fresh);
        }
        Read::Report { sweep, metrics, model } => {
            let m = ctx.ps.wait_pull(metrics).map_err(e)?;
            let wg = ctx.ps.wait_pull(model).map_err(e)?;
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

/// The same algorithm in one process with no delay (τ = 0, one worker): the
/// reference the tests check the step against. Returns the objective after
/// each sweep and the final `[w, G]` model.
#[cfg(test)]
pub fn serial(rows: &Rows, p: &Params) -> (Vec<f64>, Vec<f32>) {
    let rule = ps_core::rules::RuleRegistry::default()
        .build(&RuleSpec::BlockProx { l1: p.l1, l2: p.l2, max_step: p.max_step })
        .expect("valid rule");
    let mut wg = vec![0f32; 2 * p.features as usize];
    let mut local = Local::new(rows, p.blocks);
    let (mut keys, mut vals, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
    let mut trace = Vec::new();
    for t in 0..p.sweeps * p.blocks {
        let (b, sweep) = ((t % p.blocks) as usize, t / p.blocks);
        let full = !p.kkt || sweep + 1 == p.sweeps || (p.kkt_every > 0 && sweep % p.kkt_every == 0);
        local.gradient(b, |w, g| !full && kkt_drops(w, g, p.l1, p.kkt_delta), &mut keys, &mut vals);
        for (k, gu) in keys.iter().zip(vals.chunks_exact(2)) {
            let mut st = [gu[0], gu[1]];
            rule.settle(&mut wg[2 * (*k as usize - 1)..][..2], &mut st);
        }
        fresh.clear();
        for &k in &local.blocks[b].keys {
            fresh.extend_from_slice(&wg[2 * (k as usize - 1)..][..2]);
        }
        local.take(b, &fresh);
        if t % p.blocks == p.blocks - 1 {
            trace.push(local.loss() + regulariser(&wg, p.l1, p.l2));
        }
    }
    (trace, wg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows with a planted sparse model (features 1..=40, 6 per row) and a bias.
    fn planted(n: usize) -> Rows {
        let mut r = ps_core::rng::SplitMix64::new(3);
        let mut rows = Rows::new();
        for _ in 0..n {
            let mut k: Vec<u64> = (0..6).map(|_| 1 + r.below(40)).collect();
            k.sort_unstable();
            k.dedup();
            let margin: f64 =
                k.iter().map(|&f| if f % 3 == 0 { 1.0 } else { 0.0 }).sum::<f64>() - 1.5 + 0.3 * r.normal();
            k.push(41);
            rows.vals.extend(std::iter::repeat_n(1.0, k.len()));
            rows.keys.extend(k);
            rows.labels.push(if margin > 0.0 { 1.0 } else { -1.0 });
            rows.start.push(rows.keys.len());
        }
        rows
    }

    #[test]
    fn every_sweep_lowers_the_objective_and_l1_makes_zeros() {
        for (reg, blocks, kkt) in [("l1", 4, true), ("l1", 1, false), ("l2", 7, false)] {
            let mut p =
                params(&json!({"reg": reg, "c": 0.1, "blocks": blocks, "sweeps": 40, "kkt": kkt, "tau": 0})).unwrap();
            p.features = 41;
            let rows = planted(400);
            let start = 400.0 * std::f64::consts::LN_2;
            let (trace, wg) = serial(&rows, &p);
            let mut last = start;
            for (i, &o) in trace.iter().enumerate() {
                assert!(o <= last + 1e-6 * last, "{reg}/{blocks}: sweep {} rose from {last} to {o}", i + 1);
                last = o;
            }
            assert!(last < 0.95 * start, "{reg}: {last} is not below {start}");
            let zeros = wg.chunks_exact(2).filter(|p| p[0] == 0.0).count();
            assert_eq!(zeros > 0, reg == "l1", "{reg}: {zeros} zero weights");
        }
    }

    /// PS_LR_DATA=data/clothing cargo test --release lr_serial -- --ignored --nocapture
    #[test]
    #[ignore]
    fn lr_serial_on_real_data() {
        let dir = std::env::var("PS_LR_DATA").unwrap_or(DEFAULT_DATA.into());
        let extra: serde_json::Value =
            serde_json::from_str(&std::env::var("PS_LR_PARAMS").unwrap_or("{}".into())).unwrap();
        let mut p = params(&extra).unwrap();
        p.data = dir;
        let rows = libsvm::read(&train_path(&p), 0, 1, 2).unwrap();
        p.features = rows.key_bound() - 1;
        let t0 = Instant::now();
        let (trace, wg) = serial(&rows, &p);
        for (i, o) in trace.iter().enumerate() {
            println!("sweep {} objective {o:.4}", i + 1);
        }
        let nnz = wg.chunks_exact(2).filter(|p| p[0] != 0.0).count();
        println!("nnz {nnz} in {:?}", t0.elapsed());
    }
}
