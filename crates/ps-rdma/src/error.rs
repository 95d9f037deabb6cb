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
}

pub type Result<T> = std::result::Result<T, RdmaError>;
