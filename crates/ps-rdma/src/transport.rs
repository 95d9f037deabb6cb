//! `ps_core::Transport` over RC queue pairs, beside the authenticated TCP one.
//!
//! [`RdmaTransport`] wraps a [`TcpTransport`]: every connection starts as TCP
//! (so it is authenticated by the job secret), and the client then asks over it
//! for an RDMA connection (`RdmaSetup` JSON in a control frame): QP numbers, GIDs
//! or LIDs, PSNs, the rkeys and addresses of the rings and of the dense slabs.
//! From then on that peer's frames travel over RDMA, and the TCP connection
//! stays as the liveness signal (a dead process closes it at once).
//!
//! ## Frames over one-sided writes (both directions)
//! Each side owns a ring of `slots` receive slots of `slot_bytes` in registered
//! memory; the other side writes frame *j* into slot `j % slots` with one RDMA
//! WRITE_WITH_IMM (immediate = the frame's length). The receive completion says
//! the whole frame has landed (never half of one), in order. The receiver copies
//! the frame out of its slot and posts the receive again.
//!
//! Credits: every request a client writes gets exactly one response frame
//! (`Ack`, `PullResp` or `Error`; a `Watch` gets a `Refresh`, whenever the
//! shard has one), so a client keeps `sent - answered < slots`:
//! a request slot is reused only after the request that used it was answered
//! (hence consumed), and the server's response *j* goes to a slot whose previous
//! response the client already took. No credit message is needed; a slow shard
//! simply stops answering and the client's `frame()` waits.
//!
//! ## Dense pulls as one-sided READs
//! A server registers each dense table's slab for remote READ and sends its
//! layout. A client's dense range pull is then not sent: once every earlier
//! request to that shard is answered (read-your-writes; an outstanding `Watch`
//! changes nothing and does not count), the transport READs the
//! blocks that hold the span (the unwanted part of an end block left out,
//! [`READ_TRIM_MIN`]), checks every block's head and tail versions
//! (`slab::check_block`), re-reads a torn block, and hands the caller a
//! `PullResp` frame it built itself. The shard's CPU is not involved.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ps_core::kernels::copy_bytes;
use ps_core::limits::{WireLimits, BLOCK_BYTES, RDMA_RING_SLOTS as RING_SLOTS};
use ps_core::slab::{check_block, BLOCK_FLOATS};
use ps_core::store::DenseLayout;
use ps_core::transport::{FrameSink, PeerEvent, PeerId, RxFrame, Transport, TransportError, TxError};
use ps_core::wire::{self, DataHeader, Frame, Kind};
use ps_tcp_fallback::{TcpRx, TcpTransport};
use serde::{Deserialize, Serialize};

use crate::datapath::{self, Completion, Op, Wr, BATCH_MAX};
use crate::{Context, Cq, Endpoint, Mr, Pd, Qp, QpCaps, RdmaError};

// ------------------------------------------------------------------ tunables

/// Work requests posted per doorbell at most, and a WRITE is signalled at least
/// this often (the rest complete silently: an RC send queue completes in order).
pub const SIGNAL_EVERY: usize = 4;
/// Send queue depth: every slot's WRITE, every landing slot's READs (up to
/// `READ_PIECES` each), a batch, slack.
pub const SEND_WR: u32 = (2 * RING_SLOTS + READ_PIECES * READ_SLOTS + BATCH_MAX + 8) as u32;
/// Completion queue depth, shared by every connection of a transport.
pub const CQ_DEPTH: i32 = 16384;
/// Connections a transport holds over RDMA (CQ_DEPTH / the entries one may queue).
pub const RDMA_CONNECTIONS_MAX: usize = CQ_DEPTH as usize / (2 * RING_SLOTS + SEND_WR as usize);
/// Frames up to this size go inline (acks and errors: no DMA read of our memory).
pub const INLINE_BYTES: u32 = 128;
/// Landing slots for READ-served pulls, one pull chunk's blocks each (at 256 KiB
/// chunks: 16 x 66 x 4 KiB, about 4.3 MiB per client). A pull chunk holds a slot
/// from its READ's post until its completion is handled, so this is also how many
/// pull chunks a client keeps in flight; the QP's READ depth is 16 too.
pub const READ_SLOTS: usize = 16;
/// A pull's span of blocks is fetched by one READ, except that an end block of
/// which at least this many bytes are not wanted is cut: the READ stops (or
/// starts) at the wanted floats, and that block's version word at the cut end
/// is fetched by a READ of its own, 8 bytes, posted before (head) or after
/// (tail) it. A 64 KiB pull from a block boundary then moves 65.8 KiB instead
/// of 17 whole blocks (68 KiB). One MTU on RoCE: an extra small READ costs
/// about what a packet of unwanted bytes does.
pub const READ_TRIM_MIN: usize = 1024;
/// READs per pull chunk at most: the head word, the span, the tail word.
pub const READ_PIECES: usize = 3;
/// A torn block is re-read at most this often before the pull fails.
pub const TORN_RETRIES_MAX: u32 = 100_000;
/// How long `rx_burst` spins on the CQs for landed READs before it looks at TCP.
pub const READ_SPIN: Duration = Duration::from_micros(200);
/// The longest sleep of a sender waiting for a credit (a response's event wakes
/// it sooner; this bounds the cost of a missed one).
pub const CREDIT_NAP: Duration = Duration::from_millis(1);
/// How long a full sender waits for a slot before it gives up on the peer.
pub const TX_STALL: Duration = Duration::from_secs(60);

const _: () = {
    assert!(SIGNAL_EVERY <= BATCH_MAX && RING_SLOTS >= 2 && READ_SLOTS >= 1);
    assert!(SEND_WR as usize >= RING_SLOTS + BATCH_MAX, "every slot in flight plus a batch must fit the send queue");
    assert!(BATCH_MAX >= READ_PIECES && READ_TRIM_MIN >= 16 && READ_TRIM_MIN < BLOCK_BYTES);
};

// ------------------------------------------------------------------ device

/// Which device, port and GID to use.
#[derive(Clone, Debug, Default)]
pub struct DeviceChoice {
    /// A device name (`PS_RDMA_DEVICE`, `--rdma-device`); `None`: the first with an active port.
    pub name: Option<String>,
    /// Overrides the GID index (RoCE: the IPv4-mapped RoCEv2 GID is found otherwise).
    pub gid_index: Option<i32>,
}

/// An opened device, its active port and our address on it.
#[derive(Debug, Clone)]
pub struct Device {
    pub ctx: Arc<Context>,
    pub pd: Arc<Pd>,
    pub port: u8,
    /// `None` on InfiniBand without an override: routed by LID.
    pub gid_index: Option<i32>,
    pub gid: [u8; 16],
    pub lid: u16,
    /// the port's active MTU (an `ibv_mtu` value)
    pub mtu: u32,
    pub roce: bool,
}

const LINK_LAYER_ETHERNET: u8 = 2;

impl Device {
    pub fn open(choice: &DeviceChoice) -> Result<Device, RdmaError> {
        let port = 1u8;
        let names = Context::device_names();
        if names.is_empty() {
            return Err(RdmaError::NoDevice(String::new()));
        }
        let mut last_err = None;
        let candidates: Vec<String> = match &choice.name {
            Some(n) => vec![n.clone()],
            None => names,
        };
        for name in candidates {
            let ctx = match Context::open(Some(&name)) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let attr = match ctx.query_port(port) {
                Ok(a) => a,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            if attr.state != rdma_sys::ibv_port_state::IBV_PORT_ACTIVE {
                last_err = Some(RdmaError::PortDown { device: name.clone(), port, state: attr.state });
                continue;
            }
            let roce = attr.link_layer == LINK_LAYER_ETHERNET;
            let (gid_index, gid) = match (choice.gid_index, roce) {
                (Some(i), _) => (Some(i), ctx.query_gid(port, i)?),
                (None, true) => {
                    let (i, g) = ctx.ipv4_gid(port)?;
                    (Some(i), g)
                }
                (None, false) => (None, [0; 16]),
            };
            let pd = Pd::new(&ctx)?;
            return Ok(Device { ctx, pd, port, gid_index, gid, lid: attr.lid, mtu: attr.active_mtu, roce });
        }
        Err(last_err.unwrap_or_else(|| RdmaError::NoDevice(String::new())))
    }

    /// One line for the log: device, port, address.
    pub fn describe(&self) -> String {
        match self.gid_index {
            Some(i) => format!(
                "{} port {} ({}, GID index {i}: {})",
                self.ctx.name(),
                self.port,
                if self.roce { "RoCE" } else { "InfiniBand" },
                gid_str(&self.gid)
            ),
            None => format!("{} port {} (InfiniBand, LID {})", self.ctx.name(), self.port, self.lid),
        }
    }
}

/// A GID as text: `::ffff:a.b.c.d` for IPv4-mapped ones, else hex groups.
pub fn gid_str(g: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*g).to_string()
}

// ------------------------------------------------------------------ set-up messages

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct EndpointMsg {
    qpn: u32,
    psn: u32,
    lid: u16,
    gid: [u8; 16],
    /// the port's active MTU (an `ibv_mtu` value)
    mtu: u32,
}

/// A ring the other side writes frames into.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
struct RingMsg {
    addr: u64,
    rkey: u32,
    slots: u32,
    slot_bytes: u32,
}

/// A dense table a client may READ.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct TableMsg {
    table: u32,
    addr: u64,
    rkey: u32,
    len: u64,
    layout: DenseLayout,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rdma", rename_all = "snake_case")]
enum SetupMsg {
    Connect { ep: EndpointMsg, ring: RingMsg },
    Accept { ep: EndpointMsg, ring: RingMsg, tables: Vec<TableMsg> },
    Refuse { reason: String },
}

impl SetupMsg {
    fn frame_to(&self, tcp: &mut TcpTransport, peer: PeerId) -> Result<(), TxError> {
        let json = serde_json::to_vec(self).expect("set-up messages serialize");
        let buf = tcp.frame(peer, wire::control_len(json.len()))?;
        wire::write_control(buf, &json);
        Ok(())
    }

    fn parse(frame: &[u8]) -> Option<SetupMsg> {
        match wire::decode(frame, ps_core::limits::CONTROL_BYTES_MAX) {
            Ok(Frame::Control(j)) => serde_json::from_slice(j).ok(),
            _ => None,
        }
    }
}

// ------------------------------------------------------------------ the transport

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
/// of a client's ring (or built from READs).
#[derive(Debug)]
pub enum RdmaRx {
    Tcp(TcpRx),
    Ring { peer: PeerId, mr: Arc<Mr>, at: usize, len: usize },
    Local { peer: PeerId, buf: Vec<u64>, len: usize },
}

impl RxFrame for RdmaRx {
    fn peer(&self) -> PeerId {
        match self {
            RdmaRx::Tcp(t) => t.peer(),
            RdmaRx::Ring { peer, .. } | RdmaRx::Local { peer, .. } => *peer,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            RdmaRx::Tcp(t) => t.bytes(),
            RdmaRx::Ring { mr, at, len, .. } => &mr.bytes()[*at..*at + *len],
            RdmaRx::Local { buf, len, .. } => &bytemuck::cast_slice(buf)[..*len],
        }
    }
}

#[derive(Debug)]
struct RemoteTable {
    addr: u64,
    rkey: u32,
    len: u64,
    layout: DenseLayout,
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

/// One chained READ post: pull chunks landing in `read_mr` slots.
#[derive(Debug)]
struct ReadBatch {
    conn: usize,
    gen: u16,
    seq: u32,
    plans: Vec<ReadPlan>,
    /// its last (signalled) READ completed: an RC send queue completes in order
    done: bool,
}

/// A frame in a staging slot, waiting to be posted.
#[derive(Debug)]
struct Queued {
    slot: usize,
    len: usize,
    /// looked at yet (a frame is filled only after `frame()` returns)
    classified: bool,
    /// a dense pull this transport serves with READs
    read: Option<ReadPlan>,
}

/// Where a server's dense slabs are registered.
#[derive(Debug)]
struct Exported {
    table: u32,
    mr: Mr,
    layout: DenseLayout,
}

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
    verbs: Result<Verbs, String>,
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
    pub fn new(mut tcp: TcpTransport, dev: Result<Device, String>) -> Result<Self, RdmaError> {
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
        let mr = Mr::register_external(&v.dev.pd, slab.as_ptr(), slab.len())?;
        self.exported.push(Exported { table, mr, layout });
        Ok(())
    }

    /// A QP and both rings for `peer`, not yet connected, and what to tell the
    /// other side about them.
    fn new_conn(&mut self, peer: PeerId, client: bool) -> Result<(usize, Conn, EndpointMsg, RingMsg), RdmaError> {
        if self.by_peer.len() >= RDMA_CONNECTIONS_MAX {
            return Err(RdmaError::Setup(format!("already {RDMA_CONNECTIONS_MAX} RDMA connections")));
        }
        self.psn_seed = self.psn_seed.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0xff_ffff;
        let psn = self.psn_seed;
        let v = self.verbs.as_ref().map_err(|why| RdmaError::Setup(why.clone()))?;
        let sb = self.limits.rdma_slot_bytes();
        let caps = QpCaps { send_wr: SEND_WR, recv_wr: RING_SLOTS as u32, inline_bytes: INLINE_BYTES };
        let qp = Qp::new(&v.dev.pd, &v.send_cq, &v.recv_cq, caps)?;
        let tx_mr = Mr::new(&v.dev.pd, RING_SLOTS * sb)?;
        let rx_mr = Arc::new(Mr::new(&v.dev.pd, RING_SLOTS * sb)?);
        let ep = EndpointMsg { qpn: qp.qpn(), psn, lid: v.dev.lid, gid: v.dev.gid, mtu: v.dev.mtu };
        let ring = RingMsg { addr: rx_mr.addr(), rkey: rx_mr.rkey(), slots: RING_SLOTS as u32, slot_bytes: sb as u32 };
        let idx = self.conns.iter().position(|c| c.is_none()).unwrap_or_else(|| {
            self.conns.push(None);
            self.gens.push(0);
            self.conns.len() - 1
        });
        self.gens[idx] = self.gens[idx].wrapping_add(1) & 0xfff;
        let conn = Conn {
            qp,
            psn,
            peer,
            gen: self.gens[idx],
            tx_mr,
            tx_free: (0..RING_SLOTS).rev().collect(),
            tx_queue: VecDeque::new(),
            tx_inflight: VecDeque::new(),
            seq: 0,
            unsignaled: 0,
            remote: RingMsg { addr: 0, rkey: 0, slots: 0, slot_bytes: 0 },
            sent: 0,
            rx_mr,
            received: 0,
            slot_bytes: sb,
            client,
            tables: HashMap::new(),
            reads: 0,
            watches: 0,
        };
        Ok((idx, conn, ep, ring))
    }

    /// Checks the other side's ring against ours, brings the QP to RTS towards
    /// it and posts the receives for our ring.
    fn connect_qp(&self, conn: &mut Conn, remote: &EndpointMsg, remote_ring: RingMsg) -> Result<(), RdmaError> {
        if remote_ring.slots as usize != RING_SLOTS || remote_ring.slot_bytes as usize != conn.slot_bytes {
            return Err(RdmaError::Setup(format!(
                "the peer's ring is {} x {} B, ours {} x {} B: run one build and the same limits everywhere",
                remote_ring.slots, remote_ring.slot_bytes, RING_SLOTS, conn.slot_bytes
            )));
        }
        let v = self.verbs.as_ref().expect("checked by new_conn");
        let ep = Endpoint { qpn: remote.qpn, psn: remote.psn, lid: remote.lid, gid: remote.gid, mtu: remote.mtu };
        conn.qp.connect(v.dev.port, v.dev.gid_index, conn.psn, &ep)?;
        conn.remote = remote_ring;
        datapath::post_recv_imm(&conn.qp, RING_SLOTS, 0)
    }

    fn install(&mut self, idx: usize, conn: Conn) {
        self.by_peer.insert(conn.peer, idx);
        self.by_qpn.insert(conn.qp.qpn(), idx);
        self.conns[idx] = Some(conn);
    }

    /// Client: moves `peer` (a connected, authenticated TCP peer) to RDMA.
    /// `Ok(Err(reason))` when the server refused (it has no device, or runs TCP).
    pub fn connect_rdma(&mut self, peer: PeerId, timeout: Duration) -> Result<Result<(), String>, RdmaError> {
        let (idx, mut conn, ep, ring) = self.new_conn(peer, true)?;
        SetupMsg::Connect { ep, ring }
            .frame_to(&mut self.tcp, peer)
            .map_err(|e| RdmaError::Setup(format!("sending the RDMA set-up request: {e}")))?;
        self.tcp.flush().map_err(|e| RdmaError::Setup(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut rx = Vec::new();
        let reply = 'wait: loop {
            if Instant::now() > deadline {
                return Err(RdmaError::Setup(format!("no RDMA set-up answer from {peer:?} within {timeout:?}")));
            }
            self.tcp.rx_burst(&mut rx, Some(Duration::from_millis(50))).map_err(|e| RdmaError::Setup(e.to_string()))?;
            let mut got = None;
            for f in rx.drain(..) {
                if f.peer() == peer && got.is_none() {
                    got = SetupMsg::parse(f.bytes());
                    if got.is_none() {
                        tracing::warn!("unexpected frame from {peer:?} during RDMA set-up");
                    }
                }
                self.tcp.release(f);
            }
            if let Some(m) = got {
                break 'wait m;
            }
            // events are the caller's: keep them for `events`, but see our peer go
            let seen = self.hold_tcp_events();
            for e in &self.held_events[seen..] {
                if let PeerEvent::Closed { peer: p, reason } = e {
                    if *p == peer {
                        return Err(RdmaError::Setup(format!("{peer:?} closed during RDMA set-up: {reason}")));
                    }
                }
            }
        };
        match reply {
            SetupMsg::Accept { ep: remote, ring: remote_ring, tables } => {
                self.connect_qp(&mut conn, &remote, remote_ring)?;
                for t in tables {
                    conn.tables
                        .insert(t.table, RemoteTable { addr: t.addr, rkey: t.rkey, len: t.len, layout: t.layout });
                }
                if self.read_mr.is_none() {
                    let v = self.verbs.as_ref().expect("checked by new_conn");
                    let blocks = READ_SLOTS * read_blocks_max(&self.limits);
                    self.read_mr = Some(Mr::new(&v.dev.pd, blocks * BLOCK_BYTES)?);
                    self.read_free = (0..READ_SLOTS).rev().collect();
                }
                self.install(idx, conn);
                Ok(Ok(()))
            }
            SetupMsg::Refuse { reason } => Ok(Err(reason)),
            SetupMsg::Connect { .. } => Err(RdmaError::Setup("the server sent a connect request".into())),
        }
    }

    /// Server: a client asked for RDMA.
    fn accept_rdma(&mut self, peer: PeerId, remote: EndpointMsg, remote_ring: RingMsg) {
        let reply = match self.try_accept(peer, &remote, remote_ring) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("RDMA set-up for {peer:?} refused: {e}");
                SetupMsg::Refuse { reason: e.to_string() }
            }
        };
        if let Err(e) = reply.frame_to(&mut self.tcp, peer) {
            self.fail(peer, format!("cannot answer the RDMA set-up: {e}"));
        }
    }

    fn try_accept(&mut self, peer: PeerId, remote: &EndpointMsg, remote_ring: RingMsg) -> Result<SetupMsg, RdmaError> {
        if let Err(why) = &self.verbs {
            return Ok(SetupMsg::Refuse { reason: why.clone() });
        }
        if self.by_peer.contains_key(&peer) {
            return Err(RdmaError::Setup("RDMA is already set up for this connection".into()));
        }
        let (idx, mut conn, ep, ring) = self.new_conn(peer, false)?;
        self.connect_qp(&mut conn, remote, remote_ring)?;
        let tables = self
            .exported
            .iter()
            .map(|e| TableMsg {
                table: e.table,
                addr: e.mr.addr(),
                rkey: e.mr.rkey(),
                len: e.mr.len() as u64,
                layout: e.layout.clone(),
            })
            .collect();
        self.install(idx, conn);
        Ok(SetupMsg::Accept { ep, ring, tables })
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

    // -------------------------------------------------------------- datapath

    /// Polls both completion queues, posts what credits allow, serves READ pulls
    /// whose turn has come. Never blocks for long (a READ's round trip at most).
    fn progress(&mut self) -> Result<(), TransportError> {
        if self.verbs.is_ok() {
            self.drain_cq(false)?;
            self.drain_cq(true)?;
            self.finish_reads();
            for idx in 0..self.conns.len() {
                if self.conns[idx].is_some() {
                    self.post_queued(idx)?;
                }
            }
        }
        self.close_failed();
        Ok(())
    }

    /// Handles every completion waiting on the send (`recv == false`) or the receive CQ.
    fn drain_cq(&mut self, recv: bool) -> Result<(), TransportError> {
        let v = self.verbs.as_ref().expect("checked");
        let cq = if recv { v.recv_cq.clone() } else { v.send_cq.clone() };
        loop {
            self.wc.clear();
            let n = datapath::poll(&cq, &mut self.wc, 64).map_err(io)?;
            let wc = std::mem::take(&mut self.wc);
            for c in &wc {
                if recv {
                    self.on_recv_completion(c);
                } else {
                    self.on_send_completion(c);
                }
            }
            self.wc = wc;
            if n < 64 {
                return Ok(());
            }
        }
    }

    fn on_send_completion(&mut self, c: &Completion) {
        let (idx, gen, tag, seq) = wr_parts(c.wr_id);
        let Some(conn) = self.conns.get_mut(idx).and_then(|c| c.as_mut()).filter(|k| k.gen == gen) else { return };
        if !c.ok {
            let why = format!("RDMA work request failed: {} (peer gone?)", c.status_str());
            let peer = conn.peer;
            self.fail(peer, why);
            return;
        }
        if tag == TAG_WRITE {
            while let Some((s, slot)) = conn.tx_inflight.pop_front() {
                conn.tx_free.push(slot);
                if s == seq {
                    break;
                }
            }
        } else if tag == TAG_READ {
            if let Some(b) = self.reads.iter_mut().find(|b| b.conn == idx && b.gen == gen && b.seq == seq) {
                b.done = true;
            }
        }
    }

    fn on_recv_completion(&mut self, c: &Completion) {
        let Some(&idx) = self.by_qpn.get(&c.qp_num) else { return };
        let Some(conn) = self.conns[idx].as_mut() else { return };
        let peer = conn.peer;
        if !c.ok {
            self.fail(peer, format!("RDMA receive failed: {}", c.status_str()));
            return;
        }
        let len = c.imm.unwrap_or(0) as usize;
        if len < wire::PREFIX_BYTES || len > conn.slot_bytes || !len.is_multiple_of(8) {
            let sb = conn.slot_bytes;
            self.fail(peer, format!("RDMA frame of {len} bytes outside 8..={sb} or unaligned"));
            return;
        }
        if conn.client && conn.received >= conn.sent {
            self.fail(peer, "a response nobody asked for (the credit rule was broken)".into());
            return;
        }
        let slot = (conn.received % RING_SLOTS as u64) as usize;
        let at = slot * conn.slot_bytes;
        let rx = if conn.client {
            // a response is copied out: the credit it returns lets the server
            // write this slot again before the caller has looked at the frame
            let mut buf = self.pool.pop().unwrap_or_default();
            buf.clear();
            buf.resize(len / 8, 0);
            bytemuck::cast_slice_mut::<u64, u8>(&mut buf).copy_from_slice(&conn.rx_mr.bytes()[at..at + len]);
            if conn.rx_mr.bytes()[at + 5] == Kind::Refresh as u8 {
                conn.watches = conn.watches.saturating_sub(1);
            }
            RdmaRx::Local { peer, buf, len }
        } else {
            // a request is handled where it landed (no copy): the client writes
            // this slot again only after our response to it, which is sent after
            // the shard has handled (and released) it
            RdmaRx::Ring { peer, mr: conn.rx_mr.clone(), at, len }
        };
        conn.received += 1;
        self.stats.frames_in += 1;
        self.stats.bytes_in += len as u64;
        if let Err(e) = datapath::post_recv_imm(&conn.qp, 1, 0) {
            self.fail(peer, format!("re-posting a receive: {e}"));
        }
        self.ready.push_back(rx);
    }

    /// Posts conn `idx`'s queued frames as far as credits go; a dense pull at the
    /// head of the queue is served by READs once everything before it is answered.
    fn post_queued(&mut self, idx: usize) -> Result<(), TransportError> {
        let conn = self.conns[idx].as_mut().expect("caller checked");
        if conn.client {
            // frames filled since the last call are looked at once: READ or WRITE
            for q in conn.tx_queue.iter_mut().filter(|q| !q.classified) {
                let at = q.slot * conn.slot_bytes;
                q.read = read_plan(&conn.tx_mr.bytes()[at..at + q.len], &conn.tables, &self.limits);
                q.classified = true;
            }
        }
        loop {
            let conn = self.conns[idx].as_mut().expect("caller checked");
            let Some(front) = conn.tx_queue.front() else { return Ok(()) };
            if front.read.is_some() {
                if conn.sent - conn.received != conn.watches {
                    return Ok(()); // wait until earlier requests are answered
                }
                // every READ-served pull at the head of the queue that finds a
                // free landing slot goes in one chained post
                let rbm = read_blocks_max(&self.limits);
                let mut plans = Vec::new();
                while let Some(p) = conn.tx_queue.front().and_then(|q| q.read.as_ref()) {
                    if plans.len() == BATCH_MAX / READ_PIECES {
                        break;
                    }
                    let Some(slot) = self.read_free.pop() else { break };
                    plans.push(ReadPlan { buf_block: slot * rbm, ..p.clone() });
                    let q = conn.tx_queue.pop_front().expect("looked at");
                    conn.tx_free.push(q.slot);
                }
                if plans.is_empty() {
                    return Ok(()); // every landing slot is in use: wait for a READ to land
                }
                let peer = conn.peer;
                if let Err(e) = self.post_reads(idx, plans) {
                    self.fail(peer, e);
                    return Ok(());
                }
                continue;
            }
            if conn.reads > 0 {
                // a frame after a READ-served pull goes once the READ has landed:
                // requests take effect in the order they were made
                return Ok(());
            }
            // a batch of plain frames, up to the next READ-served pull
            let mut batch: Vec<(usize, usize)> = Vec::with_capacity(BATCH_MAX);
            while let Some(q) = conn.tx_queue.front().filter(|q| q.read.is_none() && batch.len() < BATCH_MAX) {
                if conn.client && conn.sent + batch.len() as u64 - conn.received >= RING_SLOTS as u64 {
                    self.stats.credit_waits += 1;
                    break;
                }
                batch.push((q.slot, q.len));
                conn.tx_queue.pop_front();
            }
            if batch.is_empty() {
                return Ok(());
            }
            let mut wrs: Vec<Wr<'_>> = Vec::with_capacity(batch.len());
            let mut inflight = Vec::with_capacity(batch.len());
            for (i, &(slot, len)) in batch.iter().enumerate() {
                let remote_slot = ((conn.sent + i as u64) % RING_SLOTS as u64) as usize;
                conn.seq = conn.seq.wrapping_add(1);
                conn.unsignaled += 1;
                let signaled = conn.unsignaled >= SIGNAL_EVERY || i + 1 == batch.len();
                if signaled {
                    conn.unsignaled = 0;
                }
                wrs.push(Wr {
                    op: Op::WriteImm(len as u32),
                    mr: &conn.tx_mr,
                    local_off: slot * conn.slot_bytes,
                    len,
                    remote_addr: conn.remote.addr + (remote_slot * conn.slot_bytes) as u64,
                    rkey: conn.remote.rkey,
                    wr_id: wr_id(idx, conn.gen, TAG_WRITE, conn.seq),
                    signaled,
                });
                inflight.push((conn.seq, slot));
                self.stats.bytes_out += len as u64;
                if conn.tx_mr.bytes()[slot * conn.slot_bytes + 5] == Kind::Watch as u8 {
                    conn.watches += 1;
                }
            }
            // SAFETY: each staging slot stays out of `tx_free` (so nobody writes
            // it) until a signalled completion at or after its WR frees it, and
            // tx_mr lives in the conn as long as the QP (declared first, dropped first).
            let r = unsafe { datapath::post_batch(&conn.qp, &wrs) };
            drop(wrs);
            conn.tx_inflight.extend(inflight);
            conn.sent += batch.len() as u64;
            self.stats.frames_out += batch.len() as u64;
            self.stats.doorbells += 1;
            if let Err(e) = r {
                let peer = conn.peer;
                self.fail(peer, e.to_string());
                return Ok(());
            }
        }
    }

    /// Posts one chain of READs of whole slab blocks for `plans` (each into its
    /// landing slot), the last one signalled; `finish_reads` takes it from there.
    fn post_reads(&mut self, idx: usize, plans: Vec<ReadPlan>) -> Result<(), String> {
        let conn = self.conns[idx].as_mut().expect("caller checked");
        let mr = self.read_mr.as_ref().expect("made at connect");
        self.read_seq = self.read_seq.wrapping_add(1);
        let id = wr_id(idx, conn.gen, TAG_READ, self.read_seq);
        let ops = read_ops(&plans, &conn.tables);
        let n = ops.len();
        let wrs: Vec<Wr<'_>> = ops
            .into_iter()
            .enumerate()
            .map(|(i, o)| Wr {
                op: Op::Read,
                mr,
                local_off: o.local_off,
                len: o.len,
                remote_addr: o.remote_addr,
                rkey: o.rkey,
                wr_id: id,
                signaled: i + 1 == n,
            })
            .collect();
        self.stats.read_bytes += wrs.iter().map(|w| w.len as u64).sum::<u64>();
        // SAFETY: each plan's landing slot stays out of `read_free` (nobody else
        // READs into it, nobody reads it) until this batch's completion is
        // handled in `finish_reads`, or until the QP is destroyed with its conn
        // (`drop_conn`); `read_mr` lives as long as the transport, which drops
        // every conn (and QP) first.
        let r = unsafe { datapath::post_batch(&conn.qp, &wrs) };
        drop(wrs);
        conn.reads += 1;
        self.stats.read_posts += 1;
        self.reads.push(ReadBatch { conn: idx, gen: conn.gen, seq: self.read_seq, plans, done: false });
        r.map_err(|e| e.to_string())
    }

    /// Handles every READ batch that has landed: re-reads its torn blocks, queues
    /// the `PullResp` frames the shard would have sent, frees its landing slots.
    fn finish_reads(&mut self) {
        while let Some(i) = self.reads.iter().position(|b| b.done) {
            let b = self.reads.remove(i);
            let mut stash = Vec::new();
            let r = self.land(&b, &mut stash);
            // completions polled while re-reading: WRITEs free their slots, other
            // batches are marked done (and handled in this loop)
            for c in &stash {
                self.on_send_completion(c);
            }
            match r {
                Ok(()) => {
                    let rbm = read_blocks_max(&self.limits);
                    self.read_free.extend(b.plans.iter().map(|p| p.buf_block / rbm));
                    if let Some(c) = self.conns[b.conn].as_mut().filter(|c| c.gen == b.gen) {
                        c.reads -= 1;
                    }
                }
                Err(e) => {
                    // a re-read may still be in flight: its slots come back when
                    // the failed conn's QP is destroyed (`drop_conn`)
                    let peer = self.conns[b.conn].as_ref().map(|c| c.peer);
                    self.reads.push(ReadBatch { done: false, ..b });
                    if let Some(peer) = peer {
                        self.fail(peer, e);
                    }
                }
            }
        }
    }

    /// Checks every block of a landed batch, re-reading each torn one until it is
    /// whole, and builds the batch's `PullResp` frames from the landing slots.
    fn land(&mut self, b: &ReadBatch, stash: &mut Vec<Completion>) -> Result<(), String> {
        let conn = self.conns[b.conn].as_ref().filter(|c| c.gen == b.gen).ok_or("connection gone")?;
        let mr = self.read_mr.as_ref().expect("made at connect");
        let cq = &self.verbs.as_ref().expect("rdma").send_cq;
        let id = wr_id(b.conn, conn.gen, TAG_REREAD, 0);
        let mut torn = 0u64;
        for p in &b.plans {
            let t = &conn.tables[&p.h.table];
            for k in 0..p.blocks {
                let at = (p.buf_block + k) * BLOCK_BYTES;
                let mut tries = 0;
                while check_block(&mr.bytes()[at..at + BLOCK_BYTES]).is_err() {
                    tries += 1;
                    if tries > TORN_RETRIES_MAX {
                        return Err(format!(
                            "block {} of table {} stayed torn over {tries} READs",
                            p.first_block + k,
                            p.h.table
                        ));
                    }
                    torn += 1;
                    let wr = Wr {
                        op: Op::Read,
                        mr,
                        local_off: at,
                        len: BLOCK_BYTES,
                        remote_addr: t.addr + ((p.first_block + k) * BLOCK_BYTES) as u64,
                        rkey: t.rkey,
                        wr_id: id,
                        signaled: true,
                    };
                    // SAFETY: as in `post_reads`, for this one block of the
                    // batch's own slot; its completion is polled in `wait_wr`.
                    unsafe { datapath::post_batch(&conn.qp, &[wr]) }.map_err(|e| e.to_string())?;
                    wait_wr(cq, id, stash)?;
                }
            }
        }
        let peer = conn.peer;
        for p in &b.plans {
            let resp = DataHeader { kind: Kind::PullResp, ..p.h };
            let len = resp.frame_len().ok_or("pull too large")?;
            // every byte is written below (header, values, the padding to 8), so
            // a pooled buffer is cut or grown to length, not cleared
            let mut buf = self.pool.pop().unwrap_or_default();
            buf.resize(len / 8, 0);
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
            let vals_end = wire::DATA_HEADER_BYTES + p.h.b as usize * 4;
            bytes[vals_end..].fill(0);
            resp.write(bytes);
            let n = p.h.b as usize;
            let (mut done, mut pos, mut blk) = (0, p.first_pos, p.buf_block);
            while done < n {
                let take = (BLOCK_FLOATS - pos).min(n - done);
                let src = &mr.bytes()[blk * BLOCK_BYTES + 8 + pos * 4..blk * BLOCK_BYTES + 8 + (pos + take) * 4];
                copy_bytes(
                    &mut bytes[wire::DATA_HEADER_BYTES + done * 4..wire::DATA_HEADER_BYTES + (done + take) * 4],
                    src,
                );
                done += take;
                pos = 0;
                blk += 1;
            }
            self.stats.read_pulls += 1;
            self.ready.push_back(RdmaRx::Local { peer, buf, len });
        }
        self.stats.read_bytes += torn * BLOCK_BYTES as u64;
        self.stats.torn_retries += torn;
        Ok(())
    }

    /// Waits for a free staging slot on conn `idx`. A slot frees when a WRITE
    /// from it completes: while some are in flight this spins (the send CQ raises
    /// no event); when every slot holds a frame waiting for a credit, only a
    /// response can help, and this sleeps in the poller until one comes or the
    /// peer's TCP connection closes (then `Closed`, at once).
    fn wait_slot(&mut self, idx: usize, peer: PeerId) -> Result<usize, TxError> {
        // the clock is read only once there is a wait (a clock read is a system
        // call where the VM's clock source is the HPET)
        let mut start = None;
        let closed = |_| TxError::Closed(peer);
        loop {
            let conn = self.conns[idx].as_mut().ok_or(TxError::Closed(peer))?;
            if let Some(s) = conn.tx_free.pop() {
                return Ok(s);
            }
            if self.progress().is_err() || !self.by_peer.contains_key(&peer) {
                return Err(TxError::Closed(peer));
            }
            if start.get_or_insert_with(Instant::now).elapsed() > TX_STALL {
                return Err(TxError::Full(peer));
            }
            if self.credit_bound(idx) {
                self.arm_recv().map_err(closed)?;
                if self.credit_bound(idx) {
                    self.poll_tcp(Some(CREDIT_NAP)).map_err(closed)?;
                    // the TCP connection is the liveness signal: a server that
                    // died holding every credit closes it, and nothing else
                    // would end this wait (no WRITE of ours is in flight to fail)
                    self.hold_tcp_events();
                }
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Conn `idx` has no free staging slot and none will free without a
    /// response: no WRITE and no READ of ours in flight.
    fn credit_bound(&self, idx: usize) -> bool {
        let Some(c) = self.conns[idx].as_ref() else { return false };
        c.tx_free.is_empty() && c.tx_inflight.is_empty() && self.reads.is_empty()
    }

    /// Asks for an event at the next receive completion, then looks once more
    /// (a completion that came before arming raises none).
    fn arm_recv(&mut self) -> Result<(), TransportError> {
        if let Ok(v) = &self.verbs {
            v.recv_cq.arm().map_err(io)?;
        }
        self.progress()
    }

    /// Waits in the poller for TCP traffic or a receive completion's event
    /// (`arm_recv` first), `wait` at most; TCP frames go to `tcp_rx`.
    fn poll_tcp(&mut self, wait: Option<Duration>) -> Result<(), TransportError> {
        self.tcp.rx_burst(&mut self.tcp_rx, wait)?;
        if self.tcp.take_extra_ready() {
            if let Ok(v) = &self.verbs {
                v.recv_cq.take_events();
            }
        }
        Ok(())
    }
}

/// Blocks a READ into `read_mr` needs at most: a chunk's floats may straddle one
/// more block at each end.
fn read_blocks_max(limits: &WireLimits) -> usize {
    limits.chunk_bytes / 4 / BLOCK_FLOATS + 2
}

#[derive(Debug, Clone)]
struct ReadPlan {
    h: DataHeader,
    first_block: usize,
    first_pos: usize,
    blocks: usize,
    /// where in the landing buffer its blocks go
    buf_block: usize,
}

impl ReadPlan {
    /// The READs that fetch this plan's span, as (offset from the first block's
    /// start, length), in ascending address order, which is the order they are
    /// posted and (an RC QP's responder takes READs in order) carried out in:
    /// so each block's head is read before its wanted floats, and those before
    /// its tail, as the block check needs (`ps_core::slab`). The bytes of a cut
    /// end are not fetched: the landing slot keeps stale bytes there, which
    /// neither the check nor the response reads.
    fn pieces(&self) -> ([(usize, usize); READ_PIECES], usize) {
        let span = self.blocks * BLOCK_BYTES;
        // floats wanted in the last block: 1..=BLOCK_FLOATS
        let end_pos = self.first_pos + self.h.b as usize - (self.blocks - 1) * BLOCK_FLOATS;
        let mut out = [(0, 0); READ_PIECES];
        let mut n = 0;
        let mut start = 0;
        if self.first_pos * 4 >= READ_TRIM_MIN {
            out[n] = (0, 8);
            n += 1;
            start = 8 + self.first_pos * 4;
        }
        let mut end = span;
        if (BLOCK_FLOATS - end_pos) * 4 >= READ_TRIM_MIN {
            end = (self.blocks - 1) * BLOCK_BYTES + 8 + end_pos * 4;
        }
        out[n] = (start, end - start);
        n += 1;
        if end < span {
            out[n] = (span - 8, 8);
            n += 1;
        }
        (out, n)
    }
}

/// One READ of a batch: `len` bytes at `remote_addr` into the landing buffer at `local_off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadOp {
    local_off: usize,
    len: usize,
    remote_addr: u64,
    rkey: u32,
}

/// The READs of `plans`, in the order they are posted: plan by plan, each
/// plan's pieces in ascending address order (the block check depends on it).
fn read_ops(plans: &[ReadPlan], tables: &HashMap<u32, RemoteTable>) -> Vec<ReadOp> {
    let mut ops = Vec::with_capacity(plans.len() * READ_PIECES);
    for p in plans {
        let t = &tables[&p.h.table];
        let (pieces, n) = p.pieces();
        for &(off, len) in &pieces[..n] {
            ops.push(ReadOp {
                local_off: p.buf_block * BLOCK_BYTES + off,
                len,
                remote_addr: t.addr + (p.first_block * BLOCK_BYTES + off) as u64,
                rkey: t.rkey,
            });
        }
    }
    ops
}

/// If `frame` is a dense range pull of a table the peer exported, where to READ it.
fn read_plan(frame: &[u8], tables: &HashMap<u32, RemoteTable>, limits: &WireLimits) -> Option<ReadPlan> {
    if frame.len() < wire::DATA_HEADER_BYTES || frame[5] != Kind::Pull as u8 {
        return None;
    }
    let Ok(Frame::Data { h, .. }) = wire::decode(frame, limits.frame_bytes_max) else { return None };
    if !h.dense || h.b == 0 {
        return None;
    }
    let t = tables.get(&h.table)?;
    let local = t.layout.local(h.a, h.b)? as usize;
    let first_block = local / BLOCK_FLOATS;
    let last_block = (local + h.b as usize - 1) / BLOCK_FLOATS;
    let blocks = last_block - first_block + 1;
    if blocks > read_blocks_max(limits) || ((last_block + 1) * BLOCK_BYTES) as u64 > t.len {
        return None;
    }
    Some(ReadPlan { h, first_block, first_pos: local % BLOCK_FLOATS, blocks, buf_block: 0 })
}

/// Spins on the send CQ until work request `id` completes (a torn block's
/// re-read: rare, and the caller needs it before it can go on); other completions
/// polled meanwhile go to `stash` for the caller to handle.
fn wait_wr(cq: &Cq, id: u64, stash: &mut Vec<Completion>) -> Result<(), String> {
    let start = Instant::now();
    let mut wc = Vec::new();
    loop {
        wc.clear();
        datapath::poll(cq, &mut wc, 16).map_err(|e| e.to_string())?;
        let mut mine = None;
        for c in wc.drain(..) {
            if c.wr_id == id && mine.is_none() {
                mine = Some(c);
            } else {
                stash.push(c);
            }
        }
        if let Some(c) = mine {
            return if c.ok { Ok(()) } else { Err(format!("RDMA READ failed: {}", c.status_str())) };
        }
        if start.elapsed() > TX_STALL {
            return Err("RDMA READ did not complete".into());
        }
        std::hint::spin_loop();
    }
}

impl FrameSink for RdmaTransport {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
        let Some(&idx) = self.by_peer.get(&peer) else { return self.tcp.frame(peer, len) };
        let sb = self.conns[idx].as_ref().map_or(0, |c| c.slot_bytes);
        if len > sb {
            return Err(TxError::TooLarge { len, max: sb });
        }
        let slot = self.wait_slot(idx, peer)?;
        let conn = self.conns[idx].as_mut().expect("wait_slot checked");
        conn.tx_queue.push_back(Queued { slot, len, classified: false, read: None });
        let at = slot * conn.slot_bytes;
        Ok(&mut conn.tx_mr.bytes_mut()[at..at + len])
    }

    fn frame_gather(&mut self, peer: PeerId, parts: &[&[u8]]) -> Result<(), TxError> {
        if !self.by_peer.contains_key(&peer) {
            return self.tcp.frame_gather(peer, parts);
        }
        let len = parts.iter().map(|p| p.len()).sum();
        ps_core::transport::gather_into(self.frame(peer, len)?, parts);
        Ok(())
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
            if f.bytes().get(5) == Some(&(Kind::Control as u8)) {
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
            RdmaRx::Local { buf, .. } => {
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

    fn pull_frame(table: u32, a: u64, b: u64) -> Vec<u8> {
        let h = DataHeader { kind: Kind::Pull, dense: true, table, sub: 0, ts: 1, a, b };
        let mut f = vec![0u8; h.frame_len().unwrap()];
        h.write(&mut f);
        f
    }

    #[test]
    fn read_pieces_fetch_every_wanted_float_and_version_word_in_address_order() {
        let plan = |first_pos: usize, b: u64| {
            let blocks = (first_pos + b as usize - 1) / BLOCK_FLOATS + 1;
            let h = DataHeader { kind: Kind::Pull, dense: true, table: 0, sub: 0, ts: 1, a: 0, b };
            ReadPlan { h, first_block: 3, first_pos, blocks, buf_block: 0 }
        };
        // a 64 KiB pull from a block boundary: 16 whole blocks and the head and
        // first 64 floats of the 17th, then that block's tail word
        let (p, n) = plan(0, 16384).pieces();
        assert_eq!(&p[..n], &[(0, 16 * BLOCK_BYTES + 8 + 64 * 4), (17 * BLOCK_BYTES - 8, 8)]);
        // one whole block: one READ
        let (p, n) = plan(0, BLOCK_FLOATS as u64).pieces();
        assert_eq!(&p[..n], &[(0, BLOCK_BYTES)]);
        // the middle of one block: head word, the floats, tail word
        let (p, n) = plan(500, 10).pieces();
        assert_eq!(&p[..n], &[(0, 8), (8 + 2000, 40), (BLOCK_BYTES - 8, 8)]);
        for first_pos in (0..BLOCK_FLOATS).step_by(37).chain([255, 256, 763, 764, BLOCK_FLOATS - 1]) {
            for b in [1u64, 2, 100, 255, 256, 1019, 1020, 1021, 3000, 16384] {
                let pl = plan(first_pos, b);
                let (p, n) = pl.pieces();
                let span = pl.blocks * BLOCK_BYTES;
                let mut covered = vec![false; span];
                let mut last_end = 0;
                for &(off, len) in &p[..n] {
                    assert!(off >= last_end && len > 0 && off + len <= span, "{first_pos}+{b}: {:?}", &p[..n]);
                    last_end = off + len;
                    covered[off..off + len].iter_mut().for_each(|c| *c = true);
                }
                for k in 0..pl.blocks {
                    let at = k * BLOCK_BYTES;
                    assert!(covered[at..at + 8].iter().all(|&c| c), "{first_pos}+{b}: head of block {k}");
                    assert!(covered[at + BLOCK_BYTES - 8..at + BLOCK_BYTES].iter().all(|&c| c), "tail of {k}");
                }
                for f in first_pos..first_pos + b as usize {
                    let at = (f / BLOCK_FLOATS) * BLOCK_BYTES + 8 + (f % BLOCK_FLOATS) * 4;
                    assert!(covered[at..at + 4].iter().all(|&c| c), "{first_pos}+{b}: float {f}");
                }
                let unread = covered.iter().filter(|&&c| !c).count();
                assert!(n == 1 || unread >= READ_TRIM_MIN, "a cut that saves less than READ_TRIM_MIN");
            }
        }
    }

    #[test]
    fn a_batch_posts_each_plans_reads_in_ascending_address_order_into_its_own_slot() {
        let limits = WireLimits::default();
        let layout = DenseLayout { table_begin: 0, dim: 1, ranges: vec![(0, 40_000, 0)] };
        let mut tables = HashMap::new();
        tables.insert(4, RemoteTable { addr: 1 << 20, rkey: 9, len: 64 * BLOCK_BYTES as u64, layout });
        // cut at both ends, a 64 KiB pull from a block boundary, one whole block
        let spans = [(500, 3000), (0, 16384), (BLOCK_FLOATS as u64, BLOCK_FLOATS as u64)];
        let rbm = read_blocks_max(&limits);
        let plans: Vec<ReadPlan> = spans
            .iter()
            .enumerate()
            .map(|(slot, &(a, b))| {
                let p = read_plan(&pull_frame(4, a, b), &tables, &limits).unwrap();
                ReadPlan { buf_block: slot * rbm, ..p }
            })
            .collect();
        let ops = read_ops(&plans, &tables);
        let mut at = 0;
        for (i, p) in plans.iter().enumerate() {
            let (pieces, n) = p.pieces();
            let mine = &ops[at..at + n];
            at += n;
            let base = (1u64 << 20) + (p.first_block * BLOCK_BYTES) as u64;
            for (o, &(off, len)) in mine.iter().zip(&pieces[..n]) {
                assert_eq!((o.remote_addr, o.len, o.rkey), (base + off as u64, len, 9), "plan {i}");
                assert_eq!(o.local_off, p.buf_block * BLOCK_BYTES + off, "plan {i}: its own landing slot");
                assert!(o.local_off + o.len <= (p.buf_block + rbm) * BLOCK_BYTES);
            }
            assert!(mine.windows(2).all(|w| w[0].remote_addr + w[0].len as u64 <= w[1].remote_addr), "plan {i}");
        }
        assert_eq!(at, ops.len());
        assert_eq!(ops.len(), 3 + 2 + 1, "cut at both ends, at the tail, not at all");
    }

    #[test]
    fn read_plans_cover_exactly_the_blocks_of_owned_spans() {
        let limits = WireLimits::default();
        let layout = DenseLayout { table_begin: 0, dim: 2, ranges: vec![(0, 1000, 0), (3000, 5000, 2000)] };
        let mut tables = HashMap::new();
        tables.insert(4, RemoteTable { addr: 1 << 20, rkey: 9, len: 64 * BLOCK_BYTES as u64, layout });
        // keys 3000.. (flat 6000..) start at local float 2000: block 1, position 980
        let p = read_plan(&pull_frame(4, 6000, 100), &tables, &limits).unwrap();
        assert_eq!((p.first_block, p.first_pos, p.blocks), (1, 2000 - BLOCK_FLOATS, 2));
        // a span leaving an owned range, an unknown table, a push: sent as frames
        assert!(read_plan(&pull_frame(4, 1990, 20), &tables, &limits).is_none());
        assert!(read_plan(&pull_frame(5, 0, 10), &tables, &limits).is_none());
        let mut push = pull_frame(4, 0, 10);
        push[5] = Kind::Push as u8;
        assert!(read_plan(&push, &tables, &limits).is_none());
        // beyond the registered length: never READ outside the region
        tables.get_mut(&4).unwrap().len = 3 * BLOCK_BYTES as u64;
        assert!(read_plan(&pull_frame(4, 6000, 100), &tables, &limits).is_some(), "blocks 1-2 are inside");
        assert!(read_plan(&pull_frame(4, 6000 + 2 * 1000, 20), &tables, &limits).is_none(), "block 3 is not");
    }
}
