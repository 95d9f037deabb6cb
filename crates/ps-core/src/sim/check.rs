//! The invariants of the replicated simulation, each a function that says
//! what broke (`Err`) instead of panicking, so a run can report the seed
//! and step and a negative twin can count its violations.
//! - after every step: the manager never aborted the job nor refused a
//!   frame, no worker refused one, no forwarding log is over its bound;
//! - at quiescence (invariant 1): every acknowledged push is in the values
//!   read back, exactly once; no worker keeps a request it has an answer
//!   for; every live copy of a chain, rebuilt ones too, equals its head.
//!
//! Must never: change the cluster it checks (but for the read-back, which
//! goes through a worker as an application's read would).

use std::collections::BTreeMap;

use super::cluster::{Cluster, WORKER_EP};
use crate::chain::ChainCore;
use crate::keys::TableId;
use crate::limits::CHAIN_LOG_BYTES_MAX;
use crate::wire::Kind;
use crate::worker::Keys;

/// The pushes acknowledged so far: (table, key * 4 + j) -> their sum.
pub(crate) type Acked = BTreeMap<(u32, u64), f64>;

/// Checked after every step.
pub(crate) fn step(c: &Cluster) -> Result<(), String> {
    if let Some(v) = &c.violation {
        return Err(v.clone());
    }
    if let Some(e) = (0..c.copies.len()).find(|&e| c.copies[e].log_bytes() > CHAIN_LOG_BYTES_MAX) {
        return Err(format!("copy {e}'s forwarding log is over its bound"));
    }
    Ok(())
}

/// Invariant 1 at quiescence: reads every acknowledged key back from the
/// heads through worker 0 (exact reads: no cache) and compares.
pub(crate) fn final_values(c: &mut Cluster, want: &Acked, steps_max: u64) -> Result<(), String> {
    c.workers[0].set_cache(TableId(2), false).map_err(|e| e.to_string())?;
    for table in 0..3u32 {
        let dim = if table == 1 { 4 } else { 1 };
        let keys: Vec<u64> = want.keys().filter(|(t, k)| *t == table && k % 4 == 0).map(|(_, k)| k / 4).collect();
        let ts = c.workers[0]
            .issue(&mut c.sink, Kind::Pull, TableId(table), Keys::List(&keys), None, Some(Vec::new()))
            .map_err(|e| e.to_string())?;
        c.send_from(WORKER_EP);
        c.settle(steps_max)?;
        if !c.workers[0].is_done(ts).map_err(|e| e.to_string())? {
            return Err(format!("the read of table {table} was never answered"));
        }
        let got = c.workers[0].finish(ts).map_err(|e| e.to_string())?.unwrap_or_default();
        for (i, k) in keys.iter().enumerate() {
            for j in 0..dim {
                let w = want[&(table, k * 4 + j as u64)];
                let g = got.get(i * dim + j).copied().unwrap_or(f32::NAN) as f64;
                if g != w {
                    return Err(format!("table {table} key {k}[{j}] reads {g}, the acknowledged pushes sum to {w}"));
                }
            }
        }
    }
    // nothing is kept for failover past its answer (clocks and pushes
    // nobody waited on are answered too)
    if let Some(w) = c.workers.iter().position(|w| w.unanswered() != 0) {
        return Err(format!("worker {w} keeps requests it has answers for"));
    }
    Ok(())
}

/// Invariant 1 on the copies: every live member of a chain, rebuilt ones
/// too, holds the same tables as its head.
pub(crate) fn copies_equal_heads(c: &Cluster) -> Result<(), String> {
    let image = |x: &ChainCore| crate::checkpoint::decode(&x.core().snapshot(0)).expect("a snapshot").1;
    for e in 0..c.copies.len() {
        let (server, owner) = c.at[e];
        if !c.alive(e) || c.copies[e].is_head() || !c.copies[e].is_member() {
            continue;
        }
        let head = c.copy_ep(c.copies[e].head().expect("a head"), owner);
        if image(&c.copies[e]) != image(&c.copies[head]) {
            return Err(format!("server {server}'s copy of {owner:?} differs from its head's"));
        }
    }
    Ok(())
}
