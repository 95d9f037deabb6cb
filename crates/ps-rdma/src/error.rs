//! The crate's error type: one variant per way a verbs call or a set-up step
//! fails, each carrying what a user needs to act on it (the verb, the device,
//! the errno, the remedy).
//!
//! Must never hold verbs handles or anything that needs a device to format:
//! errors cross threads and outlive the objects that produced them.

use std::io;

/// Why a verbs call failed, with what a user needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("{verb} failed on {device}: {source}")]
    Verb { verb: &'static str, device: String, source: io::Error },
    #[error(
        "no RDMA device{0}: is rdma_rxe loaded (`rdma link`), or libibverbs' provider installed (ibverbs-providers)?"
    )]
    NoDevice(String),
    #[error("port {port} of {device} is not active (state {state}): check the link (`ibv_devinfo`)")]
    PortDown { device: String, port: u8, state: u32 },
    #[error("{device} port {port} has no IPv4-mapped RoCEv2 GID: give the netdev an IPv4 address")]
    NoIpv4Gid { device: String, port: u8 },
    #[error("a work request failed: {0}")]
    Completion(String),
    #[error("{0}")]
    Setup(String),
    /// Set-up was asked of a transport that has no RDMA (why).
    #[error(transparent)]
    NoRdma(#[from] NoRdma),
    /// A READ batch's connection closed before the batch was handled.
    #[error("connection gone (it closed while its READs were in flight)")]
    ConnGone,
    /// A slab block failed its tear check on every re-read.
    #[error("block {block} of table {table} stayed torn over {tries} READs (its shard rewrites it faster than a READ copies it)")]
    Torn { block: usize, table: u32, tries: u32 },
    /// A READ-served pull does not fit in one frame.
    #[error("pull too large")]
    PullTooLarge,
    /// A READ completed in error (the verbs status).
    #[error("RDMA READ failed: {0}")]
    ReadFailed(String),
    /// A READ did not complete in time.
    #[error("RDMA READ did not complete within {0:?} (is the peer's port up? `ibv_devinfo`)")]
    ReadStalled(std::time::Duration),
}

/// Why a transport serves no RDMA: what a server tells the clients that ask
/// for it, and why a client stays on TCP.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NoRdma {
    /// The node runs `--transport tcp`.
    #[error("the node runs --transport tcp")]
    TcpOnly,
    /// No RDMA device could be opened here (the device's error).
    #[error("no usable RDMA device: {0}")]
    NoDevice(String),
}

/// A server's answer refusing RDMA set-up: its reason (the connection stays TCP).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

pub type Result<T> = std::result::Result<T, RdmaError>;
