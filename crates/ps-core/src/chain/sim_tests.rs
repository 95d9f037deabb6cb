//! The seeded failover simulations of chain replication: workers push
//! while servers die (and copies are rebuilt); every value read back is the
//! exact sum of the pushes, nothing acknowledged is lost, nothing is merged
//! twice, and every live copy equals its head. Also: garbage chain frames
//! never panic a copy.
//!
//! Must never: lower a seed count or drop a negative check to make a run
//! pass (`PS_SIM_SEEDS` raises or lowers them from outside).

use std::collections::BTreeMap;

use super::sim_cluster::{view, Cluster, SERVERS, WORKERS, WORKER_EP};
use super::{bind_frame, chain_of, ChainCore, ChainStats};
use crate::kernels::Kernels;
use crate::keys::TableId;
use crate::ring::Owner;
use crate::rules::RuleRegistry;
use crate::shard::ShardCore;
use crate::sim::SimSink;
use crate::transport::PeerId;
use crate::wire::{DataHeader, Kind};
use crate::worker::Keys;

/// One seed: every worker pushes (key lists to a sparse and a dense table,
/// some as push-pulls, and clocks); at a random moment `kills` servers die
/// (their frames in flight lost, their connections closed), workers bind to
/// the new heads and send again what had no answer. Every operation
/// succeeds, and every value equals the sum of the pushes: nothing lost,
/// nothing merged twice.
fn failover_run(seed: u64, copies: u32, kills: &[u32]) -> ChainStats {
    failover_run_with(seed, copies, kills, false)
}

/// With `rebuild`, each kill is answered as the manager does (a copy
/// placed for every short chain, bulk-copied from its tail while the
/// workers push) and the next kill comes only once every rebuilt copy
/// joined its chain: with 2 copies, every server but one may die in turn.
fn failover_run_with(seed: u64, copies: u32, kills: &[u32], rebuild: bool) -> ChainStats {
    let mut c = Cluster::new(copies, seed);
    let n = WORKER_EP;
    let mut rng = crate::rng::SplitMix64::new(seed ^ 0xC4A1);
    let mut want: BTreeMap<(u32, u64), f64> = BTreeMap::new();
    let mut current: Vec<Option<u64>> = vec![None; WORKERS];
    let mut left = [10usize; WORKERS];
    let kill_at = 50 + rng.below(600);
    let mut steps = 0u64;
    let mut killed = 0;
    loop {
        for w in 0..WORKERS {
            if current[w].is_some() || left[w] == 0 {
                continue;
            }
            if rng.below(5) == 0 {
                // a range push and a range read of the bounded table, then a clock
                let (first, count) = (rng.below(1000), 1 + rng.below(900));
                let vals: Vec<f32> = (0..count).map(|_| 1.0 + rng.below(3) as f32).collect();
                for (i, v) in vals.iter().enumerate() {
                    *want.entry((2, (first + i as u64) * 4)).or_default() += *v as f64;
                }
                let wc = &mut c.workers[w];
                wc.issue(&mut c.sink, Kind::Push, TableId(2), Keys::Range { first, count }, Some(&vals), None).unwrap();
                let ts = wc
                    .issue(&mut c.sink, Kind::Pull, TableId(2), Keys::Range { first, count }, None, Some(Vec::new()))
                    .unwrap();
                wc.clock(&mut c.sink).unwrap();
                c.send_from(n + w);
                current[w] = Some(ts);
                continue;
            }
            let table = rng.below(2) as u32;
            let dim = if table == 0 { 1 } else { 4 };
            let mut keys: Vec<u64> = (0..1 + rng.below(300))
                .map(|_| if table == 0 { rng.next_u64() % (1 << 40) } else { rng.below(3000) })
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let vals: Vec<f32> = (0..keys.len() * dim).map(|_| 1.0 + rng.below(5) as f32).collect();
            for (i, k) in keys.iter().enumerate() {
                for j in 0..dim {
                    *want.entry((table, *k * 4 + j as u64)).or_default() += vals[i * dim + j] as f64;
                }
            }
            let kind = if rng.below(4) == 0 { Kind::PushPull } else { Kind::Push };
            let out = (kind == Kind::PushPull).then(Vec::new);
            let wc = &mut c.workers[w];
            let ts = wc.issue(&mut c.sink, kind, TableId(table), Keys::List(&keys), Some(&vals), out).unwrap();
            // every operation is a clock of its own (a bounded read waits for the slowest)
            wc.clock(&mut c.sink).unwrap();
            c.send_from(n + w);
            current[w] = Some(ts);
        }
        let due = if rebuild { c.rebuilt() && steps >= kill_at } else { steps >= kill_at + killed as u64 * 300 };
        if killed < kills.len() && due {
            c.kill(kills[killed]);
            killed += 1;
            if rebuild {
                c.rebuild();
            }
        }
        let moved = c.step();
        steps += 1;
        assert!(steps < 3_000_000, "seed {seed}: no progress");
        for w in 0..WORKERS {
            if let Some(ts) = current[w] {
                if c.workers[w].is_done(ts).unwrap() {
                    c.workers[w].finish(ts).unwrap_or_else(|e| panic!("seed {seed}: worker {w}: {e}"));
                    current[w] = None;
                    left[w] -= 1;
                }
            }
        }
        let lost = c.workers.iter().any(|w| !w.lost_owners().is_empty());
        if !moved && !lost && current.iter().all(|o| o.is_none()) && left.iter().all(|&l| l == 0) {
            break;
        }
    }
    while killed < kills.len() {
        c.settle();
        c.kill(kills[killed]);
        killed += 1;
        if rebuild {
            c.rebuild();
        }
    }
    c.settle();
    if rebuild {
        assert!(c.rebuilt(), "seed {seed}: a rebuilt copy never joined its chain");
    }
    // every worker at the same clock, so a bounded read waits for nobody
    let most = c.workers.iter().map(|w| w.clocks()).max().unwrap_or(0);
    for w in 0..WORKERS {
        while c.workers[w].clocks() < most {
            c.workers[w].clock(&mut c.sink).unwrap();
        }
        c.send_from(n + w);
    }
    c.settle();
    // read everything back from the heads through worker 0 (exact reads: no cache)
    c.workers[0].set_cache(TableId(2), false).unwrap();
    for table in 0..3u32 {
        let dim = if table == 1 { 4 } else { 1 };
        let keys: Vec<u64> = want.keys().filter(|(t, k)| *t == table && k % 4 == 0).map(|(_, k)| k / 4).collect();
        let ts = c.workers[0]
            .issue(&mut c.sink, Kind::Pull, TableId(table), Keys::List(&keys), None, Some(Vec::new()))
            .unwrap();
        c.send_from(n);
        c.settle();
        assert!(c.workers[0].is_done(ts).unwrap(), "seed {seed}: the read of table {table} was never answered");
        let got = c.workers[0].finish(ts).unwrap().unwrap();
        for (i, k) in keys.iter().enumerate() {
            for j in 0..dim {
                let w = want[&(table, k * 4 + j as u64)];
                assert_eq!(got[i * dim + j] as f64, w, "seed {seed}: table {table} key {k}[{j}] (kills {kills:?})");
            }
        }
    }
    // nothing is kept for failover past its answer (clocks and pushes
    // nobody waited on are answered too)
    for (w, wc) in c.workers.iter().enumerate() {
        assert_eq!(wc.unanswered(), 0, "seed {seed}: worker {w} keeps requests it has answers for");
    }
    // and every live copy of a chain, rebuilt ones too, holds the same tables
    for e in 0..c.copies.len() {
        let (server, owner) = c.at[e];
        if c.view.dead_servers.contains(&server) || c.copies[e].is_head() || !c.copies[e].is_member() {
            continue;
        }
        let head = c.copy_ep(c.copies[e].head().expect("a head"), owner);
        let image = |x: &ChainCore| crate::checkpoint::decode(&x.core().snapshot(0)).expect("a snapshot").1;
        assert!(
            image(&c.copies[e]) == image(&c.copies[head]),
            "seed {seed}: server {server}'s copy of {owner:?} differs from its head's"
        );
    }
    c.copies.iter().fold(ChainStats::default(), |a, x| {
        let s = x.stats();
        ChainStats {
            forwarded: a.forwarded + s.forwarded,
            skipped: a.skipped + s.skipped,
            replayed: a.replayed + s.replayed,
            snapshots: a.snapshots + s.snapshots,
            snapshot_bytes: a.snapshot_bytes + s.snapshot_bytes,
        }
    })
}

/// Sums the counters of many seeds, and asserts the failovers did what
/// they are there for: frames were sent again, and some were skipped.
fn seeds(n: u64, copies: u32, kills: impl Fn(u64) -> Vec<u32>) {
    let mut total = ChainStats::default();
    for seed in 0..n {
        let s = failover_run(seed, copies, &kills(seed));
        total.forwarded += s.forwarded;
        total.skipped += s.skipped;
        total.replayed += s.replayed;
    }
    assert!(total.forwarded > 0 && total.skipped > 0 && total.replayed > 0, "{total:?}");
}

#[test]
fn two_copies_lose_no_acknowledged_push_when_any_server_dies() {
    seeds(sim_seeds(300), 2, |seed| vec![(seed % SERVERS as u64) as u32]);
}

#[test]
fn three_copies_survive_two_deaths_heads_middles_and_tails() {
    seeds(sim_seeds(200), 3, |seed| {
        let first = (seed % SERVERS as u64) as u32;
        vec![first, (first + 1 + (seed / 3) as u32 % 2) % SERVERS]
    });
}

/// Rebuilds: with 2 copies on 3 servers, a server dies, its copies are
/// rebuilt on the others from their chains' tails while the workers push,
/// then a second server dies (which, without the rebuild, takes the last
/// copy of some shard): every value is still exact, and every rebuilt
/// copy equals its head.
#[test]
fn rebuilt_copies_let_a_chain_survive_a_second_death() {
    let mut snapshots = 0;
    for seed in 0..sim_seeds(150) {
        let first = (seed % SERVERS as u64) as u32;
        let s = failover_run_with(seed, 2, &[first, (first + 1) % SERVERS], true);
        snapshots += s.snapshots;
    }
    assert!(snapshots > 0);
}

#[test]
fn without_failures_copies_replicate_and_answer_after_the_tail() {
    for copies in [2, 3] {
        let s = failover_run(7, copies, &[]);
        assert!(s.forwarded > 0 && s.skipped == 0, "{s:?}");
    }
}

/// Invariant 4 for the chain's own frames: random and truncated Bind,
/// Forward and Ack frames (and random bytes) from a peer never panic a
/// copy; they are refused or dropped, and a good client is served after.
#[test]
fn garbage_chain_frames_never_panic_a_copy() {
    let v = view(2);
    let owner = Owner { server: 0, shard: 0 };
    let core = ShardCore::new(&v, owner, &RuleRegistry::default(), Kernels::best()).unwrap();
    let mut head = ChainCore::new(core, 0, chain_of(owner, SERVERS, 2));
    let mut rng = crate::rng::SplitMix64::new(0xBAD);
    let mut sink = SimSink::default();
    for i in 0..20_000u32 {
        let kind = [Kind::Bind, Kind::Forward, Kind::Ack, Kind::Push, Kind::Clock][rng.below(5) as usize];
        let h = DataHeader {
            kind,
            dense: rng.below(2) == 0,
            table: rng.below(4) as u32,
            sub: rng.below(3) as u32,
            ts: rng.below(5),
            a: if rng.below(2) == 0 { rng.below(8) } else { rng.next_u64() },
            b: if rng.below(2) == 0 { rng.below(64) } else { rng.next_u64() },
        };
        let mut f = match h.frame_len() {
            Some(len) if len <= 1 << 16 => vec![0u8; len],
            _ => vec![0u8; 48],
        };
        let n = f.len().min(40);
        let head_bytes = h.encode(f.len().max(40));
        f[..n].copy_from_slice(&head_bytes[..n]);
        for b in f.iter_mut().skip(40) {
            *b = rng.below(256) as u8;
        }
        if rng.below(10) == 0 {
            let cut = rng.below(f.len() as u64) as usize;
            f.truncate(cut);
        }
        let peer = PeerId { index: i % 7, generation: 0 };
        if head.handle(peer, &f, &mut sink).is_err() {
            head.on_closed(peer);
        }
        sink.frames.clear();
    }
    // a good client still binds and gets its push acknowledged once the tail is linked
    let client = PeerId { index: 100, generation: 0 };
    head.handle(client, &bind_frame(0, 0), &mut sink).unwrap();
    assert!(sink.frames.iter().any(|(p, _)| *p == client), "the bind is answered");
}

fn sim_seeds(default: u64) -> u64 {
    std::env::var("PS_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}
