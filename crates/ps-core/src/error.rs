//! The error a worker-API caller sees. Each variant says what went wrong and, where
//! the caller can do something about it, what to do.

use crate::keys::TableId;

/// Why a worker operation failed; its text says what to do.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PsError {
    #[error("table {0:?} is not defined in this job; define it in the job spec the manager hands out")]
    /// The operation names a table the job spec does not define.
    UnknownTable(TableId),
    #[error("keys must be strictly ascending (sorted, no duplicates); key #{index} ({key}) is not above the one before it. Sort and merge them first, e.g. with ps_core::keys::sort_merge")]
    /// A key list is not strictly ascending; sort and merge it first.
    KeysNotSorted {
        /// position in the list of the first key not above the one before it
        index: usize,
        /// that key
        key: u64,
    },
    #[error("key {key} is outside table {table:?}'s key range {begin}..{end}")]
    /// A key (or the end of a range) is outside the table's key range.
    KeyOutOfRange {
        /// the table
        table: TableId,
        /// a key outside (a list's first or last; a range's first or last)
        key: u64,
        /// the table's first key
        begin: u64,
        /// one past the table's last key
        end: u64,
    },
    #[error("table {table:?} has dim {dim}: expected {expected} values for {keys} keys, got {got}")]
    /// The values do not match the keys: a table of dim `d` takes `d` values a key.
    WrongValueCount {
        /// the table
        table: TableId,
        /// its values per key
        dim: u32,
        /// keys in the operation
        keys: usize,
        /// values those keys need (`keys * dim`)
        expected: usize,
        /// values given
        got: usize,
    },
    #[error("table {table:?} is {layout}; this operation needs a {needed} table")]
    /// The operation needs another layout (a range operation on a sparse table).
    WrongLayout {
        /// the table
        table: TableId,
        /// its layout: "sparse" or "dense"
        layout: &'static str,
        /// the layout the operation needs
        needed: &'static str,
    },
    #[error("too many operations in flight ({0}); wait on some timestamps first")]
    /// As many operations as the worker allows are unanswered (the count
    /// given): wait on some before issuing more.
    TooManyInFlight(usize),
    #[error("timestamp {0} is unknown: never issued, or already waited on")]
    /// No operation with this timestamp is pending: it was never issued, or
    /// was waited on already.
    UnknownTimestamp(u64),
    #[error("timestamp {0} is not a pull; use wait() for pushes")]
    /// Asked for the values of a timestamp that is not a pull: wait on it instead.
    NotAPull(u64),
    #[error("server {server} shard {shard} rejected the request: {reason}")]
    /// A shard refused a frame of the operation (the worker itself refuses a
    /// table it cannot cache this way, with server and shard `u32::MAX`).
    Rejected {
        /// rank of the server that refused
        server: u32,
        /// the shard on that server
        shard: u32,
        /// the shard's message
        reason: String,
    },
    #[error("lost the connection to server {server} shard {shard}: {reason}")]
    /// The connection to a shard ended with the operation unanswered (with
    /// no failover, every pending operation fails this way).
    ServerLost {
        /// rank of the server
        server: u32,
        /// the shard on that server
        shard: u32,
        /// why the connection ended
        reason: String,
    },
    #[error("transport: {0}")]
    /// The transport refused to queue a frame, a frame could not be coded,
    /// or a shard broke the protocol; the text says which.
    Transport(String),
    #[error("clock() needs this worker's rank: call WorkerCore::set_rank first (the node runtime does)")]
    /// `clock()` before the worker knows its rank.
    NoRank,
    #[error("timestamp {dep} this operation was to run after failed: {reason}")]
    /// The operation was to run after another, and that one failed.
    DependencyFailed {
        /// the timestamp that failed
        dep: u64,
        /// why it failed
        reason: String,
    },
    #[error("timestamp {0} is not issued yet, so nothing can run after it")]
    /// The operation was to run after a timestamp not issued yet.
    FutureTimestamp(u64),
    #[error("timed out after {0:?} waiting for the servers")]
    /// The servers did not answer within the client's operation timeout (given).
    Timeout(std::time::Duration),
}

/// Why a job spec (its tables, `copies` or limits) does not hold together;
/// its text names the table and says what to fix in the job file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("table {name} ({id:?}): dim must be at least 1")]
    /// A table with no values per key.
    ZeroDim {
        /// the table's name
        name: String,
        /// the table's id
        id: TableId,
    },
    #[error("table {name} ({id:?}): key range {begin}..{end} is empty")]
    /// A table whose key range holds no key.
    EmptyKeys {
        /// the table's name
        name: String,
        /// the table's id
        id: TableId,
        /// the range's first key
        begin: u64,
        /// one past its last key
        end: u64,
    },
    #[error(
        "table {name} ({id:?}): dense {keys} keys x dim {dim} = {floats} floats is above the limit of {max}; make it sparse"
    )]
    /// A dense table too large to lay out; it should be sparse.
    DenseTooLarge {
        /// the table's name
        name: String,
        /// the table's id
        id: TableId,
        /// keys in its range
        keys: u64,
        /// values per key
        dim: u32,
        /// `keys * dim`
        floats: u128,
        /// the most floats a dense table may hold
        max: u64,
    },
    #[error("table {name} ({id:?}): {source}")]
    /// A table's update rule has a parameter out of range.
    Rule {
        /// the table's name
        name: String,
        /// the table's id
        id: TableId,
        /// what is wrong with the rule
        source: crate::rules::RuleError,
    },
    #[error("table {name} ({id:?}): {source}")]
    /// One of a table's filters has a parameter out of range.
    Filter {
        /// the table's name
        name: String,
        /// the table's id
        id: TableId,
        /// what is wrong with the filter
        source: crate::filter::FilterError,
    },
    #[error(
        "table {name} ({id:?}): the block_prox rule needs dim 2 ([w, G] per key), a dense layout and a \
         clock model (bounded:τ or sequential): it settles when every worker has finished a clock"
    )]
    /// A `block_prox` table without dim 2, a dense layout and a clock model.
    BlockProxTable {
        /// the table's name
        name: String,
        /// the table's id
        id: TableId,
    },
    #[error("table id {0:?} is defined twice")]
    /// Two tables share an id.
    DuplicateTable(TableId),
    #[error("copies must be 1..={max}, not {copies}")]
    /// `copies` is 0 or above what a job may ask for.
    Copies {
        /// what the spec asks for
        copies: u32,
        /// the most allowed (`limits::COPIES_MAX`)
        max: u32,
    },
    #[error(transparent)]
    /// The spec's wire limits do not hold together.
    Limits(#[from] crate::limits::LimitsError),
}
