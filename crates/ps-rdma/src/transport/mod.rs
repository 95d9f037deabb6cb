//! `ps_core::Transport` over RC queue pairs, beside the authenticated TCP one:
//! the control path.
//!
//! [`RdmaTransport`] wraps a [`TcpTransport`]: every connection starts as TCP
//! (so it is authenticated by the job secret), and the client then asks over it
//! for an RDMA connection (`RdmaSetup` JSON in a control frame): QP numbers, GIDs
//! or LIDs, PSNs, the rkeys and addresses of the rings and of the dense slabs.
//! From then on that peer's frames travel over RDMA, and the TCP connection
//! stays as the liveness signal (a dead process closes it at once).
//!
//! The rooms, one file each:
//! - here: the transport's state, its construction, the `Transport` methods,
//!   and how a failed or closed peer's RDMA state is dropped;
//! - `tunables.rs`: every depth, size and wait, with the checks of how they relate;
//! - `setup.rs`: the set-up messages and both sides of the handshake;
//! - `progress.rs`: polling the completion queues and routing what they hold;
//! - `ring.rs`: frames over WRITE_WITH_IMM into mailbox rings, and credits;
//! - `read_plan.rs`: which dense pulls become READs, and which READs;
//! - `read_land.rs`: posting those READs, the tear checks, the landed answer;
//! - `crate::datapath`: the verbs posts and polls all of them use.
//!
//! Must never post a work request or fill a ring slot itself (that is the
//! rooms above), and must never drop a connection while a caller may be
//! walking the connections (`fail` marks it; `close_failed` drops it).

mod progress;
mod read_land;
mod read_plan;
mod ring;
mod setup;
mod tunables;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ps_core::limits::WireLimits;
use ps_core::store::DenseLayout;
use ps_core::transport::{PeerEvent, PeerId, Received, RxFrame, Transport, TransportError};
use ps_core::wire::{self, DataHeader, Kind};
use ps_tcp_fallback::{TcpRx, TcpTransport};

pub use crate::device::{gid_str, Device, DeviceChoice};
pub use tunables::{
    CQ_DEPTH, CREDIT_NAP, INLINE_BYTES, RDMA_CONNECTIONS_MAX, READ_PIECES, READ_SLOTS, READ_SPIN, READ_TRIM_MIN,
    SEND_WR, SIGNAL_EVERY, TORN_RETRIES_MAX, TX_STALL,
};

use crate::datapath::Completion;
use crate::{Cq, Mr, NoRdma, Qp, RdmaError};
use read_land::ReadBatch;
use read_plan::{read_blocks_max, RemoteTable};
use ring::Queued;
use setup::{RingMsg, SetupMsg};

/// Counters, for the end-of-run report and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RdmaStats {
    pub frames_out: u64,
    pub frames_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub doorbells: u64,
    /// Dense pulls served by one-sided READs.
    pub read_pulls: u64,
    pub read_bytes: u64,
    /// Blocks that came back torn and were read again.
    pub torn_retries: u64,
    /// Post attempts that found a client's frames waiting and no credit (every
    /// ring slot unanswered): counted per attempt, not per frame.
    pub credit_waits: u64,
    /// Chained READ posts (each carries up to `READ_SLOTS` pull chunks).
    pub read_posts: u64,
}

/// A received frame: from TCP; in place in a server's RDMA ring; or copied out
/// of a client's ring. Or (`Answer`) a dense pull's answer landed by READs
/// (`read_land.rs`): the `PullResp` header the shard would have sent and its
/// `h.b` values at the start of `buf`, no frame (`bytes` is empty, `received`
/// is the answer).
#[derive(Debug)]
pub enum RdmaRx {
    Tcp(TcpRx),
    Ring { peer: PeerId, mr: Arc<Mr>, at: usize, len: usize },
    Local { peer: PeerId, buf: Vec<u64>, len: usize },
    Answer { peer: PeerId, h: DataHeader, buf: Vec<u64> },
}

impl RxFrame for RdmaRx {
    fn peer(&self) -> PeerId {
        match self {
            RdmaRx::Tcp(t) => t.peer(),
            RdmaRx::Ring { peer, .. } | RdmaRx::Local { peer, .. } | RdmaRx::Answer { peer, .. } => *peer,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            RdmaRx::Tcp(t) => t.bytes(),
            RdmaRx::Ring { mr, at, len, .. } => &mr.bytes()[*at..*at + *len],
            RdmaRx::Local { buf, len, .. } => &bytemuck::cast_slice(buf)[..*len],
            RdmaRx::Answer { .. } => &[],
        }
    }
    fn received(&self) -> Received<'_> {
        match self {
            RdmaRx::Answer { h, buf, .. } => {
                Received::Answer { h: *h, vals: &bytemuck::cast_slice(buf)[..h.b as usize * 4] }
            }
            _ => Received::Frame(self.bytes()),
        }
    }
}

/// One peer over RDMA. Field order is drop order: the QP goes before the memory
/// its work requests name.
#[derive(Debug)]
struct Conn {
    qp: Qp,
    /// our first packet sequence number
    psn: u32,
    peer: PeerId,
    gen: u16,
    /// our staging slots for outgoing frames
    tx_mr: Mr,
    tx_free: Vec<usize>,
    /// filled, not yet posted
    tx_queue: VecDeque<Queued>,
    /// posted, completion not yet seen: (seq, slot)
    tx_inflight: VecDeque<(u32, usize)>,
    seq: u32,
    unsignaled: usize,
    remote: RingMsg,
    /// frames written into the remote ring
    sent: u64,
    /// our ring, written by the peer (shared with the request frames a server
    /// lends out of it)
    rx_mr: Arc<Mr>,
    received: u64,
    slot_bytes: usize,
    /// client side: requests are bounded by credits
    client: bool,
    tables: HashMap<u32, RemoteTable>,
    /// READ batches posted on this QP whose completion is not handled yet
    reads: usize,
    /// client side: `Watch` requests sent and not answered yet (a shard answers
    /// one when a refresh is due, so they do not hold back READ-served pulls)
    watches: u64,
}

/// Where a server's dense slabs are registered.
#[derive(Debug)]
struct Exported {
    table: u32,
    mr: Mr,
    layout: DenseLayout,
}

// A work request's id: the connection's index (16 bits), its generation (12
// bits, so a late completion of a dropped connection is recognised), a tag
// saying what was posted (4 bits) and a sequence number (32 bits).
const TAG_WRITE: u64 = 1;
const TAG_READ: u64 = 2;
const TAG_REREAD: u64 = 3;

fn wr_id(conn: usize, gen: u16, tag: u64, seq: u32) -> u64 {
    ((conn as u64) << 48) | ((gen as u64 & 0xfff) << 36) | (tag << 32) | seq as u64
}

fn wr_parts(id: u64) -> (usize, u16, u64, u32) {
    ((id >> 48) as usize, ((id >> 36) & 0xfff) as u16, (id >> 32) & 0xf, id as u32)
}

#[derive(Debug)]
struct Verbs {
    dev: Device,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
}

/// The transport: TCP for every peer, RDMA for those that set it up.
#[derive(Debug)]
pub struct RdmaTransport {
    tcp: TcpTransport,
    /// the device, or why there is none (the answer to clients asking for RDMA)
    verbs: Result<Verbs, NoRdma>,
    limits: WireLimits,
    conns: Vec<Option<Conn>>,
    gens: Vec<u16>,
    by_peer: HashMap<PeerId, usize>,
    by_qpn: HashMap<u32, usize>,
    exported: Vec<Exported>,
    /// landing slots of READ-served pulls (a client's, made at its first connect)
    read_mr: Option<Mr>,
    read_free: Vec<usize>,
    /// posted READ batches, oldest first
    reads: Vec<ReadBatch>,
    read_seq: u32,
    ready: VecDeque<RdmaRx>,
    pool: Vec<Vec<u64>>,
    tcp_rx: Vec<TcpRx>,
    wc: Vec<Completion>,
    /// RDMA peers that failed, to drop (with TCP) at the next chance
    closing: Vec<(PeerId, String)>,
    /// connection events the set-up wait read off the TCP transport, for `events`
    held_events: Vec<PeerEvent>,
    stats: RdmaStats,
    psn_seed: u32,
}

fn io(e: impl std::fmt::Display) -> TransportError {
    TransportError::Io(e.to_string())
}

impl RdmaTransport {
    /// Wraps `tcp`. With a device, peers may be moved to RDMA; with `Err(why)`,
    /// this is TCP and set-up requests are refused with `why`.
    pub fn new(mut tcp: TcpTransport, dev: Result<Device, NoRdma>) -> Result<Self, RdmaError> {
        let limits = WireLimits::default();
        let verbs = match dev {
            Ok(dev) => {
                let send_cq = Cq::new(&dev.ctx, CQ_DEPTH, false)?;
                let recv_cq = Cq::new(&dev.ctx, CQ_DEPTH, true)?;
                let fd = recv_cq.fd().expect("created with a channel");
                tcp.watch_fd(fd).map_err(|e| RdmaError::Setup(format!("cannot watch the completion channel: {e}")))?;
                Ok(Verbs { dev, send_cq, recv_cq })
            }
            Err(why) => Err(why),
        };
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        Ok(Self {
            tcp,
            verbs,
            limits,
            conns: Vec::new(),
            gens: Vec::new(),
            by_peer: HashMap::new(),
            by_qpn: HashMap::new(),
            exported: Vec::new(),
            read_mr: None,
            read_free: Vec::new(),
            reads: Vec::new(),
            read_seq: 0,
            ready: VecDeque::new(),
            pool: Vec::new(),
            tcp_rx: Vec::new(),
            wc: Vec::new(),
            closing: Vec::new(),
            held_events: Vec::new(),
            stats: RdmaStats::default(),
            psn_seed: u32::from_le_bytes(seed) & 0xff_ffff,
        })
    }

    pub fn tcp(&mut self) -> &mut TcpTransport {
        &mut self.tcp
    }

    pub fn set_limits(&mut self, limits: WireLimits) {
        self.limits = limits;
        self.tcp.set_limits(limits);
    }

    pub fn stats(&self) -> RdmaStats {
        self.stats
    }

    pub fn has_device(&self) -> bool {
        self.verbs.is_ok()
    }

    /// Server: registers a dense table's slab for remote READ by clients.
    ///
    /// # Safety
    /// `slab` stays mapped and in place for as long as this transport lives.
    pub unsafe fn export_dense(&mut self, table: u32, layout: DenseLayout, slab: &[u8]) -> Result<(), RdmaError> {
        let Ok(v) = &self.verbs else { return Ok(()) };
        // SAFETY: the region goes into `self.exported`, which is only dropped
        // with the transport, and the caller keeps `slab` mapped and in place
        // for as long as the transport lives: so for as long as the region.
        let mr = unsafe { Mr::register_external(&v.dev.pd, slab.as_ptr(), slab.len()) }?;
        self.exported.push(Exported { table, mr, layout });
        Ok(())
    }

    fn drop_conn(&mut self, peer: PeerId) {
        if let Some(idx) = self.by_peer.remove(&peer) {
            if let Some(c) = self.conns[idx].take() {
                self.by_qpn.remove(&c.qp.qpn());
                // the QP is destroyed here: no READ of its lands after this, so
                // the landing slots of its unfinished batches are free again
                drop(c);
                let rbm = read_blocks_max(&self.limits);
                let free = &mut self.read_free;
                self.reads.retain(|b| {
                    if b.conn == idx {
                        free.extend(b.plans.iter().map(|p| p.buf_block / rbm));
                    }
                    b.conn != idx
                });
            }
        }
    }

    /// Moves the TCP side's connection events into `held_events` (they stay the
    /// caller's, handed out by `events`) and drops the RDMA state of every peer
    /// that closed, so a loop that waits on a peer sees it go at once; returns
    /// where the new events start.
    fn hold_tcp_events(&mut self) -> usize {
        let seen = self.held_events.len();
        self.tcp.events(&mut self.held_events);
        for i in seen..self.held_events.len() {
            if let PeerEvent::Closed { peer, .. } = &self.held_events[i] {
                let peer = *peer;
                self.drop_conn(peer);
            }
        }
        seen
    }

    /// Marks `peer` to be dropped (its RDMA state and its TCP connection) at the
    /// next chance: not at once, as the caller may be walking the connections.
    fn fail(&mut self, peer: PeerId, why: String) {
        if !self.closing.iter().any(|(p, _)| *p == peer) {
            self.closing.push((peer, why));
        }
    }

    /// Drops the peers `fail` marked; each then shows up as a `Closed` event.
    fn close_failed(&mut self) {
        for (peer, why) in std::mem::take(&mut self.closing) {
            tracing::warn!("dropping peer {peer:?}: {why}");
            self.drop_conn(peer);
            self.tcp.close(peer, &why);
        }
    }
}

impl Transport for RdmaTransport {
    type Rx = RdmaRx;

    fn rx_burst(&mut self, out: &mut Vec<RdmaRx>, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.progress()?;
        // READ completions raise no event (the send CQ has no channel): while
        // READs are in flight, spin on the CQs a little, then only peek at TCP
        if self.ready.is_empty() && !self.reads.is_empty() {
            let spin = Instant::now();
            while self.ready.is_empty() && !self.reads.is_empty() && spin.elapsed() < READ_SPIN {
                std::hint::spin_loop();
                self.progress()?;
            }
        }
        if self.ready.is_empty() && self.reads.is_empty() {
            self.arm_recv()?;
        }
        let wait = if self.ready.is_empty() && self.reads.is_empty() { timeout } else { Some(Duration::ZERO) };
        self.poll_tcp(wait)?;
        for f in std::mem::take(&mut self.tcp_rx) {
            let peer = f.peer();
            if wire::peek_kind(f.bytes()) == Some(Kind::Control) {
                if let Some(msg) = SetupMsg::parse(f.bytes()) {
                    self.tcp.release(f);
                    match msg {
                        SetupMsg::Connect { ep, ring } => self.accept_rdma(peer, ep, ring),
                        other => self.fail(peer, format!("unexpected RDMA set-up message {other:?}")),
                    }
                    continue;
                }
            }
            out.push(RdmaRx::Tcp(f));
        }
        self.progress()?;
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn release(&mut self, rx: RdmaRx) {
        match rx {
            RdmaRx::Tcp(t) => self.tcp.release(t),
            RdmaRx::Ring { .. } => {}
            RdmaRx::Local { buf, .. } | RdmaRx::Answer { buf, .. } => {
                if self.pool.len() < 64 {
                    self.pool.push(buf);
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.progress()?;
        self.tcp.flush()
    }

    fn events(&mut self, out: &mut Vec<PeerEvent>) {
        self.close_failed();
        // the one place TCP events become ours (closed peers' RDMA state dropped)
        self.hold_tcp_events();
        out.append(&mut self.held_events);
    }

    fn close(&mut self, peer: PeerId, reason: &str) {
        self.drop_conn(peer);
        self.tcp.close(peer, reason);
    }

    fn tx_pending_bytes(&self, peer: PeerId) -> usize {
        match self.by_peer.get(&peer).and_then(|&i| self.conns[i].as_ref()) {
            Some(c) => c.tx_queue.iter().map(|q| q.len).sum(),
            None => self.tcp.tx_pending_bytes(peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_request_ids_round_trip() {
        for (c, g, t, s) in [(0, 0, TAG_WRITE, 0), (65_535, 0xfff, TAG_READ, u32::MAX), (7, 3, TAG_WRITE, 12345)] {
            assert_eq!(wr_parts(wr_id(c, g, t, s)), (c, g, t, s));
        }
    }
}
