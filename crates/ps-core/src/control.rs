//! Control messages: registration, the cluster view, barriers, heartbeats,
//! shutdown. Rare and small, so they are JSON inside a `Control` frame: easy to
//! read in a packet capture and to extend. Bounded by `CONTROL_BYTES_MAX` and
//! parsed by serde_json, which refuses deep nesting.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::limits::WireLimits;
use crate::ring::{Owner, Ring, RingError, RingServer};
use crate::table::TableSpec;

/// A node's role. The handshake carries it as a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// runs the job: registration, the cluster view, barriers, failover
    Manager = 1,
    /// holds shards of the tables and answers workers
    Server = 2,
    /// runs the application, pushing to and pulling from servers
    Worker = 3,
}

impl Role {
    /// The role whose handshake byte is `v`, or `None`.
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Manager),
            2 => Some(Role::Server),
            3 => Some(Role::Worker),
            _ => None,
        }
    }

    /// The role in lower case, for logs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Server => "server",
            Role::Worker => "worker",
        }
    }
}

/// What the job is: its tables and the application the workers run. The manager
/// holds it and hands it to every node in the view, so servers and workers need
/// nothing but the manager's address and the job secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Every table of the job; ids must be distinct.
    pub tables: Vec<TableSpec>,
    /// The worker program: "train-lr", "bench", "check", ...
    pub app: String,
    /// The program's parameters.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Bounds on frames and queues every node uses (defaults if absent).
    #[serde(default)]
    pub limits: WireLimits,
    /// Ring partitions (virtual nodes, all servers together): a power of two.
    pub partitions: u32,
    /// Copies of every shard's key ranges, chained over consecutive servers
    /// (`chain`): 1 is no replication; at most the number of servers count.
    #[serde(default = "one")]
    pub copies: u32,
}

fn one() -> u32 {
    1
}

impl JobSpec {
    /// Checks every table, that table ids are distinct, `copies` and the
    /// limits; the error says what to fix in the spec.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut ids = std::collections::BTreeSet::new();
        for t in &self.tables {
            t.validate()?;
            if !ids.insert(t.id) {
                return Err(SpecError::DuplicateTable(t.id));
            }
        }
        if self.copies == 0 || self.copies > crate::limits::COPIES_MAX {
            return Err(SpecError::Copies { copies: self.copies, max: crate::limits::COPIES_MAX });
        }
        Ok(self.limits.validate()?)
    }
}

/// A server as registered with the manager: where to reach its shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Its rank, 0.. (its index in [`ClusterView::servers`]).
    pub rank: u32,
    /// The host name or address it registered with, where its ports listen.
    pub host: String,
    /// One listening port per shard.
    pub ports: Vec<u16>,
    /// Its process id on `host` (with `host`, tells a restarted process from
    /// the same one registering again).
    pub pid: u32,
    /// In a replicated job, the ports of the copies this server holds of
    /// other servers' shards: the copy `i` places down the chain of shard
    /// `h` (`i` in 1..copies) at `(i - 1) * shards + h`. Reported after the
    /// welcome (`Control::Copies`); empty until then.
    #[serde(default)]
    pub copy_ports: Vec<u16>,
}

/// Everything a node needs to take part: handed out once all nodes registered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The job every node runs.
    pub job: JobSpec,
    /// Every server, indexed by rank (the dead ones included).
    pub servers: Vec<ServerInfo>,
    /// Number of workers (ranks 0..workers, the dead ones included).
    pub workers: u32,
    /// Moves on with every change the manager publishes (`Control::View`).
    #[serde(default)]
    pub epoch: u64,
    /// Servers and workers the manager found dead: their chains go on
    /// without them, their clocks hold nobody back.
    #[serde(default)]
    pub dead_servers: Vec<u32>,
    /// Ranks of the workers the manager found dead (see `dead_servers`).
    #[serde(default)]
    pub dead_workers: Vec<u32>,
    /// Copies placed after failovers to bring chains back to `copies`: each
    /// is bulk-copied from its chain's tail and joins it once caught up.
    #[serde(default)]
    pub placed: Vec<PlacedCopy>,
}

/// A copy of `owner`'s key ranges rebuilt on `server` (`ClusterView::placed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedCopy {
    /// the shard whose key ranges it copies
    pub owner: Owner,
    /// rank of the server it is placed on
    pub server: u32,
    /// tells this placement from an earlier one of the same shard (a rebuild
    /// that lost its source starts over as a new placement)
    pub id: u64,
    /// where it listens (0 until the server reported it)
    pub port: u16,
    /// it has the tail's snapshot: the tail waits for it from now on
    #[serde(default)]
    pub synced: bool,
    /// it has every frame the tail answered before: a member of the chain
    /// (at its end), which a failover may make head
    pub ready: bool,
}

impl ServerInfo {
    /// A server with no copy ports reported yet.
    pub fn new(rank: u32, host: &str, ports: Vec<u16>, pid: u32) -> Self {
        Self { rank, host: host.to_string(), ports, pid, copy_ports: Vec::new() }
    }
}

impl ClusterView {
    /// The first view of a job: nobody lost, copies not reported yet.
    pub fn new(job: JobSpec, servers: Vec<ServerInfo>, workers: u32) -> Self {
        Self { job, servers, workers, epoch: 0, dead_servers: Vec::new(), dead_workers: Vec::new(), placed: Vec::new() }
    }

    /// Copies of each shard in this job (the spec's, at most one per server).
    pub fn copies(&self) -> u32 {
        self.job.copies.clamp(1, self.servers.len().max(1) as u32)
    }

    /// The servers holding copies of `owner`, head first.
    pub fn chain(&self, owner: Owner) -> Vec<u32> {
        let mut c = crate::ring::chain_of(owner, self.servers.len() as u32, self.copies());
        c.extend(self.placed.iter().filter(|p| p.owner == owner && p.ready).map(|p| p.server));
        c
    }

    /// The copy of `owner` being rebuilt that waits for its snapshot, if any.
    pub fn joining(&self, owner: Owner) -> Option<PlacedCopy> {
        self.placed
            .iter()
            .copied()
            .find(|p| p.owner == owner && !p.synced && !p.ready && !self.dead_servers.contains(&p.server))
    }

    /// The copy of `owner` being rebuilt that has its snapshot and catches up
    /// (the tail forwards to it and waits for it; not yet a member).
    pub fn syncing(&self, owner: Owner) -> Option<PlacedCopy> {
        self.placed
            .iter()
            .copied()
            .find(|p| p.owner == owner && p.synced && !p.ready && !self.dead_servers.contains(&p.server))
    }

    /// Live copies of `owner`, members and joining.
    pub fn live_copies(&self, owner: Owner) -> usize {
        let members = self.chain(owner).into_iter().filter(|s| !self.dead_servers.contains(s)).count();
        members + (self.joining(owner).is_some() || self.syncing(owner).is_some()) as usize
    }

    /// The server whose copy of `owner` is the head now (`None`: every copy is gone).
    pub fn head(&self, owner: Owner) -> Option<u32> {
        self.chain(owner).into_iter().find(|s| !self.dead_servers.contains(s))
    }

    /// Where `server` listens for its copy of `owner` (`None`: it holds none,
    /// or has not reported its copies yet).
    pub fn copy_port(&self, owner: Owner, server: u32) -> Option<u16> {
        if let Some(p) = self.placed.iter().find(|p| p.owner == owner && p.server == server) {
            return Some(p.port).filter(|&port| port != 0);
        }
        let n = self.servers.len() as u32;
        let s = self.servers.get(server as usize)?;
        let i = (server + n - owner.server % n.max(1)) % n.max(1);
        if i >= self.copies() {
            return None;
        }
        if i == 0 {
            return s.ports.get(owner.shard as usize).copied();
        }
        s.copy_ports.get(((i - 1) as usize) * s.ports.len() + owner.shard as usize).copied()
    }

    /// Places a copy for every chain with fewer live copies than the job's
    /// (after a failover): on the first live server after the chain that
    /// holds no copy of it. Returns what it did, for the log.
    pub fn place_copies(&mut self) -> Vec<String> {
        let n = self.servers.len() as u32;
        let want = self.copies() as usize;
        let mut lines = Vec::new();
        for s in 0..n {
            for h in 0..self.servers[s as usize].ports.len() as u32 {
                let owner = Owner { server: s, shard: h };
                if self.live_copies(owner) >= want || self.head(owner).is_none() {
                    continue;
                }
                let holds = |v: &Self, c: u32| {
                    v.chain(owner).contains(&c) || v.placed.iter().any(|p| p.owner == owner && p.server == c)
                };
                let start = s + self.copies();
                let free =
                    (0..n).map(|d| (start + d) % n).find(|&c| !self.dead_servers.contains(&c) && !holds(self, c));
                let Some(at) = free else {
                    lines.push(format!(
                        "shard ({s}, {h}) stays with {} copies: every live server holds one",
                        self.live_copies(owner)
                    ));
                    continue;
                };
                let id = self.placed.iter().map(|p| p.id).max().unwrap_or(0) + 1;
                self.placed.push(PlacedCopy { owner, server: at, id, port: 0, synced: false, ready: false });
                lines.push(format!("shard ({s}, {h}): a new copy is rebuilt on server {at}"));
            }
        }
        lines
    }

    /// Whether every server has reported the ports of its copies.
    pub fn copies_reported(&self) -> bool {
        self.copies() == 1
            || self.servers.iter().all(|s| s.copy_ports.len() == (self.copies() as usize - 1) * s.ports.len())
    }

    /// The ring over this view's servers and their shard counts, with the
    /// job's partitions.
    pub fn ring(&self) -> Result<Ring, RingError> {
        let servers: Vec<RingServer> =
            self.servers.iter().map(|s| RingServer { id: s.rank, nr_shards: s.ports.len() as u32 }).collect();
        Ring::new(&servers, self.job.partitions)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "msg")]
/// A control message, as JSON with its variant name in `msg` (snake case).
pub enum Control {
    /// node -> manager, first message.
    /// `rank`: the rank this node asks for (a launcher's rank), or none for the
    /// lowest free one.
    Register {
        /// what the node is; the manager checks it against the handshake's
        role: Role,
        /// where the node's ports listen
        host: String,
        /// a server's listening ports, one per shard; empty for a worker
        ports: Vec<u16>,
        /// the node's process id (with `host` and `role`, tells a node
        /// registering again from a new one)
        pid: u32,
        /// the rank asked for (see above)
        #[serde(default)]
        rank: Option<u32>,
    },
    /// manager -> node, once every expected node has registered.
    Welcome {
        /// the rank the node was given, among nodes of its role
        rank: u32,
        /// the cluster as it is now
        view: ClusterView,
    },
    /// node -> manager, every `HEARTBEAT_INTERVAL_MS`.
    Heartbeat,
    /// worker -> manager: I reached barrier `name`.
    Barrier {
        /// the barrier, as the application names it
        name: String,
    },
    /// manager -> workers: every worker reached barrier `name`.
    Released {
        /// the barrier released
        name: String,
    },
    /// worker -> manager: my program ended; `ok` false means it failed.
    Done {
        /// whether the program succeeded
        ok: bool,
        /// its last word, for the manager's log
        message: String,
    },
    /// manager -> all: stop now, the job is over (orderly).
    Shutdown {
        /// why, for the log
        reason: String,
    },
    /// manager -> all: stop now, the job failed.
    Abort {
        /// what failed, for the log
        reason: String,
    },
    /// server -> manager, after its welcome in a replicated job: the ports of
    /// the copies it holds (`ServerInfo::copy_ports`).
    Copies {
        /// laid out as [`ServerInfo::copy_ports`]
        ports: Vec<u16>,
    },
    /// manager -> all: the view changed (copies reported, a server or a
    /// worker lost); nodes act on the newest epoch.
    View {
        /// the new view (its `epoch` moved on)
        view: ClusterView,
    },
    /// server -> manager: the copy of `owner` placed on me (placement `id`)
    /// listens on `port`.
    CopyAdded {
        /// the shard copied
        owner: Owner,
        /// the placement ([`PlacedCopy::id`])
        id: u64,
        /// where the copy listens
        port: u16,
    },
    /// server -> manager: that copy has its chain's tail's snapshot (and the
    /// frames after it follow): the tail may wait for it.
    CopySynced {
        /// the shard copied
        owner: Owner,
        /// the placement ([`PlacedCopy::id`])
        id: u64,
    },
    /// the chain's tail's server -> manager: the rebuilt copy acknowledged
    /// every frame the tail answered before it waited for it: a member now.
    CopyReady {
        /// the shard copied
        owner: Owner,
        /// the placement ([`PlacedCopy::id`])
        id: u64,
    },
    /// node -> a new manager leader: I registered with the one before (and
    /// was welcomed as `rank`); answered with the current view.
    Rejoin {
        /// what the node is; must match its handshake's role
        role: Role,
        /// the rank it was welcomed as
        rank: u32,
        /// its process id, as it registered
        pid: u32,
    },
    /// manager replica -> node: I do not lead; try `leader` (its address), or
    /// the others.
    NotLeader {
        /// the leader's address, if this replica knows one
        leader: Option<String>,
    },
    /// manager replica -> manager replica: a Raft message (`consensus`), hex.
    Raft {
        /// the encoded Raft message, in hex
        bytes: String,
    },
}

impl Control {
    /// The message as JSON bytes (what a control frame carries).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("control messages always serialize")
    }

    /// Parses a control frame's JSON; [`crate::wire::WireError::Control`] says
    /// why it is not a valid message.
    pub fn from_json(b: &[u8]) -> Result<Control, crate::wire::WireError> {
        serde_json::from_slice(b).map_err(|e| crate::wire::WireError::Control(e.to_string()))
    }
}

/// Writes `msg` as a control frame into `sink`.
pub fn send_control(
    sink: &mut dyn crate::transport::FrameSink,
    peer: crate::transport::PeerId,
    msg: &Control,
) -> Result<(), crate::transport::TxError> {
    let json = msg.to_json();
    let buf = sink.frame(peer, crate::wire::control_len(json.len()))?;
    crate::wire::write_control(buf, &json);
    Ok(())
}
