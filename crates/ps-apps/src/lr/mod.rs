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

use ps_core::clock::Consistency;
use ps_core::keys::{KeyRange, TableId};
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use serde_json::json;

use super::param;
use crate::data::{libsvm, Rows};
use crate::error::{AppError, DataError};

mod local;
#[cfg(test)]
mod serial;
mod worker;

pub use local::{kkt_drops, Block, Local};
#[cfg(test)]
pub use serial::serial;
pub use worker::run;

const WEIGHTS: TableId = TableId(0);
const METRICS: TableId = TableId(1);
/// metrics slots per sweep: loss, rows, keys pushed, keys filtered, bytes sent
const SLOTS: u64 = 5;

/// Where `scripts/fetch-clothing.sh` puts the clothing reviews as LIBSVM.
pub const DEFAULT_DATA: &str = "data/clothing";

/// The lr app's parameters (the job spec's `params`, with defaults).
#[derive(Clone, Debug)]
pub struct Params {
    /// a directory with train.libsvm and test.libsvm
    pub data: String,
    /// features: keys 1..=features (0: the largest index of the train file)
    pub features: u64,
    /// the L1 weight of the objective (`reg: l1` sets it to `c`)
    pub l1: f32,
    /// the L2 weight of the objective (`reg: l2` sets it to `c`)
    pub l2: f32,
    /// feature blocks: key k is in block k mod `blocks`; a worker steps one block an iteration
    pub blocks: u64,
    /// passes over the blocks (dbpg) or over the data (ftrl)
    pub sweeps: u64,
    /// the delay: a block's read is used τ iterations after its step (below `blocks`)
    pub tau: u32,
    /// the largest step a key may take in one proximal step
    pub max_step: f32,
    /// the curvature bound is multiplied by 1 + damping·τ: stale margins
    /// call for shorter steps
    pub damping: f32,
    /// KKT filter: skip when |G| <= l1 - delta
    pub kkt: bool,
    /// the KKT filter's margin Δ
    pub kkt_delta: f32,
    /// every this many sweeps (and in the last) every key is pushed, the KKT filter or not
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
    /// the sweeps a resumed run's checkpoint had done (0: a fresh run)
    pub resume_sweep: u64,
    /// ftrl: the rule's alpha and beta, and examples per minibatch
    pub alpha: f32,
    /// ftrl: the rule's beta
    pub beta: f32,
    /// ftrl: examples per minibatch
    pub batch: usize,
}

/// The job spec's `params` read into [`Params`], defaults filled in; a bad
/// value is refused with the reason.
pub fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    let reg: String = param(p, "reg", "l1".to_string())?;
    let c: f32 = param(p, "c", 1.0)?;
    if !(c.is_finite() && c > 0.0) {
        return Err(AppError::params("lr", format!("c must be a positive number, got {c}")));
    }
    let (l1, l2) = match reg.as_str() {
        "l1" => (1.0 / c, 0.0),
        "l2" => (0.0, 1.0 / c),
        other => return Err(AppError::params("lr", format!("reg must be l1 or l2, got {other:?}"))),
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
        return Err(AppError::params("lr", format!("solver must be dbpg or ftrl, got {:?}", r.solver)));
    }
    if r.batch == 0 {
        return Err(AppError::params("lr", "batch must be positive"));
    }
    if r.resume_sweep >= r.sweeps {
        return Err(AppError::params(
            "lr",
            format!("resume_sweep {} must be below sweeps {}", r.resume_sweep, r.sweeps),
        ));
    }
    if r.solver == "ftrl" && (r.checkpoint_every > 0 || r.resume_sweep > 0) {
        return Err(AppError::params("lr", "checkpoints are for the dbpg solver"));
    }
    if r.format != "libsvm" && r.format != "clicklog" {
        return Err(AppError::params("lr", format!("format must be libsvm or clicklog, got {:?}", r.format)));
    }
    if r.format == "clicklog" && r.features == 0 {
        return Err(AppError::params(
            "lr",
            "a click log needs params.features, the key space its fields are hashed into",
        ));
    }
    if r.blocks == 0 || r.sweeps == 0 {
        return Err(AppError::params("lr", "blocks and sweeps must be positive"));
    }
    if r.tau as u64 >= r.blocks {
        return Err(AppError::params(
            "lr",
            format!(
                "tau {} must be below blocks {}: a block's next step must not start before every worker has read its last",
                r.tau, r.blocks
            ),
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
fn read_rows(p: &Params, path: &Path, rank: usize, parts: usize) -> Result<Rows, DataError> {
    match p.format.as_str() {
        "clicklog" => crate::data::clicklog::read(path, p.features, rank, parts, p.threads),
        _ => libsvm::read(path, rank, parts, p.threads),
    }
}

/// The tables: the weights (`[w, G]` per key, the block_prox rule, bounded:τ)
/// and the per-sweep metrics.
pub fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let mut r = params(p)?;
    if r.features == 0 {
        // the manager reads the file once for its largest index
        let rows = read_rows(&r, &train_path(&r), 0, 1).map_err(AppError::Features)?;
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
