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
    /// RDMA was asked for but this binary has no RDMA: rebuild with the `rdma` feature.
    #[error(
        "--transport rdma: this pslab was built without RDMA support: rebuild with \
         `cargo build --release --features rdma` (Debian packages: libibverbs-dev librdmacm-dev \
         libclang-dev; see the README)"
    )]
    NoRdmaBuild,
    /// RDMA was asked for but no device works here (why); `pslab doctor` says more.
    #[error("--transport rdma: {0} (run `pslab doctor`)")]
    RdmaUnusable(String),
    /// A shard answered that it serves no RDMA.
    #[error("--transport rdma: the shard at {addr} refused RDMA: {why}")]
    RdmaRefused {
        /// the shard's address
        addr: SocketAddr,
        /// the shard's answer
        why: String,
    },
    /// Connecting a shard over RDMA failed after it agreed to it.
    #[error("--transport rdma: RDMA set-up with the shard at {addr} failed: {why}")]
    RdmaSetup {
        /// the shard's address
        addr: SocketAddr,
        /// what failed
        why: String,
    },
    /// A table's memory could not be registered with the RDMA device (often the locked-memory limit).
    #[error("registering table {table} for one-sided reads: {why} (raise `ulimit -l`; `pslab doctor` checks it)")]
    Register {
        /// the table's id
        table: u32,
        /// the device's error
        why: String,
    },
    /// Connecting over TCP failed.
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
    /// Registration found no manager that answered with a view in time.
    #[error("no cluster view from the manager at {managers:?} within 3 minutes (is the manager running, and is --manager its address?)")]
    NoView {
        /// the manager replicas tried (`--manager`)
        managers: Vec<SocketAddr>,
    },
    /// The connection to one manager replica failed.
    #[error("manager at {addr}: {source}")]
    Manager {
        /// the replica's address
        addr: SocketAddr,
        /// why the connection failed
        source: ps_tcp_fallback::ConnectError,
    },
    /// The manager turned the registration down (its reason).
    #[error("the manager refused us: {0}")]
    Refused(String),
    /// The manager went away before the job started.
    #[error("the manager closed the connection before the job started: {0}")]
    ClosedEarly(String),
    /// The manager sent a frame that does not decode (a version mismatch, or not a pslab manager).
    #[error("bad frame from the manager: {0}")]
    BadFrame(String),
    /// The manager sent a frame that is not a control message.
    #[error("unexpected frame from the manager: {0}")]
    UnexpectedFrame(String),
    /// The manager aborted the job (its reason); the message starts with `job aborted: `.
    #[error("job aborted: {0}")]
    Aborted(String),
    /// The job ended while this node waited in a barrier.
    #[error("job shut down during barrier {name:?}: {reason}")]
    ShutdownInBarrier {
        /// the barrier's name
        name: String,
        /// why the manager ended the job
        reason: String,
    },
    /// The control thread is gone (the link failed or was closed).
    #[error("control link is gone")]
    Gone,
    /// The link's transport failed.
    #[error("control link: {0}")]
    Transport(String),
}

/// Code that speaks `String` errors (the binary, tests' apps): `?` on a barrier carries the message over.
impl From<ControlError> for String {
    fn from(e: ControlError) -> String {
        e.to_string()
    }
}

/// Where threads run (`placement`): the hwloc view of the machine.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// hwloc could not read the machine's topology or bind a thread.
    #[error("hwloc: {0}")]
    Hwloc(String),
    /// hwloc found no core to run on.
    #[error("hwloc found no CPU")]
    NoCpu,
}

/// Checkpoint files (`checkpoint`).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing a checkpoint file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// the file
        path: PathBuf,
        /// the I/O error
        source: std::io::Error,
    },
    /// A resumed job found no checkpoint for one of its shards.
    #[error("PS_RESUME: {}: {source} (a job resumes with the same servers and shards per server)", path.display())]
    Missing {
        /// the file it looked for
        path: PathBuf,
        /// the I/O error
        source: std::io::Error,
    },
    /// A checkpoint does not fit the resumed job (shards or tables differ).
    #[error("PS_RESUME: {}: {why} (a job resumes with the same servers, shards per server and tables)", path.display())]
    Mismatch {
        /// the checkpoint file
        path: PathBuf,
        /// what differs
        why: String,
    },
    /// `--resume` could not read the checkpoint's label from its first shard file.
    #[error("--resume: {}: {why}", path.display())]
    Label {
        /// the shard file read
        path: PathBuf,
        /// what failed
        why: String,
    },
}

/// What a node's entry point returns.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A `host:port` did not resolve to an address.
    #[error("cannot resolve {addr:?}: {why}")]
    Resolve {
        /// the address as given
        addr: String,
        /// the resolver's error
        why: String,
    },
    /// A listener could not bind its address.
    #[error("{what} cannot listen on {addr}: {source} (is the port taken? port 0 picks a free one)")]
    Listen {
        /// who listens (a manager, a shard)
        what: String,
        /// the address it tried
        addr: SocketAddr,
        /// the bind error
        source: std::io::Error,
    },
    /// A manager's `--listen` is not among the replicas it was given.
    #[error("--listen {listen} must be one of the manager replicas {replicas:?} (this replica's own address)")]
    NotAReplica {
        /// this manager's `--listen`
        listen: SocketAddr,
        /// the replicas (`--manager`)
        replicas: Vec<SocketAddr>,
    },
    /// The job spec the manager was given does not hold together.
    #[error("{0}")]
    Job(String),
    /// The manager replicas' Raft group failed.
    #[error("manager replicas: {0}")]
    Raft(String),
    /// A manager state read back from the Raft log does not decode.
    #[error("a committed manager state: {0}")]
    Committed(serde_json::Error),
    /// The job ended in failure: the manager's verdict.
    #[error("{0}")]
    Failed(String),
    /// This worker's program failed (the app's error).
    #[error("{0}")]
    App(crate::worker::AppFailure),
    /// The job names an app this binary does not have.
    #[error("unknown app {0:?}")]
    UnknownApp(String),
    /// `PS_KERNELS` names no kernel set.
    #[error("PS_KERNELS={0:?}: use scalar, avx2 or avx512")]
    KernelsUnknown(String),
    /// `PS_KERNELS` names kernels this CPU cannot run.
    #[error("PS_KERNELS={0}: this CPU does not support it")]
    KernelsUnsupported(String),
    /// A shard's stores could not be built for the view (ring, tables, memory).
    #[error("{0}")]
    Shard(String),
    /// A worker could not connect a shard's head.
    #[error("server {server} shard {shard} at {addr}: {source}")]
    ConnectShard {
        /// the shard's server rank
        server: u32,
        /// the shard's index on its server
        shard: u32,
        /// the address it tried
        addr: SocketAddr,
        /// why the connection failed
        source: NetError,
    },
    /// Every copy of a shard is lost: the job cannot go on.
    #[error("every copy of shard ({server}, {shard}) is gone")]
    NoCopyLeft {
        /// the shard's server rank
        server: u32,
        /// the shard's index on its server
        shard: u32,
    },
    /// The view names the head of a shard's chain but not the port of that copy.
    #[error("server {head} has not said where its copy of shard ({server}, {shard}) is")]
    NoPort {
        /// the server that holds the head copy
        head: u32,
        /// the shard's server rank
        server: u32,
        /// the shard's index on its server
        shard: u32,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        /// the thread's name
        name: String,
        /// the OS error
        source: std::io::Error,
    },
    /// Choosing or opening the transport failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The link to the manager failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The PS client failed.
    #[error(transparent)]
    Client(#[from] ps_core::error::PsError),
    /// The view's key ring does not hold together.
    #[error(transparent)]
    Ring(#[from] ps_core::ring::RingError),
    /// The transport itself failed.
    #[error("transport: {0}")]
    Transport(String),
}

/// The binary still speaks `String` errors: `?` carries the message over.
impl From<NodeError> for String {
    fn from(e: NodeError) -> String {
        e.to_string()
    }
}
