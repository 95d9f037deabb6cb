//! The mailbox rings and their credits: frames over one-sided writes, in both
//! directions.
//!
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
//! Must never write a remote slot without a credit for it, never reuse a
//! staging slot before the WRITE from it has completed, and never reorder a
//! connection's requests (a frame behind a READ-served pull waits for it).

use std::time::Instant;

use ps_core::limits::RDMA_RING_SLOTS as RING_SLOTS;
use ps_core::transport::{FrameSink, PeerId, TransportError, TxError};
use ps_core::wire::{self, Kind};

use super::read_plan::{read_blocks_max, read_plan, ReadPlan};
use super::{wr_id, RdmaRx, RdmaTransport, CREDIT_NAP, READ_PIECES, SIGNAL_EVERY, TAG_WRITE, TX_STALL};
use crate::datapath::{self, Completion, Op, Wr, BATCH_MAX};

/// A frame in a staging slot, waiting to be posted.
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) slot: usize,
    pub(super) len: usize,
    /// looked at yet (a frame is filled only after `frame()` returns)
    pub(super) classified: bool,
    /// a dense pull this transport serves with READs
    pub(super) read: Option<ReadPlan>,
}

impl RdmaTransport {
    pub(super) fn on_recv_completion(&mut self, c: &Completion) {
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
            if wire::peek_kind(&conn.rx_mr.bytes()[at..at + len]) == Some(Kind::Refresh) {
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
    pub(super) fn post_queued(&mut self, idx: usize) -> Result<(), TransportError> {
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
                    self.fail(peer, e.to_string());
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
                if wire::peek_kind(&conn.tx_mr.bytes()[slot * conn.slot_bytes..]) == Some(Kind::Watch) {
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

    /// Waits for a free staging slot on conn `idx`. A slot frees when a WRITE
    /// from it completes: while some are in flight this spins (the send CQ raises
    /// no event); when every slot holds a frame waiting for a credit, only a
    /// response can help, and this sleeps in the poller until one comes or the
    /// peer's TCP connection closes (then `Closed`, at once). A peer that
    /// frees nothing for `TX_STALL` is dropped (`Closed` too).
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
                // as TCP does with a peer that takes nothing: the connection
                // is dropped, so a replicated job fails over to another copy
                // and any other job fails with a reason, not a full queue
                let (queued, writes) =
                    self.conns[idx].as_ref().map_or((0, 0), |c| (c.tx_queue.len(), c.tx_inflight.len()));
                let why = format!(
                    "peer took nothing for {TX_STALL:?} ({queued} frames queued, {writes} WRITEs and {} READs in flight)",
                    self.reads.len()
                );
                self.fail(peer, why);
                self.close_failed();
                return Err(TxError::Closed(peer));
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
