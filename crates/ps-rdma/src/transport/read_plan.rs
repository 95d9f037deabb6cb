//! READ planning: which dense pulls a client serves with one-sided READs of
//! the server's slab, and which READs fetch each one. Pure functions of the
//! frame and the peer's exported tables, so they are tested here without a
//! device.
//!
//! A server registers each dense table's slab for remote READ and sends its
//! layout. A client's dense range pull is then not sent: the transport READs
//! the blocks that hold the span (the unwanted part of an end block left out,
//! [`READ_TRIM_MIN`]), and `read_land.rs` checks and answers it.
//!
//! Must never plan a READ outside the region the peer registered, and must
//! never order a block's pieces other than head, floats, tail (the block check
//! in `ps_core::slab` depends on it). Posting and landing are not done here.

use std::collections::HashMap;

use ps_core::limits::{WireLimits, BLOCK_BYTES};
use ps_core::slab::BLOCK_FLOATS;
use ps_core::store::DenseLayout;
use ps_core::wire::{self, DataHeader, Frame, Kind};

use super::{READ_PIECES, READ_TRIM_MIN};

#[derive(Debug)]
pub(super) struct RemoteTable {
    pub(super) addr: u64,
    pub(super) rkey: u32,
    pub(super) len: u64,
    pub(super) layout: DenseLayout,
}

/// Blocks a READ into `read_mr` needs at most: a chunk's floats may straddle one
/// more block at each end.
pub(super) fn read_blocks_max(limits: &WireLimits) -> usize {
    limits.chunk_bytes / 4 / BLOCK_FLOATS + 2
}

#[derive(Debug, Clone)]
pub(super) struct ReadPlan {
    pub(super) h: DataHeader,
    pub(super) first_block: usize,
    pub(super) first_pos: usize,
    pub(super) blocks: usize,
    /// where in the landing buffer its blocks go
    pub(super) buf_block: usize,
}

impl ReadPlan {
    /// The READs that fetch this plan's span, as (offset from the first block's
    /// start, length), in ascending address order, which is the order they are
    /// posted and (an RC QP's responder takes READs in order) carried out in:
    /// so each block's head is read before its wanted floats, and those before
    /// its tail, as the block check needs (`ps_core::slab`). The bytes of a cut
    /// end are not fetched: the landing slot keeps stale bytes there, which
    /// neither the check nor the response reads.
    pub(super) fn pieces(&self) -> ([(usize, usize); READ_PIECES], usize) {
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
pub(super) struct ReadOp {
    pub(super) local_off: usize,
    pub(super) len: usize,
    pub(super) remote_addr: u64,
    pub(super) rkey: u32,
}

/// The READs of `plans`, in the order they are posted: plan by plan, each
/// plan's pieces in ascending address order (the block check depends on it).
pub(super) fn read_ops(plans: &[ReadPlan], tables: &HashMap<u32, RemoteTable>) -> Vec<ReadOp> {
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
pub(super) fn read_plan(frame: &[u8], tables: &HashMap<u32, RemoteTable>, limits: &WireLimits) -> Option<ReadPlan> {
    if frame.len() < wire::DATA_HEADER_BYTES || wire::peek_kind(frame) != Some(Kind::Pull) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        wire::set_kind(&mut push, Kind::Push);
        assert!(read_plan(&push, &tables, &limits).is_none());
        // beyond the registered length: never READ outside the region
        tables.get_mut(&4).unwrap().len = 3 * BLOCK_BYTES as u64;
        assert!(read_plan(&pull_frame(4, 6000, 100), &tables, &limits).is_some(), "blocks 1-2 are inside");
        assert!(read_plan(&pull_frame(4, 6000 + 2 * 1000, 20), &tables, &limits).is_none(), "block 3 is not");
    }
}
