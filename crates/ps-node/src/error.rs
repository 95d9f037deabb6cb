//! The runtime's errors, one enum per room: what went wrong, with the address,
//! file or setting involved, and what to do about it where a user can do
//! something. `NodeError` is what a node's entry point (`run_manager`,
//! `run_server`, `run_worker`) returns; the rooms' errors convert into it.
//!
//! Messages the launchers, tests and scripts match on (`job aborted: `,
//! `PS_RESUME`, `--transport rdma`) are kept word for word.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Choosing, opening and connecting a node's transport (`net`).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "--transport rdma: this pslab was built without RDMA support: rebuild with \
         `cargo build --release --features rdma` (Debian packages: libibverbs-dev librdmacm-dev \
         libclang-dev; see the README)"
    )]
    NoRdmaBuild,
    #[error("--transport rdma: {0} (run `pslab doctor`)")]
    RdmaUnusable(String),
    #[error("--transport rdma: the shard at {addr} refused RDMA: {why}")]
    RdmaRefused { addr: SocketAddr, why: String },
    #[error("--transport rdma: RDMA set-up with the shard at {addr} failed: {why}")]
    RdmaSetup { addr: SocketAddr, why: String },
    #[error("registering table {table} for one-sided reads: {why} (raise `ulimit -l`; `pslab doctor` checks it)")]
    Register { table: u32, why: String },
    #[error("{0}")]
    Connect(#[from] ps_tcp_fallback::ConnectError),
    /// The transport itself (a poller, a device) failed.
    #[error("transport: {0}")]
    Transport(String),
}

/// The binary still speaks `String` errors: `?` carries the message over.
impl From<NetError> for String {
    fn from(e: NetError) -> String {
        e.to_string()
    }
}

/// A node's link to the manager (`control`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no cluster view from the manager at {managers:?} within 3 minutes (is the manager running, and is --manager its address?)")]
    NoView { managers: Vec<SocketAddr> },
    #[error("manager at {addr}: {source}")]
    Manager { addr: SocketAddr, source: ps_tcp_fallback::ConnectError },
    #[error("the manager refused us: {0}")]
    Refused(String),
    #[error("the manager closed the connection before the job started: {0}")]
    ClosedEarly(String),
    #[error("bad frame from the manager: {0}")]
    BadFrame(String),
    #[error("unexpected frame from the manager: {0}")]
    UnexpectedFrame(String),
    #[error("job aborted: {0}")]
    Aborted(String),
    #[error("job shut down during barrier {name:?}: {reason}")]
    ShutdownInBarrier { name: String, reason: String },
    #[error("control link is gone")]
    Gone,
    #[error("control link: {0}")]
    Transport(String),
}

/// Apps still speak `String` errors: `?` on a barrier carries the message over.
impl From<ControlError> for String {
    fn from(e: ControlError) -> String {
        e.to_string()
    }
}

/// Where threads run (`placement`): the hwloc view of the machine.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("hwloc: {0}")]
    Hwloc(String),
    #[error("hwloc found no CPU")]
    NoCpu,
}

/// Checkpoint files (`checkpoint`).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("PS_RESUME: {}: {source} (a job resumes with the same servers and shards per server)", path.display())]
    Missing { path: PathBuf, source: std::io::Error },
    #[error("PS_RESUME: {}: {why} (a job resumes with the same servers, shards per server and tables)", path.display())]
    Mismatch { path: PathBuf, why: String },
    #[error("--resume: {}: {why}", path.display())]
    Label { path: PathBuf, why: String },
}

/// What a node's entry point returns.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot resolve {addr:?}: {why}")]
    Resolve { addr: String, why: String },
    #[error("{what} cannot listen on {addr}: {source} (is the port taken? port 0 picks a free one)")]
    Listen { what: String, addr: SocketAddr, source: std::io::Error },
    #[error("--listen {listen} must be one of the manager replicas {replicas:?} (this replica's own address)")]
    NotAReplica { listen: SocketAddr, replicas: Vec<SocketAddr> },
    /// The job spec the manager was given does not hold together.
    #[error("{0}")]
    Job(String),
    #[error("manager replicas: {0}")]
    Raft(String),
    #[error("a committed manager state: {0}")]
    Committed(serde_json::Error),
    /// The job ended in failure: the manager's verdict, or a worker's app error.
    #[error("{0}")]
    Failed(String),
    #[error("unknown app {0:?}")]
    UnknownApp(String),
    #[error("PS_KERNELS={0:?}: use scalar, avx2 or avx512")]
    KernelsUnknown(String),
    #[error("PS_KERNELS={0}: this CPU does not support it")]
    KernelsUnsupported(String),
    /// A shard's stores could not be built for the view (ring, tables, memory).
    #[error("{0}")]
    Shard(String),
    #[error("server {server} shard {shard} at {addr}: {source}")]
    ConnectShard { server: u32, shard: u32, addr: SocketAddr, source: NetError },
    #[error("every copy of shard ({server}, {shard}) is gone")]
    NoCopyLeft { server: u32, shard: u32 },
    #[error("server {head} has not said where its copy of shard ({server}, {shard}) is")]
    NoPort { head: u32, server: u32, shard: u32 },
    #[error("cannot start thread {name}: {source}")]
    Spawn { name: String, source: std::io::Error },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Client(#[from] ps_core::error::PsError),
    #[error(transparent)]
    Ring(#[from] ps_core::ring::RingError),
    #[error("transport: {0}")]
    Transport(String),
}

/// Apps and the binary still speak `String` errors: `?` carries the message over.
impl From<NodeError> for String {
    fn from(e: NodeError) -> String {
        e.to_string()
    }
}
