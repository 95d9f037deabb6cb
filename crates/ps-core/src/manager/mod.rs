//! The manager state machine (a single process in this issue; the fault-tolerance
//! issue replicates it with Raft). It admits the expected servers and workers,
//! gives them ranks and the cluster view, runs barriers, watches heartbeats, and
//! ends the job: `Shutdown` when every worker is done, `Abort` with the reason
//! the moment any node fails, goes silent, or leaves early.
//!
//! Time is handed in (`now`: monotonic time since the manager started), so the
//! heartbeat logic is tested without sleeping.
//!
//! ## Rooms
//!
//! - this file: the types, the messages a node may send and where each goes
//!   (`on_frame`), and the outbound helpers (`send`, `broadcast`, `abort`,
//!   `publish`) every room uses.
//! - `join`: registration, ranks, the start of the job, and a node's rejoining
//!   a new leader.
//! - `barriers`: barrier arrivals and their release.
//! - `failover`: lost connections, heartbeats and deadlines; failing over a
//!   dead server, leaving a dead worker behind, or aborting.
//! - `rebuild`: what servers report about the copies placed on them, up to a
//!   rebuilt copy joining its chain.
//! - `shutdown`: workers finishing, and the end of the job.
//! - `state`: what the Raft-replicated manager replicates ([`ManagerState`]),
//!   and a new leader's restore from it.
//!
//! The manager never opens a socket and never reads a clock: frames arrive and
//! leave through the transport handed in, and time is the `now` handed in. No
//! message a node sends may panic it: every refusal is an `Err` with a reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::control::{send_control, ClusterView, Control, JobSpec, Role};
use crate::transport::{FrameSink, PeerHello, PeerId};
use crate::wire::{self, Frame, WireError};

mod barriers;
mod failover;
mod join;
mod rebuild;
mod shutdown;
mod state;
#[cfg(test)]
mod testkit;

pub use state::ManagerState;

/// Why the manager drops a node's connection: a frame it cannot read, a
/// message the node may not send, or a registration it refuses (the text
/// says which; a refused node is also sent an `Abort` with it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManagerError {
    /// The frame does not decode, or its JSON is no control message.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// A data frame where a control frame belongs (its kind and header).
    #[error("expected a control frame, got {0}")]
    NotControl(String),
    /// A control message a node may not send (the message).
    #[error("a node may not send {0}")]
    NotAllowed(String),
    /// A message that needs a registered node, before `Register`.
    #[error("message before Register")]
    NotRegistered,
    /// `Done` before `Register`.
    #[error("Done before Register")]
    DoneBeforeRegister,
    /// A node registers or rejoins as another role than it authenticated as.
    #[error("{action} as {role} but authenticated as role {authenticated}")]
    WrongRole {
        /// "registered" or "rejoined"
        action: &'static str,
        /// the role it claims
        role: &'static str,
        /// the role byte of its handshake
        authenticated: u8,
    },
    /// A connection registers a second time.
    #[error("registered twice")]
    RegisteredTwice,
    /// A manager replica registers as a node.
    #[error("a manager cannot register with a manager")]
    ManagerRegistered,
    /// Every node of the role is in already, or the job has started.
    #[error("this job already has its {want} {role}s")]
    JobFull {
        /// the role
        role: &'static str,
        /// how many of it the job has
        want: u32,
    },
    /// A server registers with no shard port or too many.
    #[error("a server must listen on 1..1024 shard ports, not {0}")]
    ShardPorts(usize),
    /// The rank a node asked for is taken or beyond the job's.
    #[error("{role} rank {rank} is taken or not below {want}")]
    RankTaken {
        /// the role
        role: &'static str,
        /// the rank asked for
        rank: u32,
        /// how many of the role the job has
        want: u32,
    },
    /// A node rejoins that the job does not know.
    #[error("no {role} {rank} (pid {pid}) is in this job")]
    UnknownNode {
        /// its role
        role: &'static str,
        /// its rank
        rank: u32,
        /// its process id
        pid: u32,
    },
    /// A node rejoins that was found dead and left out (the node).
    #[error("{0} was found dead meanwhile and left out of the job")]
    FoundDead(String),
    /// A node that is not a worker reached a barrier.
    #[error("only workers take part in barriers")]
    BarrierNotWorker,
    /// A node that is not a server reported copy ports.
    #[error("only servers hold copies")]
    CopiesNotServer,
    /// A report about copies before the job started (what was reported).
    #[error("{0} before the job started")]
    NotStarted(&'static str),
    /// A server reported another number of copy ports than the job needs.
    #[error("server {rank} reported {got} copy ports, the job needs {want}")]
    CopyPorts {
        /// the server
        rank: u32,
        /// ports reported
        got: usize,
        /// ports the job needs
        want: usize,
    },
    /// A server says a copy is ready that it does not hold.
    #[error("server {rank} holds no copy of shard ({server}, {shard})")]
    NoCopy {
        /// the reporting server
        rank: u32,
        /// the shard's server
        server: u32,
        /// the shard, on that server
        shard: u32,
    },
}

/// Why a job failed, as the manager decided (a node failed, went silent,
/// left early, or took a chain's last copy with it): the text names the node
/// and why. Replicated as a plain string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
#[error("{reason}")]
pub struct JobFailed {
    /// what failed, and why
    pub reason: String,
}

impl From<String> for JobFailed {
    fn from(reason: String) -> Self {
        Self { reason }
    }
}

impl From<&str> for JobFailed {
    fn from(reason: &str) -> Self {
        Self { reason: reason.to_string() }
    }
}

/// Where the job is in its life; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Waiting for every expected server and worker to register.
    Registering,
    /// Every node registered and got the view; the job runs.
    Running,
    /// The workers finished and the servers were told to shut down; waiting
    /// for them to disconnect.
    Stopping,
    /// Over: the outcome is final ([`ManagerCore::outcome`]).
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

impl Node {
    fn describe(&self) -> String {
        format!("{} {} (pid {} on {})", self.role.name(), self.rank, self.pid, self.host)
    }
}

/// Tunables of the manager, with defaults from `limits`.
#[derive(Clone, Copy, Debug)]
pub struct ManagerTimeouts {
    /// A node silent for this long is declared dead.
    pub heartbeat: Duration,
    /// The job fails if not every expected node registered within this.
    pub registration: Duration,
    /// How long servers get to disconnect after the shutdown before the job
    /// ends anyway.
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

/// The manager's state machine: registration, the cluster view, barriers,
/// heartbeats and the job's end. Fed frames and the time; writes its answers.
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
    outcome: Option<Result<String, JobFailed>>,
    log: Vec<String>,
    /// the view handed out, kept up to date once the job runs
    view: Option<ClusterView>,
    /// what the job lost and went on without, for the summary
    losses: Vec<String>,
}

impl ManagerCore {
    /// A manager for `job`, waiting for this many servers and workers to register.
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

    /// Where the job is now.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// `Ok(summary)` once the job ended well, `Err(reason)` once it failed.
    pub fn outcome(&self) -> Option<&Result<String, JobFailed>> {
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
        self.outcome = Some(Err(JobFailed { reason }));
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
    ) -> Result<(), ManagerError> {
        let json = match wire::decode(frame, crate::limits::CONTROL_BYTES_MAX + 64)? {
            Frame::Control(j) => j,
            other => return Err(ManagerError::NotControl(format!("{other:?}"))),
        };
        let msg = Control::from_json(json)?;
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
                    return Err(ManagerError::WrongRole {
                        action: "rejoined",
                        role: role.name(),
                        authenticated: hello.role,
                    });
                }
                self.rejoin(peer, role, rank, pid, now, tx)
            }
            Control::Heartbeat => Ok(()),
            Control::Barrier { name } => self.on_barrier(peer, name, tx),
            Control::Copies { ports } => self.on_copies(peer, ports, tx),
            Control::CopyAdded { owner, id, port } => self.on_copy_added(peer, owner, id, port, tx),
            Control::CopySynced { owner, id } => self.on_copy_synced(peer, owner, id, tx),
            Control::CopyReady { owner, id } => self.on_copy_ready(peer, owner, id, tx),
            Control::Done { ok, message } => self.on_done(peer, ok, message, now, tx),
            other => Err(ManagerError::NotAllowed(format!("{other:?}"))),
        }
    }

    fn node_of(&self, peer: PeerId) -> Result<&Node, ManagerError> {
        self.by_peer.get(&peer).map(|&i| &self.nodes[i]).ok_or(ManagerError::NotRegistered)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::testkit::*;
    use super::*;

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
}
