//! The progress engine: the transport has no thread of its own, so every call
//! into it (`rx_burst`, `frame`, `flush`) first polls both completion queues
//! and hands each completion to the ring or the READ path, then posts what
//! credits allow. Also the two ways it waits: arming the receive CQ's channel,
//! and sleeping in the TCP poller (which watches that channel's fd).
//!
//! Must never block for long (a READ's round trip at most, and a wait only
//! where a caller asked for one), and must never decide what a completion
//! means for a ring or a READ beyond routing it there.

use std::time::Duration;

use ps_core::transport::{Transport, TransportError};

use super::{io, wr_parts, RdmaTransport, TAG_READ, TAG_WRITE};
use crate::datapath::{self, Completion};

impl RdmaTransport {
    /// Polls both completion queues, posts what credits allow, serves READ pulls
    /// whose turn has come. Never blocks for long (a READ's round trip at most).
    pub(super) fn progress(&mut self) -> Result<(), TransportError> {
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

    pub(super) fn on_send_completion(&mut self, c: &Completion) {
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

    /// Asks for an event at the next receive completion, then looks once more
    /// (a completion that came before arming raises none).
    pub(super) fn arm_recv(&mut self) -> Result<(), TransportError> {
        if let Ok(v) = &self.verbs {
            v.recv_cq.arm().map_err(io)?;
        }
        self.progress()
    }

    /// Waits in the poller for TCP traffic or a receive completion's event
    /// (`arm_recv` first), `wait` at most; TCP frames go to `tcp_rx`.
    pub(super) fn poll_tcp(&mut self, wait: Option<Duration>) -> Result<(), TransportError> {
        self.tcp.rx_burst(&mut self.tcp_rx, wait)?;
        if self.tcp.take_extra_ready() {
            if let Ok(v) = &self.verbs {
                v.recv_cq.take_events();
            }
        }
        Ok(())
    }
}
