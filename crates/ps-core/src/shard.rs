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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::clock::{ClockBoard, Consistency};

use crate::control::ClusterView;
use crate::kernels::Kernels;
use crate::keys::{check_sorted, Key, Layout, TableId};
use crate::ring::Owner;
use crate::rules::RuleRegistry;
use crate::store::{DenseStore, SparseStore};
use crate::transport::{FrameSink, PeerId, TxError, GATHER_PARTS_MAX};
use crate::wire::{self, DataHeader, Frame, Kind, WireError};

#[derive(Debug)]
enum TableStore {
    Dense(DenseStore),
    Sparse(SparseStore),
}

/// Counters a shard reports when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub push_frames: u64,
    pub pull_frames: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors_sent: u64,
    /// held pushes (sequential tables) that could not be merged when their
    /// clock ended, though acknowledged: only a full sparse slab does this
    pub held_refused: u64,
}

/// Why a frame makes the shard drop its sender.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("send queue: {0}")]
    Tx(#[from] TxError),
}

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
    checkpoint: Option<(PeerId, DataHeader)>,
}

/// One connection's subscription to an eager table.
#[derive(Debug, Default)]
struct Reader {
    keys: HashSet<Key>,
    /// changed rows not sent yet, and the stamp they are due with
    due: std::collections::BTreeSet<Key>,
    stamp: u64,
    /// the stamp of the last refresh finished (its last frame sent)
    sent: u64,
}

/// An eager table's subscriptions and the rows pushed since the last refresh.
#[derive(Debug)]
struct Eager {
    /// the table's first key (dense frames address floats from it)
    begin: Key,
    dim: u64,
    readers: HashMap<PeerId, Reader>,
    /// readers that passed the subscription cap: refreshed no more, since a
    /// refresh tells a worker all its rows of this shard are that fresh
    overflowed: HashSet<PeerId>,
    dirty: HashSet<Key>,
}

impl Eager {
    /// The keys a dense frame's span `a .. a + b` (floats) covers.
    fn span(&self, a: u64, b: u64) -> std::ops::Range<Key> {
        let first = a / self.dim;
        let end = (a + b).div_ceil(self.dim);
        self.begin + first..self.begin + end
    }
}

/// The part of a shard's state that is not its tables (`live_snapshot`).
#[derive(serde::Serialize, serde::Deserialize)]
struct LiveState {
    clocks: Vec<u64>,
    min_clock: u64,
    ranks: Vec<(u32, u32, usize)>,
    held: Vec<(u32, u32, u64, Vec<u8>)>,
}

/// A push to a sequential table, merged once every worker has finished `clock`.
#[derive(Debug)]
struct Held {
    peer: PeerId,
    clock: u64,
    frame: Vec<u8>,
}

/// A pull held back until the slowest worker has finished `needed` clocks.
#[derive(Debug)]
struct Parked {
    peer: PeerId,
    table: TableId,
    needed: u64,
    frame: Vec<u8>,
}

impl ShardCore {
    /// Builds the stores of every table for the ranges `owner` holds in `view`.
    pub fn new(
        view: &ClusterView,
        owner: Owner,
        rules: &RuleRegistry,
        kernels: &'static Kernels,
    ) -> Result<Self, String> {
        let ring = view.ring().map_err(|e| e.to_string())?;
        let mut tables = BTreeMap::new();
        let mut boards = BTreeMap::new();
        let mut eager = BTreeMap::new();
        let mut settling = HashSet::new();
        let workers = view.workers as usize;
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
            let rule = rules.build(&t.rule).map_err(|e| format!("table {}: {e}", t.name))?;
            if rule.settles() {
                if !t.is_dense() || t.consistency.staleness().is_none() {
                    return Err(format!(
                        "table {}: a settling rule needs a dense table under a clock model (bounded:τ or sequential)",
                        t.name
                    ));
                }
                settling.insert(t.id);
            }
            let owned = ring.owned_ranges(t.keys(), owner);
            let store = match t.layout {
                Layout::Dense { keys } => TableStore::Dense(
                    DenseStore::new(keys, t.dim, &owned, rule).map_err(|e| format!("table {}: slab: {e}", t.name))?,
                ),
                Layout::Sparse { .. } => TableStore::Sparse(
                    SparseStore::new(t.dim, owned, rule, crate::limits::SPARSE_SLAB_BLOCKS)
                        .map_err(|e| format!("table {}: slab: {e}", t.name))?,
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

    /// Pushes to sequential tables waiting for the end of their clock: (frames, bytes).
    pub fn held(&self) -> (usize, usize) {
        (self.held.len(), self.held_bytes)
    }

    /// Pulls waiting for the clock bound: (frames, bytes).
    pub fn parked(&self) -> (usize, usize) {
        (self.parked.len(), self.parked_bytes)
    }

    /// Peers whose parked pull, once released, could not be answered: drop them.
    pub fn take_failed(&mut self) -> Vec<(PeerId, ShardError)> {
        std::mem::take(&mut self.failed)
    }

    /// The label of a checkpoint a worker asked for: the server writes
    /// [`ShardCore::snapshot`] to disk, then calls [`ShardCore::checkpoint_written`].
    pub fn checkpoint_due(&self) -> Option<u64> {
        self.checkpoint.map(|(_, h)| h.a)
    }

    /// Every table's part on this shard, as a checkpoint's bytes
    /// (`checkpoint::encode`). Pushes held for the end of a clock are not in
    /// it: take checkpoints when every worker has finished the same clock.
    pub fn snapshot(&self, label: u64) -> Vec<u8> {
        let images: Vec<crate::checkpoint::TableImage> = self
            .tables
            .iter()
            .map(|(id, (dim, store))| match store {
                TableStore::Dense(d) => {
                    let (vals, state) = d.snapshot();
                    crate::checkpoint::TableImage { id: *id, dim: *dim, sparse: false, keys: vec![], vals, state }
                }
                TableStore::Sparse(s) => {
                    let (keys, vals, state) = s.snapshot();
                    crate::checkpoint::TableImage { id: *id, dim: *dim, sparse: true, keys, vals, state }
                }
            })
            .collect();
        crate::checkpoint::encode(self.owner.server, self.owner.shard, label, &images)
    }

    /// Everything this shard holds, for a copy being rebuilt (`chain`): the
    /// tables as a checkpoint, then (JSON) every worker's clocks, which
    /// connection's clocks named which worker, and the pushes held for the
    /// end of a clock.
    pub fn live_snapshot(&self) -> Vec<u8> {
        let tables = self.snapshot(0);
        let live = LiveState {
            clocks: self.clocks.clone(),
            min_clock: self.min_clock,
            ranks: self.peer_rank.iter().map(|(p, r)| (p.index, p.generation, *r)).collect(),
            held: self.held.iter().map(|h| (h.peer.index, h.peer.generation, h.clock, h.frame.clone())).collect(),
        };
        let json = serde_json::to_vec(&live).expect("the live state serialises");
        let mut out = Vec::with_capacity(8 + tables.len() + json.len());
        out.extend_from_slice(&(tables.len() as u64).to_le_bytes());
        out.extend_from_slice(&tables);
        out.extend_from_slice(&json);
        out
    }

    /// Takes the state of [`ShardCore::live_snapshot`] (this shard is new:
    /// nothing merged yet). Refused, with why, if it does not fit.
    pub fn restore_live(&mut self, bytes: &[u8]) -> Result<(), String> {
        let n =
            bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8"))).ok_or("a live snapshot cut short")?;
        let n = usize::try_from(n).map_err(|_| "a live snapshot's length")?;
        let end = n.checked_add(8).filter(|&e| e <= bytes.len()).ok_or("a live snapshot cut short")?;
        self.restore(&bytes[8..end])?;
        let live: LiveState = serde_json::from_slice(&bytes[end..]).map_err(|e| format!("a live snapshot: {e}"))?;
        if live.clocks.len() != self.clocks.len() {
            return Err(format!("a live snapshot of {} workers, the job has {}", live.clocks.len(), self.clocks.len()));
        }
        for (rank, &c) in live.clocks.iter().enumerate() {
            self.finish_clock(rank, c);
        }
        self.min_clock = live.min_clock;
        for (index, generation, rank) in live.ranks {
            if rank < self.clocks.len() {
                self.peer_rank.insert(PeerId { index, generation }, rank);
            }
        }
        for (index, generation, clock, frame) in live.held {
            self.held_bytes += frame.len();
            self.held.push_back(Held { peer: PeerId { index, generation }, clock, frame });
        }
        Ok(())
    }

    /// Answers the checkpoint request: an `Ack` once written, or an `Error` with why not.
    pub fn checkpoint_written(&mut self, tx: &mut dyn FrameSink, r: Result<(), String>) {
        let Some((peer, h)) = self.checkpoint.take() else { return };
        match r {
            Ok(()) => {
                let ack = DataHeader { kind: Kind::Ack, dense: false, table: 0, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
                let len = ack.frame_len().expect("ack is small");
                if tx.frame(peer, len).map(|buf| ack.write(buf)).is_ok() {
                    self.stats.bytes_out += len as u64;
                }
            }
            // a peer that cannot take the error is going anyway
            Err(e) => drop(self.answer(Err(Refusal(format!("checkpoint {}: {e}", h.a))), peer, &h, tx)),
        }
    }

    /// Puts back a checkpoint this shard wrote (before any worker connects);
    /// returns its label. Refused, with what differs, if the checkpoint is of
    /// another server or shard, or of other tables.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<u64, String> {
        let (h, images) = crate::checkpoint::decode(bytes)?;
        if (h.server, h.shard) != (self.owner.server, self.owner.shard) {
            return Err(format!(
                "the checkpoint is of server {} shard {}, this is server {} shard {}",
                h.server, h.shard, self.owner.server, self.owner.shard
            ));
        }
        if images.len() != self.tables.len() {
            return Err(format!("the checkpoint has {} tables, the job {}", images.len(), self.tables.len()));
        }
        for img in images {
            let Some((dim, store)) = self.tables.get_mut(&img.id) else {
                return Err(format!("the checkpoint has table {}, the job does not", img.id.0));
            };
            if *dim != img.dim {
                return Err(format!("table {}: dim {} in the checkpoint, {dim} in the job", img.id.0, img.dim));
            }
            match store {
                TableStore::Dense(d) if !img.sparse => d.restore(&img.vals, &img.state),
                TableStore::Sparse(s) if img.sparse => s.restore(&img.keys, &img.vals, &img.state),
                _ => Err("dense in one, sparse in the other".into()),
            }
            .map_err(|e| format!("table {}: {e}", img.id.0))?;
        }
        Ok(h.label)
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

    /// Worker `rank` is gone for good (the manager said so): its clock no
    /// longer holds anyone back. Pushes held for the clocks the others have
    /// finished are merged and the reads waiting for them served.
    pub fn worker_lost(&mut self, rank: u32, tx: &mut dyn FrameSink) {
        if self.clocks.get(rank as usize).is_none_or(|&c| c == u64::MAX) {
            return;
        }
        self.finish_clock(rank as usize, u64::MAX);
        self.clocks_moved(tx);
    }

    /// Worker `rank` has finished `clock` clocks (every table's board too).
    fn finish_clock(&mut self, rank: usize, clock: u64) {
        self.clocks[rank] = clock;
        for (_, board) in self.boards.values_mut() {
            board.finish(rank, board.space(), clock);
        }
    }

    /// A worker's clock moved: if the slowest worker's did, the held pushes
    /// of the clocks now finished are merged and the eager readers refreshed;
    /// then every parked pull whose bound holds is served.
    fn clocks_moved(&mut self, tx: &mut dyn FrameSink) {
        let least = self.clocks.iter().copied().min().unwrap_or(0);
        if least > self.min_clock {
            self.min_clock = least;
            self.merge_held(tx);
            self.refresh(tx);
        }
        self.release(tx);
    }

    /// Keys `peer` is subscribed to for refreshes of `table` (eager tables).
    pub fn subscribed(&self, table: TableId, peer: PeerId) -> usize {
        self.eager.get(&table).and_then(|e| e.readers.get(&peer)).map_or(0, |r| r.keys.len())
    }

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

    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Handles one whole frame from `peer`, writing any response into `tx`.
    pub fn handle(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        // the bytes as they came off the wire, before any filter's coding is undone
        self.stats.bytes_in += frame.len() as u64;
        self.handle_uncounted(peer, frame, tx)
    }

    /// [`Self::handle`] without counting the frame's bytes: a decoded frame's
    /// length is not what the peer sent.
    fn handle_uncounted(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if crate::filter::is_coded(frame) {
            // a table filter's coding: undo it, then it is any request
            let plain = self.decoder.decode(peer, frame, self.body_max)?;
            return self.handle_uncounted(peer, &plain, tx);
        }
        let (h, keys_b, vals_b) = match wire::decode(frame, self.body_max)? {
            Frame::Data { h, keys, vals }
                if matches!(
                    h.kind,
                    Kind::Push | Kind::Pull | Kind::PushPull | Kind::Clock | Kind::Watch | Kind::Checkpoint
                ) =>
            {
                (h, keys, vals)
            }
            Frame::Data { h, .. } => return Err(WireError::Unexpected(h.kind).into()),
            Frame::Error { .. } => return Err(WireError::Unexpected(Kind::Error).into()),
            Frame::Challenge { .. } => return Err(WireError::Unexpected(Kind::Challenge).into()),
            Frame::Hello { .. } => return Err(WireError::Unexpected(Kind::Hello).into()),
            Frame::Welcome { .. } => return Err(WireError::Unexpected(Kind::Welcome).into()),
            Frame::Control(_) => return Err(WireError::Unexpected(Kind::Control).into()),
        };
        let r = if h.kind == Kind::Clock {
            self.on_clock(peer, &h, tx)
        } else if h.kind == Kind::Checkpoint {
            if self.checkpoint.is_some() {
                Err(Refusal("a checkpoint is being written on this shard already".into()))
            } else {
                self.checkpoint = Some((peer, h));
                Ok(())
            }
        } else if h.kind == Kind::Watch {
            if !self.eager.contains_key(&TableId(h.table)) {
                return Err(WireError::Unexpected(Kind::Watch).into());
            }
            self.watching.insert((peer, TableId(h.table)));
            self.serve_watch(peer, TableId(h.table), tx).map_err(|e| Refusal(e.to_string()))
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

    /// How many clocks every worker must have finished before this pull may be
    /// answered, if that is more than they have (`None`: answer it now).
    fn must_wait(&self, peer: PeerId, h: &DataHeader) -> Option<u64> {
        if !matches!(h.kind, Kind::Pull | Kind::PushPull) {
            return None;
        }
        let (model, board) = self.boards.get(&TableId(h.table))?;
        let reader = self.peer_rank.get(&peer).map_or(0, |&r| self.clocks[r]);
        let needed = model.needed(reader)?;
        (!board.reached(board.space(), needed)).then_some(needed)
    }

    /// The clock a push to a sequential table belongs to, if it must wait for
    /// every worker to finish it (`None`: merge it now).
    fn must_hold(&self, peer: PeerId, h: &DataHeader) -> Option<u64> {
        if !matches!(h.kind, Kind::Push | Kind::PushPull) {
            return None;
        }
        let (model, _) = self.boards.get(&TableId(h.table))?;
        if *model != Consistency::Sequential && !self.settling.contains(&TableId(h.table)) {
            return None;
        }
        let clock = self.peer_rank.get(&peer).map_or(0, |&r| self.clocks[r]);
        (clock >= self.min_clock).then_some(clock)
    }

    /// Checks a push to a sequential table as a merge would, acknowledges it,
    /// and keeps a copy to merge when its clock ends.
    fn hold(
        &mut self,
        peer: PeerId,
        h: &DataHeader,
        clock: u64,
        keys_b: &[u8],
        frame: &[u8],
        tx: &mut dyn FrameSink,
    ) -> Result<(), Refusal> {
        if h.kind == Kind::PushPull {
            return Err(Refusal(format!(
                "table {}'s pushes show from the next clock (sequential, or a settling rule), so push and pull separately",
                h.table
            )));
        }
        if self.held_bytes + frame.len() > crate::limits::HELD_PUSH_BYTES_MAX {
            return Err(Refusal(format!(
                "{} bytes of pushes to sequential tables already wait for the end of a clock on server {} shard {}: \
                 is a worker not calling clock()?",
                self.held_bytes, self.owner.server, self.owner.shard
            )));
        }
        self.check_push(h, keys_b)?;
        self.held_bytes += frame.len();
        self.held.push_back(Held { peer, clock, frame: frame.to_vec() });
        let ack = DataHeader { kind: Kind::Ack, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
        let len = ack.frame_len().expect("ack is small");
        ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
        self.stats.bytes_out += len as u64;
        Ok(())
    }

    /// What `apply` would refuse a push for, without merging it.
    fn check_push(&mut self, h: &DataHeader, keys_b: &[u8]) -> Result<(), Refusal> {
        let owner = self.owner;
        let Some((dim, store)) = self.tables.get(&TableId(h.table)) else {
            return Err(Refusal(format!(
                "table {} does not exist on server {} shard {}",
                h.table, owner.server, owner.shard
            )));
        };
        let keys = wire::keys_of(keys_b, &mut self.keys_scratch);
        let bad = |e: crate::store::StoreError| Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard));
        match store {
            TableStore::Dense(d) if h.dense => d.check_span(h.a, h.b).map_err(bad),
            _ if h.dense => Err(Refusal(format!("table {} is sparse: range operations need a dense table", h.table))),
            _ if h.b != h.a.saturating_mul(*dim as u64) => Err(Refusal(format!(
                "{} keys of table {} (dim {dim}) need {} values, frame says {}",
                h.a,
                h.table,
                h.a.saturating_mul(*dim as u64),
                h.b
            ))),
            TableStore::Dense(d) => {
                check_sorted(keys).map_err(|e| Refusal(e.to_string()))?;
                d.check_keys(keys).map_err(bad)
            }
            TableStore::Sparse(_) => check_sorted(keys).map_err(|e| Refusal(e.to_string())),
        }
    }

    /// Merges the held pushes of every clock all workers have finished: clock
    /// by clock, each clock's in arrival order, then settles the keys of
    /// settling tables that clock's pushes touched.
    fn merge_held(&mut self, tx: &mut dyn FrameSink) {
        while let Some(clock) = self.held.iter().map(|p| p.clock).filter(|&c| c < self.min_clock).min() {
            let mut i = 0;
            while i < self.held.len() {
                if self.held[i].clock != clock {
                    i += 1;
                    continue;
                }
                let p = self.held.remove(i).expect("looked at");
                self.held_bytes -= p.frame.len();
                if let Ok(Frame::Data { h, keys, vals }) = wire::decode(&p.frame, self.body_max) {
                    let table = TableId(h.table);
                    // checked when it was held; a refusal now could only be a full sparse slab
                    if self.apply(&h, keys, vals, p.peer, tx, false).is_err() {
                        self.stats.held_refused += 1;
                    } else if self.settling.contains(&table) {
                        let touched = self.touched.entry(table).or_default();
                        if h.dense {
                            if let Some((dim, TableStore::Dense(d))) = self.tables.get(&table) {
                                let (dim, begin) = (*dim as u64, d.layout().table_begin);
                                touched.extend(begin + h.a / dim..begin + (h.a + h.b).div_ceil(dim));
                            }
                        } else {
                            touched.extend(wire::keys_of(keys, &mut self.keys_scratch));
                        }
                    }
                }
            }
            for (table, mut keys) in std::mem::take(&mut self.touched) {
                keys.sort_unstable();
                keys.dedup();
                if let Some((_, TableStore::Dense(d))) = self.tables.get_mut(&table) {
                    // the keys were checked when their pushes were held
                    if d.settle_keys(&keys).is_err() {
                        self.stats.held_refused += 1;
                    }
                }
            }
        }
    }

    fn park(&mut self, peer: PeerId, h: &DataHeader, needed: u64, frame: &[u8]) -> Result<(), Refusal> {
        if self.parked_bytes + frame.len() > crate::limits::PARKED_PULL_BYTES_MAX {
            return Err(Refusal(format!(
                "{} bytes of reads already wait for the clock bound on server {} shard {}: \
                 is a worker not calling clock()?",
                self.parked_bytes, self.owner.server, self.owner.shard
            )));
        }
        self.parked_bytes += frame.len();
        self.parked.push_back(Parked { peer, table: TableId(h.table), needed, frame: frame.to_vec() });
        Ok(())
    }

    /// A worker finished `h.a` clocks: record it, acknowledge, and serve every
    /// parked pull whose bound now holds.
    fn on_clock(&mut self, peer: PeerId, h: &DataHeader, tx: &mut dyn FrameSink) -> Result<(), Refusal> {
        let rank = usize::try_from(h.b).ok().filter(|&r| r < self.clocks.len()).ok_or_else(|| {
            Refusal(format!("a clock from worker rank {}, but the job has {} workers", h.b, self.clocks.len()))
        })?;
        match self.peer_rank.get(&peer) {
            Some(&r) if r != rank => {
                return Err(Refusal(format!("this connection sent clocks as worker {r}, now as {rank}")));
            }
            _ => {
                self.peer_rank.insert(peer, rank);
            }
        }
        if h.a > self.clocks[rank] {
            self.finish_clock(rank, h.a);
        }
        let ack = DataHeader { kind: Kind::Ack, dense: false, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
        let len = ack.frame_len().expect("ack is small");
        ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
        self.stats.bytes_out += len as u64;
        self.clocks_moved(tx);
        Ok(())
    }

    /// The slowest worker finished a clock: each subscriber's changed rows of
    /// every eager table become due with the new stamp, and every connection
    /// with a `Watch` outstanding gets its refresh.
    fn refresh(&mut self, tx: &mut dyn FrameSink) {
        let stamp = self.min_clock;
        for e in self.eager.values_mut() {
            for r in e.readers.values_mut() {
                r.due.extend(e.dirty.iter().copied().filter(|k| r.keys.contains(k)));
                r.stamp = stamp;
            }
            e.dirty.clear();
        }
        // in a fixed order, so a simulation's seed replays exactly
        let mut watching: Vec<(PeerId, TableId)> = self.watching.iter().copied().collect();
        watching.sort_unstable_by_key(|(p, t)| (p.index, p.generation, t.0));
        for (peer, table) in watching {
            if let Err(err) = self.serve_watch(peer, table, tx) {
                self.failed.push((peer, err));
            }
        }
    }

    /// Answers `peer`'s outstanding `Watch` of `table` with one `Refresh`
    /// frame if something is due: up to half a frame of its due rows, read now
    /// (so at least as fresh as their stamp); the last frame of a refresh says
    /// so, and may be empty (the stamp alone moved on).
    fn serve_watch(&mut self, peer: PeerId, table: TableId, tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if !self.watching.contains(&(peer, table)) {
            return Ok(());
        }
        // a refresh answers one request, so it is no larger than a response
        let chunk = self.refresh_bytes;
        let Some(e) = self.eager.get_mut(&table) else { return Ok(()) };
        let Some(r) = e.readers.get_mut(&peer) else { return Ok(()) };
        if r.due.is_empty() && r.stamp <= r.sent {
            return Ok(());
        }
        let per_frame = (chunk / (8 + 4 * e.dim as usize)).max(1);
        let mut keys = Vec::with_capacity(per_frame.min(r.due.len()));
        while keys.len() < per_frame {
            let Some(k) = r.due.pop_first() else { break };
            keys.push(k);
        }
        let last = r.due.is_empty();
        if last {
            r.sent = r.stamp;
        }
        let stamp = r.stamp;
        self.watching.remove(&(peer, table));
        self.send_refresh(peer, table, &keys, stamp, last, tx)
    }

    fn send_refresh(
        &mut self,
        peer: PeerId,
        table: TableId,
        keys: &[Key],
        stamp: u64,
        last: bool,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ShardError> {
        let Some((dim, store)) = self.tables.get_mut(&table) else { return Ok(()) };
        let n = keys.len() * *dim as usize;
        self.vals_scratch.clear();
        self.vals_scratch.resize(n, 0.0);
        let read = match store {
            TableStore::Dense(d) => d.pull_keys(keys, &mut self.vals_scratch).map_err(|e| e.to_string()),
            TableStore::Sparse(s) => {
                s.prepare_pull(keys).map(|_| s.pull_prepared(&mut self.vals_scratch)).map_err(|e| e.to_string())
            }
        };
        // cannot happen (only checked pulls subscribe); if it did, this reader
        // gets no more refreshes rather than rows it was never sent
        let (keys, n, last) = if read.is_ok() {
            (keys, n, last)
        } else {
            if let Some(e) = self.eager.get_mut(&table) {
                e.readers.remove(&peer);
                e.overflowed.insert(peer);
            }
            (&[][..], 0, false)
        };
        let h = DataHeader {
            kind: Kind::Refresh,
            dense: false,
            table: table.0,
            sub: last as u32,
            ts: stamp,
            a: keys.len() as u64,
            b: n as u64,
        };
        let len = h.frame_len().expect("a refresh is at most a chunk");
        let buf = tx.frame(peer, len)?;
        h.write(buf);
        let kb = keys.len() * 8;
        buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + kb].copy_from_slice(bytemuck::cast_slice(keys));
        buf[wire::DATA_HEADER_BYTES + kb..wire::DATA_HEADER_BYTES + kb + n * 4]
            .copy_from_slice(bytemuck::cast_slice(&self.vals_scratch));
        buf[wire::DATA_HEADER_BYTES + kb + n * 4..].fill(0);
        self.stats.bytes_out += len as u64;
        Ok(())
    }

    /// Serves, in arrival order, every parked pull whose bound holds now.
    fn release(&mut self, tx: &mut dyn FrameSink) {
        let mut i = 0;
        while i < self.parked.len() {
            let p = &self.parked[i];
            let ready = self.boards.get(&p.table).is_none_or(|(_, b)| b.reached(b.space(), p.needed));
            if !ready {
                i += 1;
                continue;
            }
            let p = self.parked.remove(i).expect("looked at");
            self.parked_bytes -= p.frame.len();
            let r = match wire::decode(&p.frame, self.body_max) {
                Ok(Frame::Data { h, keys, vals }) => {
                    let r = self.apply(&h, keys, vals, p.peer, tx, true);
                    self.answer(r, p.peer, &h, tx)
                }
                // cannot happen: the same bytes decoded as a data frame before
                _ => Ok(()),
            };
            if let Err(e) = r {
                self.failed.push((p.peer, e));
            }
        }
    }

    fn apply(
        &mut self,
        h: &DataHeader,
        keys_b: &[u8],
        vals_b: &[u8],
        peer: PeerId,
        tx: &mut dyn FrameSink,
        ack: bool,
    ) -> Result<(), Refusal> {
        let owner = self.owner;
        let stamp = self.boards.contains_key(&TableId(h.table)).then_some(self.min_clock);
        let Some((dim, store)) = self.tables.get_mut(&TableId(h.table)) else {
            return Err(Refusal(format!(
                "table {} does not exist on server {} shard {}",
                h.table, owner.server, owner.shard
            )));
        };
        let dim = *dim as u64;
        let keys = wire::keys_of(keys_b, &mut self.keys_scratch);
        if !h.dense {
            if matches!(store, TableStore::Dense(_)) {
                // the sparse store checks order in its own pass over the keys
                check_sorted(keys).map_err(|e| Refusal(e.to_string()))?;
            }
            if h.b != h.a.saturating_mul(dim) {
                return Err(Refusal(format!(
                    "{} keys of table {} (dim {dim}) need {} values, frame says {}",
                    h.a,
                    h.table,
                    h.a.saturating_mul(dim),
                    h.b
                )));
            }
        } else if matches!(store, TableStore::Sparse(_)) {
            return Err(Refusal(format!("table {} is sparse: range operations need a dense table", h.table)));
        }
        let k = self.kernels;
        if matches!(h.kind, Kind::Push | Kind::PushPull) {
            self.stats.push_frames += 1;
            let vals = wire::vals_of(vals_b, &mut self.vals_scratch);
            let r = match store {
                TableStore::Dense(d) if h.dense => d.push(h.a, vals, k),
                TableStore::Dense(d) => d.push_keys(keys, vals, k),
                TableStore::Sparse(s) => s.push(keys, vals, k),
            };
            r.map_err(|e| Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard)))?;
            if let Some(e) = self.eager.get_mut(&TableId(h.table)) {
                Self::track(e, h, keys_b, peer, true);
            }
        }
        if h.kind == Kind::Push {
            if !ack {
                return Ok(());
            }
            let ack =
                DataHeader { kind: Kind::Ack, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
            let len = ack.frame_len().expect("ack is small");
            ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
            self.stats.bytes_out += len as u64;
            return Ok(());
        }
        // Pull or PushPull: answer with the values
        self.stats.pull_frames += 1;
        let mut resp =
            DataHeader { kind: Kind::PullResp, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: h.b };
        if let Some(stamp) = stamp {
            wire::set_stamp(&mut resp, stamp);
        }
        let len = resp.frame_len().ok_or_else(|| Refusal("pull too large".into()))?;
        if len > self.body_max + wire::PREFIX_BYTES {
            return Err(Refusal(format!(
                "a pull of {} values does not fit one frame of {} bytes: split it",
                h.b, self.body_max
            )));
        }
        // validate before reserving the response, so a refusal is one error frame and nothing else
        let checked = match &mut *store {
            TableStore::Dense(d) if h.dense => d.check_span(h.a, h.b),
            TableStore::Dense(d) => d.check_keys(keys),
            TableStore::Sparse(s) => s.prepare_pull(keys),
        };
        checked.map_err(|e| Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard)))?;
        if let Some(e) = self.eager.get_mut(&TableId(h.table)) {
            Self::track(e, h, keys_b, peer, false);
        }
        let n = h.b as usize;
        if let (TableStore::Dense(d), true) = (&*store, h.dense) {
            // send straight from the slab blocks: no copy into the send queue
            let hdr = resp.encode(len);
            let mut parts: [&[u8]; GATHER_PARTS_MAX] = [&[]; GATHER_PARTS_MAX];
            parts[0] = &hdr;
            let mut np = 1;
            let fits = d
                .for_each_slice(h.a, h.b, |slice| {
                    if np + 1 >= GATHER_PARTS_MAX {
                        return false;
                    }
                    parts[np] = bytemuck::cast_slice(slice);
                    np += 1;
                    true
                })
                .unwrap_or(false);
            if fits {
                parts[np] = &ZEROS[..len - wire::DATA_HEADER_BYTES - n * 4];
                np += 1;
                tx.frame_gather(peer, &parts[..np]).map_err(|e| Refusal(e.to_string()))?;
                self.stats.bytes_out += len as u64;
                return Ok(());
            }
        }
        let buf = tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?;
        resp.write(buf);
        let payload = &mut buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4];
        let scratch = &mut self.vals_scratch;
        let aligned = bytemuck::try_cast_slice_mut::<u8, f32>(payload).is_ok();
        if !aligned {
            scratch.clear();
            scratch.resize(n, 0.0);
        }
        {
            let out: &mut [f32] = if aligned {
                bytemuck::cast_slice_mut(&mut buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4])
            } else {
                &mut scratch[..]
            };
            let r = match store {
                TableStore::Dense(d) if h.dense => d.pull(h.a, out),
                TableStore::Dense(d) => d.pull_keys(keys, out),
                TableStore::Sparse(s) => {
                    s.pull_prepared(out);
                    Ok(())
                }
            };
            debug_assert!(r.is_ok(), "checked above: {r:?}");
            if r.is_err() {
                out.fill(0.0);
            }
        }
        if !aligned {
            buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4]
                .copy_from_slice(bytemuck::cast_slice(&scratch[..]));
        }
        self.stats.bytes_out += len as u64;
        Ok(())
    }
}

impl ShardCore {
    /// An eager table's bookkeeping for one checked request: a merged push
    /// marks its rows changed (`pushed`), an answered pull subscribes its
    /// reader to them (up to the cap).
    fn track(e: &mut Eager, h: &DataHeader, keys_b: &[u8], peer: PeerId, pushed: bool) {
        let span = h.dense.then(|| e.span(h.a, h.b));
        let each = |f: &mut dyn FnMut(Key)| {
            if let Some(span) = span.clone() {
                span.for_each(&mut *f);
            } else {
                keys_b.chunks_exact(8).for_each(|k| f(u64::from_le_bytes(k.try_into().expect("8 bytes"))));
            }
        };
        if pushed {
            each(&mut |k| {
                e.dirty.insert(k);
            });
        } else if !e.overflowed.contains(&peer) {
            let subs = &mut e.readers.entry(peer).or_default().keys;
            let mut over = false;
            each(&mut |k| {
                if subs.len() < crate::limits::ESSP_SUBSCRIBED_KEYS_MAX {
                    subs.insert(k);
                } else {
                    over |= !subs.contains(&k);
                }
            });
            if over {
                e.readers.remove(&peer);
                e.overflowed.insert(peer);
            }
        }
    }
}

const ZEROS: [u8; 8] = [0; 8];

/// A request the shard refuses while keeping the connection.
struct Refusal(String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Consistency;
    use crate::control::{ClusterView, JobSpec, ServerInfo};
    use crate::keys::{KeyRange, TableSpec};
    use crate::limits::{WireLimits, PARKED_PULL_BYTES_MAX};
    use crate::rules::RuleSpec;
    use crate::sim::SimSink;

    const A: PeerId = PeerId { index: 1, generation: 0 };
    const B: PeerId = PeerId { index: 2, generation: 0 };

    fn shard(model: Consistency) -> ShardCore {
        shard_of(vec![
            TableSpec::dense(0, "d", KeyRange::new(0, 1000), 1, RuleSpec::Sum).with_consistency(model),
            TableSpec::sparse(1, "s", KeyRange::FULL, 1, RuleSpec::Sum).with_consistency(model),
        ])
    }

    /// One shard owning everything of `tables`, in a job of two workers.
    fn shard_of(tables: Vec<TableSpec>) -> ShardCore {
        let job = JobSpec {
            tables,
            app: "test".into(),
            params: serde_json::Value::Null,
            limits: WireLimits::default(),
            partitions: 64,
            copies: 1,
        };
        let view = ClusterView::new(job, vec![ServerInfo::new(0, "t", vec![0], 0)], 2);
        ShardCore::new(&view, Owner { server: 0, shard: 0 }, &RuleRegistry::default(), Kernels::best()).unwrap()
    }

    fn frame(h: DataHeader, keys: &[u64]) -> Vec<u8> {
        let mut f = vec![0u8; h.frame_len().unwrap()];
        h.write(&mut f);
        let k: &[u8] = bytemuck::cast_slice(keys);
        f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + k.len()].copy_from_slice(k);
        f
    }

    fn clock(rank: u64, clocks: u64) -> Vec<u8> {
        frame(DataHeader { kind: Kind::Clock, dense: false, table: 0, sub: 0, ts: 1, a: clocks, b: rank }, &[])
    }

    fn dense_pull(ts: u64) -> Vec<u8> {
        frame(DataHeader { kind: Kind::Pull, dense: true, table: 0, sub: 0, ts, a: 0, b: 10 }, &[])
    }

    fn kinds(sink: &mut SimSink) -> Vec<(PeerId, Kind)> {
        let k = sink
            .frames
            .iter()
            .map(|(p, f)| (*p, wire::parse_prefix(f[..8].try_into().unwrap(), 1 << 30).unwrap().kind));
        let out = k.collect();
        sink.frames.clear();
        out
    }

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

    #[test]
    fn a_pull_ahead_of_the_slowest_worker_waits_for_its_clock() {
        let mut s = shard(Consistency::Bounded { staleness: 1 });
        let mut sink = SimSink::default();
        s.handle(A, &clock(0, 3), &mut sink).unwrap();
        s.handle(A, &dense_pull(7), &mut sink).unwrap();
        // worker 0 reads at clock 3: bounded(1) needs 2 clocks of everyone; worker 1 has 0
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack)]);
        assert_eq!(s.parked().0, 1);
        s.handle(B, &clock(1, 1), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Ack)]);
        s.handle(B, &clock(1, 2), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Ack), (A, Kind::PullResp)]);
        assert_eq!(s.parked(), (0, 0));
        // a reader that never clocked reads at clock 0 and never waits
        s.handle(PeerId { index: 9, generation: 0 }, &dense_pull(8), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink).len(), 1);
        // and under eventual consistency nothing waits
        let mut e = shard(Consistency::Eventual);
        e.handle(A, &clock(0, 50), &mut sink).unwrap();
        e.handle(A, &dense_pull(9), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack), (A, Kind::PullResp)]);
        // eventual tables can be read one-sided; bounded ones cannot
        assert_eq!(e.dense_slabs().len(), 1);
        assert_eq!(s.dense_slabs().len(), 0);
    }

    /// A shard with one block_prox table (dim 2, keys 0..100, l1 = 1).
    fn prox_shard() -> ShardCore {
        shard_of(vec![TableSpec::dense(
            2,
            "w",
            KeyRange::new(0, 100),
            2,
            RuleSpec::BlockProx { l1: 1.0, l2: 0.0, max_step: 10.0 },
        )
        .with_consistency(Consistency::Bounded { staleness: 0 })])
    }

    fn values(sink: &mut SimSink) -> Vec<f32> {
        let out = sink
            .frames
            .iter()
            .filter_map(|(_, f)| match wire::decode(f, 1 << 30).unwrap() {
                Frame::Data { h, vals, .. } if h.kind == Kind::PullResp => {
                    Some(vals.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect();
        sink.frames.clear();
        out
    }

    #[test]
    fn a_settling_rule_steps_once_on_the_sum_of_a_clocks_pushes() {
        let mut s = prox_shard();
        let mut sink = SimSink::default();
        let push = |g: f32, u: f32| {
            let h = DataHeader { kind: Kind::Push, dense: false, table: 2, sub: 0, ts: 3, a: 1, b: 2 };
            let mut f = frame(h, &[5]);
            f[wire::DATA_HEADER_BYTES + 8..wire::DATA_HEADER_BYTES + 16].copy_from_slice(bytemuck::cast_slice(&[g, u]));
            f
        };
        let pull = frame(DataHeader { kind: Kind::Pull, dense: false, table: 2, sub: 0, ts: 4, a: 1, b: 2 }, &[5]);
        s.handle(A, &push(-3.0, 1.0), &mut sink).unwrap();
        // B's push goes coded (LZ4 over the payload): the shard undoes it first
        let coded = crate::filter::Encoder::default()
            .encode(B, TableId(2), &[crate::filter::FilterSpec::Lz4], &push(-1.0, 1.0), 2, true)
            .unwrap();
        assert!(crate::filter::is_coded(&coded));
        s.handle(B, &coded, &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack), (B, Kind::Ack)]);
        // a reader that never clocked reads at clock 0: nothing settled yet
        s.handle(PeerId { index: 9, generation: 0 }, &pull, &mut sink).unwrap();
        assert_eq!(values(&mut sink), [0.0, 0.0]);
        // A finishes clock 0 and reads at clock 1: it waits for B
        s.handle(A, &clock(0, 1), &mut sink).unwrap();
        s.handle(A, &pull, &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack)]);
        s.handle(B, &clock(1, 1), &mut sink).unwrap();
        // G = -4, U = 2: w = soft(0 + 4, 1) / 2 = 1.5, and G beside it; one step, not two
        assert_eq!(values(&mut sink), [1.5, -4.0]);
        // a push-pull cannot be answered before its own step: refused
        let mut pp = push(1.0, 1.0);
        pp[5] = Kind::PushPull as u8;
        s.handle(A, &pp, &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Error)]);
    }

    #[test]
    fn a_checkpoint_restores_every_table_exactly_and_only_where_it_was_taken() {
        let tables = || {
            vec![
                TableSpec::dense(0, "d", KeyRange::new(0, 1000), 3, RuleSpec::Sum),
                TableSpec::sparse(
                    1,
                    "s",
                    KeyRange::FULL,
                    2,
                    RuleSpec::Adagrad { lr: 0.1, eps: 1e-6, initial_accumulator: 0.1 },
                ),
            ]
        };
        let mut s = shard_of(tables());
        let mut sink = SimSink::default();
        let mut r = crate::rng::SplitMix64::new(5);
        for round in 0..20u64 {
            let keys: Vec<u64> = (0..50).map(|i| i * 1_000_003 + round % 3).collect();
            let h = DataHeader { kind: Kind::Push, dense: false, table: 1, sub: 0, ts: 1, a: 50, b: 100 };
            let mut f = frame(h, &keys);
            let vals: Vec<f32> = (0..100).map(|_| r.normal() as f32).collect();
            f[wire::DATA_HEADER_BYTES + 400..wire::DATA_HEADER_BYTES + 800]
                .copy_from_slice(bytemuck::cast_slice(&vals));
            s.handle(A, &f, &mut sink).unwrap();
            let h = DataHeader { kind: Kind::Push, dense: true, table: 0, sub: 0, ts: 2, a: round * 30, b: 60 };
            let mut f = frame(h, &[]);
            f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + 240]
                .copy_from_slice(bytemuck::cast_slice(&vec![round as f32 + 0.5; 60]));
            s.handle(A, &f, &mut sink).unwrap();
        }
        // a worker asks; the shard answers only once told the bytes are written
        let ask = frame(DataHeader { kind: Kind::Checkpoint, dense: false, table: 0, sub: 0, ts: 9, a: 7, b: 0 }, &[]);
        sink.frames.clear();
        s.handle(B, &ask, &mut sink).unwrap();
        assert_eq!(s.checkpoint_due(), Some(7));
        assert!(sink.frames.is_empty());
        let bytes = s.snapshot(7);
        s.checkpoint_written(&mut sink, Ok(()));
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Ack)]);
        assert_eq!(s.checkpoint_due(), None);
        // a fresh shard of the same job takes it back bit for bit
        let mut back = shard_of(tables());
        assert_eq!(back.restore(&bytes), Ok(7));
        assert_eq!(back.snapshot(7), bytes);
        // and a pull reads the same values
        let keys: Vec<u64> = (0..50).map(|i| i * 1_000_003 + 1).collect();
        let pull = frame(DataHeader { kind: Kind::Pull, dense: false, table: 1, sub: 0, ts: 3, a: 50, b: 100 }, &keys);
        s.handle(A, &pull, &mut sink).unwrap();
        let want = values(&mut sink);
        back.handle(A, &pull, &mut sink).unwrap();
        assert_eq!(values(&mut sink), want);
        // another shard's, or another job's tables: refused with the reason
        let mut other = shard_of(vec![TableSpec::dense(0, "d", KeyRange::new(0, 1000), 2, RuleSpec::Sum)]);
        assert!(other.restore(&bytes).unwrap_err().contains("tables"));
        let mut wrong_dim = shard_of(vec![
            TableSpec::dense(0, "d", KeyRange::new(0, 1000), 2, RuleSpec::Sum),
            TableSpec::sparse(1, "s", KeyRange::FULL, 2, RuleSpec::Sum),
        ]);
        assert!(wrong_dim.restore(&bytes).unwrap_err().contains("dim"));
        assert!(shard_of(tables()).restore(&bytes[..bytes.len() / 2]).is_err());
        // a failed write is an error frame to the asker
        s.handle(B, &ask, &mut sink).unwrap();
        s.checkpoint_written(&mut sink, Err("disk full".into()));
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Error)]);
    }

    #[test]
    fn parked_reads_are_bounded_and_go_with_their_reader() {
        let mut s = shard(Consistency::Sequential);
        let mut sink = SimSink::default();
        s.handle(A, &clock(0, 1_000), &mut sink).unwrap();
        let keys: Vec<u64> = (0..20_000).collect();
        let pull =
            frame(DataHeader { kind: Kind::Pull, dense: false, table: 1, sub: 0, ts: 2, a: 20_000, b: 20_000 }, &keys);
        let mut errors = 0;
        for _ in 0..(PARKED_PULL_BYTES_MAX / pull.len() + 10) {
            s.handle(A, &pull, &mut sink).unwrap();
            errors += kinds(&mut sink).iter().filter(|(_, k)| *k == Kind::Error).count();
        }
        let (n, bytes) = s.parked();
        assert!(bytes <= PARKED_PULL_BYTES_MAX && n > 0, "{n} parked, {bytes} bytes");
        assert!(errors >= 10, "reads beyond the bound are refused: {errors}");
        s.on_closed(A);
        assert_eq!(s.parked(), (0, 0));
    }

    #[test]
    fn a_clock_from_outside_the_job_is_refused_and_changes_nothing() {
        let mut s = shard(Consistency::Sequential);
        let mut sink = SimSink::default();
        s.handle(A, &clock(5, 3), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Error)]);
        s.handle(A, &clock(0, 3), &mut sink).unwrap();
        s.handle(A, &clock(1, 3), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack), (A, Kind::Error)]);
        // rank 1 has finished nothing: a read at clock 3 by rank 0 waits
        s.handle(A, &dense_pull(4), &mut sink).unwrap();
        assert_eq!(s.parked().0, 1);
    }

    #[test]
    fn eager_tables_refresh_their_readers_when_the_slowest_worker_clocks() {
        let mut s = shard(Consistency::Essp { staleness: 1 });
        let mut sink = SimSink::default();
        // A reads keys 0..10 (subscribes), then B pushes key 3
        s.handle(A, &dense_pull(1), &mut sink).unwrap();
        let (_, resp) = sink.frames.pop().unwrap();
        let Frame::Data { h, .. } = wire::decode(&resp, 1 << 30).unwrap() else { panic!() };
        assert_eq!((h.kind, wire::stamp_of(&h)), (Kind::PullResp, 0));
        let push = frame(DataHeader { kind: Kind::Push, dense: false, table: 0, sub: 0, ts: 2, a: 1, b: 1 }, &[3]);
        s.handle(B, &push, &mut sink).unwrap();
        sink.frames.clear();
        assert_eq!(s.subscribed(TableId(0), A), 10);
        // A watches: nothing is due yet, so nothing is sent
        let watch = frame(DataHeader { kind: Kind::Watch, dense: false, table: 0, sub: 0, ts: 0, a: 0, b: 0 }, &[]);
        // a watch of a table that is not eager breaks the protocol
        let mut lazy = shard(Consistency::Bounded { staleness: 1 });
        assert!(lazy.handle(A, &watch, &mut sink).is_err());
        s.handle(A, &watch, &mut sink).unwrap();
        assert!(sink.frames.is_empty());
        // the minimum clock moves only when both have finished clock 0
        s.handle(A, &clock(0, 1), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack)]);
        s.handle(B, &clock(1, 1), &mut sink).unwrap();
        let refresh = sink.frames.iter().find(|(p, f)| *p == A && f[5] == Kind::Refresh as u8).expect("a refresh");
        let Frame::Data { h, keys, vals } = wire::decode(&refresh.1, 1 << 30).unwrap() else { panic!() };
        assert_eq!((wire::stamp_of(&h), h.a, h.sub), (1, 1, 1));
        assert_eq!(keys, 3u64.to_le_bytes());
        assert_eq!(vals, 0f32.to_le_bytes());
        // B read nothing and watched nothing: no refresh for it
        assert!(!sink.frames.iter().any(|(p, f)| *p == B && f[5] == Kind::Refresh as u8));
        sink.frames.clear();
        // one refresh per watch: the next clock's waits for A's next watch, and
        // with nothing changed it is empty (the stamp alone moved on)
        s.handle(A, &clock(0, 2), &mut sink).unwrap();
        s.handle(B, &clock(1, 2), &mut sink).unwrap();
        assert!(!sink.frames.iter().any(|(_, f)| f[5] == Kind::Refresh as u8));
        s.handle(A, &watch, &mut sink).unwrap();
        let empty = sink.frames.iter().find(|(_, f)| f[5] == Kind::Refresh as u8).expect("an empty refresh");
        let Frame::Data { h, .. } = wire::decode(&empty.1, 1 << 30).unwrap() else { panic!() };
        assert_eq!((wire::stamp_of(&h), h.a, h.sub), (2, 0, 1));
        sink.frames.clear();
        s.handle(A, &watch, &mut sink).unwrap();
        assert!(sink.frames.is_empty(), "nothing new: the watch waits");
        s.on_closed(A);
        assert_eq!(s.subscribed(TableId(0), A), 0);
    }
}
