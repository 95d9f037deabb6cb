//! The worker state machine: turns `push` / `pull` calls into request frames,
//! one batch per owning shard, cut into chunks of at most `chunk_bytes`, and
//! matches responses back to timestamps. No I/O: frames go into a [`FrameSink`]
//! and come back through [`WorkerCore::on_frame`].
//!
//! Chunks for different shards are interleaved, so every shard starts merging
//! while the rest of a large request is still on the wire.
//!
//! Guarantees (tested in `sim`): a request's frames to one shard travel on one
//! ordered connection and the shard handles them in order, so a pull issued
//! after my push (even before its ack) sees it; every pushed value is merged
//! exactly once or the operation reports an error.
//!
//! The rooms, one purpose each (all are `impl WorkerCore` blocks on the one
//! state below):
//!
//! - `plan`: checks an operation's keys and cuts it into chunks per owner.
//! - `issue`: sends an operation's chunks as request frames, through the
//!   process cache and the push filters; `frames` lays out one such frame.
//! - `responses`: matches answers to pending timestamps and lands pulled
//!   values where the caller's buffer wants them.
//! - `retain`: failover: keeps requests until answered and sends them again
//!   after a rebind.
//! - `deps`: operations issued to run after others finish (`issue_after`).
//! - `cached`: the process cache of bounded-staleness tables and its watches.
//!
//! This module owns the state and the small calls on it (clocks,
//! checkpoints, finishing an operation); it never touches a socket or a clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use crate::cache::Cache;
use crate::error::PsError;
use crate::filter::{Encoder, PushFilter};
use crate::keys::{Key, KeyRange, TableId};
use crate::ring::{Owner, Ring};
use crate::table::TableSpec;
use crate::transport::{FrameSink, PeerId, TxError};
use crate::wire::{CheckpointHeader, ClockHeader, DataHeader};

mod cached;
mod deps;
mod frames;
mod issue;
mod plan;
mod responses;
mod retain;
#[cfg(test)]
mod testkit;

use cached::all_watches;
use deps::Deferred;
use plan::Chunk;
use responses::Pending;
use retain::Failover;

/// Names one operation of one worker; `wait` on it.
pub type Timestamp = u64;

/// Which keys an operation touches.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    /// Strictly ascending keys, any table.
    List(&'a [Key]),
    /// `count` consecutive keys from `first`, dense tables.
    Range {
        /// the first key
        first: Key,
        /// how many keys
        count: u64,
    },
}

/// The keys of an operation, kept past the call for the cache.
#[derive(Clone, Debug)]
enum OwnedKeys {
    List(Vec<Key>),
    Range { first: Key, count: u64 },
}

impl OwnedKeys {
    fn of(k: &Keys<'_>) -> Self {
        match *k {
            Keys::List(k) => OwnedKeys::List(k.to_vec()),
            Keys::Range { first, count } => OwnedKeys::Range { first, count },
        }
    }

    fn as_keys(&self) -> Keys<'_> {
        match self {
            OwnedKeys::List(k) => Keys::List(k),
            OwnedKeys::Range { first, count } => Keys::Range { first: *first, count: *count },
        }
    }
}

fn key_iter<'a>(k: &'a Keys<'a>) -> impl Iterator<Item = Key> + Clone + 'a {
    let (list, range) = match *k {
        Keys::List(l) => (l, 0..0),
        Keys::Range { first, count } => (&[][..], first..first + count),
    };
    list.iter().copied().chain(range)
}

/// One worker's state machine: splits pushes and pulls into frames per
/// owning shard, tracks each operation by [`Timestamp`] until every frame is
/// answered, and assembles pulled values.
#[derive(Debug)]
pub struct WorkerCore {
    tables: BTreeMap<TableId, TableSpec>,
    ring: Ring,
    peers: Vec<Vec<PeerId>>,
    peer_owner: HashMap<PeerId, Owner>,
    chunk_bytes: usize,
    body_max: usize,
    next_ts: Timestamp,
    /// bytes of data frames this worker has sent (prefixes and headers included)
    bytes_sent: u64,
    /// push filters per table (`filter`), in the spec's order
    push_filters: HashMap<TableId, Vec<Box<dyn PushFilter>>>,
    /// codes the requests of tables with codecs
    encoder: Encoder,
    /// the next request goes out with exact values (a flush of residuals)
    lossless: bool,
    pending: HashMap<Timestamp, Pending>,
    in_flight_max: usize,
    broken: Option<PsError>,
    /// this worker's rank (clock frames name it) and the clocks it has finished
    rank: Option<u32>,
    clocks: u64,
    /// operations issued to run after others finish (execute-after-finished),
    /// in issue order; their timestamps are taken when they are issued
    deferred: Vec<Deferred>,
    /// process caches of tables with a staleness bound (`cache.rs`)
    caches: HashMap<TableId, Cache>,
    /// (shard, eager table) pairs to send a `Watch` for, and those with one outstanding
    watch_due: Vec<(PeerId, TableId)>,
    watch_out: HashSet<(PeerId, TableId)>,
    /// flat owner index of the first shard of each server
    owner_base: Vec<u32>,
    /// chain replication (replicated jobs, `enable_failover`)
    failover: Option<Failover>,
    // scratch reused across calls
    groups: Vec<Vec<Range<usize>>>,
    chunks: Vec<Vec<Chunk>>,
    chunk_ranges: Vec<Range<usize>>,
}

impl WorkerCore {
    /// `peers[server][shard]` is the connection to that shard.
    pub fn new(tables: &[TableSpec], ring: Ring, peers: Vec<Vec<PeerId>>, limits: crate::limits::WireLimits) -> Self {
        let mut peer_owner = HashMap::new();
        for (s, row) in peers.iter().enumerate() {
            for (h, p) in row.iter().enumerate() {
                peer_owner.insert(*p, Owner { server: s as u32, shard: h as u32 });
            }
        }
        let owners: usize = peers.iter().map(|r| r.len()).sum();
        let owner_base = peers
            .iter()
            .scan(0u32, |at, r| {
                let b = *at;
                *at += r.len() as u32;
                Some(b)
            })
            .collect();
        let caches = tables
            .iter()
            .filter(|t| Self::cacheable(t))
            .map(|t| (t.id, Cache::new(t.dim as usize, t.consistency.is_eager(), owners)))
            .collect();
        let watch_due = all_watches(&peers, &caches);
        Self {
            tables: tables.iter().map(|t| (t.id, t.clone())).collect(),
            ring,
            peers,
            peer_owner,
            chunk_bytes: limits.chunk_bytes,
            body_max: limits.frame_bytes_max,
            next_ts: 1,
            bytes_sent: 0,
            push_filters: tables
                .iter()
                .map(|t| (t.id, crate::filter::push_filters(&t.filters, t.id)))
                .filter(|(_, f)| !f.is_empty())
                .collect(),
            encoder: Encoder::default(),
            lossless: false,
            pending: HashMap::new(),
            in_flight_max: crate::limits::OPS_IN_FLIGHT_MAX,
            broken: None,
            rank: None,
            clocks: 0,
            deferred: Vec::new(),
            watch_due,
            watch_out: Default::default(),
            caches,
            owner_base,
            failover: None,
            groups: vec![Vec::new(); owners],
            chunks: vec![Vec::new(); owners],
            chunk_ranges: Vec::new(),
        }
    }

    pub(crate) fn table(&self, id: TableId) -> Result<&TableSpec, PsError> {
        self.tables.get(&id).ok_or(PsError::UnknownTable(id))
    }

    /// The ring this worker routes keys by.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// This worker's rank among the job's workers: its clock frames carry it.
    pub fn set_rank(&mut self, rank: u32) {
        self.rank = Some(rank);
    }

    /// Bytes of data frames sent so far (what the filters save shows here).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Clocks this worker has finished (`clock` calls made).
    pub fn clocks(&self) -> u64 {
        self.clocks
    }

    /// Ends this worker's current clock: every shard is told (after everything
    /// this worker sent it before, as frames of a connection stay in order), and
    /// the timestamp completes once every shard has recorded it. Reads of tables
    /// with a staleness bound wait, on the shards, for the slowest worker.
    pub fn clock(&mut self, tx: &mut dyn FrameSink) -> Result<Timestamp, PsError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let rank = self.rank.ok_or(PsError::NoRank)?;
        if self.pending.len() >= self.in_flight_max {
            return Err(PsError::TooManyInFlight(self.pending.len()));
        }
        self.clocks += 1;
        let (clocks, rank) = (self.clocks, rank as u64);
        self.send_to_every_shard(tx, "clock", |ts, sub| ClockHeader { ts, sub, clocks_done: clocks, rank }.header())
    }

    /// Sends one small frame (`header(ts, n)` for the n-th) to every shard
    /// under a new timestamp, which completes when every shard has answered.
    fn send_to_every_shard(
        &mut self,
        tx: &mut dyn FrameSink,
        what: &str,
        header: impl Fn(Timestamp, u32) -> DataHeader,
    ) -> Result<Timestamp, PsError> {
        let ts = self.next_ts;
        self.next_ts += 1;
        let mut sent = 0u32;
        let peers: Vec<PeerId> = self.peers.iter().flatten().copied().collect();
        for (g, peer) in peers.into_iter().enumerate() {
            let h = header(ts, sent);
            let mut f = vec![0u8; h.frame_len().expect("a small frame")];
            h.write(&mut f);
            if let Err(e) = Self::send_owned(&mut self.failover, tx, g, peer, ts, sent, h.kind, f, None) {
                self.pending.insert(ts, Pending::new(sent, Some(tx_error(e)), None));
                return Err(PsError::Transport(format!("send queue refused a {what} frame")));
            }
            sent += 1;
        }
        self.pending.insert(ts, Pending::new(sent, None, None));
        Ok(ts)
    }

    /// Asks every shard to write a checkpoint labelled `label`; the timestamp
    /// completes once every shard has it on disk. Call it when every worker
    /// has finished the same clock (after a barrier), so the checkpoint is
    /// one consistent state of all tables.
    pub fn checkpoint(&mut self, tx: &mut dyn FrameSink, label: u64) -> Result<Timestamp, PsError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        self.send_to_every_shard(tx, "checkpoint", |ts, sub| CheckpointHeader { ts, sub, label }.header())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The flat index (over every server's shards) of owner `o`.
    fn flat(&self, o: Owner) -> usize {
        self.peers[..o.server as usize].iter().map(|r| r.len()).sum::<usize>() + o.shard as usize
    }

    /// The owner at flat index `g` (the inverse of [`WorkerCore::flat`]).
    fn owner_of_flat(&self, mut g: usize) -> Owner {
        for (s, row) in self.peers.iter().enumerate() {
            if g < row.len() {
                return Owner { server: s as u32, shard: g as u32 };
            }
            g -= row.len();
        }
        unreachable!("flat owner index out of range")
    }

    /// True once every frame of `ts` has been answered.
    pub fn is_done(&self, ts: Timestamp) -> Result<bool, PsError> {
        if self.deferred.iter().any(|d| d.ts == ts) {
            return Ok(false);
        }
        self.pending.get(&ts).map(|p| p.frames_left == 0).ok_or(PsError::UnknownTimestamp(ts))
    }

    /// Ends a finished operation: its error, or the pulled values if it was a pull.
    pub fn finish(&mut self, ts: Timestamp) -> Result<Option<Vec<f32>>, PsError> {
        let p = self.pending.remove(&ts).ok_or(PsError::UnknownTimestamp(ts))?;
        debug_assert_eq!(p.frames_left, 0);
        match p.error {
            Some(e) => Err(e),
            None => Ok(p.pull.map(|o| o.vals)),
        }
    }

    pub(crate) fn is_pull(&self, ts: Timestamp) -> bool {
        self.pending.get(&ts).is_some_and(|p| p.pull.is_some())
            || self.deferred.iter().any(|d| d.ts == ts && d.out.is_some())
    }
}

fn tx_error(e: TxError) -> PsError {
    PsError::Transport(e.to_string())
}

/// A key range helper for callers of range operations.
pub fn range_of(first: Key, count: u64) -> KeyRange {
    KeyRange::new(first, first + count)
}
