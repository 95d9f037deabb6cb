//! Chain replication of one shard's key ranges (OSDI 2014 §4.3, after van
//! Renesse and Schneider's chain replication). No I/O: the server thread
//! hands frames in and connects the links this asks for.
//!
//! ## The chain
//! Owner `(s, h)` (server `s`'s shard `h` in the ring) is held by `k` copies
//! on servers `s, s+1, ..., s+k-1` (mod the number of servers), each a
//! [`ChainCore`] around a [`ShardCore`] of its own: the copy on server `s` is
//! the head, the last live one the tail. The ring itself never changes; when a
//! server dies the manager publishes a view naming it dead, and the first live
//! copy of each chain is its head from then on.
//!
//! ## The protocol
//! - A *counted* frame (push, push-pull, clock) of a client is applied by the
//!   head, numbered in its origin's stream (`seq`), wrapped in a `Forward`
//!   frame and sent down the chain; each copy applies it and forwards it on;
//!   the tail answers with an `Ack`, and each copy passes the ack up once its
//!   own downstream acked. The head answers the client only then: an
//!   acknowledged push is on every live copy (invariant 1 through failover).
//! - Every other frame (pulls, watches, checkpoints) is served by the head
//!   alone, at once: it has applied everything it forwarded.
//! - A client names itself with a `Bind` frame (origin = its worker rank, and
//!   the number of its next counted frame). A worker whose connection broke
//!   binds again, to the new head, and sends again every frame it has no
//!   answer for. Answers to counted frames are released in forwarding order,
//!   so the unanswered ones are the end of its stream: a copy that applied
//!   frame `seq` of that origin already (`applied`) answers it again without
//!   applying it. Nothing is merged twice, nothing acknowledged is lost.
//! - A copy keeps what it forwarded and was not yet acknowledged (`Down::log`)
//!   and sends all of it again to a new downstream (after a copy between died,
//!   or after the link broke); the downstream skips what it applied.
//!
//! - A copy lost with its server is rebuilt elsewhere (`ClusterView::placed`):
//!   the chain's tail links to the new copy, sends it its whole state at one
//!   point of its stream (`Snapshot` frames: tables, clocks, held pushes, the
//!   per-origin numbers) and then every counted frame it applies after, without
//!   waiting for it (a *shadow*); the new copy says when it has the snapshot,
//!   the manager makes it a member at the end of the chain, and the tail's
//!   shadow link carries on as its downstream: bulk copy, then the changes
//!   meanwhile, then the switch.
//!
//! The shard state machines of the copies see the same frames of every origin
//! in the same order, through *virtual peers* (one per origin), so clocks,
//! held pushes of sequential tables and settling rules evolve alike on every
//! copy. Only the order between origins may differ (each copy serialises
//! them as they came), which a sum does not see.
//!
//! Must never: answer a counted frame before its downstream acknowledged it,
//! apply a frame of an origin out of order (a gap is an error, the sender
//! dropped), or grow the forwarding log past `CHAIN_LOG_BYTES_MAX`.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::limits::CHAIN_LOG_BYTES_MAX;
use crate::ring::Owner;
use crate::shard::{ShardCore, ShardError};
use crate::transport::{FrameSink, PeerId, TxError};
use crate::wire::{self, DataHeader, Frame, Kind, WireError};

/// The generation of virtual peers: a transport never reaches it.
const VIRTUAL_GENERATION: u32 = u32::MAX;

/// Origins of clients that did not bind: above every worker rank, and apart
/// per server (`FRESH_ORIGIN_BASE | server << 20 | n`), so a new head never
/// hands out an origin an earlier head gave.
const FRESH_ORIGIN_BASE: u32 = 1 << 31;

fn virtual_peer(origin: u32) -> PeerId {
    PeerId { index: origin, generation: VIRTUAL_GENERATION }
}

fn origin_of(peer: PeerId) -> Option<u32> {
    (peer.generation == VIRTUAL_GENERATION).then_some(peer.index)
}

/// Frames that change a shard's state, numbered per origin and forwarded.
pub fn is_counted(kind: Kind) -> bool {
    matches!(kind, Kind::Push | Kind::PushPull | Kind::Clock)
}

/// The server ranks holding copies of `owner`, head first: `k` of them, the
/// owner's own server and the next ones, wrapping.
pub fn chain_of(owner: Owner, servers: u32, copies: u32) -> Vec<u32> {
    (0..copies.min(servers)).map(|i| (owner.server + i) % servers).collect()
}

/// A `Bind` frame (see the module doc).
pub fn bind_frame(origin: u32, first_seq: u64) -> Vec<u8> {
    header_frame(DataHeader { kind: Kind::Bind, dense: false, table: 0, sub: 0, ts: 0, a: origin as u64, b: first_seq })
}

fn header_frame(h: DataHeader) -> Vec<u8> {
    let mut f = vec![0u8; h.frame_len().expect("a header frame is small")];
    h.write(&mut f);
    f
}

fn forward_frame(origin: u32, seq: u64, inner: &[u8]) -> Vec<u8> {
    let h = DataHeader {
        kind: Kind::Forward,
        dense: false,
        table: 0,
        sub: 0,
        ts: seq,
        a: origin as u64,
        b: (inner.len() / 4) as u64,
    };
    let mut f = vec![0u8; h.frame_len().expect("a forwarded request fits a frame")];
    h.write(&mut f);
    f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + inner.len()].copy_from_slice(inner);
    f
}

/// The header of a data frame (its payload checked as the kind says).
fn data_header(frame: &[u8]) -> Result<DataHeader, WireError> {
    match wire::decode(frame, frame.len())? {
        Frame::Data { h, .. } => Ok(h),
        Frame::Error { h, .. } => Ok(h),
        _ => Err(WireError::Unexpected(Kind::Control)),
    }
}

/// A push-pull as the push it carries (what the next copies apply).
fn push_of(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[5] = Kind::Push as u8;
    f
}

/// A push-pull as the pull it carries: the same header, the keys, no values.
fn pull_of(frame: &[u8]) -> Result<Vec<u8>, WireError> {
    let Frame::Data { h, keys, .. } = wire::decode(frame, frame.len())? else {
        return Err(WireError::Unexpected(Kind::PushPull));
    };
    let h = DataHeader { kind: Kind::Pull, ..h };
    let mut f = vec![0u8; h.frame_len().ok_or(WireError::Overflow("pull"))?];
    h.write(&mut f);
    f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + keys.len()].copy_from_slice(keys);
    Ok(f)
}

/// What one connection is to this copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conn {
    /// a client: its origin, and the number its next counted frame has
    Client { origin: u32, next_seq: u64 },
    /// the copy before this one in the chain
    Upstream,
}

/// What happens when the downstream acknowledges a forwarded frame.
#[derive(Debug)]
enum Release {
    /// send this frame to this (real) connection, if it is still open
    Send(PeerId, Vec<u8>),
    /// serve the pull half of a push-pull of `origin` now that its push is on
    /// every copy (`frame` is the request, kind `Pull`)
    PullPart { origin: u32, frame: Vec<u8> },
}

#[derive(Debug)]
struct Entry {
    origin: u32,
    seq: u64,
    frame: Vec<u8>,
    release: Vec<Release>,
}

/// The link to the next live copy.
#[derive(Debug, Default)]
struct Down {
    /// the server it should go to (`None`: this copy is the tail)
    server: Option<u32>,
    /// the open link, once the server thread made it
    peer: Option<PeerId>,
    /// forwarded, not yet acknowledged, in order
    log: VecDeque<Entry>,
    log_bytes: usize,
}

/// The tail's link to a copy being rebuilt: the snapshot, then the frames
/// applied after it, not waited for until the copy joins the chain.
#[derive(Debug)]
struct Shadow {
    server: u32,
    placement: u64,
    peer: PeerId,
    /// frames not yet handed to the transport: the snapshot's chunks, then forwards
    out: VecDeque<Vec<u8>>,
    /// forwards sent, not yet acknowledged: the downstream's log once it joins
    unacked: VecDeque<Entry>,
    /// bytes of forwards in `out` and `unacked`
    forward_bytes: usize,
}

/// Counters a copy reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainStats {
    /// counted frames sent down the chain (replays included)
    pub forwarded: u64,
    /// frames a client or upstream sent again that this copy had applied
    pub skipped: u64,
    /// frames sent again to a new downstream
    pub replayed: u64,
    /// snapshots sent to copies being rebuilt, and their bytes
    pub snapshots: u64,
    pub snapshot_bytes: u64,
}

/// The frames a shard writes, routed: to a virtual peer's current client
/// connection, into `captured` while its origin is being captured, or nowhere
/// (an origin with no connection here: the copies after the head).
struct Routed<'a> {
    inner: &'a mut dyn FrameSink,
    clients: &'a HashMap<u32, PeerId>,
    capture: Option<u32>,
    captured: &'a mut Vec<Vec<u8>>,
    void: &'a mut Vec<u8>,
}

impl FrameSink for Routed<'_> {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
        let Some(origin) = origin_of(peer) else { return self.inner.frame(peer, len) };
        if self.capture == Some(origin) {
            self.captured.push(vec![0u8; len]);
            return Ok(self.captured.last_mut().expect("just pushed"));
        }
        match self.clients.get(&origin) {
            Some(&real) => self.inner.frame(real, len),
            None => {
                self.void.clear();
                self.void.resize(len, 0);
                Ok(&mut self.void[..])
            }
        }
    }

    fn frame_gather(&mut self, peer: PeerId, parts: &[&[u8]]) -> Result<(), TxError> {
        match origin_of(peer) {
            Some(origin) if self.capture != Some(origin) => match self.clients.get(&origin) {
                Some(&real) => self.inner.frame_gather(real, parts),
                None => Ok(()),
            },
            Some(_) => {
                let len = parts.iter().map(|p| p.len()).sum();
                crate::transport::gather_into(self.frame(peer, len)?, parts);
                Ok(())
            }
            None => self.inner.frame_gather(peer, parts),
        }
    }
}

/// One copy of one owner's key ranges in its chain (see the module doc).
#[derive(Debug)]
pub struct ChainCore {
    core: ShardCore,
    /// this copy's server rank
    me: u32,
    /// servers holding copies, head first
    chain: Vec<u32>,
    dead: BTreeSet<u32>,
    dead_workers: BTreeSet<u32>,
    conns: HashMap<PeerId, Conn>,
    /// origin -> the client connection its answers go to
    clients: HashMap<u32, PeerId>,
    /// origin -> counted frames of it applied here
    applied: HashMap<u32, u64>,
    next_fresh: u32,
    down: Down,
    stats: ChainStats,
    log: Vec<String>,
    captured: Vec<Vec<u8>>,
    void: Vec<u8>,
    /// a replicated job's copy (chains of 2 or more, or a copy being rebuilt)
    replicated: bool,
    /// a copy being rebuilt: the snapshot's bytes so far, until it is whole
    rebuild: Option<Vec<u8>>,
    /// rebuilt from the snapshot: the server thread tells the manager (`take_synced`)
    synced: bool,
    /// the copy being rebuilt that has its snapshot: the tail's last successor
    syncing: Option<(u32, u64)>,
    /// the tail waits for a rebuilt copy: (placement, frames answered before
    /// that it has yet to acknowledge)
    catching_up: Option<(u64, usize)>,
    /// it acknowledged all of them: the server thread tells the manager (`take_caught_up`)
    caught_up: Option<u64>,
    /// the copy of this owner being rebuilt, as the view says: (server, placement)
    joining: Option<(u32, u64)>,
    shadow: Option<Shadow>,
    /// this copy's placement, if it was placed to rebuild a lost one
    placement: Option<u64>,
    /// placed, and no longer in the view: its thread ends
    retired: bool,
}

/// The largest snapshot a copy being rebuilt accepts (a bound on what a peer
/// can make it allocate).
const SNAPSHOT_BYTES_MAX: u64 = 1 << 40;

impl ChainCore {
    /// The copy on server `me` of the shard `core` (whose owner's chain is `chain`).
    pub fn new(core: ShardCore, me: u32, chain: Vec<u32>) -> Self {
        debug_assert!(chain.contains(&me), "server {me} holds no copy in chain {chain:?}");
        let mut c = Self {
            core,
            me,
            chain,
            dead: BTreeSet::new(),
            dead_workers: BTreeSet::new(),
            conns: HashMap::new(),
            clients: HashMap::new(),
            applied: HashMap::new(),
            next_fresh: 0,
            down: Down::default(),
            stats: ChainStats::default(),
            log: Vec::new(),
            captured: Vec::new(),
            void: Vec::new(),
            replicated: false,
            rebuild: None,
            synced: false,
            syncing: None,
            catching_up: None,
            caught_up: None,
            joining: None,
            shadow: None,
            placement: None,
            retired: false,
        };
        c.replicated = c.chain.len() > 1;
        c.down.server = c.successor();
        c
    }

    /// A copy placed on server `me` to rebuild one lost with its server: it
    /// takes the tail's snapshot, then its frames, and joins the chain when
    /// the manager says so (`set_view`).
    pub fn new_joining(core: ShardCore, me: u32, placement: u64) -> Self {
        let mut c = Self::new(core, me, vec![me]);
        c.chain.clear();
        c.replicated = true;
        c.rebuild = Some(Vec::new());
        c.placement = Some(placement);
        c.down.server = None;
        c
    }

    /// This copy's placement, if it was placed to rebuild a lost one.
    pub fn placement(&self) -> Option<u64> {
        self.placement
    }

    /// A placed copy the view no longer has (its rebuild started over, or
    /// was given up): its thread should end.
    pub fn retired(&self) -> bool {
        self.retired
    }

    /// Whether this copy got its snapshot since the last call (a copy being
    /// rebuilt: the server tells the manager, `Control::CopySynced`).
    pub fn take_synced(&mut self) -> bool {
        std::mem::take(&mut self.synced)
    }

    /// The placement of a rebuilt copy that has acknowledged every frame this
    /// tail answered before it waited for it, once (`Control::CopyReady`).
    pub fn take_caught_up(&mut self) -> Option<u64> {
        self.caught_up.take()
    }

    /// The server of the copy being rebuilt that this copy (the tail) must
    /// link to and send its state: the server thread connects and calls
    /// [`ChainCore::shadow_linked`].
    pub fn shadow_wanted(&self) -> Option<u32> {
        if self.shadow.is_some() || self.down.server.is_some() || self.rebuild.is_some() || !self.is_member() {
            return None;
        }
        self.joining.map(|(server, _)| server)
    }

    fn is_member(&self) -> bool {
        self.chain.contains(&self.me) && !self.dead.contains(&self.me)
    }

    /// The link to the copy being rebuilt on `server` is open: the snapshot
    /// of this copy now goes first, then every counted frame it applies.
    pub fn shadow_linked(&mut self, peer: PeerId, server: u32) {
        let shard = self.core.live_snapshot();
        let applied: Vec<(u32, u64)> = self.applied.iter().map(|(o, n)| (*o, *n)).collect();
        let json = serde_json::to_vec(&applied).expect("numbers serialise");
        let mut bytes = Vec::with_capacity(8 + shard.len() + json.len());
        bytes.extend_from_slice(&(shard.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&shard);
        bytes.extend_from_slice(&json);
        let chunk = crate::limits::CHUNK_BYTES;
        let total = bytes.len() as u64;
        let mut out = VecDeque::new();
        for (i, part) in bytes.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= bytes.len();
            let h = DataHeader {
                kind: Kind::Snapshot,
                dense: false,
                table: 0,
                sub: last as u32,
                ts: (i * chunk) as u64,
                a: total,
                b: part.len().div_ceil(4) as u64,
            };
            let mut f = vec![0u8; h.frame_len().expect("a chunk fits a frame")];
            h.write(&mut f);
            f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + part.len()].copy_from_slice(part);
            out.push_back(f);
        }
        self.stats.snapshots += 1;
        self.stats.snapshot_bytes += total;
        self.log.push(format!(
            "{}: rebuilding the copy on server {server}: {total} bytes of state, then the frames after it",
            self.describe()
        ));
        let placement = self.joining.map_or(0, |(_, id)| id);
        self.shadow = Some(Shadow { server, placement, peer, out, unacked: VecDeque::new(), forward_bytes: 0 });
    }

    /// The link to the copy being rebuilt (for the server's send budget).
    pub fn shadow_peer(&self) -> Option<PeerId> {
        self.shadow.as_ref().map(|s| s.peer)
    }

    /// Hands the transport what waits for the copy being rebuilt, up to
    /// `budget` bytes (the snapshot is sent as the link drains).
    pub fn pump_shadow(&mut self, tx: &mut dyn FrameSink, mut budget: usize) {
        let Some(sh) = self.shadow.as_mut() else { return };
        let mut first = true;
        while let Some(f) = sh.out.front() {
            // at least one frame a call, so a small budget still makes progress
            if f.len() > budget && !first {
                return;
            }
            first = false;
            if tx.frame_gather(sh.peer, &[f]).is_err() {
                // the link is going (its close abandons the rebuild)
                return;
            }
            budget = budget.saturating_sub(f.len());
            sh.out.pop_front();
        }
    }

    /// A counted frame this tail applied goes to the copy being rebuilt too.
    fn shadow_send(&mut self, origin: u32, seq: u64, inner: &[u8]) {
        let Some(sh) = self.shadow.as_mut() else { return };
        let frame = forward_frame(origin, seq, inner);
        sh.forward_bytes += 2 * frame.len();
        if sh.forward_bytes > CHAIN_LOG_BYTES_MAX {
            let server = sh.server;
            self.shadow = None;
            self.log.push(format!(
                "{}: the copy being rebuilt on server {server} does not keep up; rebuild abandoned",
                self.describe()
            ));
            return;
        }
        sh.out.push_back(frame.clone());
        sh.unacked.push_back(Entry { origin, seq, frame, release: Vec::new() });
    }

    fn on_shadow_ack(&mut self, frame: &[u8]) -> Result<(), ShardError> {
        let h = data_header(frame)?;
        let sh = self.shadow.as_mut().expect("called for the shadow's peer");
        let Some(e) = sh.unacked.front() else {
            return Err(
                WireError::Control("an acknowledgement for nothing sent to the copy being rebuilt".into()).into()
            );
        };
        if (e.origin as u64, e.seq) != (h.a, h.ts) {
            return Err(WireError::Control("the copy being rebuilt acknowledged out of order".into()).into());
        }
        let e = sh.unacked.pop_front().expect("looked at");
        sh.forward_bytes -= 2 * e.frame.len();
        Ok(())
    }

    /// A chunk of the tail's snapshot (this copy is being rebuilt).
    fn on_snapshot(&mut self, peer: PeerId, frame: &[u8]) -> Result<(), ShardError> {
        let (h, payload) = match wire::decode(frame, frame.len())? {
            Frame::Data { h, vals, .. } if h.kind == Kind::Snapshot => (h, vals),
            _ => return Err(WireError::Unexpected(Kind::Snapshot).into()),
        };
        let Some(buf) = self.rebuild.as_mut() else {
            return Err(WireError::Control(format!("{} is not being rebuilt", self.describe())).into());
        };
        if h.ts == 0 {
            // a new tail starts over
            buf.clear();
        }
        if h.ts != buf.len() as u64 || h.a > SNAPSHOT_BYTES_MAX || h.ts > h.a {
            return Err(WireError::Control("a snapshot chunk out of order or too large".into()).into());
        }
        self.conns.insert(peer, Conn::Upstream);
        let take = ((h.a - h.ts) as usize).min(payload.len());
        buf.extend_from_slice(&payload[..take]);
        if h.sub != 1 {
            return Ok(());
        }
        if buf.len() as u64 != h.a {
            return Err(WireError::Control("a snapshot's last chunk before its end".into()).into());
        }
        let bytes = self.rebuild.take().expect("looked at");
        let bad = |e: String| ShardError::from(WireError::Control(format!("a snapshot: {e}")));
        let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("cut short".into()))?.try_into().expect("8"));
        let end = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= bytes.len());
        let end = end.ok_or_else(|| bad("cut short".into()))?;
        self.core.restore_live(&bytes[8..end]).map_err(bad)?;
        let applied: Vec<(u32, u64)> = serde_json::from_slice(&bytes[end..]).map_err(|e| bad(e.to_string()))?;
        self.applied = applied.into_iter().collect();
        self.synced = true;
        self.log.push(format!("{}: rebuilt from its chain's tail ({} bytes)", self.describe(), bytes.len()));
        Ok(())
    }

    pub fn core(&self) -> &ShardCore {
        &self.core
    }

    pub fn core_mut(&mut self) -> &mut ShardCore {
        &mut self.core
    }

    pub fn owner(&self) -> Owner {
        self.core.owner()
    }

    pub fn stats(&self) -> ChainStats {
        self.stats
    }

    /// Runs `f` on the shard with its frames routed (`Routed`): to virtual
    /// peers' current connections, into `captured` for `capture`'s origin.
    fn routed<R>(
        &mut self,
        tx: &mut dyn FrameSink,
        capture: Option<u32>,
        f: impl FnOnce(&mut ShardCore, &mut dyn FrameSink) -> R,
    ) -> R {
        let mut sink =
            Routed { inner: tx, clients: &self.clients, capture, captured: &mut self.captured, void: &mut self.void };
        f(&mut self.core, &mut sink)
    }

    /// Lines for the server to log (promotions, relinks).
    pub fn drain_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn replicated(&self) -> bool {
        self.replicated
    }

    fn live(&self) -> impl Iterator<Item = u32> + '_ {
        self.chain.iter().copied().filter(|s| !self.dead.contains(s))
    }

    /// The server holding the head of this chain now.
    pub fn head(&self) -> Option<u32> {
        self.live().next()
    }

    pub fn is_head(&self) -> bool {
        self.head() == Some(self.me)
    }

    fn successor(&self) -> Option<u32> {
        let at = self.chain.iter().position(|&s| s == self.me)?;
        // past the last live member: a rebuilt copy catching up
        self.chain[at + 1..].iter().copied().find(|s| !self.dead.contains(s)).or(self.syncing.map(|(s, _)| s))
    }

    /// The server this copy must link to and has no link to yet: the server
    /// thread connects to that server's copy of this owner and calls
    /// [`ChainCore::linked`].
    pub fn link_wanted(&self) -> Option<u32> {
        if self.down.peer.is_some() {
            return None;
        }
        self.down.server
    }

    /// Bytes forwarded and not yet acknowledged (what a new downstream gets again).
    pub fn log_bytes(&self) -> usize {
        self.down.log_bytes
    }

    /// The link to `server`'s copy is open: everything not yet acknowledged
    /// goes down it again, in order.
    pub fn linked(&mut self, peer: PeerId, server: u32, tx: &mut dyn FrameSink) -> Result<(), TxError> {
        if self.down.server != Some(server) {
            // the view moved on while the server thread connected
            return Err(TxError::Closed(peer));
        }
        self.down.peer = Some(peer);
        for e in &self.down.log {
            tx.frame(peer, e.frame.len())?.copy_from_slice(&e.frame);
            self.stats.replayed += 1;
        }
        if !self.down.log.is_empty() {
            self.log.push(format!(
                "{}: linked to server {server}; sent it the {} frames not acknowledged yet",
                self.describe(),
                self.down.log.len()
            ));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let o = self.owner();
        format!("server {} copy of shard ({}, {})", self.me, o.server, o.shard)
    }

    /// The manager's view changed (servers or workers gone, a copy placed or
    /// joined). Returns connections to close (a link to a copy that is gone).
    pub fn set_view(&mut self, view: &crate::control::ClusterView, tx: &mut dyn FrameSink) -> Vec<PeerId> {
        if !self.replicated() {
            return Vec::new();
        }
        let was_head = self.is_head();
        let owner = self.owner();
        self.chain = view.chain(owner);
        self.dead = view.dead_servers.iter().copied().collect();
        self.joining = view.joining(owner).map(|p| (p.server, p.id)).filter(|&(s, _)| s != self.me);
        self.syncing = view.syncing(owner).map(|p| (p.server, p.id)).filter(|&(s, _)| s != self.me);
        if let Some(id) = self.placement {
            if !view.placed.iter().any(|p| p.id == id && p.owner == owner && p.server == self.me) {
                self.retired = true;
            }
        }
        let mut close = Vec::new();
        let dead_workers: BTreeSet<u32> = view.dead_workers.iter().copied().collect();
        for &w in dead_workers.difference(&self.dead_workers.clone()) {
            self.routed(tx, None, |core, sink| core.worker_lost(w, sink));
        }
        self.dead_workers = dead_workers;
        let next = self.successor();
        if next != self.down.server {
            self.catching_up = None;
            if let Some(p) = self.down.peer.take() {
                close.push(p);
            }
            self.down.server = next;
            if let Some(sh) = self.shadow.take_if(|sh| Some((sh.server, sh.placement)) == self.syncing) {
                // the rebuilt copy has its snapshot: its link carries on as the
                // downstream, and this tail waits for it from now on; it is a
                // member once it acknowledged what was answered before
                for f in &sh.out {
                    let _ = tx.frame_gather(sh.peer, &[f]);
                }
                self.down.peer = Some(sh.peer);
                self.down.log_bytes = sh.unacked.iter().map(|e| e.frame.len()).sum();
                let before = sh.unacked.len();
                self.down.log = sh.unacked;
                if before == 0 {
                    self.caught_up = Some(sh.placement);
                } else {
                    self.catching_up = Some((sh.placement, before));
                }
                self.log.push(format!(
                    "{}: waits for the rebuilt copy on server {} from now on ({before} earlier frames to come)",
                    self.describe(),
                    sh.server
                ));
            } else if next.is_none() {
                // the tail now: what it holds is on every live copy
                let n = self.down.log.len();
                while let Some(e) = self.down.log.pop_front() {
                    self.down.log_bytes -= e.frame.len();
                    self.release(e.release, tx);
                }
                self.log.push(format!(
                    "{}: the copies after it are gone; it is the tail now ({n} waiting answers released)",
                    self.describe()
                ));
            }
        }
        if let Some(sh) = self.shadow.take_if(|sh| self.joining != Some((sh.server, sh.placement))) {
            // the copy being rebuilt is gone (or another tail rebuilds it)
            close.push(sh.peer);
        }
        if self.is_head() && !was_head {
            self.log.push(format!("{}: promoted to head (the copies before it are gone)", self.describe()));
        }
        close
    }

    /// A connection ended.
    pub fn on_closed(&mut self, peer: PeerId) {
        if !self.replicated() {
            self.core.on_closed(peer);
            return;
        }
        if self.down.peer == Some(peer) {
            self.down.peer = None;
        }
        if let Some(sh) = self.shadow.take_if(|sh| sh.peer == peer) {
            self.log.push(format!(
                "{}: the link to the copy being rebuilt on server {} broke; rebuild abandoned",
                self.describe(),
                sh.server
            ));
        }
        if let Some(Conn::Client { origin, .. }) = self.conns.remove(&peer) {
            if self.clients.get(&origin) == Some(&peer) {
                self.clients.remove(&origin);
                self.core.forget_connection(virtual_peer(origin));
            }
        }
    }

    /// Handles one whole frame from `peer`; `Err`: drop `peer` with that reason.
    pub fn handle(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if !self.replicated() {
            return self.core.handle(peer, frame, tx);
        }
        // the kind byte of the prefix: every handler below decodes what it needs
        let kind = frame.get(5).and_then(|&k| Kind::from_u8(k));
        match kind {
            Some(Kind::Bind) => self.on_bind(peer, frame, tx),
            Some(Kind::Forward) => self.on_forward(peer, frame, tx),
            Some(Kind::Ack) if Some(peer) == self.down.peer => self.on_down_ack(frame, tx),
            Some(Kind::Ack) if self.shadow.as_ref().is_some_and(|s| s.peer == peer) => self.on_shadow_ack(frame),
            Some(Kind::Snapshot) => self.on_snapshot(peer, frame),
            _ => self.on_client(peer, frame, tx),
        }
    }

    fn on_bind(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        let h = data_header(frame)?;
        if !self.is_head() {
            return Err(WireError::Control(format!(
                "{} is not the head of its chain (server {:?} is)",
                self.describe(),
                self.head()
            ))
            .into());
        }
        let origin = u32::try_from(h.a).map_err(|_| WireError::Overflow("origin"))?;
        if origin >= FRESH_ORIGIN_BASE {
            return Err(WireError::Control(format!("origin {origin} is reserved")).into());
        }
        if let Some(old) = self.clients.insert(origin, peer) {
            if old != peer {
                // the worker moved to a new connection: the old one answers no more
                self.conns.remove(&old);
                self.core.forget_connection(virtual_peer(origin));
            }
        }
        self.conns.insert(peer, Conn::Client { origin, next_seq: h.b });
        let ack = DataHeader { kind: Kind::Ack, dense: false, table: 0, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
        tx.frame(peer, ack.frame_len().expect("small"))?.copy_from_slice(&header_frame(ack));
        Ok(())
    }

    /// A counted frame `seq` of `origin` arrived (from a client or upstream):
    /// `Ok(true)` to apply it, `Ok(false)` if it was applied already.
    fn admit(&mut self, origin: u32, seq: u64) -> Result<bool, ShardError> {
        let n = self.applied.get(&origin).copied().unwrap_or(0);
        if seq > n {
            return Err(WireError::Control(format!(
                "{}: frame {seq} of origin {origin} arrived, but only {n} came before it (replication gap)",
                self.describe()
            ))
            .into());
        }
        if seq < n {
            self.stats.skipped += 1;
        }
        Ok(seq == n)
    }

    /// Attaches `r` to the log entry of (origin, seq) if it is still waiting
    /// for the downstream, else carries it out now.
    fn release_after(&mut self, origin: u32, seq: u64, r: Release, tx: &mut dyn FrameSink) {
        if let Some(e) = self.down.log.iter_mut().find(|e| e.origin == origin && e.seq == seq) {
            e.release.push(r);
        } else {
            self.release(vec![r], tx);
        }
    }

    fn release(&mut self, rs: Vec<Release>, tx: &mut dyn FrameSink) {
        for r in rs {
            match r {
                Release::Send(peer, f) => {
                    // a connection that went meanwhile: its worker asks again elsewhere
                    if let Ok(buf) = tx.frame(peer, f.len()) {
                        buf.copy_from_slice(&f);
                    }
                }
                Release::PullPart { origin, frame } => {
                    // the request was checked when it came; a refusal is an error frame
                    let _ = self.routed(tx, None, |core, sink| core.handle(virtual_peer(origin), &frame, sink));
                }
            }
        }
    }

    /// Puts a frame in the log and sends it down the link (there is a downstream).
    fn forward(&mut self, origin: u32, seq: u64, inner: &[u8], release: Vec<Release>, tx: &mut dyn FrameSink) {
        let frame = forward_frame(origin, seq, inner);
        if let Some(p) = self.down.peer {
            // from the log's copy (TCP sends straight from it when it can)
            if tx.frame_gather(p, &[&frame]).is_err() {
                // the link is going: the frame goes again on the next one
                self.down.peer = None;
            }
        }
        self.stats.forwarded += 1;
        self.down.log_bytes += frame.len();
        self.down.log.push_back(Entry { origin, seq, frame, release });
    }

    /// A client's frame: served here if this copy is the head; counted ones
    /// are numbered, applied, forwarded, and answered once acknowledged.
    fn on_client(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if !self.is_head() {
            return Err(WireError::Control(format!(
                "{} is not the head of its chain (server {:?} is): bind there",
                self.describe(),
                self.head()
            ))
            .into());
        }
        let conn = match self.conns.get(&peer) {
            Some(c) => *c,
            None => {
                // a client that did not bind (a tool, a benchmark): an origin of its own
                let origin = FRESH_ORIGIN_BASE | (self.me & 0x7ff) << 20 | (self.next_fresh & 0xf_ffff);
                self.next_fresh += 1;
                let c = Conn::Client { origin, next_seq: 0 };
                self.conns.insert(peer, c);
                self.clients.insert(origin, peer);
                c
            }
        };
        let Conn::Client { origin, next_seq } = conn else {
            return Err(WireError::Control("a copy upstream sent a client frame".into()).into());
        };
        let plain;
        let frame = if crate::filter::is_coded(frame) {
            plain = self.core.decode_coded(virtual_peer(origin), frame)?;
            &plain[..]
        } else {
            frame
        };
        let kind = match wire::decode(frame, frame.len())? {
            Frame::Data { h, .. } => h.kind,
            _ => return Err(WireError::Unexpected(Kind::Control).into()),
        };
        let vpeer = virtual_peer(origin);
        if !is_counted(kind) {
            return self.routed(tx, None, |core, sink| core.handle(vpeer, frame, sink));
        }
        if self.down.log_bytes + frame.len() > CHAIN_LOG_BYTES_MAX {
            // not counted: the client sends it again when it binds anew
            return Err(WireError::Control(format!(
                "{}: {} bytes wait for the next copy's acknowledgement already; try again",
                self.describe(),
                self.down.log_bytes
            ))
            .into());
        }
        let seq = next_seq;
        self.conns.insert(peer, Conn::Client { origin, next_seq: seq + 1 });
        if !self.admit(origin, seq)? {
            // sent again after a failover: answer it again, without applying it
            let r = match kind {
                Kind::PushPull => Release::PullPart { origin, frame: pull_of(frame)? },
                _ => {
                    let h = data_header(frame)?;
                    let ack = DataHeader {
                        kind: Kind::Ack,
                        dense: h.dense,
                        table: h.table,
                        sub: h.sub,
                        ts: h.ts,
                        a: h.a,
                        b: 0,
                    };
                    Release::Send(peer, header_frame(ack))
                }
            };
            self.release_after(origin, seq, r, tx);
            return Ok(());
        }
        let has_down = self.down.server.is_some();
        // what this copy applies and the next ones get: a push-pull's push
        // half when the pull must wait for them (`Release::PullPart`)
        let push_half = (kind == Kind::PushPull && has_down).then(|| push_of(frame));
        let applied_frame: &[u8] = push_half.as_deref().unwrap_or(frame);
        self.captured.clear();
        self.routed(tx, Some(origin), |core, sink| core.handle(vpeer, applied_frame, sink))?;
        *self.applied.entry(origin).or_default() += 1;
        let release: Vec<Release> = if kind == Kind::PushPull && has_down {
            // the push half's ack is not the client's answer: the pull half is, once replicated
            self.captured.clear();
            vec![Release::PullPart { origin, frame: pull_of(frame)? }]
        } else {
            self.captured.drain(..).map(|f| Release::Send(peer, f)).collect()
        };
        if has_down {
            self.forward(origin, seq, applied_frame, release, tx);
        } else {
            self.release(release, tx);
            if self.shadow.is_some() {
                // what the next copies apply: a push-pull's push half
                let push = if kind == Kind::PushPull { push_of(frame) } else { frame.to_vec() };
                self.shadow_send(origin, seq, &push);
            }
        }
        Ok(())
    }

    /// A frame the copy before this one forwarded.
    fn on_forward(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if let Some(Conn::Client { .. }) = self.conns.get(&peer) {
            return Err(WireError::Control("a client sent a forwarded frame".into()).into());
        }
        if self.rebuild.is_some() {
            return Err(WireError::Control("a forwarded frame before the snapshot".into()).into());
        }
        self.conns.insert(peer, Conn::Upstream);
        let (h, inner) = match wire::decode(frame, frame.len())? {
            Frame::Data { h, vals, .. } if h.kind == Kind::Forward => (h, vals),
            _ => return Err(WireError::Unexpected(Kind::Forward).into()),
        };
        let origin = u32::try_from(h.a).map_err(|_| WireError::Overflow("origin"))?;
        let seq = h.ts;
        let ack = header_frame(DataHeader { kind: Kind::Ack, dense: false, table: 0, sub: 0, ts: seq, a: h.a, b: 0 });
        match wire::decode(inner, inner.len())? {
            Frame::Data { h, .. } if matches!(h.kind, Kind::Push | Kind::Clock) => {}
            _ => return Err(WireError::Control("a forwarded frame must be a push or a clock".into()).into()),
        }
        if !self.admit(origin, seq)? {
            self.release_after(origin, seq, Release::Send(peer, ack), tx);
            return Ok(());
        }
        self.captured.clear();
        self.routed(tx, Some(origin), |core, sink| core.handle(virtual_peer(origin), inner, sink))?;
        // the head answers the client; what this copy would have said goes nowhere
        self.captured.clear();
        *self.applied.entry(origin).or_default() += 1;
        if self.down.server.is_some() {
            self.forward(origin, seq, inner, vec![Release::Send(peer, ack)], tx);
        } else {
            tx.frame(peer, ack.len())?.copy_from_slice(&ack);
            self.shadow_send(origin, seq, inner);
        }
        Ok(())
    }

    /// The downstream applied the oldest frame of the log.
    fn on_down_ack(&mut self, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        let h = data_header(frame)?;
        let Some(e) = self.down.log.front() else {
            return Err(WireError::Control("an acknowledgement for nothing forwarded".into()).into());
        };
        if (e.origin as u64, e.seq) != (h.a, h.ts) {
            return Err(WireError::Control(format!(
                "the next copy acknowledged frame {} of origin {}, expected {} of {}",
                h.ts, h.a, e.seq, e.origin
            ))
            .into());
        }
        let e = self.down.log.pop_front().expect("looked at");
        self.down.log_bytes -= e.frame.len();
        self.release(e.release, tx);
        if let Some((id, left)) = self.catching_up.as_mut() {
            *left -= 1;
            if *left == 0 {
                self.caught_up = Some(*id);
                self.catching_up = None;
            }
        }
        Ok(())
    }

    /// See [`ShardCore::checkpoint_due`].
    pub fn checkpoint_due(&self) -> Option<u64> {
        self.core.checkpoint_due()
    }

    /// See [`ShardCore::checkpoint_written`]; the answer goes to the client that asked.
    pub fn checkpoint_written(&mut self, tx: &mut dyn FrameSink, r: Result<(), String>) {
        self.routed(tx, None, |core, sink| core.checkpoint_written(sink, r));
    }

    /// Peers whose parked pull, once released, could not be answered: drop them.
    pub fn take_failed(&mut self) -> Vec<(PeerId, ShardError)> {
        let failed = self.core.take_failed();
        if !self.replicated() {
            return failed;
        }
        failed.into_iter().filter_map(|(p, e)| Some((*self.clients.get(&origin_of(p)?)?, e))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClusterView, JobSpec, ServerInfo};
    use crate::kernels::Kernels;
    use crate::keys::{KeyRange, TableId, TableSpec};
    use crate::limits::WireLimits;
    use crate::rules::{RuleRegistry, RuleSpec};
    use crate::sim::{SimNet, SimSink};
    use crate::worker::{Keys, WorkerCore};
    use std::collections::BTreeMap;

    const SERVERS: u32 = 3;
    const SHARDS: u32 = 2;
    const WORKERS: usize = 3;

    fn view(copies: u32) -> ClusterView {
        ClusterView::new(
            JobSpec {
                tables: vec![
                    TableSpec::sparse(0, "sparse1", KeyRange::FULL, 1, RuleSpec::Sum),
                    TableSpec::dense(1, "dense4", KeyRange::new(0, 3000), 4, RuleSpec::Sum),
                    // read by ranges under a bound: stamped answers, reads parked for clocks
                    TableSpec::dense(2, "bounded", KeyRange::new(0, 2000), 1, RuleSpec::Sum)
                        .with_consistency(crate::clock::Consistency::Bounded { staleness: 2 }),
                ],
                app: "sim".into(),
                params: serde_json::Value::Null,
                limits: WireLimits { chunk_bytes: 4096, frame_bytes_max: 16384, tx_queue_bytes_max: 1 << 20 },
                partitions: 256,
                copies,
            },
            (0..SERVERS).map(|r| ServerInfo::new(r, "sim", vec![0; SHARDS as usize], 0)).collect(),
            WORKERS as u32,
        )
    }

    /// Workers' endpoints start here; copies (which rebuilds add) below.
    const WORKER_EP: usize = 1000;

    /// A whole replicated cluster in one thread: every copy of every shard,
    /// the workers, the manager's view, and the connections between them
    /// (numbered endpoints: copies from 0, workers from `WORKER_EP`; a
    /// connection's generation moves on when it closes, so its frames in
    /// flight and its stale ids go with it).
    struct Cluster {
        copies: Vec<ChainCore>,
        /// (server, owner) of each copy
        at: Vec<(u32, Owner)>,
        workers: Vec<WorkerCore>,
        net: SimNet,
        sink: SimSink,
        gen: HashMap<(usize, usize), u32>,
        /// the manager's view: deaths, placed copies
        view: ClusterView,
        /// copies that have heard of the newest view
        told: Vec<bool>,
        /// per copy: the copy endpoint its link goes to
        link: Vec<Option<usize>>,
    }

    impl Cluster {
        fn new(copies: u32, seed: u64) -> Self {
            let v = view(copies);
            let mut c = Cluster {
                copies: Vec::new(),
                at: Vec::new(),
                workers: Vec::new(),
                net: SimNet::new(seed),
                sink: SimSink::default(),
                gen: HashMap::new(),
                view: v.clone(),
                told: Vec::new(),
                link: Vec::new(),
            };
            for server in 0..SERVERS {
                for shard in 0..SHARDS {
                    for i in 0..copies {
                        let owner = Owner { server: (server + SERVERS - i) % SERVERS, shard };
                        let core =
                            ShardCore::new(&v, owner, &RuleRegistry::default(), Kernels::best()).expect("a shard");
                        c.add(ChainCore::new(core, server, chain_of(owner, SERVERS, copies)), server, owner);
                    }
                }
            }
            let ring = v.ring().expect("a ring");
            let peers: Vec<Vec<PeerId>> = (0..SERVERS)
                .map(|s| {
                    (0..SHARDS)
                        .map(|h| PeerId { index: c.copy_ep(s, Owner { server: s, shard: h }) as u32, generation: 0 })
                        .collect()
                })
                .collect();
            for w in 0..WORKERS {
                let mut wc = WorkerCore::new(&v.job.tables, ring.clone(), peers.clone(), v.job.limits);
                wc.set_rank(w as u32);
                wc.enable_failover(&mut c.sink, w as u32).expect("bind");
                c.workers.push(wc);
                c.send_from(WORKER_EP + w);
            }
            c
        }

        fn add(&mut self, copy: ChainCore, server: u32, owner: Owner) {
            self.copies.push(copy);
            self.at.push((server, owner));
            self.told.push(true);
            self.link.push(None);
        }

        /// The copy of `owner` on `server` that is not retired (the newest).
        fn copy_ep(&self, server: u32, owner: Owner) -> usize {
            (0..self.at.len())
                .rev()
                .find(|&e| self.at[e] == (server, owner) && !self.copies[e].retired())
                .expect("a copy")
        }

        fn server_of(&self, ep: usize) -> Option<u32> {
            self.at.get(ep).map(|a| a.0)
        }

        fn gen(&self, a: usize, b: usize) -> u32 {
            self.gen.get(&(a.min(b), a.max(b))).copied().unwrap_or(0)
        }

        fn bump(&mut self, a: usize, b: usize) -> u32 {
            let g = self.gen(a, b) + 1;
            self.gen.insert((a.min(b), a.max(b)), g);
            g
        }

        fn alive(&self, ep: usize) -> bool {
            ep >= WORKER_EP
                || (self.server_of(ep).is_some_and(|s| !self.view.dead_servers.contains(&s))
                    && !self.copies[ep].retired())
        }

        /// Sends what `from` wrote into the sink (frames to a closed connection are dropped).
        fn send_from(&mut self, from: usize) {
            for (p, f) in std::mem::take(&mut self.sink.frames) {
                let to = p.index as usize;
                if p.generation == self.gen(from, to) && self.alive(to) {
                    self.net.send(from, to, f);
                }
            }
        }

        /// A new view: every copy hears of it, each at its own moment.
        fn publish(&mut self) {
            self.view.epoch += 1;
            self.told.iter_mut().for_each(|t| *t = false);
        }

        /// Closes the connection between two endpoints: frames in flight are
        /// lost, and each live side hears of it.
        fn close(&mut self, a: usize, b: usize) {
            let g = self.gen(a, b);
            self.bump(a, b);
            self.net.clear(a, b);
            self.net.clear(b, a);
            for (me, other) in [(a, b), (b, a)] {
                if !self.alive(me) {
                    continue;
                }
                let peer = PeerId { index: other as u32, generation: g };
                if me < WORKER_EP {
                    self.copies[me].on_closed(peer);
                    if self.link[me] == Some(other) {
                        self.link[me] = None;
                    }
                } else {
                    self.workers[me - WORKER_EP].on_closed(peer, "closed");
                }
            }
        }

        fn kill(&mut self, server: u32) {
            let eps: Vec<usize> = (0..self.copies.len()).filter(|&e| self.at[e].0 == server).collect();
            let others: Vec<usize> = (0..self.copies.len()).chain((0..WORKERS).map(|w| WORKER_EP + w)).collect();
            for &e in &eps {
                for &other in &others {
                    if other != e && self.alive(other) {
                        self.close(e, other);
                    }
                }
            }
            self.view.dead_servers.push(server);
            // as the manager does: unfinished rebuilds start over
            self.view.placed.retain(|p| p.server != server && p.ready);
            self.publish();
        }

        /// The manager's answer to a loss: a copy placed for every short chain,
        /// started empty on its server (it listens at once).
        fn rebuild(&mut self) {
            self.view.place_copies();
            let new: Vec<(usize, crate::control::PlacedCopy)> =
                self.view.placed.iter().copied().enumerate().filter(|(_, p)| p.port == 0).collect();
            for (i, p) in new {
                let core = ShardCore::new(&self.view, p.owner, &RuleRegistry::default(), Kernels::best()).unwrap();
                self.add(ChainCore::new_joining(core, p.server, p.id), p.server, p.owner);
                self.view.placed[i].port = 1;
            }
            self.publish();
        }

        fn rebuilt(&self) -> bool {
            self.view.placed.iter().all(|p| p.ready) && (0..self.copies.len()).all(|c| self.told[c] || !self.alive(c))
        }

        /// One step of the world: a copy hears of the newest view, connects a
        /// link it wants, a worker binds to a new head, or a frame is delivered.
        fn step(&mut self) -> bool {
            let n = self.copies.len();
            let roll = self.net.rng().below(8);
            if roll == 0 {
                if let Some(c) = (0..n).find(|&c| !self.told[c] && self.alive(c)) {
                    self.told[c] = true;
                    let close = self.copies[c].set_view(&self.view, &mut self.sink);
                    self.send_from(c);
                    for p in close {
                        self.close(c, p.index as usize);
                    }
                    return true;
                }
            }
            if roll == 1 {
                for c in (0..n).filter(|&c| self.alive(c)) {
                    let o = self.at[c].1;
                    if let Some(server) = self.copies[c].link_wanted() {
                        let to = self.copy_ep(server, o);
                        if !self.alive(to) {
                            continue; // connection refused: try again later
                        }
                        let g = self.bump(c, to);
                        self.link[c] = Some(to);
                        self.copies[c]
                            .linked(PeerId { index: to as u32, generation: g }, server, &mut self.sink)
                            .unwrap();
                        self.send_from(c);
                        return true;
                    }
                    if let Some(server) = self.copies[c].shadow_wanted() {
                        let to = self.copy_ep(server, o);
                        if !self.alive(to) {
                            continue;
                        }
                        let g = self.bump(c, to);
                        self.copies[c].shadow_linked(PeerId { index: to as u32, generation: g }, server);
                        return true;
                    }
                }
            }
            if roll == 3 {
                let pumping: Vec<usize> =
                    (0..n).filter(|&c| self.alive(c) && self.copies[c].shadow_peer().is_some()).collect();
                for c in pumping {
                    // a small budget: the snapshot goes over several steps, frames applied meanwhile after it
                    self.copies[c].pump_shadow(&mut self.sink, 8192);
                    self.send_from(c);
                }
            }
            if roll == 2 {
                for w in 0..self.workers.len() {
                    let Some(owner) = self.workers[w].lost_owners().into_iter().next() else { continue };
                    // the worker's view: the head the manager names (it may not know it is one yet)
                    let head = self.view.head(owner).expect("a live copy");
                    let to = self.copy_ep(head, owner);
                    let g = self.bump(WORKER_EP + w, to);
                    self.workers[w].rebind(owner, PeerId { index: to as u32, generation: g }, &mut self.sink).unwrap();
                    self.send_from(WORKER_EP + w);
                    return true;
                }
            }
            let Some((from, to, frame)) = self.net.step() else {
                return (0..n).any(|c| self.alive(c) && (!self.told[c] || self.copies[c].shadow_peer().is_some()));
            };
            let peer = PeerId { index: from as u32, generation: self.gen(from, to) };
            if to < WORKER_EP {
                let r = self.copies[to].handle(peer, &frame, &mut self.sink);
                self.send_from(to);
                if r.is_err() {
                    // refused (not the head yet): the connection is dropped
                    self.close(from, to);
                }
                if self.copies[to].take_synced() {
                    // the rebuilt copy has its snapshot: the tail waits for it from now on
                    let (server, owner) = self.at[to];
                    let id = self.copies[to].placement().expect("a placed copy");
                    if let Some(p) =
                        self.view.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.server == server)
                    {
                        p.synced = true;
                        self.publish();
                    }
                }
                if let Some(id) = self.copies[to].take_caught_up() {
                    // it acknowledged what the tail answered before: a member
                    if let Some(p) = self.view.placed.iter_mut().find(|p| p.id == id && p.synced) {
                        p.ready = true;
                        self.publish();
                    }
                }
            } else {
                let w = to - WORKER_EP;
                self.workers[w].on_frame(peer, &frame).unwrap();
                self.workers[w].pump(&mut self.sink);
                self.send_from(to);
            }
            true
        }

        fn settle(&mut self) {
            let mut steps = 0;
            while self.step() || self.workers.iter().any(|w| !w.lost_owners().is_empty()) {
                steps += 1;
                assert!(steps < 2_000_000, "no progress");
            }
        }
    }

    /// One seed: every worker pushes (key lists to a sparse and a dense table,
    /// some as push-pulls, and clocks); at a random moment `kills` servers die
    /// (their frames in flight lost, their connections closed), workers bind to
    /// the new heads and send again what had no answer. Every operation
    /// succeeds, and every value equals the sum of the pushes: nothing lost,
    /// nothing merged twice.
    fn failover_run(seed: u64, copies: u32, kills: &[u32]) -> ChainStats {
        failover_run_with(seed, copies, kills, false)
    }

    /// With `rebuild`, each kill is answered as the manager does (a copy
    /// placed for every short chain, bulk-copied from its tail while the
    /// workers push) and the next kill comes only once every rebuilt copy
    /// joined its chain: with 2 copies, every server but one may die in turn.
    fn failover_run_with(seed: u64, copies: u32, kills: &[u32], rebuild: bool) -> ChainStats {
        let mut c = Cluster::new(copies, seed);
        let n = WORKER_EP;
        let mut rng = crate::rng::SplitMix64::new(seed ^ 0xC4A1);
        let mut want: BTreeMap<(u32, u64), f64> = BTreeMap::new();
        let mut current: Vec<Option<u64>> = vec![None; WORKERS];
        let mut left = [10usize; WORKERS];
        let kill_at = 50 + rng.below(600);
        let mut steps = 0u64;
        let mut killed = 0;
        loop {
            for w in 0..WORKERS {
                if current[w].is_some() || left[w] == 0 {
                    continue;
                }
                if rng.below(5) == 0 {
                    // a range push and a range read of the bounded table, then a clock
                    let (first, count) = (rng.below(1000), 1 + rng.below(900));
                    let vals: Vec<f32> = (0..count).map(|_| 1.0 + rng.below(3) as f32).collect();
                    for (i, v) in vals.iter().enumerate() {
                        *want.entry((2, (first + i as u64) * 4)).or_default() += *v as f64;
                    }
                    let wc = &mut c.workers[w];
                    wc.issue(&mut c.sink, Kind::Push, TableId(2), Keys::Range { first, count }, Some(&vals), None)
                        .unwrap();
                    let ts = wc
                        .issue(
                            &mut c.sink,
                            Kind::Pull,
                            TableId(2),
                            Keys::Range { first, count },
                            None,
                            Some(Vec::new()),
                        )
                        .unwrap();
                    wc.clock(&mut c.sink).unwrap();
                    c.send_from(n + w);
                    current[w] = Some(ts);
                    continue;
                }
                let table = rng.below(2) as u32;
                let dim = if table == 0 { 1 } else { 4 };
                let mut keys: Vec<u64> = (0..1 + rng.below(300))
                    .map(|_| if table == 0 { rng.next_u64() % (1 << 40) } else { rng.below(3000) })
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                let vals: Vec<f32> = (0..keys.len() * dim).map(|_| 1.0 + rng.below(5) as f32).collect();
                for (i, k) in keys.iter().enumerate() {
                    for j in 0..dim {
                        *want.entry((table, *k * 4 + j as u64)).or_default() += vals[i * dim + j] as f64;
                    }
                }
                let kind = if rng.below(4) == 0 { Kind::PushPull } else { Kind::Push };
                let out = (kind == Kind::PushPull).then(Vec::new);
                let wc = &mut c.workers[w];
                let ts = wc.issue(&mut c.sink, kind, TableId(table), Keys::List(&keys), Some(&vals), out).unwrap();
                // every operation is a clock of its own (a bounded read waits for the slowest)
                wc.clock(&mut c.sink).unwrap();
                c.send_from(n + w);
                current[w] = Some(ts);
            }
            let due = if rebuild { c.rebuilt() && steps >= kill_at } else { steps >= kill_at + killed as u64 * 300 };
            if killed < kills.len() && due {
                c.kill(kills[killed]);
                killed += 1;
                if rebuild {
                    c.rebuild();
                }
            }
            let moved = c.step();
            steps += 1;
            assert!(steps < 3_000_000, "seed {seed}: no progress");
            for w in 0..WORKERS {
                if let Some(ts) = current[w] {
                    if c.workers[w].is_done(ts).unwrap() {
                        c.workers[w].finish(ts).unwrap_or_else(|e| panic!("seed {seed}: worker {w}: {e}"));
                        current[w] = None;
                        left[w] -= 1;
                    }
                }
            }
            let lost = c.workers.iter().any(|w| !w.lost_owners().is_empty());
            if !moved && !lost && current.iter().all(|o| o.is_none()) && left.iter().all(|&l| l == 0) {
                break;
            }
        }
        while killed < kills.len() {
            c.settle();
            c.kill(kills[killed]);
            killed += 1;
            if rebuild {
                c.rebuild();
            }
        }
        c.settle();
        if rebuild {
            assert!(c.rebuilt(), "seed {seed}: a rebuilt copy never joined its chain");
        }
        // every worker at the same clock, so a bounded read waits for nobody
        let most = c.workers.iter().map(|w| w.clocks()).max().unwrap_or(0);
        for w in 0..WORKERS {
            while c.workers[w].clocks() < most {
                c.workers[w].clock(&mut c.sink).unwrap();
            }
            c.send_from(n + w);
        }
        c.settle();
        // read everything back from the heads through worker 0 (exact reads: no cache)
        c.workers[0].set_cache(TableId(2), false).unwrap();
        for table in 0..3u32 {
            let dim = if table == 1 { 4 } else { 1 };
            let keys: Vec<u64> = want.keys().filter(|(t, k)| *t == table && k % 4 == 0).map(|(_, k)| k / 4).collect();
            let ts = c.workers[0]
                .issue(&mut c.sink, Kind::Pull, TableId(table), Keys::List(&keys), None, Some(Vec::new()))
                .unwrap();
            c.send_from(n);
            c.settle();
            assert!(c.workers[0].is_done(ts).unwrap(), "seed {seed}: the read of table {table} was never answered");
            let got = c.workers[0].finish(ts).unwrap().unwrap();
            for (i, k) in keys.iter().enumerate() {
                for j in 0..dim {
                    let w = want[&(table, k * 4 + j as u64)];
                    assert_eq!(got[i * dim + j] as f64, w, "seed {seed}: table {table} key {k}[{j}] (kills {kills:?})");
                }
            }
        }
        // nothing is kept for failover past its answer (clocks and pushes
        // nobody waited on are answered too)
        for (w, wc) in c.workers.iter().enumerate() {
            assert_eq!(wc.unanswered(), 0, "seed {seed}: worker {w} keeps requests it has answers for");
        }
        // and every live copy of a chain, rebuilt ones too, holds the same tables
        for e in 0..c.copies.len() {
            let (server, owner) = c.at[e];
            if c.view.dead_servers.contains(&server) || c.copies[e].is_head() || !c.copies[e].is_member() {
                continue;
            }
            let head = c.copy_ep(c.copies[e].head().expect("a head"), owner);
            let image = |x: &ChainCore| crate::checkpoint::decode(&x.core().snapshot(0)).expect("a snapshot").1;
            assert!(
                image(&c.copies[e]) == image(&c.copies[head]),
                "seed {seed}: server {server}'s copy of {owner:?} differs from its head's"
            );
        }
        c.copies.iter().fold(ChainStats::default(), |a, x| {
            let s = x.stats();
            ChainStats {
                forwarded: a.forwarded + s.forwarded,
                skipped: a.skipped + s.skipped,
                replayed: a.replayed + s.replayed,
                snapshots: a.snapshots + s.snapshots,
                snapshot_bytes: a.snapshot_bytes + s.snapshot_bytes,
            }
        })
    }

    /// Sums the counters of many seeds, and asserts the failovers did what
    /// they are there for: frames were sent again, and some were skipped.
    fn seeds(n: u64, copies: u32, kills: impl Fn(u64) -> Vec<u32>) {
        let mut total = ChainStats::default();
        for seed in 0..n {
            let s = failover_run(seed, copies, &kills(seed));
            total.forwarded += s.forwarded;
            total.skipped += s.skipped;
            total.replayed += s.replayed;
        }
        assert!(total.forwarded > 0 && total.skipped > 0 && total.replayed > 0, "{total:?}");
    }

    #[test]
    fn two_copies_lose_no_acknowledged_push_when_any_server_dies() {
        seeds(sim_seeds(300), 2, |seed| vec![(seed % SERVERS as u64) as u32]);
    }

    #[test]
    fn three_copies_survive_two_deaths_heads_middles_and_tails() {
        seeds(sim_seeds(200), 3, |seed| {
            let first = (seed % SERVERS as u64) as u32;
            vec![first, (first + 1 + (seed / 3) as u32 % 2) % SERVERS]
        });
    }

    /// Rebuilds: with 2 copies on 3 servers, a server dies, its copies are
    /// rebuilt on the others from their chains' tails while the workers push,
    /// then a second server dies (which, without the rebuild, takes the last
    /// copy of some shard): every value is still exact, and every rebuilt
    /// copy equals its head.
    #[test]
    fn rebuilt_copies_let_a_chain_survive_a_second_death() {
        let mut snapshots = 0;
        for seed in 0..sim_seeds(150) {
            let first = (seed % SERVERS as u64) as u32;
            let s = failover_run_with(seed, 2, &[first, (first + 1) % SERVERS], true);
            snapshots += s.snapshots;
        }
        assert!(snapshots > 0);
    }

    #[test]
    fn without_failures_copies_replicate_and_answer_after_the_tail() {
        for copies in [2, 3] {
            let s = failover_run(7, copies, &[]);
            assert!(s.forwarded > 0 && s.skipped == 0, "{s:?}");
        }
    }

    /// Invariant 4 for the chain's own frames: random and truncated Bind,
    /// Forward and Ack frames (and random bytes) from a peer never panic a
    /// copy; they are refused or dropped, and a good client is served after.
    #[test]
    fn garbage_chain_frames_never_panic_a_copy() {
        let v = view(2);
        let owner = Owner { server: 0, shard: 0 };
        let core = ShardCore::new(&v, owner, &RuleRegistry::default(), Kernels::best()).unwrap();
        let mut head = ChainCore::new(core, 0, chain_of(owner, SERVERS, 2));
        let mut rng = crate::rng::SplitMix64::new(0xBAD);
        let mut sink = SimSink::default();
        for i in 0..20_000u32 {
            let kind = [Kind::Bind, Kind::Forward, Kind::Ack, Kind::Push, Kind::Clock][rng.below(5) as usize];
            let h = DataHeader {
                kind,
                dense: rng.below(2) == 0,
                table: rng.below(4) as u32,
                sub: rng.below(3) as u32,
                ts: rng.below(5),
                a: if rng.below(2) == 0 { rng.below(8) } else { rng.next_u64() },
                b: if rng.below(2) == 0 { rng.below(64) } else { rng.next_u64() },
            };
            let mut f = match h.frame_len() {
                Some(len) if len <= 1 << 16 => vec![0u8; len],
                _ => vec![0u8; 48],
            };
            let n = f.len().min(40);
            let head_bytes = h.encode(f.len().max(40));
            f[..n].copy_from_slice(&head_bytes[..n]);
            for b in f.iter_mut().skip(40) {
                *b = rng.below(256) as u8;
            }
            if rng.below(10) == 0 {
                let cut = rng.below(f.len() as u64) as usize;
                f.truncate(cut);
            }
            let peer = PeerId { index: i % 7, generation: 0 };
            if head.handle(peer, &f, &mut sink).is_err() {
                head.on_closed(peer);
            }
            sink.frames.clear();
        }
        // a good client still binds and gets its push acknowledged once the tail is linked
        let client = PeerId { index: 100, generation: 0 };
        head.handle(client, &bind_frame(0, 0), &mut sink).unwrap();
        assert!(sink.frames.iter().any(|(p, _)| *p == client), "the bind is answered");
    }

    fn sim_seeds(default: u64) -> u64 {
        std::env::var("PS_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
    }
}
