//! The manager state machine (a single process in this issue; the fault-tolerance
//! issue replicates it with Raft). It admits the expected servers and workers,
//! gives them ranks and the cluster view, runs barriers, watches heartbeats, and
//! ends the job: `Shutdown` when every worker is done, `Abort` with the reason
//! the moment any node fails, goes silent, or leaves early.
//!
//! Time is handed in (`now`: monotonic time since the manager started), so the
//! heartbeat logic is tested without sleeping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::control::{send_control, ClusterView, Control, JobSpec, Role, ServerInfo};
use crate::ring::Owner;
use crate::transport::{FrameSink, PeerHello, PeerId};
use crate::wire::{self, Frame};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    Registering,
    Running,
    Stopping,
    Ended,
}

#[derive(Debug)]
struct Node {
    peer: PeerId,
    role: Role,
    rank: u32,
    host: String,
    ports: Vec<u16>,
    pid: u32,
    last_seen: Duration,
    connected: bool,
    done: bool,
    /// restored by a new leader, not yet connected to it (`Rejoin`)
    rejoining: bool,
}

/// A node as the replicated state keeps it (no connection, no clock).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub role: Role,
    pub rank: u32,
    pub host: String,
    pub ports: Vec<u16>,
    pub pid: u32,
    pub done: bool,
}

/// Everything a manager replica must know to take over as leader: what the
/// leader replicates after every change (`consensus`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManagerState {
    pub job: JobSpec,
    pub expect_servers: u32,
    pub expect_workers: u32,
    pub nodes: Vec<NodeRecord>,
    pub phase: Phase,
    pub barriers: BTreeMap<String, BTreeSet<u32>>,
    pub outcome: Option<Result<String, String>>,
    pub view: Option<ClusterView>,
    pub losses: Vec<String>,
}

/// The peer of a node restored from the replicated state, until it rejoins.
const NO_PEER: PeerId = PeerId { index: u32::MAX, generation: u32::MAX - 1 };

impl Node {
    fn describe(&self) -> String {
        format!("{} {} (pid {} on {})", self.role.name(), self.rank, self.pid, self.host)
    }
}

/// Tunables of the manager, with defaults from `limits`.
#[derive(Clone, Copy, Debug)]
pub struct ManagerTimeouts {
    pub heartbeat: Duration,
    pub registration: Duration,
    pub stopping: Duration,
}

impl Default for ManagerTimeouts {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(crate::limits::HEARTBEAT_TIMEOUT_MS),
            registration: Duration::from_secs(120),
            stopping: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
pub struct ManagerCore {
    job: JobSpec,
    expect_servers: u32,
    expect_workers: u32,
    timeouts: ManagerTimeouts,
    nodes: Vec<Node>,
    by_peer: HashMap<PeerId, usize>,
    phase: Phase,
    phase_since: Duration,
    barriers: BTreeMap<String, BTreeSet<u32>>,
    outcome: Option<Result<String, String>>,
    log: Vec<String>,
    /// the view handed out, kept up to date once the job runs
    view: Option<ClusterView>,
    /// what the job lost and went on without, for the summary
    losses: Vec<String>,
}

impl ManagerCore {
    pub fn new(job: JobSpec, expect_servers: u32, expect_workers: u32, timeouts: ManagerTimeouts) -> Self {
        Self {
            job,
            expect_servers,
            expect_workers,
            timeouts,
            nodes: Vec::new(),
            by_peer: HashMap::new(),
            phase: Phase::Registering,
            phase_since: Duration::ZERO,
            barriers: BTreeMap::new(),
            outcome: None,
            log: Vec::new(),
            view: None,
            losses: Vec::new(),
        }
    }

    /// The current view (once every node registered).
    pub fn view(&self) -> Option<&ClusterView> {
        self.view.as_ref()
    }

    /// What the replicas replicate (see [`ManagerState`]).
    pub fn state(&self) -> ManagerState {
        ManagerState {
            job: self.job.clone(),
            expect_servers: self.expect_servers,
            expect_workers: self.expect_workers,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeRecord {
                    role: n.role,
                    rank: n.rank,
                    host: n.host.clone(),
                    ports: n.ports.clone(),
                    pid: n.pid,
                    done: n.done,
                })
                .collect(),
            phase: self.phase,
            barriers: self.barriers.clone(),
            outcome: self.outcome.clone(),
            view: self.view.clone(),
            losses: self.losses.clone(),
        }
    }

    /// A new leader's manager, from the last committed state: every node is
    /// expected to rejoin (`Control::Rejoin`) within the heartbeat timeout,
    /// else it is lost as a silent node would be.
    pub fn restore(state: ManagerState, timeouts: ManagerTimeouts, now: Duration) -> Self {
        let mut m = Self::new(state.job, state.expect_servers, state.expect_workers, timeouts);
        m.nodes = state
            .nodes
            .into_iter()
            .map(|r| Node {
                peer: NO_PEER,
                role: r.role,
                rank: r.rank,
                host: r.host,
                ports: r.ports,
                pid: r.pid,
                last_seen: now,
                connected: false,
                done: r.done,
                rejoining: true,
            })
            .collect();
        m.phase = state.phase;
        m.phase_since = now;
        m.barriers = state.barriers;
        m.outcome = state.outcome;
        m.view = state.view;
        m.losses = state.losses;
        m.log.push(format!("took over as leader: {} nodes to rejoin, phase {:?}", m.nodes.len(), m.phase));
        m
    }

    /// A node that registered with an earlier leader connects to this one.
    fn rejoin(
        &mut self,
        peer: PeerId,
        role: Role,
        rank: u32,
        pid: u32,
        now: Duration,
        tx: &mut dyn FrameSink,
    ) -> Result<(), String> {
        let Some(i) = self.nodes.iter().position(|n| n.role == role && n.rank == rank && n.pid == pid) else {
            let reason = format!("no {} {rank} (pid {pid}) is in this job", role.name());
            self.send(tx, peer, &Control::Abort { reason: reason.clone() });
            return Err(reason);
        };
        if self.dead(role, rank) {
            let reason = format!("{} was found dead meanwhile and left out of the job", self.nodes[i].describe());
            self.send(tx, peer, &Control::Abort { reason: reason.clone() });
            return Err(reason);
        }
        let n = &mut self.nodes[i];
        if n.connected {
            self.by_peer.remove(&n.peer);
        }
        n.peer = peer;
        n.connected = true;
        n.rejoining = false;
        n.last_seen = now;
        self.by_peer.insert(peer, i);
        self.log.push(format!("{} rejoined", self.nodes[i].describe()));
        if let Some(v) = self.view.clone() {
            self.send(tx, peer, &Control::View { view: v });
        }
        if self.phase == Phase::Stopping && role != Role::Manager {
            self.send(tx, peer, &Control::Shutdown { reason: "all workers finished".into() });
        }
        Ok(())
    }

    fn dead(&self, role: Role, rank: u32) -> bool {
        let Some(v) = &self.view else { return false };
        match role {
            Role::Server => v.dead_servers.contains(&rank),
            Role::Worker => v.dead_workers.contains(&rank),
            Role::Manager => false,
        }
    }

    fn live_workers(&self) -> u32 {
        self.expect_workers - self.view.as_ref().map_or(0, |v| v.dead_workers.len() as u32)
    }

    fn publish(&mut self, tx: &mut dyn FrameSink) {
        let Some(v) = self.view.as_mut() else { return };
        v.epoch += 1;
        let msg = Control::View { view: v.clone() };
        self.broadcast(tx, &[Role::Server, Role::Worker], &msg);
    }

    /// Node `i` died (or went silent) while the job runs: a server is failed
    /// over when every chain keeps a live copy, a worker is left behind (the
    /// application decides what happens to its data); anything else aborts.
    fn lose(&mut self, i: usize, why: String, now: Duration, tx: &mut dyn FrameSink) {
        let (role, rank, peer, connected) = {
            let n = &self.nodes[i];
            (n.role, n.rank, n.peer, n.connected)
        };
        let who = self.nodes[i].describe();
        if self.phase != Phase::Running || self.dead(role, rank) {
            if !self.dead(role, rank) {
                self.abort(tx, format!("{who} {why}"));
            }
            return;
        }
        let Some(v) = self.view.as_mut() else { return };
        match role {
            Role::Server if v.copies() > 1 => {
                v.dead_servers.push(rank);
                let orphan = (0..v.servers.len() as u32).find_map(|s| {
                    let shards = v.servers[s as usize].ports.len() as u32;
                    (0..shards).map(|h| Owner { server: s, shard: h }).find(|&o| v.head(o).is_none())
                });
                if let Some(o) = orphan {
                    let reason = format!(
                        "{who} {why}, and with it the last copy of server {} shard {}'s key ranges",
                        o.server, o.shard
                    );
                    self.abort(tx, reason);
                    return;
                }
                self.log.push(format!("{who} {why}: failing over to the next copies (view {})", v.epoch + 1));
                self.losses.push(format!("{who} (failed over)"));
                // every chain short of a copy gets one placed on the next live
                // server that holds none
                // rebuilds not finished start over (their source may have been the dead one)
                v.placed.retain(|p| p.server != rank && p.ready);
                for line in v.place_copies() {
                    self.log.push(line);
                }
            }
            Role::Worker if v.dead_workers.len() + 1 < self.expect_workers as usize => {
                v.dead_workers.push(rank);
                self.log.push(format!("{who} {why}: the job goes on without it (view {})", v.epoch + 1));
                self.losses.push(format!("{who} (left behind)"));
            }
            _ => {
                self.abort(tx, format!("{who} {why}"));
                return;
            }
        }
        if connected {
            // presumed dead but still there: it must not go on as if it were in the job
            self.send(tx, peer, &Control::Abort { reason: format!("the manager presumed {who} dead: {why}") });
        }
        self.publish(tx);
        self.release_barriers(tx);
        self.check_done(now, tx);
    }

    /// Releases every barrier every live worker has reached.
    fn release_barriers(&mut self, tx: &mut dyn FrameSink) {
        let live: BTreeSet<u32> = (0..self.expect_workers).filter(|&w| !self.dead(Role::Worker, w)).collect();
        let ready: Vec<String> =
            self.barriers.iter().filter(|(_, set)| live.is_subset(set)).map(|(n, _)| n.clone()).collect();
        for name in ready {
            self.barriers.remove(&name);
            self.broadcast(tx, &[Role::Worker], &Control::Released { name });
        }
    }

    /// Every live worker is done: the servers are told to stop.
    fn check_done(&mut self, now: Duration, tx: &mut dyn FrameSink) {
        let done = self.nodes.iter().filter(|n| n.role == Role::Worker && n.done && !self.dead(Role::Worker, n.rank));
        let all = done.count() as u32;
        if all == self.live_workers() && self.phase == Phase::Running {
            self.phase = Phase::Stopping;
            self.phase_since = now;
            self.log.push(format!("all {all} workers finished; stopping the servers"));
            self.broadcast(
                tx,
                &[Role::Server, Role::Worker],
                &Control::Shutdown { reason: "all workers finished".into() },
            );
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// `Ok(summary)` once the job ended well, `Err(reason)` once it failed.
    pub fn outcome(&self) -> Option<&Result<String, String>> {
        self.outcome.as_ref()
    }

    /// Lines for the driver to log.
    pub fn drain_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn count(&self, role: Role) -> u32 {
        self.nodes.iter().filter(|n| n.role == role).count() as u32
    }

    fn send(&mut self, tx: &mut dyn FrameSink, peer: PeerId, msg: &Control) {
        if let Err(e) = send_control(tx, peer, msg) {
            self.log.push(format!("could not send to {peer:?}: {e}"));
        }
    }

    fn broadcast(&mut self, tx: &mut dyn FrameSink, roles: &[Role], msg: &Control) {
        let peers: Vec<PeerId> =
            self.nodes.iter().filter(|n| n.connected && roles.contains(&n.role)).map(|n| n.peer).collect();
        for p in peers {
            self.send(tx, p, msg);
        }
    }

    fn abort(&mut self, tx: &mut dyn FrameSink, reason: String) {
        if self.phase == Phase::Ended {
            return;
        }
        self.log.push(format!("job failed: {reason}"));
        self.broadcast(tx, &[Role::Server, Role::Worker], &Control::Abort { reason: reason.clone() });
        self.phase = Phase::Ended;
        self.outcome = Some(Err(reason));
    }

    /// A peer passed the handshake. Nothing happens until it registers.
    pub fn on_open(&mut self, _peer: PeerId, _hello: PeerHello, _now: Duration) {}

    /// Handles one frame; `Err` means drop the peer with that reason.
    pub fn on_frame(
        &mut self,
        peer: PeerId,
        hello: PeerHello,
        frame: &[u8],
        now: Duration,
        tx: &mut dyn FrameSink,
    ) -> Result<(), String> {
        let json = match wire::decode(frame, crate::limits::CONTROL_BYTES_MAX + 64).map_err(|e| e.to_string())? {
            Frame::Control(j) => j,
            other => return Err(format!("expected a control frame, got {other:?}")),
        };
        let msg = Control::from_json(json).map_err(|e| e.to_string())?;
        if let Some(&i) = self.by_peer.get(&peer) {
            self.nodes[i].last_seen = now;
        }
        match msg {
            Control::Register { role, host, ports, pid, rank } => {
                // registered with an earlier leader already (its welcome not sent): the same node again
                if let Some(n) = self.nodes.iter().find(|n| n.role == role && n.pid == pid && n.host == host) {
                    let rank = n.rank;
                    self.rejoin(peer, role, rank, pid, now, tx)?;
                    if let (Some(view), Phase::Running) = (self.view.clone(), self.phase) {
                        self.send(tx, peer, &Control::Welcome { rank, view });
                    }
                    return Ok(());
                }
                self.register(peer, hello, role, host, ports, pid, rank, now, tx)
            }
            Control::Rejoin { role, rank, pid } => {
                if Role::from_u8(hello.role) != Some(role) {
                    return Err(format!("rejoined as {} but authenticated as role {}", role.name(), hello.role));
                }
                self.rejoin(peer, role, rank, pid, now, tx)
            }
            Control::Heartbeat => Ok(()),
            Control::Barrier { name } => {
                let node = self.node_of(peer)?;
                if node.role != Role::Worker {
                    return Err("only workers take part in barriers".into());
                }
                let rank = node.rank;
                self.barriers.entry(name).or_default().insert(rank);
                self.release_barriers(tx);
                Ok(())
            }
            Control::Copies { ports } => {
                let node = self.node_of(peer)?;
                if node.role != Role::Server {
                    return Err("only servers hold copies".into());
                }
                let rank = node.rank;
                let Some(v) = self.view.as_mut() else { return Err("copies before the job started".into()) };
                let want = (v.copies() as usize - 1) * v.servers[rank as usize].ports.len();
                if ports.len() != want {
                    return Err(format!("server {rank} reported {} copy ports, the job needs {want}", ports.len()));
                }
                if v.servers[rank as usize].copy_ports == ports {
                    // told again after it rejoined a new leader: nothing changed
                    return Ok(());
                }
                v.servers[rank as usize].copy_ports = ports;
                if v.copies_reported() {
                    self.log.push(format!("every server reported its copies: {} copies of every shard", v.copies()));
                    self.publish(tx);
                }
                Ok(())
            }
            Control::CopyAdded { owner, id, port } => {
                let rank = self.node_of(peer)?.rank;
                let Some(v) = self.view.as_mut() else { return Err("a copy before the job started".into()) };
                let Some(p) =
                    v.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.server == rank && p.port == 0)
                else {
                    return Ok(()); // told again after a new leader: known already
                };
                p.port = port;
                self.publish(tx);
                Ok(())
            }
            Control::CopySynced { owner, id } => {
                let rank = self.node_of(peer)?.rank;
                let Some(v) = self.view.as_mut() else { return Err("a copy before the job started".into()) };
                let Some(p) =
                    v.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.server == rank && !p.synced)
                else {
                    return Ok(());
                };
                p.synced = true;
                self.publish(tx);
                Ok(())
            }
            Control::CopyReady { owner, id } => {
                let rank = self.node_of(peer)?.rank;
                let Some(v) = self.view.as_mut() else { return Err("a copy before the job started".into()) };
                // from the chain's tail, which saw the copy acknowledge what it answered before
                if !v.chain(owner).contains(&rank) {
                    return Err(format!("server {rank} holds no copy of shard ({}, {})", owner.server, owner.shard));
                }
                let Some(p) = v.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.synced && !p.ready)
                else {
                    return Ok(());
                };
                p.ready = true;
                let rank = p.server;
                let n = v.live_copies(owner);
                self.log.push(format!(
                    "server {rank}'s rebuilt copy of shard ({}, {}) joined its chain: {n} copies again",
                    owner.server, owner.shard
                ));
                self.publish(tx);
                Ok(())
            }
            Control::Done { ok, message } => {
                let i = *self.by_peer.get(&peer).ok_or("Done before Register")?;
                self.nodes[i].done = true;
                let who = self.nodes[i].describe();
                if !ok {
                    self.abort(tx, format!("{who} failed: {message}"));
                    return Ok(());
                }
                self.log.push(format!("{who} finished: {message}"));
                self.check_done(now, tx);
                Ok(())
            }
            other => Err(format!("a node may not send {other:?}")),
        }
    }

    fn node_of(&self, peer: PeerId) -> Result<&Node, String> {
        self.by_peer.get(&peer).map(|&i| &self.nodes[i]).ok_or_else(|| "message before Register".to_string())
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        peer: PeerId,
        hello: PeerHello,
        role: Role,
        host: String,
        ports: Vec<u16>,
        pid: u32,
        asked: Option<u32>,
        now: Duration,
        tx: &mut dyn FrameSink,
    ) -> Result<(), String> {
        if Role::from_u8(hello.role) != Some(role) {
            return Err(format!("registered as {} but authenticated as role {}", role.name(), hello.role));
        }
        if self.by_peer.contains_key(&peer) {
            return Err("registered twice".into());
        }
        let (have, want) = match role {
            Role::Server => (self.count(Role::Server), self.expect_servers),
            Role::Worker => (self.count(Role::Worker), self.expect_workers),
            Role::Manager => return Err("a manager cannot register with a manager".into()),
        };
        if self.phase != Phase::Registering || have >= want {
            let reason = format!("this job already has its {want} {}s", role.name());
            self.send(tx, peer, &Control::Abort { reason: reason.clone() });
            return Err(reason);
        }
        if role == Role::Server && (ports.is_empty() || ports.len() > 1024) {
            return Err(format!("a server must listen on 1..1024 shard ports, not {}", ports.len()));
        }
        let taken = |r: u32| self.nodes.iter().any(|n| n.role == role && n.rank == r);
        let rank = match asked {
            Some(r) if r >= want || taken(r) => {
                let reason = format!("{} rank {r} is taken or not below {want}", role.name());
                self.send(tx, peer, &Control::Abort { reason: reason.clone() });
                return Err(reason);
            }
            Some(r) => r,
            None => (0..want).find(|&r| !taken(r)).expect("fewer than `want` registered"),
        };
        let node =
            Node { peer, role, rank, host, ports, pid, last_seen: now, connected: true, done: false, rejoining: false };
        self.log.push(format!("{} registered", node.describe()));
        self.by_peer.insert(peer, self.nodes.len());
        self.nodes.push(node);
        if self.count(Role::Server) == self.expect_servers && self.count(Role::Worker) == self.expect_workers {
            self.start(now, tx);
        }
        Ok(())
    }

    fn start(&mut self, now: Duration, tx: &mut dyn FrameSink) {
        let mut servers: Vec<ServerInfo> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Server)
            .map(|n| ServerInfo::new(n.rank, &n.host, n.ports.clone(), n.pid))
            .collect();
        servers.sort_by_key(|s| s.rank);
        let view = ClusterView::new(self.job.clone(), servers, self.expect_workers);
        if let Err(e) = view.ring() {
            self.abort(tx, format!("cannot build the ring: {e}"));
            return;
        }
        let targets: Vec<(PeerId, u32)> = self.nodes.iter().map(|n| (n.peer, n.rank)).collect();
        for (peer, rank) in targets {
            self.send(tx, peer, &Control::Welcome { rank, view: view.clone() });
        }
        self.phase = Phase::Running;
        self.phase_since = now;
        self.log.push(format!(
            "all {} servers and {} workers registered; job running",
            self.expect_servers, self.expect_workers
        ));
        self.view = Some(view);
    }

    /// A connection ended.
    pub fn on_closed(&mut self, peer: PeerId, reason: &str, now: Duration, tx: &mut dyn FrameSink) {
        let Some(&i) = self.by_peer.get(&peer) else { return };
        self.nodes[i].connected = false;
        let node = &self.nodes[i];
        let expected = self.phase == Phase::Ended
            || (node.role == Role::Worker && node.done)
            || (self.phase == Phase::Stopping && node.role == Role::Server)
            || self.dead(node.role, node.rank);
        if !expected {
            self.lose(i, format!("disconnected: {reason}"), now, tx);
            return;
        }
        self.check_stopped(now);
    }

    fn check_stopped(&mut self, _now: Duration) {
        if self.phase == Phase::Stopping && self.nodes.iter().all(|n| n.role != Role::Server || !n.connected) {
            self.phase = Phase::Ended;
            let live = self.expect_servers - self.view.as_ref().map_or(0, |v| v.dead_servers.len() as u32);
            let mut summary = format!("{} workers finished; {live} servers stopped", self.live_workers());
            if !self.losses.is_empty() {
                summary += &format!("; lost and gone on without: {}", self.losses.join(", "));
            }
            self.outcome = Some(Ok(summary));
        }
    }

    /// Periodic check: heartbeats, registration and stopping deadlines.
    pub fn on_tick(&mut self, now: Duration, tx: &mut dyn FrameSink) {
        match self.phase {
            Phase::Registering if now.saturating_sub(self.phase_since) > self.timeouts.registration => {
                let reason = format!(
                    "only {}/{} servers and {}/{} workers registered within {:?}",
                    self.count(Role::Server),
                    self.expect_servers,
                    self.count(Role::Worker),
                    self.expect_workers,
                    self.timeouts.registration
                );
                self.abort(tx, reason);
            }
            Phase::Running | Phase::Registering => {
                let silent = self.nodes.iter().position(|n| {
                    (n.connected || n.rejoining)
                        && !n.done
                        && !self.dead(n.role, n.rank)
                        && now.saturating_sub(n.last_seen) > self.timeouts.heartbeat
                });
                if let Some(i) = silent {
                    let n = &self.nodes[i];
                    let why = if n.rejoining {
                        format!(
                            "did not rejoin the new leader within {:.1} s: presumed dead",
                            self.timeouts.heartbeat.as_secs_f64()
                        )
                    } else {
                        format!(
                            "sent nothing for {:.1} s (heartbeat timeout {:.1} s): presumed dead",
                            now.saturating_sub(n.last_seen).as_secs_f64(),
                            self.timeouts.heartbeat.as_secs_f64()
                        )
                    };
                    let who = n.describe();
                    self.nodes[i].rejoining = false;
                    if self.phase == Phase::Registering {
                        self.abort(tx, format!("{who} {why}"));
                    } else {
                        self.lose(i, why, now, tx);
                    }
                }
            }
            Phase::Stopping if now.saturating_sub(self.phase_since) > self.timeouts.stopping => {
                self.log.push("servers did not all disconnect in time after shutdown; ending anyway".into());
                self.phase = Phase::Ended;
                self.outcome = Some(Ok("workers finished; some servers did not confirm shutdown".into()));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRange, TableSpec};
    use crate::rules::RuleSpec;

    #[derive(Default)]
    struct Out(Vec<(PeerId, Vec<u8>)>);
    impl FrameSink for Out {
        fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], crate::transport::TxError> {
            self.0.push((peer, vec![0; len]));
            Ok(&mut self.0.last_mut().unwrap().1)
        }
    }
    impl Out {
        fn msgs(&mut self) -> Vec<(PeerId, Control)> {
            self.0
                .drain(..)
                .map(|(p, f)| match wire::decode(&f, 1 << 20).unwrap() {
                    Frame::Control(j) => (p, Control::from_json(j).unwrap()),
                    _ => panic!(),
                })
                .collect()
        }
    }

    fn job() -> JobSpec {
        JobSpec {
            tables: vec![TableSpec::dense(0, "w", KeyRange::new(0, 100), 1, RuleSpec::Sum)],
            app: "check".into(),
            params: serde_json::Value::Null,
            limits: Default::default(),
            partitions: 256,
            copies: 1,
        }
    }

    fn p(i: u32) -> PeerId {
        PeerId { index: i, generation: 0 }
    }

    fn reg(m: &mut ManagerCore, out: &mut Out, i: u32, role: Role, now: Duration) {
        let msg =
            Control::Register { role, host: "127.0.0.1".into(), ports: vec![1000 + i as u16], pid: i, rank: None };
        let json = msg.to_json();
        let mut f = vec![0u8; wire::control_len(json.len())];
        wire::write_control(&mut f, &json);
        m.on_frame(p(i), PeerHello { role: role as u8, node: i }, &f, now, out).unwrap();
    }

    fn ctl(m: &mut ManagerCore, out: &mut Out, i: u32, role: Role, msg: Control, now: Duration) -> Result<(), String> {
        let json = msg.to_json();
        let mut f = vec![0u8; wire::control_len(json.len())];
        wire::write_control(&mut f, &json);
        m.on_frame(p(i), PeerHello { role: role as u8, node: i }, &f, now, out)
    }

    #[test]
    fn registration_barrier_and_orderly_shutdown() {
        let mut m = ManagerCore::new(job(), 2, 2, ManagerTimeouts::default());
        let mut out = Out::default();
        let t = Duration::from_secs(1);
        reg(&mut m, &mut out, 0, Role::Server, t);
        reg(&mut m, &mut out, 1, Role::Worker, t);
        reg(&mut m, &mut out, 2, Role::Server, t);
        assert_eq!(m.phase(), Phase::Registering);
        assert!(out.msgs().is_empty());
        reg(&mut m, &mut out, 3, Role::Worker, t);
        let welcomes = out.msgs();
        assert_eq!(welcomes.len(), 4);
        let ranks: Vec<_> = welcomes
            .iter()
            .map(|(_, c)| match c {
                Control::Welcome { rank, view } => {
                    assert_eq!(view.servers.len(), 2);
                    *rank
                }
                _ => panic!(),
            })
            .collect();
        assert_eq!(ranks, vec![0, 0, 1, 1]);
        // a fifth node is turned away
        let mut late = Out::default();
        let msg = Control::Register { role: Role::Worker, host: "h".into(), ports: vec![], pid: 9, rank: None };
        let json = msg.to_json();
        let mut f = vec![0u8; wire::control_len(json.len())];
        wire::write_control(&mut f, &json);
        assert!(m.on_frame(p(9), PeerHello { role: 3, node: 9 }, &f, t, &mut late).is_err());
        // barrier releases only when both workers arrive
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Barrier { name: "b".into() }, t).unwrap();
        assert!(out.msgs().is_empty());
        ctl(&mut m, &mut out, 3, Role::Worker, Control::Barrier { name: "b".into() }, t).unwrap();
        assert_eq!(out.msgs().len(), 2);
        // done -> shutdown -> servers leave -> ended ok
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Done { ok: true, message: "ok".into() }, t).unwrap();
        m.on_closed(p(1), "eof", t, &mut out);
        assert_eq!(m.phase(), Phase::Running, "a finished worker may leave");
        ctl(&mut m, &mut out, 3, Role::Worker, Control::Done { ok: true, message: "ok".into() }, t).unwrap();
        assert_eq!(m.phase(), Phase::Stopping);
        assert!(out.msgs().iter().any(|(_, c)| matches!(c, Control::Shutdown { .. })));
        m.on_closed(p(0), "eof", t, &mut out);
        m.on_closed(p(2), "eof", t, &mut out);
        assert_eq!(m.phase(), Phase::Ended);
        assert!(matches!(m.outcome(), Some(Ok(_))));
    }

    #[test]
    fn a_silent_node_is_reported_and_the_job_aborted() {
        let mut m = ManagerCore::new(job(), 1, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::from_secs(0));
        reg(&mut m, &mut out, 1, Role::Worker, Duration::from_secs(0));
        out.msgs();
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Heartbeat, Duration::from_secs(4)).unwrap();
        m.on_tick(Duration::from_secs(4), &mut out);
        assert_eq!(m.phase(), Phase::Running);
        m.on_tick(Duration::from_secs(6), &mut out);
        assert_eq!(m.phase(), Phase::Ended);
        let Some(Err(reason)) = m.outcome() else { panic!() };
        assert!(reason.contains("server 0") && reason.contains("presumed dead"), "{reason}");
        assert!(out.msgs().iter().any(|(peer, c)| *peer == p(1) && matches!(c, Control::Abort { .. })));
    }

    #[test]
    fn a_node_that_disconnects_early_fails_the_job() {
        let mut m = ManagerCore::new(job(), 1, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        reg(&mut m, &mut out, 1, Role::Worker, Duration::ZERO);
        m.on_closed(p(0), "connection reset", Duration::ZERO, &mut out);
        let Some(Err(reason)) = m.outcome() else { panic!() };
        assert!(reason.contains("server 0") && reason.contains("connection reset"), "{reason}");
    }

    #[test]
    fn asked_ranks_are_honoured_and_clashes_refused() {
        let mut m = ManagerCore::new(job(), 2, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        let reg_as = |m: &mut ManagerCore, out: &mut Out, i: u32, rank: Option<u32>| {
            ctl(
                m,
                out,
                i,
                Role::Server,
                Control::Register { role: Role::Server, host: "h".into(), ports: vec![1], pid: i, rank },
                Duration::ZERO,
            )
        };
        reg_as(&mut m, &mut out, 0, Some(1)).unwrap();
        assert!(reg_as(&mut m, &mut out, 1, Some(1)).unwrap_err().contains("taken"));
        assert!(reg_as(&mut m, &mut out, 2, Some(2)).unwrap_err().contains("not below 2"));
        reg_as(&mut m, &mut out, 3, None).unwrap();
        reg(&mut m, &mut out, 4, Role::Worker, Duration::ZERO);
        let ranks: Vec<(PeerId, u32)> = out
            .msgs()
            .into_iter()
            .filter_map(|(p, c)| match c {
                Control::Welcome { rank, .. } => Some((p, rank)),
                _ => None,
            })
            .collect();
        assert!(ranks.contains(&(p(0), 1)) && ranks.contains(&(p(3), 0)), "{ranks:?}");
    }

    fn views(out: &mut Out) -> Vec<ClusterView> {
        out.msgs()
            .into_iter()
            .filter_map(|(_, c)| match c {
                Control::View { view } => Some(view),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_replicated_job_fails_over_a_dead_server_until_a_chain_would_lose_its_last_copy() {
        let mut j = job();
        j.copies = 2;
        let mut m = ManagerCore::new(j, 3, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        for i in 0..3 {
            reg(&mut m, &mut out, i, Role::Server, Duration::ZERO);
        }
        reg(&mut m, &mut out, 3, Role::Worker, Duration::ZERO);
        out.msgs();
        for i in 0..3 {
            ctl(&mut m, &mut out, i, Role::Server, Control::Copies { ports: vec![2000 + i as u16] }, Duration::ZERO)
                .unwrap();
        }
        let v = views(&mut out);
        assert!(v.iter().all(|v| v.copies_reported()) && !v.is_empty(), "one view once every copy is known");
        // server 1 dies: its chain's next copy (server 2) is the head now
        m.on_closed(p(1), "reset", Duration::ZERO, &mut out);
        assert_eq!(m.phase(), Phase::Running);
        let v = views(&mut out);
        assert_eq!(v.last().unwrap().dead_servers, vec![1]);
        assert_eq!(v.last().unwrap().head(Owner { server: 1, shard: 0 }), Some(2));
        // server 2 dies too: shard (1, 0) had its copies on 1 and 2 only
        m.on_closed(p(2), "reset", Duration::ZERO, &mut out);
        let Some(Err(reason)) = m.outcome() else { panic!("{:?}", m.outcome()) };
        assert!(reason.contains("last copy of server 1 shard 0"), "{reason}");
    }

    #[test]
    fn a_lost_worker_is_left_behind_barriers_and_the_end_count_the_live_ones() {
        let mut m = ManagerCore::new(job(), 1, 3, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        for i in 1..4 {
            reg(&mut m, &mut out, i, Role::Worker, Duration::ZERO);
        }
        out.msgs();
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Barrier { name: "b".into() }, Duration::ZERO).unwrap();
        ctl(&mut m, &mut out, 2, Role::Worker, Control::Barrier { name: "b".into() }, Duration::ZERO).unwrap();
        assert!(out.msgs().is_empty(), "worker 2 has not arrived");
        // worker 2 (peer 3) goes silent: presumed dead, the barrier lets the others through
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Heartbeat, Duration::from_secs(6)).unwrap();
        ctl(&mut m, &mut out, 2, Role::Worker, Control::Heartbeat, Duration::from_secs(6)).unwrap();
        ctl(&mut m, &mut out, 0, Role::Server, Control::Heartbeat, Duration::from_secs(6)).unwrap();
        m.on_tick(Duration::from_secs(6), &mut out);
        assert_eq!(m.phase(), Phase::Running);
        let msgs = out.msgs();
        assert!(msgs.iter().any(|(_, c)| matches!(c, Control::View { view } if view.dead_workers == vec![2])));
        assert!(msgs.iter().any(|(_, c)| matches!(c, Control::Released { .. })));
        // told it is presumed dead, in case it is alive after all
        assert!(msgs.iter().any(|(peer, c)| *peer == p(3) && matches!(c, Control::Abort { .. })));
        for i in 1..3 {
            ctl(&mut m, &mut out, i, Role::Worker, Control::Done { ok: true, message: "ok".into() }, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(m.phase(), Phase::Stopping);
        m.on_closed(p(0), "eof", Duration::ZERO, &mut out);
        let Some(Ok(summary)) = m.outcome() else { panic!() };
        assert!(summary.contains("worker 2") && summary.contains("left behind"), "{summary}");
    }

    #[test]
    fn losing_every_worker_fails_the_job() {
        let mut m = ManagerCore::new(job(), 1, 2, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        reg(&mut m, &mut out, 1, Role::Worker, Duration::ZERO);
        reg(&mut m, &mut out, 2, Role::Worker, Duration::ZERO);
        m.on_closed(p(1), "reset", Duration::ZERO, &mut out);
        assert_eq!(m.phase(), Phase::Running);
        m.on_closed(p(2), "reset", Duration::ZERO, &mut out);
        assert!(matches!(m.outcome(), Some(Err(_))));
    }

    #[test]
    fn a_new_leader_takes_over_from_the_replicated_state_and_its_nodes_rejoin() {
        let mut m = ManagerCore::new(job(), 1, 2, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        reg(&mut m, &mut out, 1, Role::Worker, Duration::ZERO);
        reg(&mut m, &mut out, 2, Role::Worker, Duration::ZERO);
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Barrier { name: "b".into() }, Duration::ZERO).unwrap();
        out.msgs();
        // the state survives serialisation, as the Raft log carries it
        let state = m.state();
        let bytes = serde_json::to_vec(&state).unwrap();
        let state: ManagerState = serde_json::from_slice(&bytes).unwrap();
        let t = Duration::from_secs(100);
        let mut n = ManagerCore::restore(state, ManagerTimeouts::default(), t);
        assert_eq!(n.phase(), Phase::Running);
        assert_eq!(n.state(), m.state(), "nothing lost in the hand-over");
        // the server and worker 0 rejoin on new connections and get the view
        let rejoin = |n: &mut ManagerCore, out: &mut Out, peer: u32, role: Role, rank: u32, pid: u32| {
            ctl(n, out, peer, role, Control::Rejoin { role, rank, pid }, t)
        };
        rejoin(&mut n, &mut out, 10, Role::Server, 0, 0).unwrap();
        rejoin(&mut n, &mut out, 11, Role::Worker, 0, 1).unwrap();
        assert_eq!(views(&mut out).len(), 2);
        // a stranger is turned away
        assert!(rejoin(&mut n, &mut out, 12, Role::Worker, 1, 999).is_err());
        out.msgs();
        // worker 1 (pid 2) never rejoins: lost after the heartbeat timeout, and the
        // barrier worker 0 reached before the hand-over lets it through
        ctl(&mut n, &mut out, 10, Role::Server, Control::Heartbeat, t + Duration::from_secs(6)).unwrap();
        ctl(&mut n, &mut out, 11, Role::Worker, Control::Heartbeat, t + Duration::from_secs(6)).unwrap();
        n.on_tick(t + Duration::from_secs(6), &mut out);
        assert_eq!(n.phase(), Phase::Running);
        let msgs = out.msgs();
        assert!(msgs.iter().any(|(_, c)| matches!(c, Control::View { view } if view.dead_workers == vec![1])));
        assert!(msgs.iter().any(|(p, c)| *p == super::tests::p(11) && matches!(c, Control::Released { .. })));
    }

    #[test]
    fn role_must_match_the_authenticated_one() {
        let mut m = ManagerCore::new(job(), 1, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        let r = ctl(
            &mut m,
            &mut out,
            0,
            Role::Worker,
            Control::Register { role: Role::Server, host: "h".into(), ports: vec![1], pid: 1, rank: None },
            Duration::ZERO,
        );
        assert!(r.unwrap_err().contains("authenticated as role 3"));
    }
}
