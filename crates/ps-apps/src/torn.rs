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
//!
//! With `hammer`, worker 0 also starts a client process of its own (`pslab
//! hammer`, connected straight to the shards) that pushes whole-table +1s with
//! many frames in flight, and kills it with SIGKILL mid-stream. The shards must
//! keep serving everyone else, and no frame may be merged twice or in part: the
//! surplus over rounds x writers is the same for every key of a segment and at
//! most the number of pushes the killed client started.

use std::time::{Duration, Instant};

use ps_core::keys::{KeyRange, TableId};
use ps_core::ring::Owner;
use ps_core::rules::RuleSpec;
use ps_core::slab::BLOCK_FLOATS;
use ps_core::store::DenseLayout;
use ps_core::table::TableSpec;
use serde_json::json;

use super::param;
use ps_node::WorkerCtx;

use crate::error::AppError;

const TABLE: u32 = 0;

#[derive(Clone, Debug)]
struct Params {
    keys: u64,
    rounds: u32,
    reads: u32,
    window: usize,
    seconds_max: f64,
    /// start and kill -9 an extra pushing client (0: none; else its pushes before the kill)
    hammer: u32,
}

fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    let r = Params {
        keys: param(p, "keys", 32_768)?,
        rounds: param(p, "rounds", 2_000)?,
        reads: param(p, "reads", 2_000)?,
        window: param(p, "window", 8)?,
        seconds_max: param(p, "seconds_max", 300.0)?,
        hammer: param(p, "hammer", 0)?,
    };
    if r.keys == 0 || r.keys > 60_000 {
        return Err(AppError::params("torn", "keys must be in 1..=60000 (one chunk per owned range)"));
    }
    Ok(r)
}

pub(crate) fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let r = params(p)?;
    let t = TableSpec::dense(TABLE, "torn", KeyRange::new(0, r.keys), 1, RuleSpec::Sum);
    Ok((
        vec![t],
        json!({"keys": r.keys, "rounds": r.rounds, "reads": r.reads, "window": r.window, "seconds_max": r.seconds_max,
               "hammer": r.hammer}),
    ))
}

/// For every key, the id of its (shard, owned range, block) segment, from the
/// layout the shards give their dense slabs (`DenseLayout`).
fn segments(ctx: &WorkerCtx, keys: u64) -> Result<Vec<u64>, AppError> {
    let ring = ctx.view.ring()?;
    let table = KeyRange::new(0, keys);
    let mut seg = vec![u64::MAX; keys as usize];
    let mut next = 0u64;
    for (s, srv) in ctx.view.servers.iter().enumerate() {
        for h in 0..srv.ports.len() {
            let owned = ring.owned_ranges(table, Owner { server: s as u32, shard: h as u32 });
            let layout = DenseLayout::new(table, 1, &owned);
            for &(begin, end, base) in &layout.ranges {
                let mut last_block = u64::MAX;
                for k in begin..end {
                    let block = (base + k - begin) / BLOCK_FLOATS as u64;
                    if block != last_block {
                        next += 1;
                        last_block = block;
                    }
                    seg[k as usize] = next;
                }
            }
        }
    }
    if seg.contains(&u64::MAX) {
        return Err(AppError::check("torn: some key has no owner in the ring"));
    }
    Ok(seg)
}

pub(crate) fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let workers = ctx.workers();
    if workers < 2 {
        return Err(AppError::Shape { app: "torn", why: "needs at least 2 workers (one reader, writers)".into() });
    }
    let writers = workers as u64 - 1;
    let seg = segments(ctx, p.keys)?;
    let table = TableId(TABLE);
    ctx.barrier("start")?;
    let deadline = Instant::now() + Duration::from_secs_f64(p.seconds_max);
    let mut torn_seen = 0u64;
    let mut reads = 0u64;
    let mut hammer_issued = 0u64;
    let mut hammer_child = None;
    if ctx.rank == 0 && p.hammer > 0 {
        hammer_child = Some(spawn_hammer(ctx)?);
    }
    if ctx.rank == 0 {
        let mut out = Vec::new();
        while reads < p.reads as u64 && Instant::now() < deadline {
            ctx.ps
                .pull_into_range(table, 0, p.keys, &mut out)
                .map_err(|source| AppError::PsAt { what: format!("pull {reads}").into(), source })?;
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
            if let Some((child, lines)) = hammer_child.as_mut() {
                // kill it once it has started `hammer` pushes: frames are in flight
                while let Ok(n) = lines.try_recv() {
                    hammer_issued = hammer_issued.max(n);
                }
                if hammer_issued >= p.hammer as u64 {
                    child.kill().map_err(|source| AppError::Hammer { what: "kill -9 of the hammer", source })?;
                    let _ = child.wait();
                    while let Ok(n) = lines.recv() {
                        hammer_issued = hammer_issued.max(n);
                    }
                    tracing::info!("killed the hammer client (SIGKILL) after it started {hammer_issued} pushes");
                    ctx.emit("hammer", json!({"killed_after_pushes": hammer_issued}));
                    hammer_child = None;
                }
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
                return Err(AppError::check(format!(
                    "torn: writer {} did {i} of {} rounds in {} s (raise seconds_max, or lower rounds)",
                    ctx.rank, p.rounds, p.seconds_max
                )));
            }
            window.push_back(
                ctx.ps
                    .push_range(table, 0, &ones)
                    .map_err(|source| AppError::PsAt { what: format!("push {i}").into(), source })?,
            );
            if window.len() > p.window {
                ctx.ps.wait(window.pop_front().expect("non-empty")).map_err(AppError::ps_at("wait"))?;
            }
        }
        for ts in window {
            ctx.ps.wait(ts).map_err(AppError::ps_at("wait"))?;
        }
    }
    if let Some((mut child, _)) = hammer_child {
        let _ = child.kill();
        let _ = child.wait();
        return Err(AppError::check(format!(
            "the hammer started only {hammer_issued} of {} pushes before the reads ended (raise reads, or lower hammer)",
            p.hammer
        )));
    }
    ctx.barrier("pushed")?;
    let mut out = Vec::new();
    ctx.ps.pull_into_range(table, 0, p.keys, &mut out).map_err(AppError::ps_at("final pull"))?;
    let want = (p.rounds as u64 * writers) as f32;
    // every key: want + the hammer's merged pushes (none without it), whole frames only
    // (worker 0 checks the exact bound below: what the killed client had started)
    let surplus_max = if p.hammer > 0 { 10.0 * p.hammer as f32 } else { 0.0 };
    let mut wrong = out.iter().filter(|v| **v < want || **v > want + surplus_max || v.fract() != 0.0).count();
    wrong += (1..out.len()).filter(|&k| seg[k] == seg[k - 1] && out[k] != out[k - 1]).count();
    if wrong > 0 {
        let bad: Vec<(usize, f32)> = out
            .iter()
            .enumerate()
            .filter(|(_, v)| **v < want || **v > want + surplus_max)
            .take(5)
            .map(|(k, v)| (k, *v))
            .collect();
        tracing::error!("final values out of bounds (first 5): {bad:?}; len {}", out.len());
    }
    if ctx.rank == 0 && p.hammer > 0 {
        let mut surplus: Vec<u64> = out.iter().map(|v| (v - want) as u64).collect();
        surplus.sort_unstable();
        surplus.dedup();
        ctx.emit("hammer", json!({"surplus_values_seen": surplus, "started_pushes": hammer_issued}));
        if hammer_issued > 0 && surplus.iter().any(|s| *s > hammer_issued + 1) {
            wrong += 1;
        }
    }
    let stats = ps_node::net::stats_json(ctx.ps.transport_mut());
    ctx.emit(
        "torn",
        json!({"rank": ctx.rank, "reads": reads, "torn_seen": torn_seen, "final_wrong": wrong, "transport": stats}),
    );
    if torn_seen > 0 || wrong > 0 {
        return Err(AppError::check(format!(
            "torn: {torn_seen} of {reads} pulls showed a torn block; {wrong} final values are wrong (want {want}, plus whole hammer pushes if any)"
        )));
    }
    Ok(format!(
        "torn: {reads} whole-table pulls, no torn block reached the caller; all {} values = {want}; transport {stats}",
        p.keys
    ))
}

/// Starts `pslab hammer` on this job's view; its stdout lines `@pushed N` come
/// back on the channel.
fn spawn_hammer(ctx: &WorkerCtx) -> Result<(std::process::Child, std::sync::mpsc::Receiver<u64>), AppError> {
    use std::io::BufRead;
    let exe = std::env::current_exe()
        .map_err(|source| AppError::Hammer { what: "cannot find this pslab executable to start the hammer", source })?;
    let view = serde_json::to_string(&ctx.view).map_err(AppError::HammerView)?;
    let mut child = std::process::Command::new(exe)
        .arg("hammer")
        .arg(view)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| AppError::Hammer { what: "cannot start the hammer", source })?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("@pushed ").and_then(|n| n.trim().parse().ok()) {
                if tx.send(n).is_err() {
                    return;
                }
            }
        }
    });
    Ok((child, rx))
}

/// The hammer: a client outside the manager's books that pushes +1 to every key
/// of the torn table, many frames in flight, until it is killed. It says
/// `@pushed N` before starting push N.
pub fn hammer(secret: ps_core::auth::JobSecret, view_json: &str, net: &ps_node::NetOpts) -> Result<(), AppError> {
    let view: ps_core::control::ClusterView = serde_json::from_str(view_json).map_err(AppError::HammerView)?;
    let p = params(&view.job.params)?;
    let mut ps = ps_node::worker::connect_client(secret, &view, None, 9999, net)?;
    let ones = vec![1f32; p.keys as usize];
    let mut window = std::collections::VecDeque::new();
    for i in 1..=10 * p.hammer.max(1) as u64 {
        println!("@pushed {i}");
        window.push_back(
            ps.push_range(TableId(TABLE), 0, &ones)
                .map_err(|source| AppError::PsAt { what: format!("hammer push {i}").into(), source })?,
        );
        if window.len() > 4 {
            ps.wait(window.pop_front().expect("non-empty")).map_err(AppError::ps_at("hammer wait"))?;
        }
    }
    Err(AppError::check("hammer: was not killed in time"))
}
