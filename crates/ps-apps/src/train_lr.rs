//! The main job: sparse logistic regression by asynchronous minibatch SGD
//! (Adagrad on the servers), on a generated dataset with a planted model, so it
//! runs anywhere with no download and its answer can be checked: the learned
//! model should classify held-out examples about as well as the planted one.
//!
//! Data: every example has `nnz` random binary features out of `features`;
//! the planted weights are N(0,1) on 30% of the features; the label is the sign
//! of the planted margin plus Gaussian noise. Features are hashed into the full
//! u64 key space (as click-log features are), so the table is sparse. Worker r
//! trains on examples r, r+W, r+2W, ...; worker 0 evaluates on a held-out set.
//!
//! Each minibatch: pull the weights of the batch's keys, compute the summed gradient of
//! the log-loss (Adagrad on the servers scales each coordinate), push it; the push of batch t overlaps the pull of batch t+1
//! (bounded delay 1). The per-epoch loss is summed through the PS itself (a
//! small dense table with the sum rule) and reported by worker 0.
//!
//! Worker loss: when the manager names a worker dead (it was killed, or went
//! silent), the others go on. `on_worker_loss` says what happens to its
//! examples from the next epoch on: `reassign` (the default) deals them out to
//! the live workers, `skip` leaves them out; what it pushed before it died
//! stays in the model. The lowest live rank reports and evaluates.

use std::time::Instant;

use ps_core::keys::{KeyRange, TableId};
use ps_core::rng::{mix64, SplitMix64};
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use serde_json::json;

use super::param;
use ps_node::WorkerCtx;

use crate::error::AppError;

const WEIGHTS: TableId = TableId(0);
const METRICS: TableId = TableId(1);

#[derive(Clone, Debug)]
struct Params {
    examples: u64,
    test: u64,
    features: u64,
    nnz: usize,
    epochs: u32,
    batch: usize,
    lr: f32,
    noise: f64,
    seed: u64,
    /// what the job does with a lost worker's examples: reassign or skip
    on_worker_loss: String,
}

fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    let r = Params {
        examples: param(p, "examples", 400_000)?,
        test: param(p, "test", 20_000)?,
        features: param(p, "features", 10_000)?,
        nnz: param(p, "nnz", 24)?,
        epochs: param(p, "epochs", 8)?,
        batch: param(p, "batch", 512)?,
        lr: param(p, "lr", 0.2)?,
        noise: param(p, "noise", 0.3)?,
        seed: param(p, "seed", 42)?,
        on_worker_loss: param(p, "on_worker_loss", "reassign".to_string())?,
    };
    if !["reassign", "skip"].contains(&r.on_worker_loss.as_str()) {
        return Err(AppError::params(
            "train-lr",
            format!("on_worker_loss is reassign or skip, not {:?}", r.on_worker_loss),
        ));
    }
    if r.examples == 0 || r.features == 0 || r.nnz == 0 || r.batch == 0 || r.epochs == 0 {
        return Err(AppError::params("train-lr", "examples, features, nnz, batch and epochs must be positive"));
    }
    Ok(r)
}

pub(crate) fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let r = params(p)?;
    let tables = vec![
        TableSpec::sparse(
            WEIGHTS.0,
            "weights",
            KeyRange::FULL,
            1,
            RuleSpec::Adagrad { lr: r.lr, eps: 1e-6, initial_accumulator: 0.1 },
        ),
        TableSpec::dense(METRICS.0, "metrics", KeyRange::new(0, 2 * r.epochs as u64 + 2), 1, RuleSpec::Sum),
    ];
    let filled = json!({
        "examples": r.examples, "test": r.test, "features": r.features, "nnz": r.nnz, "epochs": r.epochs,
        "batch": r.batch, "lr": r.lr, "noise": r.noise, "seed": r.seed, "on_worker_loss": r.on_worker_loss,
    });
    Ok((tables, filled))
}

fn key_of(feature: u64, seed: u64) -> u64 {
    mix64(feature ^ seed.rotate_left(17)) % (u64::MAX - 1)
}

fn planted(feature: u64, seed: u64) -> f64 {
    let mut r = SplitMix64::new(mix64(feature.wrapping_mul(31) ^ seed));
    if r.next_f64() < 0.3 {
        r.normal()
    } else {
        0.0
    }
}

/// Example `i`: sorted unique keys and a ±1 label.
fn example(i: u64, p: &Params) -> (Vec<u64>, f32) {
    let mut r = SplitMix64::new(mix64(i ^ p.seed.wrapping_mul(0x9E37)));
    let mut feats: Vec<u64> = (0..p.nnz).map(|_| r.below(p.features)).collect();
    feats.sort_unstable();
    feats.dedup();
    let margin: f64 = feats.iter().map(|&f| planted(f, p.seed)).sum::<f64>() / (0.3 * p.nnz as f64).sqrt();
    let y = if margin + p.noise * r.normal() > 0.0 { 1.0 } else { -1.0 };
    let mut keys: Vec<u64> = feats.iter().map(|&f| key_of(f, p.seed)).collect();
    keys.sort_unstable();
    (keys, y)
}

fn planted_margin(keys_of_features: &[u64], p: &Params) -> f64 {
    keys_of_features.iter().map(|&f| planted(f, p.seed)).sum()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn logloss(z: f64, y: f32) -> f64 {
    // log(1 + exp(-y z)), stable
    let m = -(y as f64) * z;
    if m > 0.0 {
        m + (-m).exp().ln_1p()
    } else {
        m.exp().ln_1p()
    }
}

/// The training examples worker `rank` of `workers` works on while the
/// workers in `dead` are gone: its own (every `workers`-th), and under
/// `reassign` its share of each dead worker's, dealt out round-robin.
fn share(p: &Params, rank: u64, workers: u64, dead: &std::collections::BTreeSet<u32>) -> Vec<u64> {
    let live: Vec<u64> = (0..workers).filter(|w| !dead.contains(&(*w as u32))).collect();
    (0..p.examples)
        .filter(|&i| {
            let owner = i % workers;
            if !dead.contains(&(owner as u32)) {
                owner == rank
            } else {
                p.on_worker_loss == "reassign" && live[(i / workers) as usize % live.len()] == rank
            }
        })
        .collect()
}

pub(crate) fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let (rank, workers) = (ctx.rank as u64, ctx.workers() as u64);
    let mut dead = ctx.dead_workers();
    let mut mine: Vec<u64> = share(&p, rank, workers, &dead);
    let mut losses: Vec<serde_json::Value> = Vec::new();
    let batches_per_epoch = mine.len().div_ceil(p.batch);
    let mut total = batches_per_epoch as u64 * p.epochs as u64;
    ctx.emit("progress", json!({"rank": rank, "done": 0, "total": total, "unit": "batches"}));
    let started = Instant::now();
    let mut w: Vec<f32> = Vec::new();
    let mut grad: Vec<f32> = Vec::new();
    let mut in_flight: Option<u64> = None;
    let mut done = 0u64;
    let mut batch: Vec<(Vec<u64>, f32)> = Vec::with_capacity(p.batch);
    let mut keys: Vec<u64> = Vec::new();
    for epoch in 0..p.epochs {
        let now_dead = ctx.dead_workers();
        if now_dead != dead {
            let before = mine.len();
            mine = share(&p, rank, workers, &now_dead);
            for &w in now_dead.difference(&dead) {
                let theirs = (w as u64..p.examples).step_by(workers as usize).count();
                let what = if p.on_worker_loss == "reassign" {
                    format!("its {theirs} examples dealt out to the live workers")
                } else {
                    format!("its {theirs} examples left out")
                };
                tracing::warn!("worker {rank}: worker {w} is lost; from epoch {} on {what}", epoch + 1);
                losses.push(
                    json!({"worker": w, "from_epoch": epoch + 1, "examples": theirs, "policy": p.on_worker_loss}),
                );
            }
            total = done + (mine.len().div_ceil(p.batch) * (p.epochs - epoch) as usize) as u64;
            tracing::info!("worker {rank}: {} examples per epoch now (was {before})", mine.len());
            dead = now_dead;
        }
        let (mut loss_sum, mut count) = (0f64, 0f64);
        // a different order every epoch
        let mut order = mine.clone();
        let mut r = SplitMix64::new(mix64(p.seed ^ (epoch as u64) << 32 ^ rank));
        for i in (1..order.len()).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        for chunk in order.chunks(p.batch) {
            batch.clear();
            batch.extend(chunk.iter().map(|&i| example(i, &p)));
            keys.clear();
            for (k, _) in &batch {
                keys.extend_from_slice(k);
            }
            keys.sort_unstable();
            keys.dedup();
            ctx.ps.pull_into(WEIGHTS, &keys, &mut w)?;
            grad.clear();
            grad.resize(keys.len(), 0.0);
            for (ks, y) in &batch {
                let pos: Vec<usize> = ks.iter().map(|k| keys.binary_search(k).expect("batch key")).collect();
                let z: f64 = pos.iter().map(|&j| w[j] as f64).sum();
                loss_sum += logloss(z, *y);
                count += 1.0;
                let g = (sigmoid(z) - if *y > 0.0 { 1.0 } else { 0.0 }) as f32;
                for j in pos {
                    grad[j] += g;
                }
            }
            if let Some(ts) = in_flight.take() {
                ctx.ps.wait(ts)?;
            }
            in_flight = Some(ctx.ps.push(WEIGHTS, &keys, &grad)?);
            done += 1;
            if done.is_multiple_of(20) || done == total {
                ctx.emit("progress", json!({"rank": rank, "done": done, "total": total, "unit": "batches"}));
            }
        }
        if let Some(ts) = in_flight.take() {
            ctx.ps.wait(ts)?;
        }
        let ts = ctx.ps.push_range(METRICS, 2 * epoch as u64, &[loss_sum as f32, count as f32])?;
        ctx.ps.wait(ts)?;
        ctx.barrier(&format!("epoch-{epoch}"))?;
        let reporter = (0..workers).find(|w| !ctx.dead_workers().contains(&(*w as u32))).unwrap_or(0);
        if rank == reporter {
            let ts = ctx.ps.pull_range(METRICS, 2 * epoch as u64, 2, Vec::new())?;
            let m = ctx.ps.wait_pull(ts)?;
            ctx.emit(
                "epoch",
                json!({"epoch": epoch + 1, "epochs": p.epochs, "loss": m[0] as f64 / m[1].max(1.0) as f64,
                       "examples": m[1] as u64, "secs": started.elapsed().as_secs_f64()}),
            );
        }
    }
    ctx.barrier("trained")?;
    let dead = ctx.dead_workers();
    if rank != (0..workers).find(|w| !dead.contains(&(*w as u32))).unwrap_or(0) {
        return Ok(format!("trained on {} examples", mine.len()));
    }
    // evaluate on held-out examples against the planted model
    let (mut correct, mut planted_correct, mut agree, mut loss) = (0u64, 0u64, 0u64, 0f64);
    let mut scored: Vec<(f64, bool)> = Vec::with_capacity(p.test as usize);
    let test: Vec<u64> = (p.examples..p.examples + p.test).collect();
    for chunk in test.chunks(4096) {
        let ex: Vec<(Vec<u64>, f32, f64)> = chunk
            .iter()
            .map(|&i| {
                let (k, y) = example(i, &p);
                // recover the planted margin from the same feature draw
                let mut r = SplitMix64::new(mix64(i ^ p.seed.wrapping_mul(0x9E37)));
                let mut feats: Vec<u64> = (0..p.nnz).map(|_| r.below(p.features)).collect();
                feats.sort_unstable();
                feats.dedup();
                (k, y, planted_margin(&feats, &p))
            })
            .collect();
        keys.clear();
        for (k, _, _) in &ex {
            keys.extend_from_slice(k);
        }
        keys.sort_unstable();
        keys.dedup();
        ctx.ps.pull_into(WEIGHTS, &keys, &mut w)?;
        for (ks, y, pm) in &ex {
            let z: f64 = ks.iter().map(|k| w[keys.binary_search(k).expect("key")] as f64).sum();
            let pos = *y > 0.0;
            correct += ((z > 0.0) == pos) as u64;
            planted_correct += ((*pm > 0.0) == pos) as u64;
            agree += ((z > 0.0) == (*pm > 0.0)) as u64;
            loss += logloss(z, *y);
            scored.push((z, pos));
        }
    }
    let n = p.test as f64;
    let auc = auc(&mut scored);
    let result = json!({
        "test_examples": p.test, "accuracy": correct as f64 / n, "planted_accuracy": planted_correct as f64 / n,
        "agreement_with_planted": agree as f64 / n, "test_logloss": loss / n, "auc": auc,
        "train_secs": started.elapsed().as_secs_f64(), "lost_workers": losses,
    });
    ctx.emit("result", result);
    let acc = correct as f64 / n;
    let planted_acc = planted_correct as f64 / n;
    if acc < planted_acc - 0.08 {
        return Err(AppError::check(format!(
            "test accuracy {acc:.4} is far below the planted model's {planted_acc:.4}: training did not converge"
        )));
    }
    let lost = if losses.is_empty() {
        String::new()
    } else {
        let what: Vec<String> = losses
            .iter()
            .map(|l| {
                let done = if l["policy"] == "reassign" { "dealt out to the others" } else { "left out" };
                format!(
                    "worker {} lost, its {} examples {done} from epoch {}",
                    l["worker"], l["examples"], l["from_epoch"]
                )
            })
            .collect();
        format!("; {}", what.join("; "))
    };
    Ok(format!("test accuracy {acc:.4} (planted model {planted_acc:.4}), AUC {auc:.4}{lost}"))
}

/// Area under the ROC curve by the rank-sum formula (ties get average ranks).
pub fn auc(scored: &mut [(f64, bool)]) -> f64 {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut pos, mut i) = (0f64, 0f64, 0usize);
    while i < scored.len() {
        let mut j = i;
        while j < scored.len() && scored[j].0 == scored[i].0 {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0;
        for s in &scored[i..j] {
            if s.1 {
                rank_sum += avg;
                pos += 1.0;
            }
        }
        i = j;
    }
    let neg = scored.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_inverted_scores() {
        let mut perfect = vec![(0.1, false), (0.2, false), (0.8, true), (0.9, true)];
        assert_eq!(auc(&mut perfect), 1.0);
        let mut inverted = vec![(0.1, true), (0.2, true), (0.8, false), (0.9, false)];
        assert_eq!(auc(&mut inverted), 0.0);
        let mut ties = vec![(0.5, true), (0.5, false)];
        assert_eq!(auc(&mut ties), 0.5);
    }

    #[test]
    fn examples_are_deterministic_and_sorted() {
        let p = params(&serde_json::Value::Null).unwrap();
        let (a, ya) = example(7, &p);
        let (b, yb) = example(7, &p);
        assert_eq!((a.clone(), ya), (b, yb));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(!a.is_empty() && a.len() <= p.nnz);
    }

    #[test]
    fn the_planted_model_beats_chance_clearly() {
        let p = params(&serde_json::Value::Null).unwrap();
        let mut ok = 0;
        for i in 0..2000 {
            let (_, y) = example(i, &p);
            let mut r = SplitMix64::new(mix64(i ^ p.seed.wrapping_mul(0x9E37)));
            let mut feats: Vec<u64> = (0..p.nnz).map(|_| r.below(p.features)).collect();
            feats.sort_unstable();
            feats.dedup();
            ok += ((planted_margin(&feats, &p) > 0.0) == (y > 0.0)) as u32;
        }
        assert!(ok > 1600, "planted accuracy {ok}/2000");
    }
}
