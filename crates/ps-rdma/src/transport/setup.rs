//! Connection set-up: the messages two ends exchange over their authenticated
//! TCP connection to move it to RDMA (`RdmaSetup` JSON in a control frame),
//! and both sides of that exchange. A client sends `Connect` with its QP's
//! address and its ring; the server answers `Accept` with its own and the
//! dense slabs a client may READ, or `Refuse` with the reason.
//!
//! Must never post a frame or a READ (it only brings a QP to RTS and posts its
//! receives), and must never trust the peer's numbers unchecked: a ring that
//! is not the shape of ours is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ps_core::limits::{BLOCK_BYTES, RDMA_RING_SLOTS as RING_SLOTS};
use ps_core::store::DenseLayout;
use ps_core::transport::{FrameSink, PeerEvent, PeerId, RxFrame, Transport, TxError};
use ps_core::wire::{self, Frame};
use ps_tcp_fallback::TcpTransport;
use serde::{Deserialize, Serialize};

use super::read_plan::{read_blocks_max, RemoteTable};
use super::{Conn, RdmaTransport, INLINE_BYTES, RDMA_CONNECTIONS_MAX, READ_SLOTS, SEND_WR};
use crate::datapath;
use crate::{Endpoint, Mr, Qp, QpCaps, RdmaError, Refused};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct EndpointMsg {
    pub(super) qpn: u32,
    pub(super) psn: u32,
    pub(super) lid: u16,
    pub(super) gid: [u8; 16],
    /// the port's active MTU (an `ibv_mtu` value)
    pub(super) mtu: u32,
}

/// A ring the other side writes frames into.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct RingMsg {
    pub(super) addr: u64,
    pub(super) rkey: u32,
    pub(super) slots: u32,
    pub(super) slot_bytes: u32,
}

/// A dense table a client may READ.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct TableMsg {
    pub(super) table: u32,
    pub(super) addr: u64,
    pub(super) rkey: u32,
    pub(super) len: u64,
    pub(super) layout: DenseLayout,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rdma", rename_all = "snake_case")]
pub(super) enum SetupMsg {
    Connect { ep: EndpointMsg, ring: RingMsg },
    Accept { ep: EndpointMsg, ring: RingMsg, tables: Vec<TableMsg> },
    Refuse { reason: String },
}

impl SetupMsg {
    pub(super) fn frame_to(&self, tcp: &mut TcpTransport, peer: PeerId) -> Result<(), TxError> {
        let json = serde_json::to_vec(self).expect("set-up messages serialize");
        let buf = tcp.frame(peer, wire::control_len(json.len()))?;
        wire::write_control(buf, &json);
        Ok(())
    }

    pub(super) fn parse(frame: &[u8]) -> Option<SetupMsg> {
        match wire::decode(frame, ps_core::limits::CONTROL_BYTES_MAX) {
            Ok(Frame::Control(j)) => serde_json::from_slice(j).ok(),
            _ => None,
        }
    }
}

impl RdmaTransport {
    /// A QP and both rings for `peer`, not yet connected, and what to tell the
    /// other side about them.
    fn new_conn(&mut self, peer: PeerId, client: bool) -> Result<(usize, Conn, EndpointMsg, RingMsg), RdmaError> {
        if self.by_peer.len() >= RDMA_CONNECTIONS_MAX {
            return Err(RdmaError::Setup(format!("already {RDMA_CONNECTIONS_MAX} RDMA connections")));
        }
        self.psn_seed = self.psn_seed.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0xff_ffff;
        let psn = self.psn_seed;
        let v = self.verbs.as_ref().map_err(|why| RdmaError::NoRdma(why.clone()))?;
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
    pub fn connect_rdma(&mut self, peer: PeerId, timeout: Duration) -> Result<Result<(), Refused>, RdmaError> {
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
            SetupMsg::Refuse { reason } => Ok(Err(Refused(reason))),
            SetupMsg::Connect { .. } => Err(RdmaError::Setup("the server sent a connect request".into())),
        }
    }

    /// Server: a client asked for RDMA.
    pub(super) fn accept_rdma(&mut self, peer: PeerId, remote: EndpointMsg, remote_ring: RingMsg) {
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
            return Ok(SetupMsg::Refuse { reason: why.to_string() });
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
}
