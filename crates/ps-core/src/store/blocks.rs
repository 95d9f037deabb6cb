//! The flat float space a store keeps its values in: slabs of versioned
//! blocks, grown a slab at a time, addressed by flat float index (see the
//! addressing notes of the `store` module).
//!
//! Knows nothing of keys, tables or rules; it must never write a block's data
//! but inside that block's write protocol (`Slab::write`).

use crate::slab::{Slab, BLOCK_FLOATS};

/// Growable flat float space over slabs of versioned blocks.
#[derive(Debug)]
pub struct BlockStore {
    slabs: Vec<Slab>,
    blocks_per_slab: usize,
}

impl BlockStore {
    /// A store whose first slab holds `floats` (dense tables: exactly their size).
    pub fn with_floats(floats: usize, blocks_per_slab: usize) -> std::io::Result<Self> {
        let need = floats.div_ceil(BLOCK_FLOATS).max(1);
        let per = blocks_per_slab.max(need);
        Ok(Self { slabs: vec![Slab::new(need)?], blocks_per_slab: per })
    }

    pub(crate) fn blocks(&self) -> usize {
        self.slabs.iter().map(|s| s.blocks()).sum()
    }

    pub(crate) fn slabs(&self) -> &[Slab] {
        &self.slabs
    }

    /// Makes sure flat floats `0..floats` exist.
    pub fn ensure_floats(&mut self, floats: usize) -> std::io::Result<()> {
        while self.blocks() * BLOCK_FLOATS < floats {
            self.slabs.push(Slab::new(self.blocks_per_slab)?);
        }
        Ok(())
    }

    #[inline]
    pub(super) fn locate(&self, block: usize) -> (usize, usize) {
        locate(self.slabs[0].blocks(), self.blocks_per_slab, block)
    }

    /// The block-sized pieces of flat span `start..start+len`.
    #[inline]
    fn pieces(&self, start: usize, len: usize) -> Pieces {
        Pieces { at: start, done: 0, len, first: self.slabs[0].blocks(), per: self.blocks_per_slab }
    }

    /// Calls `f(data, offset_in_span)` for each block-sized piece of flat span
    /// `start..start+len`, each inside the block's write protocol.
    #[inline]
    pub fn update_span(&mut self, start: usize, len: usize, mut f: impl FnMut(&mut [f32], usize)) {
        for p in self.pieces(start, len) {
            self.slabs[p.slab].write(p.block, |d| f(&mut d[p.pos..p.pos + p.n], p.done));
        }
    }

    /// Copies flat span `start..start+out.len()` into `out`.
    #[inline]
    pub fn read_span(&self, start: usize, out: &mut [f32]) {
        for p in self.pieces(start, out.len()) {
            out[p.done..p.done + p.n].copy_from_slice(&self.slabs[p.slab].data(p.block)[p.pos..p.pos + p.n]);
        }
    }

    /// Calls `f` on each block-sized slice of flat span `start..start+len`, in
    /// order, while it returns true; returns false if `f` stopped early.
    pub fn for_each_slice<'a>(&'a self, start: usize, len: usize, mut f: impl FnMut(&'a [f32]) -> bool) -> bool {
        self.pieces(start, len).all(|p| f(&self.slabs[p.slab].data(p.block)[p.pos..p.pos + p.n]))
    }

    /// One whole block's data (owner thread).
    #[inline]
    pub(super) fn block_data(&self, block: usize) -> &[f32] {
        let (s, b) = self.locate(block);
        self.slabs[s].data(b)
    }

    /// Runs `f` on one whole block's data inside the write protocol.
    #[inline]
    pub(super) fn write_block<R>(&mut self, block: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let (s, b) = self.locate(block);
        self.slabs[s].write(b, f)
    }
}

/// (slab, block in slab) of flat block `block`: the first slab may be smaller than the rest.
#[inline]
fn locate(first: usize, per: usize, block: usize) -> (usize, usize) {
    if block < first {
        (0, block)
    } else {
        let b = block - first;
        (1 + b / per, b % per)
    }
}

/// One block-sized piece of a flat span.
#[derive(Clone, Copy, Debug)]
struct Piece {
    slab: usize,
    block: usize,
    /// offset of the piece in its block's data
    pos: usize,
    n: usize,
    /// offset of the piece in the span
    done: usize,
}

/// The pieces of a flat span, block by block (computed without borrowing the store).
#[derive(Debug)]
struct Pieces {
    at: usize,
    done: usize,
    len: usize,
    first: usize,
    per: usize,
}

impl Iterator for Pieces {
    type Item = Piece;
    #[inline]
    fn next(&mut self) -> Option<Piece> {
        if self.done >= self.len {
            return None;
        }
        let (block, pos) = (self.at / BLOCK_FLOATS, self.at % BLOCK_FLOATS);
        let n = (BLOCK_FLOATS - pos).min(self.len - self.done);
        let (slab, block) = locate(self.first, self.per, block);
        let p = Piece { slab, block, pos, n, done: self.done };
        self.at += n;
        self.done += n;
        Some(p)
    }
}
