//! A whole replicated cluster in one test thread, driven by a seed: every
//! copy of every shard (chains on servers), the workers and the manager
//! state machine, over the packet simulator. The manager registers the
//! nodes, publishes the views as frames, decides failovers when a server's
//! connection to it closes, and places the copies that rebuild lost ones;
//! servers start those copies and report them (`CopyAdded`, `CopySynced`,
//! `CopyReady`) as their server threads do. The runs and their invariants
//! are in `failover_tests` and `check`; the server process's side of the
//! control link is in `servers`.
//!
//! Endpoints: copies from 0 (rebuilds add more), workers from `WORKER_EP`,
//! the manager at `MANAGER_EP`, server `s`'s control link at
//! `CONTROL_EP + s`. A connection's generation moves on when it closes, so
//! its frames in flight and its stale ids go with it. Data connections
//! (worker to copy, copy to copy) may lose frames; control links to the
//! manager do not (a lost one makes the manager fail the server over, which
//! is the kill a run asks for, not a fault).
//!
//! Must never: reach into a copy's state to help it along (it drives copies
//! only through the API a server thread uses), or decide a view itself.

use std::collections::HashMap;
use std::time::Duration;

use crate::chain::{chain_of, ChainCore};
use crate::control::{send_control, ClusterView, Control, JobSpec, Role, ServerInfo};
use crate::kernels::Kernels;
use crate::keys::KeyRange;
use crate::limits::WireLimits;
use crate::manager::{ManagerCore, ManagerTimeouts};
use crate::ring::Owner;
use crate::rules::{RuleRegistry, RuleSpec};
use crate::shard::ShardCore;
use crate::sim::{Faults, Micros, PacketSim, SimSink};
use crate::table::TableSpec;
use crate::transport::{PeerHello, PeerId};
use crate::worker::WorkerCore;

pub(crate) const SERVERS: u32 = 3;
pub(crate) const SHARDS: u32 = 2;
pub(crate) const WORKERS: usize = 3;

/// Workers' endpoints start here; copies (which rebuilds add) below.
pub(crate) const WORKER_EP: usize = 1000;
pub(super) const MANAGER_EP: usize = 2000;
pub(super) const CONTROL_EP: usize = 3000;
/// Processes (what pauses and partitions hit): server `s` is `s`.
const WORKER_PROC: usize = 100;
const MANAGER_PROC: usize = 200;

const HEARTBEAT_US: Micros = crate::limits::HEARTBEAT_INTERVAL_MS * 1000;

pub(crate) fn job(copies: u32) -> JobSpec {
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
    }
}

/// The first view of the job (what the manager hands out), for unit tests.
pub(crate) fn view(copies: u32) -> ClusterView {
    ClusterView::new(
        job(copies),
        (0..SERVERS).map(|r| ServerInfo::new(r, "sim", vec![1; SHARDS as usize], r)).collect(),
        WORKERS as u32,
    )
}

/// A whole replicated cluster in one thread (see the module doc).
pub(crate) struct Cluster {
    pub(crate) copies: Vec<ChainCore>,
    /// (server, owner) of each copy
    pub(crate) at: Vec<(u32, Owner)>,
    pub(crate) workers: Vec<WorkerCore>,
    pub(crate) net: PacketSim,
    pub(crate) sink: SimSink,
    pub(super) manager: ManagerCore,
    gen: HashMap<(usize, usize), u32>,
    /// the newest view each server and each worker heard of
    pub(super) server_views: Vec<ClusterView>,
    pub(super) worker_views: Vec<ClusterView>,
    /// per copy: the epoch of the last view it was given
    pub(super) told: Vec<u64>,
    pub(super) crashed: Vec<bool>,
    /// placements started (a copy each)
    pub(super) started: Vec<u64>,
    heartbeat_at: Micros,
    /// whether the links from a tail to a copy being rebuilt may lose
    /// frames (off by default: see `failover_tests::shadow_link_loss_*`)
    pub(crate) lossy_shadow: bool,
    /// connections (low end, high end, generation) that never lose a frame
    calm: Vec<(usize, usize, u32)>,
    /// frames a worker refused (its connection dropped, as the client does)
    pub(crate) worker_refusals: u64,
    /// what broke the run, found while stepping (the manager refused a
    /// frame, the job was aborted)
    pub(crate) violation: Option<String>,
}

impl Cluster {
    /// A cluster with `copies` copies of every shard, the seed's faults on
    /// its network (loss included).
    pub(crate) fn new(copies: u32, seed: u64) -> Self {
        Self::with_faults(copies, seed, Faults::of_seed(seed, true))
    }

    pub(crate) fn with_faults(copies: u32, seed: u64, faults: Faults) -> Self {
        let mut net = PacketSim::with_faults(seed, faults);
        for s in 0..SERVERS as usize {
            net.set_process(CONTROL_EP + s, s);
        }
        for w in 0..WORKERS {
            net.set_process(WORKER_EP + w, WORKER_PROC + w);
        }
        net.set_process(MANAGER_EP, MANAGER_PROC);
        let mut manager = ManagerCore::new(job(copies), SERVERS, WORKERS as u32, ManagerTimeouts::default());
        // registration is not what runs test: every node registers at time 0
        let mut sink = SimSink::default();
        let nodes = (0..SERVERS).map(|s| (Role::Server, s, CONTROL_EP + s as usize, vec![1; SHARDS as usize]));
        let nodes = nodes.chain((0..WORKERS as u32).map(|w| (Role::Worker, w, WORKER_EP + w as usize, vec![])));
        for (role, rank, ep, ports) in nodes.collect::<Vec<_>>() {
            let msg = Control::Register { role, host: "sim".into(), ports, pid: rank, rank: Some(rank) };
            let mut f = SimSink::default();
            send_control(&mut f, PeerId { index: MANAGER_EP as u32, generation: 0 }, &msg).expect("a frame");
            let hello = PeerHello { role: role as u8, node: rank };
            manager
                .on_frame(PeerId { index: ep as u32, generation: 0 }, hello, &f.frames[0].1, Duration::ZERO, &mut sink)
                .expect("registered");
        }
        let v = manager.view().expect("every node registered").clone();
        let mut c = Cluster {
            copies: Vec::new(),
            at: Vec::new(),
            workers: Vec::new(),
            net,
            sink: SimSink::default(),
            manager,
            gen: HashMap::new(),
            server_views: vec![v.clone(); SERVERS as usize],
            worker_views: vec![v.clone(); WORKERS],
            told: Vec::new(),
            crashed: vec![false; SERVERS as usize],
            started: Vec::new(),
            heartbeat_at: HEARTBEAT_US,
            lossy_shadow: false,
            calm: Vec::new(),
            worker_refusals: 0,
            violation: None,
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
        if copies > 1 {
            for s in 0..SERVERS {
                let ports = vec![1; (copies as usize - 1) * SHARDS as usize];
                c.tell_manager(s, &Control::Copies { ports });
            }
        }
        c
    }

    pub(super) fn add(&mut self, copy: ChainCore, server: u32, owner: Owner) {
        self.net.set_process(self.copies.len(), server as usize);
        self.copies.push(copy);
        self.at.push((server, owner));
        self.told.push(0);
    }

    /// The manager's view now.
    pub(crate) fn view(&self) -> &ClusterView {
        self.manager.view().expect("the job runs")
    }

    /// The copy of `owner` on `server` that is not retired (the newest).
    pub(crate) fn copy_ep(&self, server: u32, owner: Owner) -> usize {
        self.find_copy(server, owner).expect("a copy")
    }

    /// [`Cluster::copy_ep`], `None` while `server` has not started it (a
    /// connection to it is refused).
    fn find_copy(&self, server: u32, owner: Owner) -> Option<usize> {
        (0..self.at.len()).rev().find(|&e| self.at[e] == (server, owner) && !self.copies[e].retired())
    }

    /// Virtual time, as the manager takes it.
    pub(super) fn now(&self) -> Duration {
        Duration::from_micros(self.net.now())
    }

    pub(crate) fn worker_paused(&self, w: usize) -> bool {
        self.net.paused(WORKER_EP + w)
    }

    fn gen(&self, a: usize, b: usize) -> u32 {
        self.gen.get(&(a.min(b), a.max(b))).copied().unwrap_or(0)
    }

    fn bump(&mut self, a: usize, b: usize) -> u32 {
        let g = self.gen(a, b) + 1;
        self.gen.insert((a.min(b), a.max(b)), g);
        g
    }

    pub(super) fn alive(&self, ep: usize) -> bool {
        match ep {
            e if e < WORKER_EP => {
                self.at.get(e).is_some_and(|a| !self.crashed[a.0 as usize]) && !self.copies[e].retired()
            }
            e if e >= CONTROL_EP => !self.crashed[e - CONTROL_EP],
            _ => true,
        }
    }

    /// Opens a connection from `a` to `b`: refused if `b` is gone or
    /// across a partition.
    pub(super) fn connect(&mut self, a: usize, b: usize) -> Option<PeerId> {
        if !self.alive(b) || !self.net.reachable(a, b) {
            return None;
        }
        Some(PeerId { index: b as u32, generation: self.bump(a, b) })
    }

    /// Sends what `from` wrote into the sink: frames to a closed connection
    /// are dropped, and a lost frame closes its connection.
    pub(crate) fn send_from(&mut self, from: usize) {
        let mut lost: Vec<usize> = Vec::new();
        for (p, f) in std::mem::take(&mut self.sink.frames) {
            let to = p.index as usize;
            if p.generation != self.gen(from, to) || !self.alive(to) || lost.contains(&to) {
                continue;
            }
            let data = from < MANAGER_EP && to < MANAGER_EP;
            let calm = self.calm.contains(&(from.min(to), from.max(to), p.generation));
            if !data || calm {
                self.net.send(from, to, f);
            } else if !self.net.send_lossy(from, to, f) {
                lost.push(to);
            }
        }
        for to in lost {
            self.close(from, to);
        }
    }

    /// Closes the connection between two endpoints: frames in flight are
    /// lost, and each live side hears of it.
    pub(super) fn close(&mut self, a: usize, b: usize) {
        let g = self.gen(a, b);
        if std::env::var("PS_SIM_DEBUG").is_ok() {
            eprintln!("{} us: close {a} <-> {b} (generation {g})", self.net.now());
        }
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
            } else if me < MANAGER_EP {
                self.workers[me - WORKER_EP].on_closed(peer, "closed");
            }
        }
    }

    /// Server `server` crashes: its connections close (frames in flight
    /// lost), the manager among them, which fails it over.
    pub(crate) fn kill(&mut self, server: u32) {
        let eps: Vec<usize> = (0..self.copies.len()).filter(|&e| self.at[e].0 == server).collect();
        let others: Vec<usize> = (0..self.copies.len()).chain((0..WORKERS).map(|w| WORKER_EP + w)).collect();
        for &e in &eps {
            for &other in &others {
                if other != e && self.alive(other) {
                    self.close(e, other);
                }
            }
        }
        self.crashed[server as usize] = true;
        let ctl = CONTROL_EP + server as usize;
        self.net.clear(ctl, MANAGER_EP);
        self.net.clear(MANAGER_EP, ctl);
        let now = self.now();
        self.manager.on_closed(PeerId { index: ctl as u32, generation: 0 }, "crashed", now, &mut self.sink);
        self.send_from(MANAGER_EP);
    }

    /// Every placed copy joined its chain, and every live copy was given
    /// the manager's newest view.
    pub(crate) fn rebuilt(&self) -> bool {
        let v = self.view();
        v.placed.iter().all(|p| p.ready) && (0..self.copies.len()).all(|c| self.told[c] == v.epoch || !self.alive(c))
    }

    /// Every live node sends the manager a heartbeat, and the manager looks
    /// for silent ones, once per heartbeat interval of virtual time.
    fn heartbeats(&mut self) {
        let now = self.now();
        if self.net.now() < self.heartbeat_at {
            return;
        }
        self.heartbeat_at = self.net.now() + HEARTBEAT_US;
        for s in 0..SERVERS {
            if self.alive(CONTROL_EP + s as usize) && !self.net.paused(CONTROL_EP + s as usize) {
                self.tell_manager(s, &Control::Heartbeat);
            }
        }
        for w in 0..WORKERS {
            if !self.worker_paused(w) {
                send_control(&mut self.sink, PeerId { index: MANAGER_EP as u32, generation: 0 }, &Control::Heartbeat)
                    .expect("a frame");
                self.send_from(WORKER_EP + w);
            }
        }
        if !self.net.paused(MANAGER_EP) {
            self.manager.on_tick(now, &mut self.sink);
            self.send_from(MANAGER_EP);
        }
    }

    /// One step of the world: a copy hears of its server's newest view,
    /// connects a link it wants, a worker binds to a new head, or a frame
    /// is delivered. `false` once nothing is left to do.
    pub(crate) fn step(&mut self) -> bool {
        self.heartbeats();
        let n = self.copies.len();
        let roll = self.net.rng().below(8);
        if roll == 0 {
            if let Some(c) = (0..n).find(|&c| {
                self.told[c] < self.server_views[self.at[c].0 as usize].epoch && self.alive(c) && !self.net.paused(c)
            }) {
                self.tell(c);
                return true;
            }
        }
        if roll == 1 && self.connect_links() {
            return true;
        }
        if roll == 3 {
            let pumping: Vec<usize> = (0..n)
                .filter(|&c| self.alive(c) && !self.net.paused(c) && self.copies[c].shadow_peer().is_some())
                .collect();
            for c in pumping {
                // a small budget: the snapshot goes over several steps, frames applied meanwhile after it
                self.copies[c].pump_shadow(&mut self.sink, 8192);
                self.send_from(c);
            }
        }
        if roll == 2 && self.rebind_workers() {
            return true;
        }
        let Some((from, to, frame)) = self.net.step() else {
            let pending = (0..n).any(|c| {
                self.alive(c)
                    && (self.told[c] < self.server_views[self.at[c].0 as usize].epoch
                        || self.copies[c].shadow_peer().is_some()
                        || self.copies[c].link_wanted().is_some()
                        || self.copies[c].shadow_wanted().is_some())
            });
            // time passes while nothing is in flight: pauses end, partitions heal
            let woke = self.net.wake_next();
            return pending || woke;
        };
        if to == MANAGER_EP {
            self.at_manager(from, &frame);
        } else if to >= CONTROL_EP || (to >= WORKER_EP && from == MANAGER_EP) {
            self.heard_from_manager(to, &frame);
        } else if to < WORKER_EP {
            let peer = PeerId { index: from as u32, generation: self.gen(from, to) };
            let r = self.copies[to].handle(peer, &frame, &mut self.sink);
            self.send_from(to);
            if let Err(e) = &r {
                if std::env::var("PS_SIM_DEBUG").is_ok() {
                    eprintln!("{} us: copy {to} refused a frame of {from}: {e}", self.net.now());
                }
            }
            if let Err(e) = &r {
                // a head refusing a worker's frame for a gap in its stream: the
                // worker had answers for frames this head never applied (the
                // text is the chain's `admit`; a typed error would be better)
                let gap = e.to_string().contains("replication gap");
                if gap && (WORKER_EP..MANAGER_EP).contains(&from) {
                    self.violation.get_or_insert(format!("invariant 1: an acknowledged frame is lost: {e}"));
                }
            }
            if r.is_err() {
                // refused (not the head yet, a gap): the connection is dropped
                self.close(from, to);
            }
            self.report(to);
        } else {
            let peer = PeerId { index: from as u32, generation: self.gen(from, to) };
            let w = to - WORKER_EP;
            let r = self.workers[w].on_frame(peer, &frame);
            self.workers[w].pump(&mut self.sink);
            self.send_from(to);
            if let Err(e) = r {
                // as the client does: the connection is dropped, and the worker fails over
                if std::env::var("PS_SIM_DEBUG").is_ok() {
                    eprintln!("{} us: worker {w} refused a frame of {from}: {e}", self.net.now());
                }
                self.worker_refusals += 1;
                self.close(from, to);
            }
        }
        true
    }

    /// A copy connects a link it wants (downstream or to a copy being
    /// rebuilt); `true` if one did.
    fn connect_links(&mut self) -> bool {
        let ready: Vec<usize> = (0..self.copies.len()).filter(|&c| self.alive(c) && !self.net.paused(c)).collect();
        for c in ready {
            let o = self.at[c].1;
            if let Some(server) = self.copies[c].link_wanted() {
                let Some(peer) = self.find_copy(server, o).and_then(|to| self.connect(c, to)) else { continue };
                if self.copies[c].linked(peer, server, &mut self.sink).is_ok() {
                    self.send_from(c);
                    return true;
                }
                self.sink.frames.clear();
            }
            if let Some(server) = self.copies[c].shadow_wanted() {
                let Some(peer) = self.find_copy(server, o).and_then(|to| self.connect(c, to)) else { continue };
                self.copies[c].shadow_linked(peer, server);
                if !self.lossy_shadow {
                    let to = peer.index as usize;
                    self.calm.push((c.min(to), c.max(to), peer.generation));
                }
                return true;
            }
        }
        false
    }

    /// A worker that lost an owner binds to the head its view names (which
    /// may not know it is the head yet); `true` if one did.
    fn rebind_workers(&mut self) -> bool {
        let ready: Vec<usize> = (0..WORKERS).filter(|&w| !self.worker_paused(w)).collect();
        for w in ready {
            let Some(owner) = self.workers[w].lost_owners().into_iter().next() else { continue };
            let Some(head) = self.worker_views[w].head(owner) else { continue };
            let to = self.find_copy(head, owner);
            let Some(peer) = to.and_then(|to| self.connect(WORKER_EP + w, to)) else { continue };
            if std::env::var("PS_SIM_DEBUG").is_ok() {
                eprintln!("{} us: worker {w} binds {owner:?} at {peer:?}", self.net.now());
            }
            if let Err(e) = self.workers[w].rebind(owner, peer, &mut self.sink) {
                self.violation.get_or_insert(format!("worker {w} could not rebind: {e}"));
            }
            self.send_from(WORKER_EP + w);
            return true;
        }
        false
    }

    /// What is still waiting, for a run that made no progress.
    pub(crate) fn waiting(&self) -> String {
        let mut out = Vec::new();
        for c in (0..self.copies.len()).filter(|&c| self.alive(c)) {
            let x = &self.copies[c];
            let (link, shadow, told) = (x.link_wanted(), x.shadow_wanted(), self.told[c]);
            if link.is_some() || shadow.is_some() || x.shadow_peer().is_some() || x.log_bytes() > 0 {
                let to = link.and_then(|s| self.find_copy(s, self.at[c].1));
                out.push(format!(
                    "copy {c} {:?}: link {link:?} (to {to:?}, alive {:?}) shadow {shadow:?}/{:?} log {} told {told}",
                    self.at[c],
                    to.map(|t| (self.alive(t), self.copies[t].is_member(), self.copies[t].retired())),
                    x.shadow_peer(),
                    x.log_bytes()
                ));
            }
        }
        for (w, x) in self.workers.iter().enumerate() {
            if !x.lost_owners().is_empty() || x.unanswered() > 0 {
                out.push(format!("worker {w}: lost {:?}, {} unanswered", x.lost_owners(), x.unanswered()));
            }
        }
        out.push(format!(
            "in flight {}, now {} us, view {:?}",
            self.net.in_flight(),
            self.net.now(),
            self.view().placed
        ));
        out.join("; ")
    }

    /// Steps until nothing is left to do (or `steps_max` steps: no progress).
    pub(crate) fn settle(&mut self, steps_max: u64) -> Result<(), String> {
        let mut steps = 0;
        while self.step() || self.workers.iter().any(|w| !w.lost_owners().is_empty()) {
            steps += 1;
            if steps >= steps_max {
                return Err(format!("no progress in {steps_max} steps: {}", self.waiting()));
            }
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
        }
        Ok(())
    }
}
