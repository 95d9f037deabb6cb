//! A whole replicated cluster in one test thread, driven by a seed: every
//! copy of every shard, the workers, the manager's view and the connections
//! between them over `PacketSim` (ordered, no faults), with kills and rebuilds as the manager does
//! them. The runs and their invariants are in `sim_tests`.
//!
//! Must never: reach into a copy's state to help it along (it drives copies
//! only through the API a server thread uses), or read the wall clock or
//! any randomness but the seed's.

use std::collections::HashMap;

use super::{chain_of, ChainCore};
use crate::control::{ClusterView, JobSpec, ServerInfo};
use crate::kernels::Kernels;
use crate::keys::{KeyRange, TableSpec};
use crate::limits::WireLimits;
use crate::ring::Owner;
use crate::rules::{RuleRegistry, RuleSpec};
use crate::shard::ShardCore;
use crate::sim::{Faults, PacketSim, SimSink};
use crate::transport::PeerId;
use crate::worker::WorkerCore;

pub(super) const SERVERS: u32 = 3;
const SHARDS: u32 = 2;
pub(super) const WORKERS: usize = 3;

pub(super) fn view(copies: u32) -> ClusterView {
    ClusterView::new(
        JobSpec {
            tables: vec![
                TableSpec::sparse(0, "sparse1", KeyRange::FULL, 1, RuleSpec::Sum),
                TableSpec::dense(1, "dense4", KeyRange::new(0, 3000), 4, RuleSpec::Sum),
                // read by ranges under a bound: stamped answers, reads parked for clocks
                TableSpec::dense(2, "bounded", KeyRange::new(0, 2000), 1, RuleSpec::Sum)
                    .with_consistency(crate::clock::Consistency::Bounded { staleness: 2 }),
            ],
            app: "sim".into(),
            params: serde_json::Value::Null,
            limits: WireLimits { chunk_bytes: 4096, frame_bytes_max: 16384, tx_queue_bytes_max: 1 << 20 },
            partitions: 256,
            copies,
        },
        (0..SERVERS).map(|r| ServerInfo::new(r, "sim", vec![0; SHARDS as usize], 0)).collect(),
        WORKERS as u32,
    )
}

/// Workers' endpoints start here; copies (which rebuilds add) below.
pub(super) const WORKER_EP: usize = 1000;

/// A whole replicated cluster in one thread: every copy of every shard,
/// the workers, the manager's view, and the connections between them
/// (numbered endpoints: copies from 0, workers from `WORKER_EP`; a
/// connection's generation moves on when it closes, so its frames in
/// flight and its stale ids go with it).
pub(super) struct Cluster {
    pub(super) copies: Vec<ChainCore>,
    /// (server, owner) of each copy
    pub(super) at: Vec<(u32, Owner)>,
    pub(super) workers: Vec<WorkerCore>,
    net: PacketSim,
    pub(super) sink: SimSink,
    gen: HashMap<(usize, usize), u32>,
    /// the manager's view: deaths, placed copies
    pub(super) view: ClusterView,
    /// copies that have heard of the newest view
    told: Vec<bool>,
    /// per copy: the copy endpoint its link goes to
    link: Vec<Option<usize>>,
}

impl Cluster {
    pub(super) fn new(copies: u32, seed: u64) -> Self {
        let v = view(copies);
        let mut c = Cluster {
            copies: Vec::new(),
            at: Vec::new(),
            workers: Vec::new(),
            net: PacketSim::with_faults(seed, Faults::NONE),
            sink: SimSink::default(),
            gen: HashMap::new(),
            view: v.clone(),
            told: Vec::new(),
            link: Vec::new(),
        };
        for server in 0..SERVERS {
            for shard in 0..SHARDS {
                for i in 0..copies {
                    let owner = Owner { server: (server + SERVERS - i) % SERVERS, shard };
                    let core = ShardCore::new(&v, owner, &RuleRegistry::default(), Kernels::best()).expect("a shard");
                    c.add(ChainCore::new(core, server, chain_of(owner, SERVERS, copies)), server, owner);
                }
            }
        }
        let ring = v.ring().expect("a ring");
        let peers: Vec<Vec<PeerId>> = (0..SERVERS)
            .map(|s| {
                (0..SHARDS)
                    .map(|h| PeerId { index: c.copy_ep(s, Owner { server: s, shard: h }) as u32, generation: 0 })
                    .collect()
            })
            .collect();
        for w in 0..WORKERS {
            let mut wc = WorkerCore::new(&v.job.tables, ring.clone(), peers.clone(), v.job.limits);
            wc.set_rank(w as u32);
            wc.enable_failover(&mut c.sink, w as u32).expect("bind");
            c.workers.push(wc);
            c.send_from(WORKER_EP + w);
        }
        c
    }

    fn add(&mut self, copy: ChainCore, server: u32, owner: Owner) {
        self.copies.push(copy);
        self.at.push((server, owner));
        self.told.push(true);
        self.link.push(None);
    }

    /// The copy of `owner` on `server` that is not retired (the newest).
    pub(super) fn copy_ep(&self, server: u32, owner: Owner) -> usize {
        (0..self.at.len()).rev().find(|&e| self.at[e] == (server, owner) && !self.copies[e].retired()).expect("a copy")
    }

    fn server_of(&self, ep: usize) -> Option<u32> {
        self.at.get(ep).map(|a| a.0)
    }

    fn gen(&self, a: usize, b: usize) -> u32 {
        self.gen.get(&(a.min(b), a.max(b))).copied().unwrap_or(0)
    }

    fn bump(&mut self, a: usize, b: usize) -> u32 {
        let g = self.gen(a, b) + 1;
        self.gen.insert((a.min(b), a.max(b)), g);
        g
    }

    fn alive(&self, ep: usize) -> bool {
        ep >= WORKER_EP
            || (self.server_of(ep).is_some_and(|s| !self.view.dead_servers.contains(&s)) && !self.copies[ep].retired())
    }

    /// Sends what `from` wrote into the sink (frames to a closed connection are dropped).
    pub(super) fn send_from(&mut self, from: usize) {
        for (p, f) in std::mem::take(&mut self.sink.frames) {
            let to = p.index as usize;
            if p.generation == self.gen(from, to) && self.alive(to) {
                self.net.send(from, to, f);
            }
        }
    }

    /// A new view: every copy hears of it, each at its own moment.
    fn publish(&mut self) {
        self.view.epoch += 1;
        self.told.iter_mut().for_each(|t| *t = false);
    }

    /// Closes the connection between two endpoints: frames in flight are
    /// lost, and each live side hears of it.
    fn close(&mut self, a: usize, b: usize) {
        let g = self.gen(a, b);
        self.bump(a, b);
        self.net.clear(a, b);
        self.net.clear(b, a);
        for (me, other) in [(a, b), (b, a)] {
            if !self.alive(me) {
                continue;
            }
            let peer = PeerId { index: other as u32, generation: g };
            if me < WORKER_EP {
                self.copies[me].on_closed(peer);
                if self.link[me] == Some(other) {
                    self.link[me] = None;
                }
            } else {
                self.workers[me - WORKER_EP].on_closed(peer, "closed");
            }
        }
    }

    pub(super) fn kill(&mut self, server: u32) {
        let eps: Vec<usize> = (0..self.copies.len()).filter(|&e| self.at[e].0 == server).collect();
        let others: Vec<usize> = (0..self.copies.len()).chain((0..WORKERS).map(|w| WORKER_EP + w)).collect();
        for &e in &eps {
            for &other in &others {
                if other != e && self.alive(other) {
                    self.close(e, other);
                }
            }
        }
        self.view.dead_servers.push(server);
        // as the manager does: unfinished rebuilds start over
        self.view.placed.retain(|p| p.server != server && p.ready);
        self.publish();
    }

    /// The manager's answer to a loss: a copy placed for every short chain,
    /// started empty on its server (it listens at once).
    pub(super) fn rebuild(&mut self) {
        self.view.place_copies();
        let new: Vec<(usize, crate::control::PlacedCopy)> =
            self.view.placed.iter().copied().enumerate().filter(|(_, p)| p.port == 0).collect();
        for (i, p) in new {
            let core = ShardCore::new(&self.view, p.owner, &RuleRegistry::default(), Kernels::best()).unwrap();
            self.add(ChainCore::new_joining(core, p.server, p.id), p.server, p.owner);
            self.view.placed[i].port = 1;
        }
        self.publish();
    }

    pub(super) fn rebuilt(&self) -> bool {
        self.view.placed.iter().all(|p| p.ready) && (0..self.copies.len()).all(|c| self.told[c] || !self.alive(c))
    }

    /// One step of the world: a copy hears of the newest view, connects a
    /// link it wants, a worker binds to a new head, or a frame is delivered.
    pub(super) fn step(&mut self) -> bool {
        let n = self.copies.len();
        let roll = self.net.rng().below(8);
        if roll == 0 {
            if let Some(c) = (0..n).find(|&c| !self.told[c] && self.alive(c)) {
                self.told[c] = true;
                let close = self.copies[c].set_view(&self.view, &mut self.sink);
                self.send_from(c);
                for p in close {
                    self.close(c, p.index as usize);
                }
                return true;
            }
        }
        if roll == 1 {
            for c in (0..n).filter(|&c| self.alive(c)) {
                let o = self.at[c].1;
                if let Some(server) = self.copies[c].link_wanted() {
                    let to = self.copy_ep(server, o);
                    if !self.alive(to) {
                        continue; // connection refused: try again later
                    }
                    let g = self.bump(c, to);
                    self.link[c] = Some(to);
                    self.copies[c].linked(PeerId { index: to as u32, generation: g }, server, &mut self.sink).unwrap();
                    self.send_from(c);
                    return true;
                }
                if let Some(server) = self.copies[c].shadow_wanted() {
                    let to = self.copy_ep(server, o);
                    if !self.alive(to) {
                        continue;
                    }
                    let g = self.bump(c, to);
                    self.copies[c].shadow_linked(PeerId { index: to as u32, generation: g }, server);
                    return true;
                }
            }
        }
        if roll == 3 {
            let pumping: Vec<usize> =
                (0..n).filter(|&c| self.alive(c) && self.copies[c].shadow_peer().is_some()).collect();
            for c in pumping {
                // a small budget: the snapshot goes over several steps, frames applied meanwhile after it
                self.copies[c].pump_shadow(&mut self.sink, 8192);
                self.send_from(c);
            }
        }
        if roll == 2 {
            for w in 0..self.workers.len() {
                let Some(owner) = self.workers[w].lost_owners().into_iter().next() else { continue };
                // the worker's view: the head the manager names (it may not know it is one yet)
                let head = self.view.head(owner).expect("a live copy");
                let to = self.copy_ep(head, owner);
                let g = self.bump(WORKER_EP + w, to);
                self.workers[w].rebind(owner, PeerId { index: to as u32, generation: g }, &mut self.sink).unwrap();
                self.send_from(WORKER_EP + w);
                return true;
            }
        }
        let Some((from, to, frame)) = self.net.step() else {
            return (0..n).any(|c| self.alive(c) && (!self.told[c] || self.copies[c].shadow_peer().is_some()));
        };
        let peer = PeerId { index: from as u32, generation: self.gen(from, to) };
        if to < WORKER_EP {
            let r = self.copies[to].handle(peer, &frame, &mut self.sink);
            self.send_from(to);
            if r.is_err() {
                // refused (not the head yet): the connection is dropped
                self.close(from, to);
            }
            if self.copies[to].take_synced() {
                // the rebuilt copy has its snapshot: the tail waits for it from now on
                let (server, owner) = self.at[to];
                let id = self.copies[to].placement().expect("a placed copy");
                if let Some(p) =
                    self.view.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.server == server)
                {
                    p.synced = true;
                    self.publish();
                }
            }
            if let Some(id) = self.copies[to].take_caught_up() {
                // it acknowledged what the tail answered before: a member
                if let Some(p) = self.view.placed.iter_mut().find(|p| p.id == id && p.synced) {
                    p.ready = true;
                    self.publish();
                }
            }
        } else {
            let w = to - WORKER_EP;
            self.workers[w].on_frame(peer, &frame).unwrap();
            self.workers[w].pump(&mut self.sink);
            self.send_from(to);
        }
        true
    }

    pub(super) fn settle(&mut self) {
        let mut steps = 0;
        while self.step() || self.workers.iter().any(|w| !w.lost_owners().is_empty()) {
            steps += 1;
            assert!(steps < 2_000_000, "no progress");
        }
    }
}
