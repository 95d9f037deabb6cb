//! Unreplicated shards and workers over the packet simulator (delay,
//! reordering across connections, partitions, pauses; no loss, which these
//! state machines do not survive): invariant 1 with read-your-writes,
//! filtered pushes, and operations issued after others. Also the fixture
//! `ssp_tests` shares.
//!
//! Must never: lower a seed count or drop a check to make a run pass.

use super::{PacketSim, SimSink};
use crate::control::{ClusterView, JobSpec, ServerInfo};
use crate::kernels::Kernels;
use crate::keys::{KeyRange, TableId};
use crate::limits::WireLimits;
use crate::ring::Owner;
use crate::rng::SplitMix64;
use crate::rules::{RuleRegistry, RuleSpec};
use crate::shard::ShardCore;
use crate::table::TableSpec;
use crate::transport::PeerId;
use crate::wire::{self, Kind};
use crate::worker::{Keys, WorkerCore};
use crate::PsError;
use std::collections::BTreeMap;

pub(super) const SERVERS: usize = 2;
pub(super) const SHARDS: usize = 2;
pub(super) const WORKERS: usize = 3;

pub(super) fn view() -> ClusterView {
    ClusterView::new(
        JobSpec {
            tables: vec![
                TableSpec::sparse(0, "sparse1", KeyRange::FULL, 1, RuleSpec::Sum),
                TableSpec::dense(1, "dense8", KeyRange::new(0, 4096), 8, RuleSpec::Sum),
                TableSpec::sparse(2, "sgd8", KeyRange::new(0, 1 << 40), 8, RuleSpec::Sgd { lr: 0.5 }),
            ],
            app: "sim".into(),
            params: serde_json::Value::Null,
            // small chunks so requests split into many frames
            limits: WireLimits { chunk_bytes: 4096, frame_bytes_max: 8192, tx_queue_bytes_max: 1 << 20 },
            partitions: 256,
            copies: 1,
        },
        (0..SERVERS as u32).map(|r| ServerInfo::new(r, "sim", vec![0; SHARDS], 0)).collect(),
        WORKERS as u32,
    )
}

// endpoints: shards 0..S*H, then workers
fn shard_ep(o: Owner) -> usize {
    o.server as usize * SHARDS + o.shard as usize
}

/// Every shard of `view`, the workers' connections to them
/// (`peers[server][shard]`, numbered as the endpoints) and the workers, ranked.
pub(super) fn cluster(view: &ClusterView) -> (Vec<ShardCore>, Vec<Vec<PeerId>>, Vec<WorkerCore>) {
    let ring = view.ring().unwrap();
    let shards = (0..SERVERS * SHARDS)
        .map(|i| {
            let o = Owner { server: (i / SHARDS) as u32, shard: (i % SHARDS) as u32 };
            ShardCore::new(view, o, &RuleRegistry::default(), Kernels::best()).unwrap()
        })
        .collect();
    let peers: Vec<Vec<PeerId>> = (0..SERVERS)
        .map(|s| (0..SHARDS).map(|h| PeerId { index: (s * SHARDS + h) as u32, generation: 0 }).collect())
        .collect();
    let workers = (0..WORKERS)
        .map(|w| {
            let mut c = WorkerCore::new(&view.job.tables, ring.clone(), peers.clone(), view.job.limits);
            c.set_rank(w as u32);
            c
        })
        .collect();
    (shards, peers, workers)
}

/// Delivers the next frame in flight: a shard handles it and what it
/// answers goes back on the wire, or a worker takes it and sends what it
/// now may (`pump`: watches, deferred operations; the caller sends `sink`).
/// `None` once nothing is in flight; `Some(Some(w))` when worker `w` got it.
pub(super) fn deliver(
    net: &mut PacketSim,
    shards: &mut [ShardCore],
    workers: &mut [WorkerCore],
    peers: &[Vec<PeerId>],
    sink: &mut SimSink,
) -> Option<Option<usize>> {
    let (from, to, frame) = net.step()?;
    if to < SERVERS * SHARDS {
        let w = from - SERVERS * SHARDS;
        shards[to].handle(PeerId { index: w as u32, generation: 0 }, &frame, sink).unwrap();
        for (p, f) in sink.frames.drain(..) {
            net.send(to, SERVERS * SHARDS + p.index as usize, f);
        }
        return Some(None);
    }
    let w = to - SERVERS * SHARDS;
    let o = Owner { server: (from / SHARDS) as u32, shard: (from % SHARDS) as u32 };
    workers[w].on_frame(peers[o.server as usize][o.shard as usize], &frame).unwrap();
    workers[w].pump(sink);
    Some(Some(w))
}

/// A user's push filter: sends half of each value now, keeps the rest.
#[derive(Debug, Default)]
struct Halve(crate::filter::Residuals);
impl crate::filter::PushFilter for Halve {
    fn name(&self) -> &str {
        "halve"
    }
    fn filter(&mut self, keys: &mut Vec<u64>, vals: &mut Vec<f32>, dim: usize) {
        for (k, v) in keys.iter().zip(vals.chunks_exact_mut(dim)) {
            self.0.take_into(*k, v);
            let kept: Vec<f32> = v.iter().map(|x| x / 2.0).collect();
            v.iter_mut().zip(&kept).for_each(|(v, k)| *v -= k);
            self.0.keep(*k, &kept);
        }
    }
    fn flush(&mut self, dim: usize) -> (Vec<u64>, Vec<f32>) {
        self.0.flush(dim)
    }
}

/// Filters over the simulated network, 100 seeds: the workers push the
/// same key lists again and again (key caching sends them as hashes, LZ4
/// packs them, significantly-modified and a user's filter hold values
/// back), flush, and every value equals the sum of what they pushed.
#[test]
fn filtered_pushes_lose_nothing_in_any_interleaving() {
    use crate::filter::FilterSpec;
    for seed in 0..100 {
        let mut v = view();
        v.job.tables[0].filters =
            vec![FilterSpec::SignificantlyModified { threshold: 2.5 }, FilterSpec::KeyCache, FilterSpec::Lz4];
        let (mut shards, peers, mut workers) = cluster(&v);
        workers[0].add_push_filter(TableId(0), Box::new(Halve::default())).unwrap();
        let mut net = PacketSim::new(seed);
        let mut sink = SimSink::default();
        let mut rng = SplitMix64::new(seed ^ 0xF17);
        let lists: Vec<Vec<u64>> = (0..2)
            .map(|l| {
                (0..300u64)
                    .map(|i| crate::rng::mix64(i * 7 + l) % (1 << 50))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .collect();
        let mut want: BTreeMap<u64, f64> = BTreeMap::new();
        for round in 0..8 {
            for (w, worker) in workers.iter_mut().enumerate() {
                let keys = &lists[(round + w) % 2];
                let vals: Vec<f32> = keys.iter().map(|_| rng.below(7) as f32 - 3.0).collect();
                keys.iter().zip(&vals).for_each(|(k, v)| *want.entry(*k).or_default() += *v as f64);
                worker.issue(&mut sink, Kind::Push, TableId(0), Keys::List(keys), Some(&vals), None).unwrap();
                if round == 7 {
                    worker.flush_filters(&mut sink, TableId(0)).unwrap();
                }
                for (p, f) in sink.frames.drain(..) {
                    net.send(SERVERS * SHARDS + w, p.index as usize, f);
                }
            }
            while deliver(&mut net, &mut shards, &mut workers, &peers, &mut sink).is_some() {}
        }
        let keys: Vec<u64> = want.keys().copied().collect();
        let ts =
            workers[0].issue(&mut sink, Kind::Pull, TableId(0), Keys::List(&keys), None, Some(Vec::new())).unwrap();
        for (p, f) in sink.frames.drain(..) {
            net.send(SERVERS * SHARDS, p.index as usize, f);
        }
        while deliver(&mut net, &mut shards, &mut workers, &peers, &mut sink).is_some() {}
        let got = workers[0].finish(ts).unwrap().unwrap();
        for (k, g) in keys.iter().zip(&got) {
            assert_eq!(*g as f64, want[k], "seed {seed}: key {k}");
        }
    }
}

/// One seed: every worker runs rounds of push -> (wait) -> pull and checks
/// read-your-writes; at the end every value equals the sum of all acknowledged pushes.
fn run(seed: u64) {
    let view = view();
    let ring = view.ring().unwrap();
    let (mut shards, peers, mut workers) = cluster(&view);
    let mut net = PacketSim::new(seed);
    // acknowledged sums per (table, key, j)
    let mut acked: BTreeMap<(u32, u64, usize), f64> = BTreeMap::new();
    let mut mine: Vec<BTreeMap<(u32, u64, usize), f64>> = vec![BTreeMap::new(); WORKERS];
    // per worker: the op in flight (ts, table, keys, vals) and remaining rounds
    #[derive(Clone)]
    enum Op {
        Push(u64, u32, Vec<u64>, Vec<f32>),
        Pull(u64, u32, Vec<u64>),
    }
    let mut current: Vec<Option<Op>> = vec![None; WORKERS];
    let mut rounds = [6usize; WORKERS];
    let mut sink = SimSink::default();
    let flush = |net: &mut PacketSim, sink: &mut SimSink, from: usize, to_ep: &dyn Fn(PeerId) -> usize| {
        for (p, f) in sink.frames.drain(..) {
            net.send(from, to_ep(p), f);
        }
    };
    let worker_ep = |w: usize| SERVERS * SHARDS + w;
    let mut steps = 0;
    loop {
        // idle workers issue their next op
        for w in 0..WORKERS {
            if current[w].is_some() || rounds[w] == 0 {
                continue;
            }
            let rng = net.rng();
            let table = rng.below(3) as u32;
            let dim = if table == 0 { 1 } else { 8 };
            let space = if table == 1 { 4096 } else { 3000 };
            let mut keys: Vec<u64> =
                (0..1 + rng.below(400)).map(|_| rng.below(space) * if table == 1 { 1 } else { 1_000_003 }).collect();
            keys.sort_unstable();
            keys.dedup();
            let vals: Vec<f32> = (0..keys.len() * dim).map(|_| rng.below(9) as f32).collect();
            let ts =
                workers[w].issue(&mut sink, Kind::Push, TableId(table), Keys::List(&keys), Some(&vals), None).unwrap();
            flush(&mut net, &mut sink, worker_ep(w), &|p: PeerId| p.index as usize);
            current[w] = Some(Op::Push(ts, table, keys, vals));
        }
        let Some((from, to, frame)) = net.step() else { break };
        steps += 1;
        if to < SERVERS * SHARDS {
            let w = from - SERVERS * SHARDS;
            shards[to].handle(PeerId { index: w as u32, generation: 0 }, &frame, &mut sink).unwrap();
            flush(&mut net, &mut sink, to, &|p: PeerId| worker_ep(p.index as usize));
        } else {
            let w = to - SERVERS * SHARDS;
            let o = Owner { server: (from / SHARDS) as u32, shard: (from % SHARDS) as u32 };
            workers[w].on_frame(peers[o.server as usize][o.shard as usize], &frame).unwrap();
            workers[w].pump(&mut sink);
            let _ = shard_ep(o);
            match current[w].clone() {
                Some(Op::Push(ts, table, keys, vals)) if workers[w].is_done(ts).unwrap() => {
                    workers[w].finish(ts).unwrap();
                    let dim = vals.len() / keys.len();
                    for (i, k) in keys.iter().enumerate() {
                        for j in 0..dim {
                            let g = vals[i * dim + j] as f64;
                            let g = if table == 2 { -0.5 * g } else { g };
                            *acked.entry((table, *k, j)).or_default() += g;
                            *mine[w].entry((table, *k, j)).or_default() += g;
                        }
                    }
                    // read my writes: issue a pull of the same keys right away
                    let ts = workers[w]
                        .issue(&mut sink, Kind::Pull, TableId(table), Keys::List(&keys), None, Some(Vec::new()))
                        .unwrap();
                    flush(&mut net, &mut sink, worker_ep(w), &|p: PeerId| p.index as usize);
                    current[w] = Some(Op::Pull(ts, table, keys));
                }
                Some(Op::Pull(ts, table, keys)) if workers[w].is_done(ts).unwrap() => {
                    let got = workers[w].finish(ts).unwrap().unwrap();
                    let dim = got.len() / keys.len();
                    for (i, k) in keys.iter().enumerate() {
                        for j in 0..dim {
                            let own = mine[w].get(&(table, *k, j)).copied().unwrap_or(0.0);
                            let v = got[i * dim + j] as f64;
                            // everyone's updates share a sign per table, so mine is a bound
                            let ok = if table == 2 { v <= own } else { v >= own };
                            assert!(ok, "seed {seed}: worker {w} pulled {v} for table {table} key {k}[{j}] below its own acknowledged {own}");
                        }
                    }
                    current[w] = None;
                    rounds[w] -= 1;
                }
                _ => {}
            }
        }
        assert!(steps < 1_000_000, "seed {seed}: no progress");
    }
    assert!(current.iter().all(|c| c.is_none()), "seed {seed}: operations left unanswered");
    // invariant 1: read everything back through a fresh worker
    let mut reader = WorkerCore::new(&view.job.tables, ring.clone(), peers.clone(), view.job.limits);
    for table in 0..3u32 {
        let keys: Vec<u64> = acked.keys().filter(|(t, _, j)| *t == table && *j == 0).map(|(_, k, _)| *k).collect();
        if keys.is_empty() {
            continue;
        }
        let ts =
            reader.issue(&mut sink, Kind::Pull, TableId(table), Keys::List(&keys), None, Some(Vec::new())).unwrap();
        let reader_ep = SERVERS * SHARDS + WORKERS;
        flush(&mut net, &mut sink, reader_ep, &|p: PeerId| p.index as usize);
        while let Some((from, to, frame)) = net.step() {
            if to < SERVERS * SHARDS {
                shards[to].handle(PeerId { index: 99, generation: 0 }, &frame, &mut sink).unwrap();
                flush(&mut net, &mut sink, to, &|_| reader_ep);
            } else {
                let o = (from / SHARDS, from % SHARDS);
                reader.on_frame(peers[o.0][o.1], &frame).unwrap();
            }
        }
        let got = reader.finish(ts).unwrap().unwrap();
        let dim = got.len() / keys.len();
        for (i, k) in keys.iter().enumerate() {
            for j in 0..dim {
                let want = acked[&(table, *k, j)];
                assert_eq!(got[i * dim + j] as f64, want, "seed {seed}: table {table} key {k}[{j}]");
            }
        }
    }
}

#[test]
fn invariant_1_and_read_your_writes_over_many_seeds() {
    for seed in super::seeds(200) {
        run(seed);
    }
}

#[test]
fn an_operation_issued_after_others_runs_only_once_they_finish() {
    let view = view();
    let (mut shards, peers, mut workers) = cluster(&view);
    let mut sink = SimSink::default();
    let keys: Vec<u64> = (0..50).map(|i| i * 977).collect();
    let ones = vec![1.0f32; keys.len()];
    let w = &mut workers[0];
    let push = w.issue(&mut sink, Kind::Push, TableId(0), Keys::List(&keys), Some(&ones), None).unwrap();
    let sent_push = sink.frames.len();
    let pull =
        w.issue_after(&mut sink, &[push], Kind::Pull, TableId(0), Keys::List(&keys), None, Some(Vec::new())).unwrap();
    let again =
        w.issue_after(&mut sink, &[pull], Kind::Push, TableId(0), Keys::List(&keys), Some(&ones), None).unwrap();
    assert_eq!(sink.frames.len(), sent_push, "nothing goes out before the push finishes");
    assert!(!w.is_done(pull).unwrap() && w.is_pull(pull) && !w.is_done(again).unwrap());
    assert_eq!(
        w.issue_after(&mut sink, &[again + 5], Kind::Push, TableId(0), Keys::List(&keys), Some(&ones), None),
        Err(PsError::FutureTimestamp(again + 5))
    );
    // deliver everything, in order, pumping the worker after each answer
    let mut net = PacketSim::new(7);
    let mut pulls_seen = 0;
    loop {
        for (p, f) in sink.frames.drain(..) {
            net.send(SERVERS * SHARDS, p.index as usize, f);
        }
        let Some((from, to, frame)) = net.step() else { break };
        if to < SERVERS * SHARDS {
            if wire::peek_kind(&frame) == Some(Kind::Pull) {
                pulls_seen += 1;
                assert!(w.is_done(push).unwrap(), "the pull went out before the push finished");
            }
            shards[to].handle(PeerId { index: 0, generation: 0 }, &frame, &mut sink).unwrap();
            for (_, f) in sink.frames.drain(..) {
                net.send(to, SERVERS * SHARDS, f);
            }
        } else {
            let o = Owner { server: (from / SHARDS) as u32, shard: (from % SHARDS) as u32 };
            w.on_frame(peers[o.server as usize][o.shard as usize], &frame).unwrap();
            w.pump(&mut sink);
        }
    }
    assert!(pulls_seen > 0);
    w.finish(push).unwrap();
    assert_eq!(w.finish(pull).unwrap().unwrap(), ones, "the pull ran after the push");
    w.finish(again).unwrap();
    // a dependency that failed fails what waits on it
    let lost = w.issue(&mut sink, Kind::Push, TableId(0), Keys::List(&keys), Some(&ones), None).unwrap();
    let after =
        w.issue_after(&mut sink, &[lost], Kind::Pull, TableId(0), Keys::List(&keys), None, Some(Vec::new())).unwrap();
    w.on_closed(peers[0][0], "gone");
    w.pump(&mut sink);
    assert!(w.is_done(after).unwrap());
    assert!(w.finish(after).is_err());
}
