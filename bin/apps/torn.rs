//! Invariant 3 as a real job: no torn block ever reaches the caller.
//!
//! Worker 0 reads; the others write. Every write is a range push of +1 to every
//! key of a dense table, so the shards merge continuously while the reader pulls
//! the whole table again and again (over RDMA: one-sided READs of the slab
//! blocks, checked and re-read by the transport when torn).
//!
//! What makes a torn read visible: a shard merges one push frame into one block
//! inside one version-guarded write, and a frame covers a whole owned key range
//! (the table is small enough to need one chunk per range). So in any whole
//! image of a block, the keys of one owned range all have the same count. The
//! reader computes, from the ring, which keys share a (shard, range, block)
//! segment, and every pull must show one value per segment. At the end every
//! value must equal rounds x writers (invariant 1 as well).

use std::time::{Duration, Instant};

use ps_core::keys::{KeyRange, TableId, TableSpec};
use ps_core::ring::Owner;
use ps_core::rules::RuleSpec;
use ps_core::slab::BLOCK_FLOATS;
use serde_json::json;

use super::param;
use crate::node::WorkerCtx;

const TABLE: u32 = 0;

#[derive(Clone, Debug)]
struct Params {
    keys: u64,
    rounds: u32,
    reads: u32,
    window: usize,
    seconds_max: f64,
}

fn params(p: &serde_json::Value) -> Result<Params, String> {
    let r = Params {
        keys: param(p, "keys", 32_768)?,
        rounds: param(p, "rounds", 2_000)?,
        reads: param(p, "reads", 2_000)?,
        window: param(p, "window", 8)?,
        seconds_max: param(p, "seconds_max", 300.0)?,
    };
    if r.keys == 0 || r.keys > 60_000 {
        return Err("torn: keys must be in 1..=60000 (one chunk per owned range)".into());
    }
    Ok(r)
}

pub fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), String> {
    let r = params(p)?;
    let t = TableSpec::dense(TABLE, "torn", KeyRange::new(0, r.keys), 1, RuleSpec::Sum);
    Ok((
        vec![t],
        json!({"keys": r.keys, "rounds": r.rounds, "reads": r.reads, "window": r.window, "seconds_max": r.seconds_max}),
    ))
}

/// For every key, the id of its (shard, owned range, block) segment, as the
/// shards lay their dense slabs out (ranges in key order, back to back).
fn segments(ctx: &WorkerCtx, keys: u64) -> Result<Vec<u64>, String> {
    let ring = ctx.view.ring().map_err(|e| e.to_string())?;
    let mut seg = vec![u64::MAX; keys as usize];
    let mut next = 0u64;
    for (s, srv) in ctx.view.servers.iter().enumerate() {
        for h in 0..srv.ports.len() {
            let owner = Owner { server: s as u32, shard: h as u32 };
            let mut base = 0u64;
            for r in ring.owned_ranges(KeyRange::new(0, keys), owner) {
                let mut last_block = u64::MAX;
                for k in r.begin..r.end {
                    let block = (base + k - r.begin) / BLOCK_FLOATS as u64;
                    if block != last_block {
                        next += 1;
                        last_block = block;
                    }
                    seg[k as usize] = next;
                }
                base += r.len();
            }
        }
    }
    if seg.contains(&u64::MAX) {
        return Err("torn: some key has no owner in the ring".into());
    }
    Ok(seg)
}

pub fn run(ctx: &mut WorkerCtx) -> Result<String, String> {
    let p = params(&ctx.view.job.params)?;
    let workers = ctx.workers();
    if workers < 2 {
        return Err("torn needs at least 2 workers (one reader, writers)".into());
    }
    let writers = workers as u64 - 1;
    let seg = segments(ctx, p.keys)?;
    let table = TableId(TABLE);
    ctx.barrier("start")?;
    let deadline = Instant::now() + Duration::from_secs_f64(p.seconds_max);
    let mut torn_seen = 0u64;
    let mut reads = 0u64;
    if ctx.rank == 0 {
        let mut out = Vec::new();
        while reads < p.reads as u64 && Instant::now() < deadline {
            ctx.ps.pull_into_range(table, 0, p.keys, &mut out).map_err(|e| format!("pull {reads}: {e}"))?;
            reads += 1;
            let mut bad = 0u64;
            for k in 1..p.keys as usize {
                if seg[k] == seg[k - 1] && out[k] != out[k - 1] {
                    bad += 1;
                }
            }
            if bad > 0 {
                torn_seen += 1;
                tracing::error!(
                    "pull {reads}: {bad} keys differ from their block segment: a torn block reached the caller"
                );
            }
            if reads.is_multiple_of(100) {
                ctx.emit("progress", json!({"rank": 0, "done": reads, "total": p.reads, "unit": "reads"}));
            }
        }
    } else {
        let ones = vec![1f32; p.keys as usize];
        let mut window = std::collections::VecDeque::new();
        for i in 0..p.rounds {
            if Instant::now() > deadline {
                return Err(format!("torn: writer {} did {i} of {} rounds in {} s", ctx.rank, p.rounds, p.seconds_max));
            }
            window.push_back(ctx.ps.push_range(table, 0, &ones).map_err(|e| format!("push {i}: {e}"))?);
            if window.len() > p.window {
                ctx.ps.wait(window.pop_front().expect("non-empty")).map_err(|e| format!("wait: {e}"))?;
            }
        }
        for ts in window {
            ctx.ps.wait(ts).map_err(|e| format!("wait: {e}"))?;
        }
    }
    ctx.barrier("pushed")?;
    let mut out = Vec::new();
    ctx.ps.pull_into_range(table, 0, p.keys, &mut out).map_err(|e| format!("final pull: {e}"))?;
    let want = (p.rounds as u64 * writers) as f32;
    let wrong = out.iter().filter(|v| **v != want).count();
    let stats = crate::net::stats_json(ctx.ps.transport_mut());
    ctx.emit(
        "torn",
        json!({"rank": ctx.rank, "reads": reads, "torn_seen": torn_seen, "final_wrong": wrong, "transport": stats}),
    );
    if torn_seen > 0 || wrong > 0 {
        return Err(format!(
            "torn: {torn_seen} of {reads} pulls showed a torn block; {wrong} final values differ from {want}"
        ));
    }
    Ok(format!(
        "torn: {reads} whole-table pulls, no torn block reached the caller; all {} values = {want}; transport {stats}",
        p.keys
    ))
}
