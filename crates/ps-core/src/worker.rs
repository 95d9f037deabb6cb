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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;

use crate::cache::{Cache, CacheStats, Lookup};
use crate::clock::Consistency;
use crate::error::PsError;
use crate::filter::{has_codecs, Decoder, Encoder, PushFilter};
use crate::keys::{check_sorted, Key, KeyRange, TableId, TableSpec};
use crate::ring::{position, Owner, Ring};
use crate::rules::RuleSpec;
use crate::transport::{FrameSink, PeerId, TxError, GATHER_PARTS_MAX};
use crate::wire::{self, DataHeader, Frame, Kind};

const ZEROS: [u8; 8] = [0; 8];

/// Names one operation of one worker; `wait` on it.
pub type Timestamp = u64;

#[derive(Debug)]
struct PullOut {
    vals: Vec<f32>,
    dim: usize,
    /// dense: first flat float of the request
    base: u64,
    /// sparse: per sub, a slice of `ranges`
    subs: Vec<Range<usize>>,
    ranges: Vec<Range<usize>>,
}

#[derive(Debug)]
struct Pending {
    frames_left: u32,
    error: Option<PsError>,
    pull: Option<PullOut>,
    /// a read of a cached table: fills the cache when it completes
    read: Option<CachedRead>,
    /// a push into a cached table: released in the cache when it completes
    pushed: Option<(TableId, OwnedKeys)>,
}

impl Pending {
    fn new(frames_left: u32, error: Option<PsError>, pull: Option<PullOut>) -> Self {
        Self { frames_left, error, pull, read: None, pushed: None }
    }
}

/// An operation waiting for the timestamps it was issued after.
#[derive(Debug)]
struct Deferred {
    ts: Timestamp,
    deps: Vec<Timestamp>,
    kind: Kind,
    table: TableId,
    keys: OwnedKeys,
    vals: Option<Vec<f32>>,
    out: Option<Vec<f32>>,
}

#[derive(Debug)]
struct CachedRead {
    table: TableId,
    keys: OwnedKeys,
    /// the reader's clock when it asked
    clock: u64,
    /// the least stamp of the responses so far
    stamp: u64,
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

/// Which keys an operation touches.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    /// Strictly ascending keys, any table.
    List(&'a [Key]),
    /// `count` consecutive keys from `first`, dense tables.
    Range { first: Key, count: u64 },
}

/// One chunk to send.
#[derive(Clone, Debug)]
struct Chunk {
    owner: Owner,
    /// dense: first flat float; sparse: number of keys
    a: u64,
    /// dense: floats; sparse: values (keys * dim)
    b: u64,
    /// sparse: slice of `chunk_ranges`
    ranges: Range<usize>,
}

/// A request frame with no answer yet, kept for failover (replicated jobs):
/// what the shard applies (a coded frame decoded), and its number among the
/// counted frames to its owner (`chain::is_counted`).
#[derive(Debug)]
struct Unanswered {
    ts: Timestamp,
    sub: u32,
    /// the request's `a`: a dense pull's answer carries its stamp in `sub`
    /// (`wire::stamp_of`) and is matched by `a` instead
    a: u64,
    seq: Option<u64>,
    frame: Vec<u8>,
}

/// One owner's stream, as failover needs it.
#[derive(Debug, Default)]
struct OwnerStream {
    /// sent (or to send), not answered, in order
    unanswered: VecDeque<Unanswered>,
    /// the number the next counted frame gets
    next_seq: u64,
    /// the connection broke: why (until `rebind`)
    lost: Option<String>,
    /// rebound, and no request answered on the new connection yet
    resumed: bool,
}

/// Chain replication on the worker's side (`chain`): it binds to every head
/// as `origin`, keeps every request until it is answered, and after a lost
/// connection binds to the new head and sends the unanswered ones again.
#[derive(Debug)]
struct Failover {
    origin: u32,
    streams: Vec<OwnerStream>,
    /// decodes this worker's own coded frames as the shard will
    mirror: Decoder,
    body_max: usize,
    /// owners answered since their rebind (`take_resumed`)
    resumed: Vec<Owner>,
}

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
    watch_out: std::collections::HashSet<(PeerId, TableId)>,
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

    pub fn table(&self, id: TableId) -> Result<&TableSpec, PsError> {
        self.tables.get(&id).ok_or(PsError::UnknownTable(id))
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// This worker's rank among the job's workers: its clock frames carry it.
    pub fn set_rank(&mut self, rank: u32) {
        self.rank = Some(rank);
    }

    /// Turns on failover for a replicated job (every shard is a chain of
    /// copies, `chain`): binds to every shard as `origin` (the worker's rank),
    /// and from now on keeps each request until it is answered, so that when
    /// a connection breaks the operations in flight wait for [`WorkerCore::rebind`]
    /// to the new head instead of failing.
    pub fn enable_failover(&mut self, tx: &mut dyn FrameSink, origin: u32) -> Result<(), PsError> {
        let owners = self.peers.iter().map(|r| r.len()).sum();
        self.failover = Some(Failover {
            origin,
            streams: (0..owners).map(|_| OwnerStream::default()).collect(),
            mirror: Decoder::default(),
            body_max: self.body_max,
            resumed: Vec::new(),
        });
        for &peer in self.peers.iter().flatten() {
            let f = crate::chain::bind_frame(origin, 0);
            tx.frame(peer, f.len()).map_err(tx_error)?.copy_from_slice(&f);
        }
        Ok(())
    }

    /// Owners whose connection broke and that wait for [`WorkerCore::rebind`].
    pub fn lost_owners(&self) -> Vec<Owner> {
        let Some(f) = &self.failover else { return Vec::new() };
        f.streams.iter().enumerate().filter(|(_, s)| s.lost.is_some()).map(|(g, _)| self.owner_of_flat(g)).collect()
    }

    /// Requests kept for failover that have no answer yet (0 once every
    /// operation is answered: nothing is kept longer than it must be).
    pub fn unanswered(&self) -> usize {
        self.failover.as_ref().map_or(0, |f| f.streams.iter().map(|s| s.unanswered.len()).sum())
    }

    /// Owners that answered a request since they were rebound.
    pub fn take_resumed(&mut self) -> Vec<Owner> {
        self.failover.as_mut().map(|f| std::mem::take(&mut f.resumed)).unwrap_or_default()
    }

    /// `owner` is served on the new connection `peer` now (the head of its
    /// chain): binds there, saying the number of the first counted frame it
    /// has no answer for, and sends every unanswered request again, in order.
    /// The head answers again, without applying, what it applied already.
    pub fn rebind(&mut self, owner: Owner, peer: PeerId, tx: &mut dyn FrameSink) -> Result<(), PsError> {
        let g = self.flat(owner);
        let old = std::mem::replace(&mut self.peers[owner.server as usize][owner.shard as usize], peer);
        self.peer_owner.remove(&old);
        self.peer_owner.insert(peer, owner);
        self.encoder.forget(old);
        self.watch_out.retain(|(p, _)| *p != old);
        self.watch_due.retain(|(p, _)| *p != old);
        let mut eager: Vec<TableId> = self.caches.iter().filter(|(_, c)| c.is_eager()).map(|(t, _)| *t).collect();
        eager.sort_unstable_by_key(|t| t.0);
        self.watch_due.extend(eager.into_iter().map(|t| (peer, t)));
        for c in self.caches.values_mut() {
            c.owner_moved(g);
        }
        let f = self.failover.as_mut().ok_or(PsError::Transport("rebind without failover".into()))?;
        f.mirror.forget(old);
        let stream = &mut f.streams[g];
        stream.lost = None;
        stream.resumed = true;
        let first = stream.unanswered.iter().find_map(|u| u.seq).unwrap_or(stream.next_seq);
        // answers to counted frames come in order, so the unanswered ones are the end of the stream
        let seqs: Vec<u64> = stream.unanswered.iter().filter_map(|u| u.seq).collect();
        if seqs.iter().enumerate().any(|(i, &q)| q != first + i as u64) || first + seqs.len() as u64 != stream.next_seq
        {
            return Err(PsError::Transport(format!(
                "server {} shard {}: unanswered frames {seqs:?} are not the end of the stream (next {})",
                owner.server, owner.shard, stream.next_seq
            )));
        }
        let bind = crate::chain::bind_frame(f.origin, first);
        let mut send = |frame: &[u8]| tx.frame(peer, frame.len()).map(|b| b.copy_from_slice(frame));
        // a failed send means this connection is going too: its close comes next
        if send(&bind).is_ok() {
            for u in &stream.unanswered {
                if send(&u.frame).is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Sends a frame built in memory to flat owner `g`: `wire` goes out (unless
    /// that owner's connection is down), and with failover on `kept` (what the
    /// shard applies: `wire` itself unless it is coded) is kept until answered.
    #[allow(clippy::too_many_arguments)]
    fn send_owned(
        failover: &mut Option<Failover>,
        tx: &mut dyn FrameSink,
        g: usize,
        peer: PeerId,
        ts: Timestamp,
        sub: u32,
        kind: Kind,
        wire: Vec<u8>,
        kept: Option<Vec<u8>>,
    ) -> Result<(), TxError> {
        let Some(f) = failover.as_mut() else {
            return tx.frame(peer, wire.len()).map(|b| b.copy_from_slice(&wire));
        };
        let stream = &mut f.streams[g];
        let seq = crate::chain::is_counted(kind).then_some(stream.next_seq);
        let a = u64::from_le_bytes(wire[24..32].try_into().expect("a data frame"));
        if stream.lost.is_none() {
            // TCP sends straight from the kept copy when nothing is queued ahead
            match tx.frame_gather(peer, &[&wire]) {
                // its close event comes next; the frame goes again after the rebind
                Ok(()) | Err(TxError::Closed(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if seq.is_some() {
            stream.next_seq += 1;
        }
        stream.unanswered.push_back(Unanswered { ts, sub, a, seq, frame: kept.unwrap_or(wire) });
        Ok(())
    }

    /// The request `h` answers (to `peer`) need not go again.
    fn answered(&mut self, peer: PeerId, h: &DataHeader) {
        let Some(f) = self.failover.as_mut() else { return };
        let Some(&o) = self.peer_owner.get(&peer) else { return };
        let g = self.owner_base[o.server as usize] as usize + o.shard as usize;
        let stream = &mut f.streams[g];
        let by_a = h.kind == Kind::PullResp && h.dense;
        let hit = |u: &Unanswered| u.ts == h.ts && if by_a { u.a == h.a } else { u.sub == h.sub };
        if let Some(i) = stream.unanswered.iter().position(hit) {
            stream.unanswered.remove(i);
        }
        if std::mem::take(&mut stream.resumed) {
            f.resumed.push(o);
        }
    }

    /// Tables whose reads a process cache may answer: a staleness bound to
    /// allow it, and the `Sum` rule so my own pushes can be added in locally.
    /// Not sequential tables: there my pushes show only from the next clock.
    fn cacheable(t: &TableSpec) -> bool {
        t.consistency.staleness().is_some() && t.consistency != Consistency::Sequential && t.rule == RuleSpec::Sum
    }

    /// Turns the process cache of a table on (the default for `Sum` tables
    /// with a staleness bound) or off (every read goes to the shards, for the
    /// freshest values the bound allows; the cached rows are dropped).
    pub fn set_cache(&mut self, table: TableId, on: bool) -> Result<(), PsError> {
        let t = self.table(table)?.clone();
        if !on {
            self.caches.remove(&table);
        } else if Self::cacheable(&t) {
            let owners = self.peers.iter().map(|r| r.len()).sum();
            self.caches.entry(table).or_insert_with(|| Cache::new(t.dim as usize, t.consistency.is_eager(), owners));
            if t.consistency.is_eager() {
                self.watch_due = all_watches(&self.peers, &self.caches);
            }
        } else {
            return Err(PsError::Rejected {
                server: u32::MAX,
                shard: u32::MAX,
                reason: format!(
                    "table {} cannot be cached: it needs a staleness bound (not sequential) and the sum rule",
                    t.name
                ),
            });
        }
        Ok(())
    }

    /// Hits, misses and the staleness of reads of a cached table.
    pub fn cache_stats(&self, table: TableId) -> Option<CacheStats> {
        self.caches.get(&table).map(|c| c.stats())
    }

    /// Clocks this worker has finished (`clock` calls made).
    /// Bytes of data frames sent so far (what the filters save shows here).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

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
        self.send_to_every_shard(tx, "clock", |ts, sub| DataHeader {
            kind: Kind::Clock,
            dense: false,
            table: 0,
            sub,
            ts,
            a: clocks,
            b: rank,
        })
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
        self.send_to_every_shard(tx, "checkpoint", |ts, sub| DataHeader {
            kind: Kind::Checkpoint,
            dense: false,
            table: 0,
            sub,
            ts,
            a: label,
            b: 0,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn flat(&self, o: Owner) -> usize {
        self.peers[..o.server as usize].iter().map(|r| r.len()).sum::<usize>() + o.shard as usize
    }

    fn check_keys(t: &TableSpec, keys: &Keys<'_>, vals: Option<&[f32]>) -> Result<u64, PsError> {
        let range = t.keys();
        let out_of_range = |key| PsError::KeyOutOfRange { table: t.id, key, begin: range.begin, end: range.end };
        let n = match *keys {
            Keys::List(k) => {
                check_sorted(k)?;
                if let (Some(&first), Some(&last)) = (k.first(), k.last()) {
                    if !range.contains(first) {
                        return Err(out_of_range(first));
                    }
                    if !range.contains(last) {
                        return Err(out_of_range(last));
                    }
                }
                k.len() as u64
            }
            Keys::Range { first, count } => {
                if !t.is_dense() {
                    return Err(PsError::WrongLayout { table: t.id, layout: "sparse", needed: "dense" });
                }
                if count > 0 {
                    let last = first.checked_add(count - 1).ok_or(out_of_range(first))?;
                    if !range.contains(first) {
                        return Err(out_of_range(first));
                    }
                    if !range.contains(last) {
                        return Err(out_of_range(last));
                    }
                }
                count
            }
        };
        if let Some(v) = vals {
            let expected = n as usize * t.dim as usize;
            if v.len() != expected {
                return Err(PsError::WrongValueCount {
                    table: t.id,
                    dim: t.dim,
                    keys: n as usize,
                    expected,
                    got: v.len(),
                });
            }
        }
        Ok(n)
    }

    /// Plans the chunks of an operation into `self.chunks` (per owner).
    fn plan(&mut self, t: &TableSpec, keys: &Keys<'_>) {
        for g in &mut self.groups {
            g.clear();
        }
        for c in &mut self.chunks {
            c.clear();
        }
        self.chunk_ranges.clear();
        let dim = t.dim as u64;
        let range = t.keys();
        match *keys {
            Keys::List(k) => {
                let ring = &self.ring;
                let mut groups = std::mem::take(&mut self.groups);
                ring.split_sorted(range, k, |o, r| groups[self.flat(o)].push(r));
                let per_chunk = (self.chunk_bytes as u64 / (8 + 4 * dim)).max(1) as usize;
                for (g, group) in groups.iter().enumerate() {
                    let owner = self.owner_of_flat(g);
                    let mut start = self.chunk_ranges.len();
                    let mut n = 0usize;
                    for r in group {
                        let mut at = r.start;
                        while at < r.end {
                            let take = (r.end - at).min(per_chunk - n);
                            self.chunk_ranges.push(at..at + take);
                            n += take;
                            at += take;
                            if n == per_chunk {
                                let end = self.chunk_ranges.len();
                                self.chunks[g].push(Chunk {
                                    owner,
                                    a: n as u64,
                                    b: n as u64 * dim,
                                    ranges: start..end,
                                });
                                start = end;
                                n = 0;
                            }
                        }
                    }
                    if n > 0 {
                        let end = self.chunk_ranges.len();
                        self.chunks[g].push(Chunk { owner, a: n as u64, b: n as u64 * dim, ranges: start..end });
                    }
                }
                self.groups = groups;
            }
            Keys::Range { first, count } => {
                let end = first + count;
                let per_chunk = (self.chunk_bytes / 4) as u64;
                let mut k = first;
                while k < end {
                    let p = self.ring.partition_of(position(range, k));
                    let mut stop = self.ring.partition_keys(range, p).end.min(end);
                    let owner = self.ring.owner_of_partition(p);
                    // extend over following partitions with the same owner
                    while stop < end {
                        let q = self.ring.partition_of(position(range, stop));
                        if self.ring.owner_of_partition(q) != owner {
                            break;
                        }
                        stop = self.ring.partition_keys(range, q).end.min(end);
                    }
                    let g = self.flat(owner);
                    let (mut f, fend) = ((k - range.begin) * dim, (stop - range.begin) * dim);
                    while f < fend {
                        let n = per_chunk.min(fend - f);
                        self.chunks[g].push(Chunk { owner, a: f, b: n, ranges: 0..0 });
                        f += n;
                    }
                    k = stop;
                }
            }
        }
    }

    fn owner_of_flat(&self, mut g: usize) -> Owner {
        for (s, row) in self.peers.iter().enumerate() {
            if g < row.len() {
                return Owner { server: s as u32, shard: g as u32 };
            }
            g -= row.len();
        }
        unreachable!("flat owner index out of range")
    }

    /// Issues one operation. `kind` is Push, Pull or PushPull; `vals` is given for
    /// pushes; `out` (resized here) receives pulled values.
    pub fn issue(
        &mut self,
        tx: &mut dyn FrameSink,
        kind: Kind,
        table: TableId,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.pending.len() + self.deferred.len() >= self.in_flight_max {
            return Err(PsError::TooManyInFlight(self.pending.len() + self.deferred.len()));
        }
        let t = self.table(table)?.clone();
        Self::check_keys(&t, &keys, vals)?;
        let ts = self.next_ts;
        self.next_ts += 1;
        if let (Kind::Push, Some(filters), Some(v)) = (kind, self.push_filters.get_mut(&table), vals) {
            // the push filters choose what goes: on owned copies
            let mut k: Vec<Key> = key_iter(&keys).collect();
            let mut v = v.to_vec();
            for f in filters.iter_mut() {
                f.filter(&mut k, &mut v, t.dim as usize);
            }
            return self.issue_at(tx, ts, kind, &t, Keys::List(&k), Some(&v), out);
        }
        self.issue_at(tx, ts, kind, &t, keys, vals, out)
    }

    /// Adds a user's push filter to `table`, after the filters of its spec
    /// (the worker side only: a push filter changes what is pushed, not how
    /// it is coded, so the shards need not know it).
    pub fn add_push_filter(&mut self, table: TableId, filter: Box<dyn PushFilter>) -> Result<(), PsError> {
        self.table(table)?;
        self.push_filters.entry(table).or_default().push(filter);
        Ok(())
    }

    /// Pushes everything the filters of `table` held back (residuals of the
    /// push filters and of quantisation), with exact values: after it, the
    /// servers have every update pushed so far. Returns the pushes' timestamps.
    pub fn flush_filters(&mut self, tx: &mut dyn FrameSink, table: TableId) -> Result<Vec<Timestamp>, PsError> {
        let t = self.table(table)?.clone();
        let dim = t.dim as usize;
        let mut held: Vec<(Vec<Key>, Vec<f32>)> = Vec::new();
        if let Some(filters) = self.push_filters.get_mut(&table) {
            held.extend(filters.iter_mut().map(|f| f.flush(dim)));
        }
        held.push(self.encoder.flush(table, dim));
        let mut out = Vec::new();
        for (k, v) in held.into_iter().filter(|(k, _)| !k.is_empty()) {
            let ts = self.next_ts;
            self.next_ts += 1;
            self.lossless = true;
            let r = self.issue_at(tx, ts, Kind::Push, &t, Keys::List(&k), Some(&v), None);
            self.lossless = false;
            out.push(r?);
        }
        Ok(out)
    }

    /// Issues an operation to run only once every timestamp in `deps` has all
    /// its answers (OSDI's execute-after-finished): it is checked now and gets
    /// its timestamp now, and its frames go out from [`WorkerCore::pump`]. If a
    /// dependency failed, so does it. A dependency already waited on counts as
    /// finished. Under a staleness bound it reads at the clock it runs at.
    #[allow(clippy::too_many_arguments)]
    pub fn issue_after(
        &mut self,
        tx: &mut dyn FrameSink,
        deps: &[Timestamp],
        kind: Kind,
        table: TableId,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        if let Some(&d) = deps.iter().find(|&&d| d >= self.next_ts) {
            return Err(PsError::FutureTimestamp(d));
        }
        if deps.iter().all(|&d| self.finished(d)) {
            return self.issue(tx, kind, table, keys, vals, out);
        }
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.pending.len() + self.deferred.len() >= self.in_flight_max {
            return Err(PsError::TooManyInFlight(self.pending.len() + self.deferred.len()));
        }
        let t = self.table(table)?;
        Self::check_keys(t, &keys, vals)?;
        let ts = self.next_ts;
        self.next_ts += 1;
        self.deferred.push(Deferred {
            ts,
            deps: deps.to_vec(),
            kind,
            table,
            keys: OwnedKeys::of(&keys),
            vals: vals.map(|v| v.to_vec()),
            out,
        });
        Ok(ts)
    }

    /// Whether `ts` has all its answers (or was waited on already).
    fn finished(&self, ts: Timestamp) -> bool {
        match self.pending.get(&ts) {
            Some(p) => p.frames_left == 0,
            None => !self.deferred.iter().any(|d| d.ts == ts),
        }
    }

    /// Sends every deferred operation whose dependencies have finished, in
    /// issue order; the caller flushes. Call it after handling responses.
    pub fn pump(&mut self, tx: &mut dyn FrameSink) {
        if let Some(e) = self.broken.clone() {
            for d in std::mem::take(&mut self.deferred) {
                self.pending.insert(d.ts, Pending::new(0, Some(e.clone()), None));
            }
            return;
        }
        for (peer, table) in std::mem::take(&mut self.watch_due) {
            if self.watch_out.contains(&(peer, table)) {
                continue;
            }
            let h = DataHeader { kind: Kind::Watch, dense: false, table: table.0, sub: 0, ts: 0, a: 0, b: 0 };
            let len = h.frame_len().expect("a watch is small");
            match tx.frame(peer, len) {
                Ok(buf) => {
                    h.write(buf);
                    self.watch_out.insert((peer, table));
                }
                // the connection is going: nothing to watch on it
                Err(_) => continue,
            }
        }
        let mut i = 0;
        while i < self.deferred.len() {
            if !self.deferred[i].deps.iter().all(|&d| self.finished(d)) {
                i += 1;
                continue;
            }
            let d = self.deferred.remove(i);
            let failed = d.deps.iter().find_map(|&dep| {
                let e = self.pending.get(&dep)?.error.as_ref()?;
                Some(PsError::DependencyFailed { dep, reason: e.to_string() })
            });
            let r = match (failed, self.table(d.table).cloned()) {
                (Some(e), _) | (None, Err(e)) => Err(e),
                (None, Ok(t)) => self.issue_at(tx, d.ts, d.kind, &t, d.keys.as_keys(), d.vals.as_deref(), d.out),
            };
            if let Err(e) = r {
                // issue_at leaves a pending entry when frames went out; otherwise record the failure
                self.pending.entry(d.ts).or_insert_with(|| Pending::new(0, Some(e), None));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_at(
        &mut self,
        tx: &mut dyn FrameSink,
        ts: Timestamp,
        kind: Kind,
        t: &TableSpec,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        let t = t.clone();
        let table = t.id;
        let n = match keys {
            Keys::List(k) => k.len() as u64,
            Keys::Range { count, .. } => count,
        };
        self.plan(&t, &keys);
        let dim = t.dim as usize;
        let dense = matches!(keys, Keys::Range { .. });
        let mut pull = out.map(|mut v| {
            // every value is overwritten by a response (or the op fails), so a
            // buffer of the right length is reused as it is: no memset per pull
            if v.len() != n as usize * dim {
                v.clear();
                v.resize(n as usize * dim, 0.0);
            }
            PullOut {
                vals: v,
                dim,
                base: match keys {
                    Keys::Range { first, .. } => (first - t.keys().begin) * dim as u64,
                    Keys::List(_) => 0,
                },
                subs: Vec::new(),
                ranges: Vec::new(),
            }
        });
        let mut read = None;
        let mut pushed = None;
        if let Some(cache) = self.caches.get_mut(&table) {
            let needed = t.consistency.needed(self.clocks).unwrap_or(0);
            if kind == Kind::Pull {
                let out = pull.as_mut().expect("a pull has its buffer");
                if let Lookup::Hit { stamp } = cache.lookup(key_iter(&keys), needed, &mut out.vals) {
                    cache.record(self.clocks, stamp);
                    self.pending.insert(ts, Pending::new(0, None, pull));
                    return Ok(ts);
                }
            }
            if kind != Kind::Pull {
                cache.push(key_iter(&keys), vals.expect("a push has values"));
                pushed = Some((table, OwnedKeys::of(&keys)));
            }
            if kind != Kind::Push {
                read = Some(CachedRead { table, keys: OwnedKeys::of(&keys), clock: self.clocks, stamp: u64::MAX });
            }
        }
        let base_float = pull.as_ref().map(|p| p.base).unwrap_or(match keys {
            Keys::Range { first, .. } => (first - t.keys().begin) * dim as u64,
            Keys::List(_) => 0,
        });
        // interleave: chunk i of every owner, then chunk i+1 ...
        let rounds = self.chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut sub = 0u32;
        let mut sent = 0u32;
        for i in 0..rounds {
            for g in 0..self.chunks.len() {
                let Some(c) = self.chunks[g].get(i) else { continue };
                let h = DataHeader { kind, dense, table: table.0, sub, ts, a: c.a, b: c.b };
                let mut len = h.frame_len().expect("chunk sizes are bounded");
                let peer = self.peers[c.owner.server as usize][c.owner.shard as usize];
                let content = wire::DATA_HEADER_BYTES
                    + if dense { 0 } else { c.a as usize * 8 }
                    + if kind == Kind::Pull { 0 } else { c.b as usize * 4 };
                let ranges = &self.chunk_ranges[c.ranges.clone()];
                let carries_vals = kind != Kind::Pull && vals.is_some();
                // gather the frame from the caller's slices: no copy on this side
                // when the transport can send from them
                let hdr = h.encode(len);
                let mut parts: [&[u8]; GATHER_PARTS_MAX] = [&[]; GATHER_PARTS_MAX];
                let need = 2 + if dense { 1 } else { ranges.len() * (1 + carries_vals as usize) };
                let coded = has_codecs(&t.filters) && !(dense && kind == Kind::Pull);
                let fill = |buf: &mut [u8]| {
                    buf[..wire::DATA_HEADER_BYTES].copy_from_slice(&hdr);
                    let mut at = wire::DATA_HEADER_BYTES;
                    if let (true, Some(v), true) = (dense, vals, carries_vals) {
                        let off = (c.a - base_float) as usize;
                        let src: &[u8] = bytemuck::cast_slice(&v[off..off + c.b as usize]);
                        crate::kernels::copy_bytes(&mut buf[at..at + src.len()], src);
                    } else if let Keys::List(k) = keys {
                        for r in ranges {
                            let src: &[u8] = bytemuck::cast_slice(&k[r.clone()]);
                            crate::kernels::copy_bytes(&mut buf[at..at + src.len()], src);
                            at += src.len();
                        }
                        if let (Some(v), true) = (vals, carries_vals) {
                            for r in ranges {
                                let src: &[u8] = bytemuck::cast_slice(&v[r.start * dim..r.end * dim]);
                                crate::kernels::copy_bytes(&mut buf[at..at + src.len()], src);
                                at += src.len();
                            }
                        }
                    }
                    buf[content..].fill(0);
                };
                let r = if coded || self.failover.is_some() {
                    let mut plain = vec![0u8; len];
                    fill(&mut plain);
                    let (wire, kept) = if coded {
                        let dim = t.dim as usize;
                        let f = match self.encoder.encode(peer, table, &t.filters, &plain, dim, !self.lossless) {
                            Ok(f) => f,
                            Err(e) => return Err(PsError::Transport(format!("filter coding: {e}"))),
                        };
                        // what the shard will apply, for sending again after a failover
                        let kept = match self.failover.as_mut() {
                            Some(fo) => Some(
                                fo.mirror
                                    .decode(peer, &f, fo.body_max)
                                    .map_err(|e| PsError::Transport(format!("filter coding: {e}")))?,
                            ),
                            None => None,
                        };
                        (f, kept)
                    } else {
                        (plain, None)
                    };
                    len = wire.len();
                    Self::send_owned(&mut self.failover, tx, g, peer, ts, sub, kind, wire, kept)
                } else if need <= GATHER_PARTS_MAX {
                    let mut n = 0;
                    macro_rules! put {
                        ($p:expr) => {{
                            parts[n] = $p;
                            n += 1;
                        }};
                    }
                    put!(&hdr[..]);
                    if dense {
                        if let (Some(v), true) = (vals, carries_vals) {
                            let off = (c.a - base_float) as usize;
                            put!(bytemuck::cast_slice(&v[off..off + c.b as usize]));
                        }
                    } else if let Keys::List(k) = keys {
                        for r in ranges {
                            put!(bytemuck::cast_slice(&k[r.clone()]));
                        }
                        if let (Some(v), true) = (vals, carries_vals) {
                            for r in ranges {
                                put!(bytemuck::cast_slice(&v[r.start * dim..r.end * dim]));
                            }
                        }
                    }
                    put!(&ZEROS[..len - content]);
                    tx.frame_gather(peer, &parts[..n])
                } else {
                    tx.frame(peer, len).map(fill)
                };
                if let Err(e) = r {
                    // frames already queued for this ts will be answered; account for them
                    let mut p = Pending::new(sent, Some(tx_error(e)), None);
                    p.pushed = pushed;
                    self.pending.insert(ts, p);
                    if sent == 0 {
                        self.settle(ts);
                    }
                    return Err(PsError::Transport("send queue refused a frame mid-request".into()));
                }
                self.bytes_sent += len as u64;
                if let (Some(p), false) = (pull.as_mut(), dense) {
                    let s = p.ranges.len();
                    p.ranges.extend_from_slice(ranges);
                    p.subs.push(s..p.ranges.len());
                }
                sub += 1;
                sent += 1;
            }
        }
        self.pending.insert(ts, Pending { frames_left: sent, error: None, pull, read, pushed });
        if sent == 0 {
            self.settle(ts);
        }
        Ok(ts)
    }

    /// The flat owner index of `key` of a table spanning `range`.
    fn owner_index(ring: &Ring, base: &[u32], range: KeyRange, key: Key) -> u32 {
        let o = ring.owner_of_partition(ring.partition_of(position(range, key)));
        base[o.server as usize] + o.shard
    }

    /// An operation has all its answers: its cache bookkeeping is done now, so
    /// a later read sees what it brought.
    fn settle(&mut self, ts: Timestamp) {
        let Some(p) = self.pending.get_mut(&ts) else { return };
        let ok = p.error.is_none();
        let (read, pushed) = (p.read.take(), p.pushed.take());
        if let Some((table, keys)) = pushed {
            if let Some(c) = self.caches.get_mut(&table) {
                c.pushed(key_iter(&keys.as_keys()), ok);
            }
        }
        let Some(r) = read else { return };
        let (Some(c), Some(out), true) = (self.caches.get_mut(&r.table), p.pull.as_ref(), ok) else { return };
        let Some(t) = self.tables.get(&r.table) else { return };
        let stamp = if r.stamp == u64::MAX { 0 } else { r.stamp };
        let (ring, base, range) = (&self.ring, &self.owner_base, t.keys());
        c.fill(key_iter(&r.keys.as_keys()), &out.vals, stamp, |k| Self::owner_index(ring, base, range, k));
        c.record(r.clock, stamp);
    }

    /// A shard's eager refresh of rows this worker read.
    fn on_refresh(&mut self, peer: PeerId, h: &DataHeader, keys_b: &[u8], vals_b: &[u8]) -> Result<(), String> {
        let table = TableId(h.table);
        if !self.watch_out.remove(&(peer, table)) {
            return Err(format!("a refresh of table {} nobody watched for", h.table));
        }
        // watch for the next one (sent by `pump`) while the table is cached
        if self.caches.contains_key(&table) {
            self.watch_due.push((peer, table));
        }
        let Some(t) = self.tables.get(&TableId(h.table)) else {
            return Err(format!("a refresh of unknown table {}", h.table));
        };
        let Some(c) = self.caches.get_mut(&TableId(h.table)) else { return Ok(()) };
        if h.b != h.a.saturating_mul(t.dim as u64) {
            return Err(format!("a refresh of {} keys with {} values (dim {})", h.a, h.b, t.dim));
        }
        let keys: Vec<Key> = keys_b.chunks_exact(8).map(|k| u64::from_le_bytes(k.try_into().expect("8"))).collect();
        let range = t.keys();
        if keys.iter().any(|&k| !range.contains(k)) {
            return Err(format!("a refresh of keys outside table {}", h.table));
        }
        let mut vals = vec![0.0f32; h.b as usize];
        wire::copy_vals(&mut vals, vals_b);
        let stamp = wire::stamp_of(h);
        let (ring, base) = (&self.ring, &self.owner_base);
        c.fill(keys.iter().copied(), &vals, stamp, |k| Self::owner_index(ring, base, range, k));
        if h.sub == 1 {
            // the last frame of a refresh: every row read from this shard is this fresh
            if let Some(o) = self.peer_owner.get(&peer) {
                c.owner_advanced((base[o.server as usize] + o.shard) as usize, stamp);
            }
        }
        Ok(())
    }

    /// Handles one response frame. An `Err` means the frame broke the protocol:
    /// drop the connection it came on.
    pub fn on_frame(&mut self, peer: PeerId, frame: &[u8]) -> Result<(), PsError> {
        let bad = |what: String| PsError::Transport(format!("protocol violation from {peer:?}: {what}"));
        let owner = self.peer_owner.get(&peer).copied().unwrap_or(Owner { server: u32::MAX, shard: u32::MAX });
        match wire::decode(frame, self.body_max).map_err(|e| bad(e.to_string()))? {
            Frame::Data { h, keys, vals } if h.kind == Kind::Refresh => {
                self.on_refresh(peer, &h, keys, vals).map_err(bad)
            }
            // a Bind's answer (failover)
            Frame::Data { h, .. } if h.kind == Kind::Ack && h.ts == 0 && self.failover.is_some() => Ok(()),
            Frame::Data { h, vals, .. } if matches!(h.kind, Kind::Ack | Kind::PullResp) => {
                self.answered(peer, &h);
                let p = self
                    .pending
                    .get_mut(&h.ts)
                    .ok_or_else(|| bad(format!("response for unknown timestamp {}", h.ts)))?;
                if p.frames_left == 0 {
                    return Err(bad(format!("too many responses for timestamp {}", h.ts)));
                }
                if h.kind == Kind::PullResp {
                    let Some(out) = p.pull.as_mut() else { return Err(bad(format!("values for push {}", h.ts))) };
                    if h.dense {
                        let off = h.a.checked_sub(out.base).ok_or_else(|| bad("response before the request".into()))?
                            as usize;
                        let dst = off
                            .checked_add(h.b as usize)
                            .and_then(|end| out.vals.get_mut(off..end))
                            .ok_or_else(|| bad("response beyond the request".into()))?;
                        wire::copy_vals(dst, vals);
                    } else {
                        let sub = out
                            .subs
                            .get(h.sub as usize)
                            .cloned()
                            .ok_or_else(|| bad(format!("unknown sub {}", h.sub)))?;
                        let keys: usize = out.ranges[sub.clone()].iter().map(|r| r.len()).sum();
                        if keys * out.dim != h.b as usize {
                            return Err(bad(format!("sub {} carries {} values for {keys} keys", h.sub, h.b)));
                        }
                        let mut at = 0;
                        for r in &out.ranges[sub] {
                            let n = r.len() * out.dim;
                            wire::copy_vals(&mut out.vals[r.start * out.dim..r.end * out.dim], &vals[at..at + n * 4]);
                            at += n * 4;
                        }
                    }
                    if let Some(r) = p.read.as_mut() {
                        r.stamp = r.stamp.min(wire::stamp_of(&h));
                    }
                }
                p.frames_left -= 1;
                if p.frames_left == 0 {
                    self.settle(h.ts);
                }
                Ok(())
            }
            Frame::Error { h, message } => {
                self.answered(peer, &h);
                let p =
                    self.pending.get_mut(&h.ts).ok_or_else(|| bad(format!("error for unknown timestamp {}", h.ts)))?;
                if p.frames_left == 0 {
                    return Err(bad(format!("too many responses for timestamp {}", h.ts)));
                }
                p.frames_left -= 1;
                p.error.get_or_insert(PsError::Rejected {
                    server: owner.server,
                    shard: owner.shard,
                    reason: message.to_string(),
                });
                if p.frames_left == 0 {
                    self.settle(h.ts);
                }
                Ok(())
            }
            other => Err(bad(format!("unexpected frame {other:?}"))),
        }
    }

    /// A connection to a shard is gone. Without failover every operation in
    /// flight fails, and so does every later one; with it, the owner waits for
    /// [`WorkerCore::rebind`] and its requests for the new connection.
    pub fn on_closed(&mut self, peer: PeerId, reason: &str) {
        let owner = self.peer_owner.get(&peer).copied();
        let Some(owner) = owner else { return };
        if let Some(f) = self.failover.as_mut() {
            let g = self.owner_base[owner.server as usize] as usize + owner.shard as usize;
            f.streams[g].lost.get_or_insert_with(|| reason.to_string());
            f.mirror.forget(peer);
            self.encoder.forget(peer);
            self.watch_out.retain(|(p, _)| *p != peer);
            return;
        }
        let err = PsError::ServerLost { server: owner.server, shard: owner.shard, reason: reason.to_string() };
        for p in self.pending.values_mut() {
            p.frames_left = 0;
            p.error.get_or_insert(err.clone());
        }
        let all: Vec<Timestamp> = self.pending.keys().copied().collect();
        for ts in all {
            self.settle(ts);
        }
        self.broken.get_or_insert(err);
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

    pub fn is_pull(&self, ts: Timestamp) -> bool {
        self.pending.get(&ts).is_some_and(|p| p.pull.is_some())
            || self.deferred.iter().any(|d| d.ts == ts && d.out.is_some())
    }
}

/// A watch on every shard for every eager table cached.
fn all_watches(peers: &[Vec<PeerId>], caches: &HashMap<TableId, Cache>) -> Vec<(PeerId, TableId)> {
    let mut eager: Vec<TableId> = caches.iter().filter(|(_, c)| c.is_eager()).map(|(t, _)| *t).collect();
    eager.sort_unstable_by_key(|t| t.0);
    peers.iter().flatten().flat_map(|&p| eager.iter().map(move |&t| (p, t))).collect()
}

fn tx_error(e: TxError) -> PsError {
    PsError::Transport(e.to_string())
}

/// A key range helper for callers of range operations.
pub fn range_of(first: Key, count: u64) -> KeyRange {
    KeyRange::new(first, first + count)
}
