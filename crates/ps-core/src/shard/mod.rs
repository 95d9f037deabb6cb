//! The shard state machine: one per pinned core, owning its key ranges of every
//! table outright. It turns request frames into merges and reads of its stores
//! and writes the responses into a [`FrameSink`]; it never blocks, never locks,
//! and never trusts a frame: a malformed one is an `Err` (the caller drops the
//! peer), a well-formed but wrong request (unknown table, key not owned, counts
//! that disagree with the table's dim) gets an `Error` frame back.
//!
//! Clocks: a worker's `Clock` frame says how many clocks it has finished; on a
//! table with a staleness bound (`clock::Consistency`), a pull whose reader is
//! ahead of what the slowest worker has finished is parked (copied, up to
//! `PARKED_PULL_BYTES_MAX`) and served, in arrival order, by the `Clock` frame
//! that makes the bound hold. Frames of one connection arrive in order, so a
//! worker's pushes of clock k are merged before its clock frame is seen, and the
//! shard knows each reader's clock from the clock frames before its pull.
//!
//! Under `sequential` the shard also holds each push (acknowledged at once,
//! copied, up to `HELD_PUSH_BYTES_MAX`) until every worker has finished the
//! clock it was made in, then merges the held pushes in arrival order before
//! it serves the reads that were waiting for that clock: a read at clock c sees
//! exactly the updates of clocks < c, so a job's result is that of a serial run
//! of its clocks, whatever the timing (the pusher's own pushes of clock c too
//! show only from clock c + 1).
//!
//! A table whose rule *settles* (`UpdateRule::settles`: the block proximal
//! step) has its pushes held the same way under any clock model; when a clock
//! ends, its held pushes are merged (gathered into the rule's state) and then
//! every key they touched is settled once: the step is taken on the sum of all
//! workers' pushes of that clock, and reads under `bounded:τ` see the steps of
//! every clock up to τ behind theirs (delayed block proximal gradient).
//!
//! Every pull response of such a table carries a stamp (`wire::stamp_of`): the
//! clocks every worker had finished when it was read, which the worker's cache
//! keeps with the rows. Under `essp` the shard remembers which rows each
//! connection read (its subscriptions, capped by `ESSP_SUBSCRIBED_KEYS_MAX`) and
//! which rows pushes changed; when the slowest worker finishes a clock, each
//! subscriber's changed rows become due with the new stamp, and go out as
//! `Refresh` frames, one per `Watch` the worker sent (it keeps one outstanding:
//! every frame a shard sends answers one request, as the RDMA rings need).
//!
//! ## The rooms
//! - this file: [`ShardCore`], its construction, and frame handling: decode
//!   once, then hand the request to the room that serves it;
//! - `apply`: merges and reads of the stores, and the answers they make;
//! - `clocks`: worker clocks and the pushes held for the end of a clock;
//! - `parked`: pulls waiting for the clock bound;
//! - `eager`: ESSP subscriptions and `Refresh` frames;
//! - `snapshot`: checkpoints and the live state a rebuilt copy takes.
//!
//! Must never: block, lock, read the wall clock, panic on a frame from the
//! network, or hold more than the bounds of `limits` (held pushes, parked
//! pulls, subscriptions).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::clock::{ClockBoard, Consistency};
use crate::control::ClusterView;
use crate::kernels::Kernels;
use crate::keys::{Key, Layout, TableId};
use crate::ring::{Owner, RingError};
use crate::rules::{RuleError, RuleRegistry};
use crate::store::{DenseStore, SparseStore};
use crate::transport::{FrameSink, PeerId, TxError};
use crate::wire::{self, CheckpointHeader, ClockHeader, DataFrame, DataHeader, Kind, WatchHeader, WireError};

use clocks::Held;
use eager::Eager;
use parked::Parked;

mod apply;
mod clocks;
mod eager;
mod parked;
mod snapshot;
#[cfg(test)]
mod testing;

#[derive(Debug)]
enum TableStore {
    Dense(DenseStore),
    Sparse(SparseStore),
}

/// Counters a shard reports when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// push frames handled
    pub push_frames: u64,
    /// pull frames handled
    pub pull_frames: u64,
    /// bytes of frames received, as they came off the wire (filter coding included)
    pub bytes_in: u64,
    /// bytes of response frames written
    pub bytes_out: u64,
    /// error frames sent back (each names what the request got wrong)
    pub errors_sent: u64,
    /// held pushes (sequential tables) that could not be merged when their
    /// clock ended, though acknowledged: only a full sparse slab does this
    pub held_refused: u64,
}

/// Why a frame makes the shard drop its sender.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The frame does not decode: the peer is broken or hostile.
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    /// The response could not be queued to the peer (see [`TxError`]).
    #[error("send queue: {0}")]
    Tx(#[from] TxError),
}

/// Why a shard's stores cannot be built for a view (the text names the table).
#[derive(Debug, thiserror::Error)]
pub enum ShardSetupError {
    /// The view's ring cannot be built (fix the job's `partitions` or servers).
    #[error("{0}")]
    Ring(#[from] RingError),
    /// A table's update rule cannot be built.
    #[error("table {table}: {source}")]
    Rule {
        /// the table's name
        table: String,
        /// why its rule cannot be built
        source: RuleError,
    },
    /// A table with a settling rule that is not dense or has no clock model.
    #[error("table {table}: a settling rule needs a dense table under a clock model (bounded:τ or sequential)")]
    SettlingTable {
        /// the table's name
        table: String,
    },
    /// A table's slab (its memory) could not be mapped.
    #[error("table {table}: slab: {source}")]
    Slab {
        /// the table's name
        table: String,
        /// the mapping's error
        source: std::io::Error,
    },
}

/// One shard's state machine: the tables of the key ranges it owns, the merges
/// of pushes, the answers to pulls and the clocks of staleness-bounded tables.
#[derive(Debug)]
pub struct ShardCore {
    owner: Owner,
    tables: BTreeMap<TableId, (u32, TableStore)>,
    kernels: &'static Kernels,
    body_max: usize,
    keys_scratch: Vec<u64>,
    vals_scratch: Vec<f32>,
    stats: ShardStats,
    /// tables with a staleness bound: the model and every worker's clocks
    boards: BTreeMap<TableId, (Consistency, ClockBoard)>,
    /// clocks each worker rank has finished (what its pulls are read at)
    clocks: Vec<u64>,
    /// the rank each peer's clock frames named
    peer_rank: HashMap<PeerId, usize>,
    parked: VecDeque<Parked>,
    parked_bytes: usize,
    /// pushes to sequential tables waiting for the end of their clock
    held: VecDeque<Held>,
    held_bytes: usize,
    /// peers whose released pull could not be answered (their sends failed)
    failed: Vec<(PeerId, ShardError)>,
    /// eager (ESSP) tables: who read which rows, and which rows changed
    eager: BTreeMap<TableId, Eager>,
    /// clocks every worker has finished (the least of `clocks`): the stamp
    min_clock: u64,
    /// (connection, eager table) pairs with a `Watch` outstanding
    watching: HashSet<(PeerId, TableId)>,
    /// payload bytes of one refresh frame at most
    refresh_bytes: usize,
    /// tables whose rule settles (their pushes are held to the end of a clock)
    settling: HashSet<TableId>,
    /// keys the held pushes of the clock being merged touched, per settling table
    touched: BTreeMap<TableId, Vec<Key>>,
    /// undoes the table filters' coding, per connection
    decoder: crate::filter::Decoder,
    /// a checkpoint asked for and not yet written: who asked, and its frame
    checkpoint: Option<(PeerId, CheckpointHeader)>,
}

impl ShardCore {
    /// Builds the stores of every table for the ranges `owner` holds in `view`.
    pub fn new(
        view: &ClusterView,
        owner: Owner,
        rules: &RuleRegistry,
        kernels: &'static Kernels,
    ) -> Result<Self, ShardSetupError> {
        let ring = view.ring()?;
        let mut tables = BTreeMap::new();
        let mut boards = BTreeMap::new();
        let mut eager = BTreeMap::new();
        let mut settling = HashSet::new();
        let workers = view.workers as usize;
        let slab = |t: &crate::table::TableSpec, source| ShardSetupError::Slab { table: t.name.clone(), source };
        for t in &view.job.tables {
            if t.consistency.staleness().is_some() {
                boards.insert(t.id, (t.consistency, ClockBoard::new(t.keys(), workers)));
            }
            if t.consistency.is_eager() {
                eager.insert(
                    t.id,
                    Eager {
                        begin: t.keys().begin,
                        dim: t.dim as u64,
                        readers: HashMap::new(),
                        overflowed: HashSet::new(),
                        dirty: HashSet::new(),
                    },
                );
            }
            let rule =
                rules.build(&t.rule).map_err(|source| ShardSetupError::Rule { table: t.name.clone(), source })?;
            if rule.settles() {
                if !t.is_dense() || t.consistency.staleness().is_none() {
                    return Err(ShardSetupError::SettlingTable { table: t.name.clone() });
                }
                settling.insert(t.id);
            }
            let owned = ring.owned_ranges(t.keys(), owner);
            let store = match t.layout {
                Layout::Dense { keys } => {
                    TableStore::Dense(DenseStore::new(keys, t.dim, &owned, rule).map_err(|source| slab(t, source))?)
                }
                Layout::Sparse { .. } => TableStore::Sparse(
                    SparseStore::new(t.dim, owned, rule, crate::limits::SPARSE_SLAB_BLOCKS)
                        .map_err(|source| slab(t, source))?,
                ),
            };
            tables.insert(t.id, (t.dim, store));
        }
        Ok(Self {
            owner,
            tables,
            kernels,
            body_max: view.job.limits.frame_bytes_max,
            keys_scratch: Vec::new(),
            vals_scratch: Vec::new(),
            stats: ShardStats::default(),
            boards,
            clocks: vec![0; workers],
            peer_rank: HashMap::new(),
            parked: VecDeque::new(),
            parked_bytes: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            failed: Vec::new(),
            eager,
            min_clock: 0,
            watching: HashSet::new(),
            refresh_bytes: view.job.limits.chunk_bytes.min(view.job.limits.frame_bytes_max / 2),
            settling,
            touched: BTreeMap::new(),
            decoder: Default::default(),
            checkpoint: None,
        })
    }

    /// Peers whose parked pull, once released, could not be answered: drop them.
    pub fn take_failed(&mut self) -> Vec<(PeerId, ShardError)> {
        std::mem::take(&mut self.failed)
    }

    /// `peer` is gone: its parked pulls and remembered key lists go too.
    pub fn on_closed(&mut self, peer: PeerId) {
        self.forget_connection(peer);
        self.peer_rank.remove(&peer);
    }

    /// What belongs to one connection of `peer` goes (parked pulls, key lists,
    /// subscriptions, watches), but not the worker rank its clocks named: a
    /// replicated shard keeps that for the worker's next connection (`chain`).
    pub fn forget_connection(&mut self, peer: PeerId) {
        self.decoder.forget(peer);
        let mut freed = 0;
        self.parked.retain(|p| {
            if p.peer == peer {
                freed += p.frame.len();
            }
            p.peer != peer
        });
        self.parked_bytes -= freed;
        for e in self.eager.values_mut() {
            e.readers.remove(&peer);
            e.overflowed.remove(&peer);
        }
        self.watching.retain(|(p, _)| *p != peer);
    }

    /// Undoes a table filter's coding of `frame` (a coded request from `peer`,
    /// whose connection's key lists it updates): the plain frame a replicated
    /// shard forwards to the next copy.
    pub fn decode_coded(&mut self, peer: PeerId, frame: &[u8]) -> Result<Vec<u8>, ShardError> {
        Ok(self.decoder.decode(peer, frame, self.body_max)?)
    }

    /// The `(server, shard)` whose key ranges this shard holds.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Every dense table's layout and slab bytes, for registering with a
    /// one-sided transport. A dense table is one slab that never moves or grows.
    /// Tables with a staleness bound are left out: their reads must wait for
    /// worker clocks here, which a one-sided READ cannot.
    pub fn dense_slabs(&self) -> Vec<(TableId, crate::store::DenseLayout, &[u8])> {
        self.tables
            .iter()
            .filter(|(id, _)| !self.boards.contains_key(id))
            .filter_map(|(id, (_, st))| match st {
                TableStore::Dense(d) => Some((*id, d.layout().clone(), d.values().slabs()[0].as_bytes())),
                TableStore::Sparse(_) => None,
            })
            .collect()
    }

    /// The counters so far.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Handles one whole frame from `peer`, writing any response into `tx`.
    pub fn handle(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        // the bytes as they came off the wire, before any filter's coding is undone
        self.stats.bytes_in += frame.len() as u64;
        self.handle_uncounted(peer, frame, tx)
    }

    /// Handles one request decoded already (by the chain, which decodes a
    /// client's frame once per hop): `d` is plain (a table filter's coding
    /// undone, [`Self::decode_coded`]), checked against [`Self::body_max`];
    /// `wire_bytes` is what came off the wire for it (the coded frame's
    /// length when it was coded), counted as [`Self::handle`] counts a frame.
    pub fn handle_decoded(
        &mut self,
        peer: PeerId,
        wire_bytes: usize,
        d: DataFrame<'_>,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ShardError> {
        debug_assert!(!wire::is_coded(d.bytes), "a coded frame handed down undecoded");
        self.stats.bytes_in += wire_bytes as u64;
        self.serve(peer, d, tx)
    }

    /// The bound on a frame's body this shard decodes with (the job's `frame_bytes_max`).
    pub fn body_max(&self) -> usize {
        self.body_max
    }

    /// [`Self::handle`] without counting the frame's bytes: a decoded frame's
    /// length is not what the peer sent.
    fn handle_uncounted(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if crate::filter::is_coded(frame) {
            // a table filter's coding: undo it, then it is any request
            let plain = self.decoder.decode(peer, frame, self.body_max)?;
            return self.handle_uncounted(peer, &plain, tx);
        }
        let d = wire::decode_data(frame, self.body_max)?;
        self.serve(peer, d, tx)
    }

    /// Serves one plain request frame, decoded once.
    fn serve(&mut self, peer: PeerId, d: DataFrame<'_>, tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        let DataFrame { h, keys: keys_b, vals: vals_b, bytes: frame } = d;
        if !matches!(h.kind, Kind::Push | Kind::Pull | Kind::PushPull | Kind::Clock | Kind::Watch | Kind::Checkpoint) {
            return Err(WireError::Unexpected(h.kind).into());
        }
        let r = if h.kind == Kind::Clock {
            self.on_clock(peer, ClockHeader::try_from(h)?, tx)
        } else if h.kind == Kind::Checkpoint {
            if self.checkpoint.is_some() {
                Err(Refusal("a checkpoint is being written on this shard already".into()))
            } else {
                self.checkpoint = Some((peer, CheckpointHeader::try_from(h)?));
                Ok(())
            }
        } else if h.kind == Kind::Watch {
            let table = TableId(WatchHeader::try_from(h)?.table);
            if !self.eager.contains_key(&table) {
                return Err(WireError::Unexpected(Kind::Watch).into());
            }
            self.watching.insert((peer, table));
            self.serve_watch(peer, table, tx).map_err(|e| Refusal(e.to_string()))
        } else if let Some(wait) = self.must_wait(peer, &h) {
            self.park(peer, &h, wait, frame)
        } else if let Some(clock) = self.must_hold(peer, &h) {
            self.hold(peer, &h, clock, keys_b, frame, tx)
        } else {
            self.apply(&h, keys_b, vals_b, peer, tx, true)
        };
        self.answer(r, peer, &h, tx)
    }

    /// A refusal becomes an error frame to the requester.
    fn answer(
        &mut self,
        r: Result<(), Refusal>,
        peer: PeerId,
        h: &DataHeader,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ShardError> {
        match r {
            Ok(()) => Ok(()),
            Err(Refusal(msg)) => {
                self.stats.errors_sent += 1;
                let buf = tx.frame(peer, wire::error_len(&msg))?;
                wire::write_error(buf, h, &msg);
                Ok(())
            }
        }
    }
}

/// A request the shard refuses while keeping the connection.
struct Refusal(String);

#[cfg(test)]
mod tests {
    use super::testing::{frame, shard, A};
    use super::*;
    use crate::clock::Consistency;
    use crate::sim::SimSink;
    use crate::wire::Frame;

    /// Invariant 4: well-formed frames with any counts (a clock flagged dense
    /// with a huge clock count once panicked the ack's length) and truncated
    /// ones never panic a shard.
    #[test]
    fn frames_with_any_counts_never_panic_a_shard() {
        let mut sh = shard(Consistency::Bounded { staleness: 1 });
        let mut sink = SimSink::default();
        let mut rng = crate::rng::SplitMix64::new(0x5EED);
        let kinds = [Kind::Push, Kind::Pull, Kind::PushPull, Kind::Clock, Kind::Watch, Kind::Checkpoint, Kind::Ack];
        for i in 0..30_000u32 {
            let h = DataHeader {
                kind: kinds[rng.below(kinds.len() as u64) as usize],
                dense: rng.below(2) == 0,
                table: rng.below(3) as u32,
                sub: rng.below(3) as u32,
                ts: rng.below(5),
                a: if rng.below(2) == 0 { rng.below(2000) } else { rng.next_u64() >> rng.below(64) },
                b: if rng.below(2) == 0 { rng.below(64) } else { rng.next_u64() >> rng.below(64) },
            };
            let len = h.frame_len().filter(|&l| l <= 1 << 16).unwrap_or(40);
            let mut f = vec![0u8; len.max(40)];
            let bytes = h.encode(f.len());
            f[..40].copy_from_slice(&bytes);
            for b in f.iter_mut().skip(40) {
                *b = rng.below(256) as u8;
            }
            if rng.below(8) == 0 {
                f.truncate(rng.below(f.len() as u64) as usize);
            }
            let peer = PeerId { index: i % 5, generation: 0 };
            if sh.handle(peer, &f, &mut sink).is_err() {
                sh.on_closed(peer);
            }
            sink.frames.clear();
        }
        let clock = DataHeader { kind: Kind::Clock, dense: true, table: 0, sub: 0, ts: 1, a: u64::MAX >> 2, b: 0 };
        let mut f = vec![0u8; clock.frame_len().unwrap()];
        clock.write(&mut f);
        let _ = sh.handle(PeerId { index: 9, generation: 0 }, &f, &mut sink);
    }

    /// A coded frame counts as the bytes that came off the wire, however much
    /// larger it decodes to (the count once went below zero here: a panic
    /// with overflow checks on, a wrap without).
    #[test]
    fn a_coded_frame_counts_its_wire_bytes_and_decodes_to_the_push() {
        use crate::filter::{Encoder, FilterSpec};
        let mut sh = shard(Consistency::Eventual);
        let mut sink = SimSink::default();
        let keys: Vec<u64> = (0..600).map(|i| i * 5).collect();
        let h = DataHeader { kind: Kind::Push, dense: false, table: 1, sub: 0, ts: 1, a: 600, b: 600 };
        let mut plain = frame(h, &keys);
        let vals_at = wire::DATA_HEADER_BYTES + keys.len() * 8;
        for (i, v) in plain[vals_at..vals_at + 600 * 4].chunks_exact_mut(4).enumerate() {
            v.copy_from_slice(&((i % 3) as f32).to_le_bytes());
        }
        let mut enc = Encoder::default();
        let specs = [FilterSpec::KeyCache, FilterSpec::Lz4];
        let mut wire_bytes = 0;
        for ts in 1..=2u64 {
            let head = DataHeader { ts, ..h }.encode(plain.len());
            plain[..wire::DATA_HEADER_BYTES].copy_from_slice(&head);
            let coded = enc.encode(A, TableId(1), &specs, &plain, 1, true).unwrap();
            assert!(coded.len() < plain.len() / 2, "{} of {}", coded.len(), plain.len());
            wire_bytes += coded.len() as u64;
            sh.handle(A, &coded, &mut sink).unwrap();
            assert_eq!(sh.stats().bytes_in, wire_bytes);
        }
        assert_eq!(sh.stats().push_frames, 2);
        // both pushes were merged: key 5 holds 1.0 twice
        let pull = DataHeader { kind: Kind::Pull, dense: false, table: 1, sub: 0, ts: 3, a: 1, b: 1 };
        sink.frames.clear();
        sh.handle(A, &frame(pull, &[5]), &mut sink).unwrap();
        let Frame::Data { vals, .. } = wire::decode(&sink.frames[0].1, 1 << 20).unwrap() else { panic!() };
        assert_eq!(vals, 2f32.to_le_bytes());
    }
}
