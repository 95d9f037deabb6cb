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
//! ## The rooms
//! - this file: [`ChainCore`], its public API, views and connection ends;
//! - `frames`: the chain's own frames (`Forward`, `Ack`, `Bind`) built and read;
//! - `routing`: virtual peers (one per origin) and where a shard's answers go;
//! - `protocol`: binding, numbering, applying, forwarding, the forwarding log
//!   and its acknowledgements;
//! - `rebuild`: the snapshot and shadow stream that rebuild a lost copy;
//! - `planted` (tests only): bugs a test plants to prove the seeded
//!   simulation (`crate::sim`) finds them.
//!
//! Must never: answer a counted frame before its downstream acknowledged it,
//! apply a frame of an origin out of order (a gap is an error, the sender
//! dropped), or grow the forwarding log past `CHAIN_LOG_BYTES_MAX`.

use std::collections::{BTreeSet, HashMap};

use crate::ring::Owner;
use crate::shard::{ShardCore, ShardError};
use crate::transport::{FrameSink, PeerId};
use crate::wire::{self, BindHeader, Kind};

use frames::header_frame;
use protocol::{Conn, Down};
use rebuild::Shadow;
use routing::{origin_of, virtual_peer};

mod frames;
mod protocol;
mod rebuild;
mod routing;

/// Bugs planted on purpose, per test thread, to prove the seeded simulation
/// (`crate::sim::planted_tests`) finds them; off unless a test turns one on.
#[cfg(test)]
pub(crate) mod planted {
    use std::cell::Cell;

    thread_local! {
        static EARLY_ANSWER: Cell<bool> = const { Cell::new(false) };
    }

    /// The head answers a client's counted frame as soon as it forwards it,
    /// before the copies after it acknowledged it (breaks invariant 1 when
    /// the head dies with the frame in flight).
    pub(crate) fn set_early_answer(on: bool) {
        EARLY_ANSWER.with(|c| c.set(on));
    }

    pub(crate) fn early_answer() -> bool {
        EARLY_ANSWER.with(|c| c.get())
    }
}

/// Frames that change a shard's state, numbered per origin and forwarded.
pub fn is_counted(kind: Kind) -> bool {
    matches!(kind, Kind::Push | Kind::PushPull | Kind::Clock)
}

/// Where a shard's copies live (placement, in the ring's module).
pub use crate::ring::chain_of;

/// A `Bind` frame (see the module doc).
pub fn bind_frame(origin: u32, first_seq: u64) -> Vec<u8> {
    header_frame(BindHeader { origin: origin as u64, next_counted: first_seq }.header())
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
    /// bytes of those snapshots
    pub snapshot_bytes: u64,
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

    /// A live member of its chain (not a copy still being rebuilt, not dead).
    pub(crate) fn is_member(&self) -> bool {
        self.chain.contains(&self.me) && !self.dead.contains(&self.me)
    }

    /// The shard this copy holds.
    pub fn core(&self) -> &ShardCore {
        &self.core
    }

    /// The shard this copy holds, to change outside the chain's protocol.
    pub fn core_mut(&mut self) -> &mut ShardCore {
        &mut self.core
    }

    /// The owner whose key ranges this chain replicates.
    pub fn owner(&self) -> Owner {
        self.core.owner()
    }

    /// The replication counters so far (the shard's own are in [`ShardCore::stats`]).
    pub fn stats(&self) -> ChainStats {
        self.stats
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

    pub(crate) fn is_head(&self) -> bool {
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
                self.shadow_joins(sh, tx);
            } else if next.is_none() {
                self.release_all(tx);
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
        // routed by the prefix's kind: every handler below decodes what it needs
        match wire::peek_kind(frame) {
            Some(Kind::Bind) => self.on_bind(peer, frame, tx),
            Some(Kind::Forward) => self.on_forward(peer, frame, tx),
            Some(Kind::Ack) if Some(peer) == self.down.peer => self.on_down_ack(frame, tx),
            Some(Kind::Ack) if self.shadow.as_ref().is_some_and(|s| s.peer == peer) => self.on_shadow_ack(frame),
            Some(Kind::Snapshot) => self.on_snapshot(peer, frame),
            _ => self.on_client(peer, frame, tx),
        }
    }

    /// See [`ShardCore::checkpoint_due`].
    pub fn checkpoint_due(&self) -> Option<u64> {
        self.core.checkpoint_due()
    }

    /// See [`ShardCore::checkpoint_written`]; the answer goes to the client that asked.
    pub fn checkpoint_written(&mut self, tx: &mut dyn FrameSink, r: Result<(), crate::checkpoint::WriteError>) {
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
