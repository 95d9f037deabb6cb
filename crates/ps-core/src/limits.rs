//! Every tunable and bound of the system, with its reason, and the compile-time
//! checks of how they relate (eRPC's `static_assert` habit). Runtime-configurable
//! values live in [`WireLimits`]; their defaults are here.
//!
//! Units are last in names: `_bytes`, `_ms`, `_max`.

/// Bytes of one data-path chunk. Large pushes and pulls are cut into frames of at
/// most this payload, so (1) a shard merges chunk *i* while chunk *i+1* is still on
/// the wire, (2) a chunk stays in L2 between the receive copy and the merge, and
/// (3) no receive buffer ever needs to be bigger than a few chunks.
/// 256 KiB measured best on loopback TCP (docs/benchmarks.md): 1 MiB chunks left a
/// 1 MiB value unpipelined (0.54x raw TCP), 256 KiB pipelines it (see the bench).
pub const CHUNK_BYTES: usize = 256 << 10;

/// Largest frame a node accepts after authentication, by default. A length prefix
/// above this drops the connection before a byte of the body is buffered.
pub const FRAME_BYTES_MAX: usize = 4 << 20;

/// Largest frame accepted before the handshake has succeeded: an unauthenticated
/// peer can make a node buffer at most this much.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 256;

/// Bytes one connection may have queued for sending. Past this, a worker's
/// `push` waits for the socket to drain, and a shard stops reading requests from
/// that peer until its responses are gone (back-pressure instead of growth).
pub const TX_QUEUE_BYTES_MAX: usize = 4 * FRAME_BYTES_MAX;

/// Frames a transport may hold read-but-not-yet-handled for one connection.
pub const RX_FRAMES_QUEUED_MAX: usize = 64;

/// Connections one listener (a shard, the manager) keeps at once; more are refused.
pub const CONNECTIONS_MAX: usize = 1024;

/// Free receive buffers a transport keeps for reuse.
pub const RX_POOL_BUFFERS_MAX: usize = 64;

/// Smallest receive buffer: big enough that small frames arrive many per read.
pub const RX_BUFFER_BYTES_MIN: usize = 64 * 1024;

/// A peer has this long to complete the handshake after connecting.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// A peer that sent part of a frame and then nothing for this long is dropped,
/// so a stalled (or malicious) authenticated peer cannot hold a receive buffer
/// forever. Long: a frame is at most a few MiB.
pub const FRAME_STALL_TIMEOUT_MS: u64 = 30_000;

/// How often every node tells the manager it is alive.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;

/// Silence after which the manager declares a node dead. Several intervals, so a
/// briefly descheduled process (2 cores, many processes) is not declared dead.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 10 * HEARTBEAT_INTERVAL_MS;

/// How long a starting worker waits for the manager to name a new head when
/// the head it is connecting to dies (a server lost while the job starts, in a
/// job with copies): the manager sees a killed server at once (its control
/// connection closes) and a silent one after [`HEARTBEAT_TIMEOUT_MS`]; past
/// this the worker gives up with the connect error.
pub const NEW_HEAD_WAIT_MS: u64 = 3 * HEARTBEAT_TIMEOUT_MS;

/// Bytes of pull frames a shard holds back for the clock bound (SSP) at most;
/// a pull beyond it is refused with an error frame, so a flood of early reads
/// cannot grow a shard's memory. A worker waits for its reads before it moves
/// to the next clock, so honest jobs hold a few frames per worker.
pub const PARKED_PULL_BYTES_MAX: usize = 64 << 20;

/// Key lists one connection may have remembered per table (the key-caching
/// filter): both ends keep the same FIFO, so this bounds the shard's memory
/// per worker and table at `KEY_CACHE_BYTES_MAX`. 256 lists cover the blocks
/// of a block-cyclic solver many times over.
pub const KEY_CACHE_LISTS_MAX: usize = 256;
/// Bytes of key lists one connection may have remembered per table (the
/// key-caching filter); the oldest lists go first. A list above a quarter of
/// this is never remembered.
pub const KEY_CACHE_BYTES_MAX: usize = 16 << 20;

/// Bytes of pushes a shard holds for `sequential` tables until every worker has
/// finished the clock they were made in; a push beyond it is refused with an
/// error frame. Honest jobs hold one clock's pushes of every worker: 256 MiB
/// covers 4 workers pushing 64 MiB per clock to one shard.
pub const HELD_PUSH_BYTES_MAX: usize = 256 << 20;

/// Keys one worker connection may subscribe to on one shard and table for
/// eager (ESSP) refreshes. Past it a pull is still answered but subscribes
/// nothing more: refreshes only make reads fresher, the bound holds without
/// them, and a worker pulling ever-new sparse keys cannot grow a shard's
/// memory without end. 4 M keys is 32 MiB of key set per connection.
pub const ESSP_SUBSCRIBED_KEYS_MAX: usize = 4 << 20;

/// Operations a worker may have in flight before `push`/`pull` refuse.
pub const OPS_IN_FLIGHT_MAX: usize = 1024;

/// Bytes a copy of a replicated shard keeps forwarded but not yet
/// acknowledged by the next copy (`chain`): what it sends again to a new
/// downstream. Beyond it a client's push is refused (its connection dropped;
/// it binds again and sends it again), so a stalled downstream cannot take a
/// server's memory.
pub const CHAIN_LOG_BYTES_MAX: usize = 512 << 20;

/// Copies of each shard's key ranges in a replicated job, at most.
pub const COPIES_MAX: u32 = 8;

/// Default ring partitions (virtual nodes, all servers together). A power of two.
pub const RING_PARTITIONS: u32 = 1024;

/// Virtual nodes per server below which the ring refuses (balance suffers).
pub const RING_VNODES_PER_SERVER_MIN: u32 = 64;

/// Largest dense table, in floats (16 GiB): bigger ones should be sparse.
pub const DENSE_TABLE_FLOATS_MAX: u64 = 1 << 32;

/// Bytes of one slab block, header and trailer included. One block is the unit a
/// one-sided READ checks for tearing; 4 KiB matches the page and the usual RDMA MTU.
pub const BLOCK_BYTES: usize = 4096;

/// Blocks in one slab of a sparse table (64 MiB): slabs are registered once as RDMA
/// memory regions, so few and big beats many and small.
pub const SPARSE_SLAB_BLOCKS: usize = 16 * 1024;

/// Receive slots of one RDMA ring (per worker-shard connection and direction):
/// the requests a worker may have unanswered at one shard over RDMA. 8 slots of
/// a chunk each keep a chunk pipeline full (over TCP 2-4 chunks in flight were
/// measured enough) for 2 MiB of registered memory per ring.
pub const RDMA_RING_SLOTS: usize = 8;

/// Largest JSON control message.
pub const CONTROL_BYTES_MAX: usize = 1 << 20;

const _: () = {
    assert!(CHUNK_BYTES.is_multiple_of(8));
    assert!(FRAME_BYTES_MAX >= CHUNK_BYTES + 4096, "a full chunk plus its header must fit a frame");
    assert!(TX_QUEUE_BYTES_MAX >= 2 * FRAME_BYTES_MAX, "a sender must be able to queue one frame while another drains");
    assert!(CONTROL_BYTES_MAX <= FRAME_BYTES_MAX);
    assert!(
        CHUNK_BYTES + 2 * 4096 <= FRAME_BYTES_MAX,
        "a request chunk wrapped in a Forward frame (chain replication) must fit a frame"
    );
    assert!(CHAIN_LOG_BYTES_MAX >= 4 * FRAME_BYTES_MAX, "a copy must be able to forward several frames ahead");
    assert!(RX_BUFFER_BYTES_MIN <= FRAME_BYTES_MAX);
    assert!(RING_PARTITIONS.is_power_of_two());
    assert!(BLOCK_BYTES.is_power_of_two() && BLOCK_BYTES >= 64);
    assert!(HEARTBEAT_TIMEOUT_MS >= 4 * HEARTBEAT_INTERVAL_MS);
    assert!(HANDSHAKE_FRAME_BYTES_MAX >= 128);
    assert!(
        CHUNK_BYTES / (BLOCK_BYTES - 16) + 4 <= crate::transport::GATHER_PARTS_MAX,
        "a chunk read from slab blocks must fit one gathered send"
    );
};

/// Bounds on what a node accepts from the network; handed to every transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireLimits {
    /// Largest frame body (after the 8-byte prefix) accepted after the
    /// handshake, bytes; at least `chunk_bytes + 4096`. Default [`FRAME_BYTES_MAX`].
    pub frame_bytes_max: usize,
    /// Most payload a worker puts in one request frame, bytes: a multiple of
    /// 8, at least 4096. Default [`CHUNK_BYTES`].
    pub chunk_bytes: usize,
    /// Bytes one connection may have queued for sending; at least twice
    /// `frame_bytes_max`. Default [`TX_QUEUE_BYTES_MAX`].
    pub tx_queue_bytes_max: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        Self { frame_bytes_max: FRAME_BYTES_MAX, chunk_bytes: CHUNK_BYTES, tx_queue_bytes_max: TX_QUEUE_BYTES_MAX }
    }
}

impl WireLimits {
    /// Largest response a shard sends to one request: a chunk of values plus its
    /// header. Shards refuse pulls that would need more; the TCP transport counts
    /// this much send-queue room per request it reads ahead.
    pub fn response_bytes_max(&self) -> usize {
        self.chunk_bytes + 4096
    }

    /// Bytes of one RDMA ring slot: the largest request or response frame,
    /// rounded to pages.
    pub fn rdma_slot_bytes(&self) -> usize {
        self.response_bytes_max().next_multiple_of(4096)
    }

    /// Registered bytes of one RDMA connection's two rings (ours, and our
    /// staging slots for the other side's).
    pub fn rdma_conn_bytes(&self) -> usize {
        2 * RDMA_RING_SLOTS * self.rdma_slot_bytes()
    }

    /// The relations the constants above check at compile time, for values a user set.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.chunk_bytes < 4096 || !self.chunk_bytes.is_multiple_of(8) {
            return Err(LimitsError::ChunkBytes { chunk_bytes: self.chunk_bytes });
        }
        if self.frame_bytes_max < self.chunk_bytes + 4096 {
            return Err(LimitsError::FrameBytes {
                frame_bytes_max: self.frame_bytes_max,
                chunk_bytes: self.chunk_bytes,
            });
        }
        if self.tx_queue_bytes_max < 2 * self.frame_bytes_max {
            return Err(LimitsError::TxQueueBytes {
                tx_queue_bytes_max: self.tx_queue_bytes_max,
                frame_bytes_max: self.frame_bytes_max,
            });
        }
        Ok(())
    }
}

/// Wire limits a user set that do not hold together (see [`WireLimits::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// `chunk_bytes` is below 4096 or not a multiple of 8.
    #[error("chunk_bytes {chunk_bytes} must be a multiple of 8 and at least 4096")]
    ChunkBytes {
        /// the value set
        chunk_bytes: usize,
    },
    /// A frame cannot hold a chunk and its header.
    #[error("frame_bytes_max {frame_bytes_max} must be at least chunk_bytes {chunk_bytes} + 4096")]
    FrameBytes {
        /// the value set
        frame_bytes_max: usize,
        /// the chunk size it must hold
        chunk_bytes: usize,
    },
    /// The send queue cannot hold two frames.
    #[error("tx_queue_bytes_max {tx_queue_bytes_max} must be at least twice frame_bytes_max {frame_bytes_max}")]
    TxQueueBytes {
        /// the value set
        tx_queue_bytes_max: usize,
        /// the largest frame it must hold twice
        frame_bytes_max: usize,
    },
}
