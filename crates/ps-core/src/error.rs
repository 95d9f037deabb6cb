//! The error a worker-API caller sees. Each variant says what went wrong and, where
//! the caller can do something about it, what to do.

use crate::keys::TableId;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PsError {
    #[error("table {0:?} is not defined in this job; define it in the job spec the manager hands out")]
    UnknownTable(TableId),
    #[error("keys must be strictly ascending (sorted, no duplicates); key #{index} ({key}) is not above the one before it. Sort and merge them first, e.g. with ps_core::keys::sort_merge")]
    KeysNotSorted { index: usize, key: u64 },
    #[error("key {key} is outside table {table:?}'s key range {begin}..{end}")]
    KeyOutOfRange { table: TableId, key: u64, begin: u64, end: u64 },
    #[error("table {table:?} has dim {dim}: expected {expected} values for {keys} keys, got {got}")]
    WrongValueCount { table: TableId, dim: u32, keys: usize, expected: usize, got: usize },
    #[error("table {table:?} is {layout}; this operation needs a {needed} table")]
    WrongLayout { table: TableId, layout: &'static str, needed: &'static str },
    #[error("too many operations in flight ({0}); wait on some timestamps first")]
    TooManyInFlight(usize),
    #[error("timestamp {0} is unknown: never issued, or already waited on")]
    UnknownTimestamp(u64),
    #[error("timestamp {0} is not a pull; use wait() for pushes")]
    NotAPull(u64),
    #[error("server {server} shard {shard} rejected the request: {reason}")]
    Rejected { server: u32, shard: u32, reason: String },
    #[error("lost the connection to server {server} shard {shard}: {reason}")]
    ServerLost { server: u32, shard: u32, reason: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("clock() needs this worker's rank: call WorkerCore::set_rank first (the node runtime does)")]
    NoRank,
    #[error("timestamp {dep} this operation was to run after failed: {reason}")]
    DependencyFailed { dep: u64, reason: String },
    #[error("timestamp {0} is not issued yet, so nothing can run after it")]
    FutureTimestamp(u64),
    #[error("timed out after {0:?} waiting for the servers")]
    Timeout(std::time::Duration),
}
