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

/// Counters a copy reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainStats {
    /// counted frames sent down the chain (replays included)
    pub forwarded: u64,
    /// frames a client or upstream sent again that this copy had applied
    pub skipped: u64,
    /// frames sent again to a new downstream
    pub replayed: u64,
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
}

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
        };
        c.down.server = c.successor();
        c
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

    /// Lines for the server to log (promotions, relinks).
    pub fn drain_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn replicated(&self) -> bool {
        self.chain.len() > 1
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
        self.chain[at + 1..].iter().copied().find(|s| !self.dead.contains(s))
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

    /// The manager's view changed: servers and workers in these sets are gone.
    /// Returns connections to close (a link to a copy that is gone).
    pub fn set_view(
        &mut self,
        dead: &BTreeSet<u32>,
        dead_workers: &BTreeSet<u32>,
        tx: &mut dyn FrameSink,
    ) -> Vec<PeerId> {
        let was_head = self.is_head();
        self.dead = dead.clone();
        let mut close = Vec::new();
        for &w in dead_workers.difference(&self.dead_workers.clone()) {
            let mut sink = Routed {
                inner: tx,
                clients: &self.clients,
                capture: None,
                captured: &mut self.captured,
                void: &mut self.void,
            };
            self.core.worker_lost(w, &mut sink);
        }
        self.dead_workers = dead_workers.clone();
        let next = self.successor();
        if next != self.down.server {
            if let Some(p) = self.down.peer.take() {
                close.push(p);
            }
            self.down.server = next;
            if next.is_none() {
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
                    let mut sink = Routed {
                        inner: tx,
                        clients: &self.clients,
                        capture: None,
                        captured: &mut self.captured,
                        void: &mut self.void,
                    };
                    // the request was checked when it came; a refusal is an error frame
                    let _ = self.core.handle(virtual_peer(origin), &frame, &mut sink);
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
            let mut sink = Routed {
                inner: tx,
                clients: &self.clients,
                capture: None,
                captured: &mut self.captured,
                void: &mut self.void,
            };
            return self.core.handle(vpeer, frame, &mut sink);
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
        {
            let mut sink = Routed {
                inner: tx,
                clients: &self.clients,
                capture: Some(origin),
                captured: &mut self.captured,
                void: &mut self.void,
            };
            self.core.handle(vpeer, applied_frame, &mut sink)?;
        }
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
        }
        Ok(())
    }

    /// A frame the copy before this one forwarded.
    fn on_forward(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if let Some(Conn::Client { .. }) = self.conns.get(&peer) {
            return Err(WireError::Control("a client sent a forwarded frame".into()).into());
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
        {
            let mut sink = Routed {
                inner: tx,
                clients: &self.clients,
                capture: Some(origin),
                captured: &mut self.captured,
                void: &mut self.void,
            };
            self.core.handle(virtual_peer(origin), inner, &mut sink)?;
        }
        // the head answers the client; what this copy would have said goes nowhere
        self.captured.clear();
        *self.applied.entry(origin).or_default() += 1;
        if self.down.server.is_some() {
            self.forward(origin, seq, inner, vec![Release::Send(peer, ack)], tx);
        } else {
            tx.frame(peer, ack.len())?.copy_from_slice(&ack);
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
        Ok(())
    }

    /// See [`ShardCore::checkpoint_due`].
    pub fn checkpoint_due(&self) -> Option<u64> {
        self.core.checkpoint_due()
    }

    /// See [`ShardCore::checkpoint_written`]; the answer goes to the client that asked.
    pub fn checkpoint_written(&mut self, tx: &mut dyn FrameSink, r: Result<(), String>) {
        let mut sink = Routed {
            inner: tx,
            clients: &self.clients,
            capture: None,
            captured: &mut self.captured,
            void: &mut self.void,
        };
        self.core.checkpoint_written(&mut sink, r);
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

    /// A whole replicated cluster in one thread: every copy of every shard,
    /// the workers, and the connections between them (numbered endpoints:
    /// copies first, then workers; a connection's generation moves on when it
    /// closes, so its frames in flight and its stale ids go with it).
    struct Cluster {
        copies: Vec<ChainCore>,
        /// (server, owner) of each copy
        at: Vec<(u32, Owner)>,
        workers: Vec<WorkerCore>,
        net: SimNet,
        sink: SimSink,
        gen: HashMap<(usize, usize), u32>,
        dead: BTreeSet<u32>,
        /// copies that have heard of the deaths so far
        told: Vec<bool>,
        /// per copy: the copy endpoint its link goes to
        link: Vec<Option<usize>>,
        copies_per_chain: u32,
    }

    impl Cluster {
        fn new(copies: u32, seed: u64) -> Self {
            let v = view(copies);
            let mut cs = Vec::new();
            let mut at = Vec::new();
            for server in 0..SERVERS {
                for shard in 0..SHARDS {
                    for i in 0..copies {
                        let owner = Owner { server: (server + SERVERS - i) % SERVERS, shard };
                        let core =
                            ShardCore::new(&v, owner, &RuleRegistry::default(), Kernels::best()).expect("a shard");
                        cs.push(ChainCore::new(core, server, chain_of(owner, SERVERS, copies)));
                        at.push((server, owner));
                    }
                }
            }
            let n = cs.len();
            let mut c = Cluster {
                copies: cs,
                at,
                workers: Vec::new(),
                net: SimNet::new(seed),
                sink: SimSink::default(),
                gen: HashMap::new(),
                dead: BTreeSet::new(),
                told: vec![true; n],
                link: vec![None; n],
                copies_per_chain: copies,
            };
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
                c.send_from(n + w);
            }
            c
        }

        fn copy_ep(&self, server: u32, owner: Owner) -> usize {
            self.at.iter().position(|&a| a == (server, owner)).expect("a copy")
        }

        fn server_of(&self, ep: usize) -> Option<u32> {
            self.at.get(ep).map(|a| a.0)
        }

        fn gen(&self, a: usize, b: usize) -> u32 {
            self.gen.get(&(a.min(b), a.max(b))).copied().unwrap_or(0)
        }

        fn alive(&self, ep: usize) -> bool {
            self.server_of(ep).is_none_or(|s| !self.dead.contains(&s))
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

        /// Closes the connection between two endpoints: frames in flight are
        /// lost, and each live side hears of it.
        fn close(&mut self, a: usize, b: usize) {
            let g = self.gen(a, b);
            self.gen.insert((a.min(b), a.max(b)), g + 1);
            self.net.clear(a, b);
            self.net.clear(b, a);
            let n = self.copies.len();
            for (me, other) in [(a, b), (b, a)] {
                if !self.alive(me) {
                    continue;
                }
                let peer = PeerId { index: other as u32, generation: g };
                if me < n {
                    self.copies[me].on_closed(peer);
                    if self.link[me] == Some(other) {
                        self.link[me] = None;
                    }
                } else {
                    self.workers[me - n].on_closed(peer, "closed");
                }
            }
        }

        fn kill(&mut self, server: u32) {
            let eps: Vec<usize> = (0..self.copies.len()).filter(|&e| self.at[e].0 == server).collect();
            let all = self.copies.len() + self.workers.len();
            for &e in &eps {
                for other in 0..all {
                    if other != e && self.alive(other) {
                        self.close(e, other);
                    }
                }
            }
            self.dead.insert(server);
            self.told.iter_mut().for_each(|t| *t = false);
        }

        /// One step of the world: a copy hears of the deaths, connects a link
        /// it wants, a worker binds to a new head, or a frame is delivered.
        fn step(&mut self) -> bool {
            let n = self.copies.len();
            let roll = self.net.rng().below(8);
            if roll == 0 {
                if let Some(c) = (0..n).find(|&c| !self.told[c] && self.alive(c)) {
                    self.told[c] = true;
                    let close = self.copies[c].set_view(&self.dead, &BTreeSet::new(), &mut self.sink);
                    self.send_from(c);
                    for p in close {
                        self.close(c, p.index as usize);
                    }
                    return true;
                }
            }
            if roll == 1 {
                for c in (0..n).filter(|&c| self.alive(c)) {
                    let Some(server) = self.copies[c].link_wanted() else { continue };
                    let to = self.copy_ep(server, self.at[c].1);
                    if !self.alive(to) {
                        continue; // connection refused: try again later
                    }
                    let g = self.gen(c, to) + 1;
                    self.gen.insert((c.min(to), c.max(to)), g);
                    self.link[c] = Some(to);
                    self.copies[c].linked(PeerId { index: to as u32, generation: g }, server, &mut self.sink).unwrap();
                    self.send_from(c);
                    return true;
                }
            }
            if roll == 2 {
                for w in 0..self.workers.len() {
                    let Some(owner) = self.workers[w].lost_owners().into_iter().next() else { continue };
                    // the worker's view: the first copy not known dead (it may not be promoted yet)
                    let head = chain_of(owner, SERVERS, self.copies_per_chain)
                        .into_iter()
                        .find(|s| !self.dead.contains(s))
                        .expect("a live copy");
                    let to = self.copy_ep(head, owner);
                    let g = self.gen(n + w, to) + 1;
                    self.gen.insert(((n + w).min(to), (n + w).max(to)), g);
                    self.workers[w].rebind(owner, PeerId { index: to as u32, generation: g }, &mut self.sink).unwrap();
                    self.send_from(n + w);
                    return true;
                }
            }
            let Some((from, to, frame)) = self.net.step() else { return false };
            if to < n {
                let peer = PeerId { index: from as u32, generation: self.gen(from, to) };
                let r = self.copies[to].handle(peer, &frame, &mut self.sink);
                self.send_from(to);
                if r.is_err() {
                    // refused (not the head yet): the connection is dropped
                    self.close(from, to);
                }
            } else {
                let peer = PeerId { index: from as u32, generation: self.gen(from, to) };
                let w = to - n;
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
        let mut c = Cluster::new(copies, seed);
        let n = c.copies.len();
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
            if killed < kills.len() && steps >= kill_at + killed as u64 * 300 {
                c.kill(kills[killed]);
                killed += 1;
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
            c.kill(kills[killed]);
            killed += 1;
        }
        c.settle();
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
        // and every live copy of a chain holds the same tables
        for e in 0..n {
            let (server, owner) = c.at[e];
            if c.dead.contains(&server) || c.copies[e].is_head() {
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
