//! The one-process reference solver ([`serial`]): the same block steps with
//! no delay and one worker, which the tests hold the algorithm to, and those
//! tests (on planted data, and on the real data when asked).

use ps_core::rules::RuleSpec;

use super::{kkt_drops, regulariser, Local, Params};
use crate::data::Rows;

/// The same algorithm in one process with no delay (τ = 0, one worker): the
/// reference the tests check the step against. Returns the objective after
/// each sweep and the final `[w, G]` model.
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
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::data::libsvm;
    use crate::lr::{params, train_path, DEFAULT_DATA};

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
