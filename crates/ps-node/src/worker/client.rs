//! A worker's PS client: one connection per shard head (TCP, moved to RDMA
//! where the settings and the shard allow), and failover for replicated
//! jobs: a lost head is replaced by the one the manager's newest view names.
//! Matching responses to requests is ps-core's (`WorkerCore`); this file
//! only finds addresses and opens connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ps_core::auth::JobSecret;
use ps_core::client::Worker;
use ps_core::control::{ClusterView, Role};
use ps_core::ring::Owner;
use ps_core::transport::PeerHello;
use ps_core::worker::WorkerCore;
use ps_tcp_fallback::{TcpConfig, TcpTransport};

use super::PsWorker;
use crate::error::NodeError;
use crate::net::{self, NetOpts, NodeTransport};
use crate::view::ViewBoard;
use crate::{resolve, StdClock};

/// A PS client connected to every shard of `view` (TCP, moved to RDMA as
/// `netopts` and the shards allow); `node` is its id in the handshakes. In a
/// replicated job, `board` (the manager's newest view) lets a head that dies
/// while the worker connects be replaced by the next copy.
pub fn connect_client(
    secret: JobSecret,
    view: &ClusterView,
    board: Option<&ViewBoard>,
    node: u32,
    netopts: &NetOpts,
) -> Result<PsWorker, NodeError> {
    let ring = view.ring()?;
    let mut cfg = TcpConfig::new(secret, PeerHello { role: Role::Worker as u8, node }, true);
    cfg.limits = view.job.limits;
    let tcp = TcpTransport::client(cfg).map_err(|e| NodeError::Transport(e.to_string()))?;
    let mut t = net::worker_transport(tcp, netopts)?;
    t.set_limits(view.job.limits);
    let mut peers = Vec::new();
    let mut modes = std::collections::BTreeMap::<String, usize>::new();
    for s in &view.servers {
        let mut row = Vec::new();
        for h in 0..s.ports.len() {
            let owner = Owner { server: s.rank, shard: h as u32 };
            let (peer, mode) = connect_head(&mut t, view, board, owner, netopts)?;
            *modes.entry(mode).or_default() += 1;
            row.push(peer);
        }
        peers.push(row);
    }
    let modes: Vec<String> = modes.iter().map(|(m, n)| format!("{n} shards over {m}")).collect();
    tracing::info!("client {node}: transport: {}", modes.join(", "));
    let core = WorkerCore::new(&view.job.tables, ring, peers, view.job.limits);
    Ok(Worker::new(core, t, StdClock(Instant::now()), Duration::from_secs(120)))
}

/// Connects to the head of `owner`'s chain. With `board` (a job with copies),
/// a head that cannot be reached (a server killed while the job starts) is
/// waited out: once the manager's view names another head, the worker
/// connects there, for up to `NEW_HEAD_WAIT_MS`.
fn connect_head(
    t: &mut NodeTransport,
    view: &ClusterView,
    board: Option<&ViewBoard>,
    owner: Owner,
    netopts: &NetOpts,
) -> Result<(ps_core::transport::PeerId, String), NodeError> {
    let (server, shard) = (owner.server, owner.shard);
    let deadline = Instant::now() + Duration::from_millis(ps_core::limits::NEW_HEAD_WAIT_MS);
    let mut addr = match (head_addr(view, owner), board) {
        (Ok(addr), _) => addr,
        // a head promoted a moment ago has not said where its copy listens yet
        (Err(e @ NodeError::NoPort { .. }), Some(board)) => next_head(board, owner, None, deadline)?.ok_or(e)?,
        (Err(e), _) => return Err(e),
    };
    loop {
        let source = match net::connect_shard(t, addr, netopts) {
            Ok(connected) => return Ok(connected),
            Err(source) => source,
        };
        let Some(board) = board else { return Err(NodeError::ConnectShard { server, shard, addr, source }) };
        let Some(next) = next_head(board, owner, Some(addr), deadline)? else {
            return Err(NodeError::ConnectShard { server, shard, addr, source });
        };
        tracing::warn!(
            "shard ({server}, {shard}): its head at {addr} was lost while connecting ({source}); the manager names {next} now"
        );
        addr = next;
    }
}

/// Waits, until `deadline`, for the manager's view (`board`) to name a head
/// of `owner` other than `not` whose copy's port is known (a copy promoted a
/// moment ago reports its port a moment later). `None` if none came.
fn next_head(
    board: &ViewBoard,
    owner: Owner,
    not: Option<SocketAddr>,
    deadline: Instant,
) -> Result<Option<SocketAddr>, NodeError> {
    loop {
        match head_addr(&board.get(), owner) {
            Ok(next) if Some(next) != not => return Ok(Some(next)),
            Ok(_) | Err(NodeError::NoPort { .. }) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the copy of `owner` that is the head of its chain now listens.
fn head_addr(view: &ClusterView, owner: Owner) -> Result<SocketAddr, NodeError> {
    let (server, shard) = (owner.server, owner.shard);
    let head = view.head(owner).ok_or(NodeError::NoCopyLeft { server, shard })?;
    let port = view.copy_port(owner, head).ok_or(NodeError::NoPort { head, server, shard })?;
    resolve(&format!("{}:{port}", view.servers[head as usize].host))
}

/// Failover for a replicated job's worker (`--copies` above 1): a lost
/// connection is replaced by one to the head the manager's newest view names,
/// and each failover is reported (`@failover`: which shard, where to, and the
/// time from noticing the loss to the new head's first answer).
pub fn enable_failover(
    ps: &mut PsWorker,
    rank: u32,
    board: Arc<ViewBoard>,
    netopts: &NetOpts,
) -> Result<(), NodeError> {
    let net = netopts.clone();
    let reconnect_board = board.clone();
    let reconnect = Box::new(move |t: &mut NodeTransport, owner: Owner| {
        let view = reconnect_board.get();
        let addr = head_addr(&view, owner).map_err(|e| e.to_string())?;
        net::connect_shard(t, addr, &net)
            .map(|(peer, _)| peer)
            .map_err(|e| ps_core::client::ReconnectError::from(e.to_string()))
    });
    let on_failover = Box::new(move |owner: Owner, took: Duration| {
        let view = board.get();
        let head = view.head(owner).unwrap_or(owner.server);
        tracing::info!(
            "worker {rank}: shard ({}, {}) failed over to server {head}: {:.0} ms from the lost connection to its first answer",
            owner.server,
            owner.shard,
            took.as_secs_f64() * 1e3
        );
        println!(
            "@failover {}",
            serde_json::json!({"worker": rank, "server": owner.server, "shard": owner.shard, "to": head, "ms": took.as_secs_f64() * 1e3})
        );
    });
    Ok(ps.enable_failover(rank, reconnect, on_failover)?)
}
