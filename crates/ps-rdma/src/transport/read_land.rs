//! READ posting and landing: chained READs of a pull's slab blocks into a
//! landing slot, then, once the last one completes, the tear check of every
//! block (head and tail versions, `ps_core::slab::check_block`), a re-read of
//! each torn one, and the answer the shard would have sent: its `PullResp`
//! header and the values gathered out of the landing slot (`RdmaRx::Answer`;
//! no frame is built, so the worker decodes nothing). The shard's CPU is not
//! involved.
//!
//! Must never read a landing slot before its batch's last READ has completed,
//! never hand out a block that failed the check, and never free a landing slot
//! while a READ into it may still be in flight.

use std::time::Instant;

use ps_core::kernels::copy_bytes;
use ps_core::limits::BLOCK_BYTES;
use ps_core::slab::{check_block, BLOCK_FLOATS};
use ps_core::wire::{DataHeader, Kind};

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
    /// the answers the shard would have sent, frees its landing slots.
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
    /// whole, and queues the batch's answers, gathered from the landing slots.
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
            // the answer the shard would have sent: its header, and the values
            // copied once out of the landing slot (the slot is free again after
            // this); every value byte is written, so a pooled buffer is cut or
            // grown to length, not cleared
            let h = DataHeader { kind: Kind::PullResp, ..p.h };
            let n = p.h.b as usize;
            let mut buf = self.pool.pop().unwrap_or_default();
            buf.resize((n * 4).div_ceil(8), 0);
            let slot = &mr.bytes()[p.buf_block * BLOCK_BYTES..(p.buf_block + p.blocks) * BLOCK_BYTES];
            gather_values(&mut bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..n * 4], slot, p.first_pos);
            self.stats.read_pulls += 1;
            self.ready.push_back(RdmaRx::Answer { peer, h, buf });
        }
        self.stats.read_bytes += torn * BLOCK_BYTES as u64;
        self.stats.torn_retries += torn;
        Ok(())
    }
}

/// Copies the wanted floats out of landed slab blocks: `slot` holds whole
/// blocks (head word, `BLOCK_FLOATS` floats, tail word), the first wanted
/// float at `first_pos` of the first block; `dst` takes as many as it holds.
fn gather_values(dst: &mut [u8], slot: &[u8], first_pos: usize) {
    let n = dst.len() / 4;
    let (mut done, mut pos, mut blk) = (0, first_pos, 0);
    while done < n {
        let take = (BLOCK_FLOATS - pos).min(n - done);
        let at = blk * BLOCK_BYTES + 8 + pos * 4;
        copy_bytes(&mut dst[done * 4..(done + take) * 4], &slot[at..at + take * 4]);
        done += take;
        pos = 0;
        blk += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of a pull come out of the landed blocks in order, over
    /// block boundaries, without a head or tail word among them.
    #[test]
    fn gathered_values_skip_the_block_words_in_order() {
        let blocks = 3;
        let mut slot = vec![0u8; blocks * BLOCK_BYTES];
        for k in 0..blocks {
            let at = k * BLOCK_BYTES;
            slot[at..at + 8].fill(0xEE);
            slot[at + BLOCK_BYTES - 8..at + BLOCK_BYTES].fill(0xEE);
            for j in 0..BLOCK_FLOATS {
                let v = (k * BLOCK_FLOATS + j) as f32;
                slot[at + 8 + j * 4..at + 12 + j * 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        for (first_pos, n) in [(0, 1), (5, 10), (BLOCK_FLOATS - 1, 2), (3, BLOCK_FLOATS), (7, 2 * BLOCK_FLOATS - 7)] {
            let mut dst = vec![0u8; n * 4];
            gather_values(&mut dst, &slot, first_pos);
            let got: Vec<f32> = dst.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let want: Vec<f32> = (first_pos..first_pos + n).map(|f| f as f32).collect();
            assert_eq!(got, want, "from {first_pos}, {n} floats");
        }
    }
}
