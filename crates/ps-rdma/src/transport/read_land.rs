//! READ posting and landing: chained READs of a pull's slab blocks into a
//! landing slot, then, once the last one completes, the tear check of every
//! block (head and tail versions, `ps_core::slab::check_block`), a re-read of
//! each torn one, and the `PullResp` frame the shard would have sent, built
//! from the landing slot. The shard's CPU is not involved.
//!
//! Must never read a landing slot before its batch's last READ has completed,
//! never hand out a block that failed the check, and never free a landing slot
//! while a READ into it may still be in flight.

use std::time::Instant;

use ps_core::kernels::copy_bytes;
use ps_core::limits::BLOCK_BYTES;
use ps_core::slab::{check_block, BLOCK_FLOATS};
use ps_core::wire::{self, DataHeader, Kind};

use super::read_plan::{read_blocks_max, read_ops, ReadPlan};
use super::{wr_id, RdmaRx, RdmaTransport, TAG_READ, TAG_REREAD, TORN_RETRIES_MAX, TX_STALL};
use crate::datapath::{self, Completion, Op, Wr};
use crate::{Cq, RdmaError};

/// One chained READ post: pull chunks landing in `read_mr` slots.
#[derive(Debug)]
pub(super) struct ReadBatch {
    pub(super) conn: usize,
    pub(super) gen: u16,
    pub(super) seq: u32,
    pub(super) plans: Vec<ReadPlan>,
    /// its last (signalled) READ completed: an RC send queue completes in order
    pub(super) done: bool,
}

impl RdmaTransport {
    /// Posts one chain of READs of whole slab blocks for `plans` (each into its
    /// landing slot), the last one signalled; `finish_reads` takes it from there.
    pub(super) fn post_reads(&mut self, idx: usize, plans: Vec<ReadPlan>) -> Result<(), RdmaError> {
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
        r
    }

    /// Handles every READ batch that has landed: re-reads its torn blocks, queues
    /// the `PullResp` frames the shard would have sent, frees its landing slots.
    pub(super) fn finish_reads(&mut self) {
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
                        self.fail(peer, e.to_string());
                    }
                }
            }
        }
    }

    /// Checks every block of a landed batch, re-reading each torn one until it is
    /// whole, and builds the batch's `PullResp` frames from the landing slots.
    fn land(&mut self, b: &ReadBatch, stash: &mut Vec<Completion>) -> Result<(), RdmaError> {
        let conn = self.conns[b.conn].as_ref().filter(|c| c.gen == b.gen).ok_or(RdmaError::ConnGone)?;
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
                        return Err(RdmaError::Torn { block: p.first_block + k, table: p.h.table, tries });
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
                    unsafe { datapath::post_batch(&conn.qp, &[wr]) }?;
                    wait_wr(cq, id, stash)?;
                }
            }
        }
        let peer = conn.peer;
        for p in &b.plans {
            let resp = DataHeader { kind: Kind::PullResp, ..p.h };
            let len = resp.frame_len().ok_or(RdmaError::PullTooLarge)?;
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
}

/// Spins on the send CQ until work request `id` completes (a torn block's
/// re-read: rare, and the caller needs it before it can go on); other completions
/// polled meanwhile go to `stash` for the caller to handle.
fn wait_wr(cq: &Cq, id: u64, stash: &mut Vec<Completion>) -> Result<(), RdmaError> {
    let start = Instant::now();
    let mut wc = Vec::new();
    loop {
        wc.clear();
        datapath::poll(cq, &mut wc, 16)?;
        let mut mine = None;
        for c in wc.drain(..) {
            if c.wr_id == id && mine.is_none() {
                mine = Some(c);
            } else {
                stash.push(c);
            }
        }
        if let Some(c) = mine {
            return if c.ok { Ok(()) } else { Err(RdmaError::ReadFailed(c.status_str())) };
        }
        if start.elapsed() > TX_STALL {
            return Err(RdmaError::ReadStalled(TX_STALL));
        }
        std::hint::spin_loop();
    }
}
