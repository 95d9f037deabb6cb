//! What one shard stores for one table: values in versioned slab blocks, optimizer
//! state beside them, and (for sparse tables) the slot table that maps keys to
//! where their values live.
//!
//! ## Addressing
//! Values live in a *flat float space* of blocks: flat index `f` is float
//! `f % BLOCK_FLOATS` of block `f / BLOCK_FLOATS`. A dense range of keys is a
//! contiguous flat span. A sparse key gets a *slot*; with `dim <= BLOCK_FLOATS` a
//! block holds `BLOCK_FLOATS / dim` whole slots (no slot straddles a block, so a
//! one-sided READ of one block returns whole values), otherwise a slot starts on a
//! block boundary and spans as many blocks as it needs.
//!
//! ## The sparse slot table
//! Keys arrive sorted (the worker API requires it), so the slot table
//! ([`SlotIndex`], a two-level B+-tree of sorted pages) is walked in step with
//! each batch by a forward-only cursor: sequential access, instead of a random
//! hash probe per key. New keys get the next free slots (so keys pushed together
//! get consecutive slots, and their values share blocks) and go into their pages.
//!
//! Nothing here allocates per request once warmed up: scratch vectors are kept.

use std::sync::Arc;

use crate::kernels::Kernels;
use crate::keys::{Key, KeyRange};
use crate::rules::UpdateRule;
use crate::slab::{Slab, BLOCK_FLOATS};
use crate::slot_index::SlotIndex;

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

    pub fn blocks(&self) -> usize {
        self.slabs.iter().map(|s| s.blocks()).sum()
    }

    pub fn slabs(&self) -> &[Slab] {
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
    fn locate(&self, block: usize) -> (usize, usize) {
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
    fn block_data(&self, block: usize) -> &[f32] {
        let (s, b) = self.locate(block);
        self.slabs[s].data(b)
    }

    /// Runs `f` on one whole block's data inside the write protocol.
    #[inline]
    fn write_block<R>(&mut self, block: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
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

/// Why a shard refused part of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} is not owned by this shard (stale ring?)")]
    NotOwned(Key),
    #[error("span of {len} floats at flat offset {start} is not inside one range this shard owns")]
    SpanNotOwned { start: u64, len: u64 },
    #[error("out of memory for slabs: {0}")]
    Memory(String),
    #[error("keys must be strictly ascending; {0} is not above the key before it")]
    NotSorted(Key),
    #[error("sparse table is full: {0} slots")]
    Full(usize),
}

/// How one shard lays out its part of a dense table in its (single) slab: what a
/// worker needs to turn a table-global float span into block addresses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DenseLayout {
    pub table_begin: Key,
    pub dim: u32,
    /// (first key, end key, flat float index of the first key's values), ascending
    pub ranges: Vec<(Key, Key, u64)>,
}

impl DenseLayout {
    /// The layout of `owned` (ascending) of a table over `table_keys`: the
    /// ranges back to back, in key order, from flat float 0.
    pub fn new(table_keys: KeyRange, dim: u32, owned: &[KeyRange]) -> Self {
        let mut base = 0u64;
        let ranges = owned
            .iter()
            .map(|r| {
                let at = base;
                base += r.len() * dim as u64;
                (r.begin, r.end, at)
            })
            .collect();
        Self { table_begin: table_keys.begin, dim, ranges }
    }

    /// Floats the layout holds.
    pub fn floats(&self) -> u64 {
        self.ranges.iter().map(|r| (r.1 - r.0) * self.dim as u64).sum()
    }

    /// The shard-local flat float index of table-global flat span `start..start+len`,
    /// if one owned range holds all of it (what `DenseStore::pull` accepts).
    pub fn local(&self, start: u64, len: u64) -> Option<u64> {
        let dim = self.dim as u64;
        let key = self.table_begin.checked_add(start / dim)?;
        let i = self.ranges.partition_point(|r| r.1 <= key);
        let &(begin, end, base) = self.ranges.get(i)?;
        let first = (begin - self.table_begin) * dim;
        let last = (end - self.table_begin) * dim;
        (start >= first && start.checked_add(len)? <= last).then(|| base + (start - first))
    }
}

/// One shard's part of a dense table: its owned key ranges, contiguous in one slab.
#[derive(Debug)]
pub struct DenseStore {
    dim: usize,
    layout: DenseLayout,
    values: BlockStore,
    state: Vec<f32>,
    rule: Arc<dyn UpdateRule>,
}

impl DenseStore {
    pub fn new(table_keys: KeyRange, dim: u32, owned: &[KeyRange], rule: Arc<dyn UpdateRule>) -> std::io::Result<Self> {
        let layout = DenseLayout::new(table_keys, dim, owned);
        let floats = layout.floats() as usize;
        let k = rule.state_per_value();
        Ok(Self {
            dim: dim as usize,
            layout,
            values: BlockStore::with_floats(floats, 0)?,
            state: vec![rule.initial_state(); floats * k],
            rule,
        })
    }

    pub fn values(&self) -> &BlockStore {
        &self.values
    }

    /// Where this shard keeps the table, for one-sided readers: every owned key
    /// range with the flat float index its values start at, all in one slab.
    pub fn layout(&self) -> &DenseLayout {
        &self.layout
    }

    /// Maps a table-global flat float span to this shard's flat space.
    fn local(&self, start: u64, len: u64) -> Result<usize, StoreError> {
        self.layout.local(start, len).map(|l| l as usize).ok_or(StoreError::SpanNotOwned { start, len })
    }

    /// Merges `vals` into table-global flat floats `start..start+vals.len()`.
    pub fn push(&mut self, start: u64, vals: &[f32], k: &Kernels) -> Result<(), StoreError> {
        let local = self.local(start, vals.len() as u64)?;
        let spv = self.rule.state_per_value();
        let (rule, state) = (&self.rule, &mut self.state);
        self.values.update_span(local, vals.len(), |w, off| {
            let g = &vals[off..off + w.len()];
            let st = &mut state[(local + off) * spv..(local + off + w.len()) * spv];
            rule.apply(w, st, g, k);
        });
        Ok(())
    }

    fn key_start(&self, key: Key) -> Result<u64, StoreError> {
        let rel = key.checked_sub(self.layout.table_begin).ok_or(StoreError::NotOwned(key))?;
        let start = rel.checked_mul(self.dim as u64).ok_or(StoreError::NotOwned(key))?;
        self.local(start, self.dim as u64).map_err(|_| StoreError::NotOwned(key))?;
        Ok(start)
    }

    /// Checks that a span is owned here (what `pull` would check), without reading.
    pub fn check_span(&self, start: u64, len: u64) -> Result<(), StoreError> {
        self.local(start, len).map(|_| ())
    }

    /// Checks that every key is owned here.
    pub fn check_keys(&self, keys: &[Key]) -> Result<(), StoreError> {
        keys.iter().try_for_each(|&k| self.key_start(k).map(|_| ()))
    }

    /// Merges `dim` floats per key for a key list (all keys checked before any change).
    pub fn push_keys(&mut self, keys: &[Key], vals: &[f32], k: &Kernels) -> Result<(), StoreError> {
        for &key in keys {
            self.key_start(key)?;
        }
        for (i, &key) in keys.iter().enumerate() {
            let start = self.key_start(key)?;
            self.push(start, &vals[i * self.dim..(i + 1) * self.dim], k)?;
        }
        Ok(())
    }

    /// Settles every key of `keys` (a settling rule's step; see
    /// [`UpdateRule::settles`]): the rule turns each key's gathered state into
    /// its new weights, through the same versioned block writes as a push.
    pub fn settle_keys(&mut self, keys: &[Key]) -> Result<(), StoreError> {
        let (dim, spv) = (self.dim, self.rule.state_per_value());
        let mut w = vec![0.0f32; dim];
        for &key in keys {
            let local = self.local(self.key_start(key)?, dim as u64)?;
            let (rule, state) = (&self.rule, &mut self.state);
            // one key's floats may sit in two blocks: gather, settle, scatter
            self.values.read_span(local, &mut w);
            rule.settle(&mut w, &mut state[local * spv..(local + dim) * spv]);
            self.values.update_span(local, dim, |dst, off| dst.copy_from_slice(&w[off..off + dst.len()]));
        }
        Ok(())
    }

    /// Every owned value and the rule's state (a checkpoint).
    pub fn snapshot(&self) -> (Vec<f32>, Vec<f32>) {
        let mut vals = vec![0f32; self.layout.floats() as usize];
        self.values.read_span(0, &mut vals);
        (vals, self.state.clone())
    }

    /// Puts back what [`DenseStore::snapshot`] took, through the same versioned
    /// block writes as a push (the slabs stay where they are, registered or not).
    pub fn restore(&mut self, vals: &[f32], state: &[f32]) -> Result<(), String> {
        let floats = self.layout.floats() as usize;
        if vals.len() != floats || state.len() != self.state.len() {
            return Err(format!(
                "the checkpoint holds {} values and {} state floats; this shard owns {floats} and {}",
                vals.len(),
                state.len(),
                self.state.len()
            ));
        }
        self.values.update_span(0, floats, |w, off| w.copy_from_slice(&vals[off..off + w.len()]));
        self.state.copy_from_slice(state);
        Ok(())
    }

    /// Reads `dim` floats per key for a key list.
    pub fn pull_keys(&self, keys: &[Key], out: &mut [f32]) -> Result<(), StoreError> {
        for (i, &key) in keys.iter().enumerate() {
            let start = self.key_start(key)?;
            self.pull(start, &mut out[i * self.dim..(i + 1) * self.dim])?;
        }
        Ok(())
    }

    /// Calls `f` on the slab slices holding table-global flat floats
    /// `start..start+len`, in order (for sending straight from the slab).
    pub fn for_each_slice<'a>(
        &'a self,
        start: u64,
        len: u64,
        f: impl FnMut(&'a [f32]) -> bool,
    ) -> Result<bool, StoreError> {
        let local = self.local(start, len)?;
        Ok(self.values.for_each_slice(local, len as usize, f))
    }

    /// Reads table-global flat floats `start..start+out.len()`.
    pub fn pull(&self, start: u64, out: &mut [f32]) -> Result<(), StoreError> {
        let local = self.local(start, out.len() as u64)?;
        self.values.read_span(local, out);
        Ok(())
    }
}

/// One shard's part of a sparse table.
#[derive(Debug)]
pub struct SparseStore {
    dim: usize,
    owned: Vec<KeyRange>,
    index: SlotIndex,
    next_slot: u32,
    values: BlockStore,
    state: Vec<f32>,
    rule: Arc<dyn UpdateRule>,
    // scratch, reused across requests
    batch_slots: Vec<u32>,
    new_keys: Vec<(Key, u32)>,
    local_idx: Vec<u32>,
}

const NO_SLOT: u32 = u32::MAX;

impl SparseStore {
    pub fn new(
        dim: u32,
        owned: Vec<KeyRange>,
        rule: Arc<dyn UpdateRule>,
        blocks_per_slab: usize,
    ) -> std::io::Result<Self> {
        Ok(Self {
            dim: dim as usize,
            owned,
            index: SlotIndex::default(),
            next_slot: 0,
            values: BlockStore::with_floats(0, blocks_per_slab)?,
            state: Vec::new(),
            rule,
            batch_slots: Vec::new(),
            new_keys: Vec::new(),
            local_idx: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn values(&self) -> &BlockStore {
        &self.values
    }

    fn slots_per_block(&self) -> usize {
        (BLOCK_FLOATS / self.dim).max(1)
    }

    /// Flat float index of slot `s`.
    #[inline]
    fn slot_base(&self, s: u32) -> usize {
        let s = s as usize;
        if self.dim <= BLOCK_FLOATS {
            let spb = BLOCK_FLOATS / self.dim;
            (s / spb) * BLOCK_FLOATS + (s % spb) * self.dim
        } else {
            s * self.dim.div_ceil(BLOCK_FLOATS) * BLOCK_FLOATS
        }
    }

    /// Fills `batch_slots` with the slot of each key (NO_SLOT if absent), by
    /// walking the sorted batch against the sorted table with galloping search,
    /// and checks in the same pass that the batch is strictly ascending and owned
    /// here (one pass over the keys: at a million keys this is memory-bound).
    /// Returns how many keys are absent. Changes nothing but scratch.
    fn lookup(&mut self, batch: &[Key]) -> Result<usize, StoreError> {
        // sized up front and written by index: no length update per key
        self.batch_slots.clear();
        self.batch_slots.resize(batch.len(), NO_SLOT);
        let (owned, out) = (&self.owned[..], &mut self.batch_slots[..]);
        let mut cursor = self.index.cursor();
        let (mut r, mut missing) = (0usize, 0usize);
        let mut prev: Option<Key> = None;
        for (&k, slot) in batch.iter().zip(out.iter_mut()) {
            if prev.is_some_and(|p| k <= p) {
                return Err(StoreError::NotSorted(k));
            }
            prev = Some(k);
            while r < owned.len() && owned[r].end <= k {
                r += 1;
            }
            if r == owned.len() || !owned[r].contains(k) {
                return Err(StoreError::NotOwned(k));
            }
            match cursor.seek(k) {
                Some(s) => *slot = s,
                None => missing += 1,
            }
        }
        Ok(missing)
    }

    /// Gives every absent key of the batch a new slot and merges them into the table.
    fn insert_missing(&mut self, batch: &[Key]) -> Result<(), StoreError> {
        self.new_keys.clear();
        for (i, s) in self.batch_slots.iter_mut().enumerate() {
            if *s == NO_SLOT {
                if self.next_slot == NO_SLOT {
                    return Err(StoreError::Full(self.index.len()));
                }
                *s = self.next_slot;
                self.new_keys.push((batch[i], self.next_slot));
                self.next_slot += 1;
            }
        }
        if self.new_keys.is_empty() {
            return Ok(());
        }
        let floats = self.slot_base(self.next_slot - 1) + self.dim;
        self.values.ensure_floats(floats).map_err(|e| StoreError::Memory(e.to_string()))?;
        let spv = self.rule.state_per_value();
        self.state.resize(self.next_slot as usize * self.dim * spv, self.rule.initial_state());
        self.index.insert_sorted(&self.new_keys);
        Ok(())
    }

    /// Merges `vals` (dim floats per key) for strictly ascending `batch` keys.
    pub fn push(&mut self, batch: &[Key], vals: &[f32], k: &Kernels) -> Result<(), StoreError> {
        debug_assert_eq!(batch.len() * self.dim, vals.len());
        if self.lookup(batch)? > 0 {
            self.insert_missing(batch)?;
        }
        let dim = self.dim;
        if self.rule.is_sum() && dim <= BLOCK_FLOATS {
            // runs of keys whose slots share a block: one write protocol, one kernel call
            let spb = self.slots_per_block() as u32;
            let mut i = 0;
            while i < batch.len() {
                let (block, first, j) = block_run(&self.batch_slots, i, spb);
                self.local_idx.clear();
                self.local_idx.extend(self.batch_slots[i..j].iter().map(|s| s - first));
                let (idx, v) = (&self.local_idx, &vals[i * dim..j * dim]);
                self.values.write_block(block, |d| (k.scatter_add)(&mut d[..spb as usize * dim], idx, v, dim));
                i = j;
            }
            return Ok(());
        }
        let spv = self.rule.state_per_value();
        for (i, &s) in self.batch_slots.iter().enumerate() {
            let base = self.slot_base(s);
            let g = &vals[i * dim..(i + 1) * dim];
            let st_base = s as usize * dim * spv;
            let (rule, state) = (&self.rule, &mut self.state);
            self.values.update_span(base, dim, |w, off| {
                let st = &mut state[st_base + off * spv..st_base + (off + w.len()) * spv];
                rule.apply(w, st, &g[off..off + w.len()], k);
            });
        }
        Ok(())
    }

    /// Every key held, ascending, with its values and the rule's state (a checkpoint).
    pub fn snapshot(&self) -> (Vec<Key>, Vec<f32>, Vec<f32>) {
        let (dim, spv) = (self.dim, self.rule.state_per_value());
        let mut keys = Vec::with_capacity(self.index.len());
        let mut vals = vec![0f32; self.index.len() * dim];
        let mut state = Vec::with_capacity(self.index.len() * dim * spv);
        for (i, (k, s)) in self.index.iter().enumerate() {
            keys.push(k);
            self.values.read_span(self.slot_base(s), &mut vals[i * dim..(i + 1) * dim]);
            let st = s as usize * dim * spv;
            state.extend_from_slice(&self.state[st..st + dim * spv]);
        }
        (keys, vals, state)
    }

    /// Puts back what [`SparseStore::snapshot`] took into an empty store.
    pub fn restore(&mut self, keys: &[Key], vals: &[f32], state: &[f32]) -> Result<(), String> {
        let (dim, spv) = (self.dim, self.rule.state_per_value());
        if !self.index.is_empty() {
            return Err("a sparse store is restored only when empty".into());
        }
        if vals.len() != keys.len() * dim || state.len() != keys.len() * dim * spv {
            return Err(format!(
                "the checkpoint's {} keys come with {} values and {} state floats",
                keys.len(),
                vals.len(),
                state.len()
            ));
        }
        crate::keys::check_sorted(keys).map_err(|e| e.to_string())?;
        self.prepare_pull(keys).map_err(|e| e.to_string())?;
        self.insert_missing(keys).map_err(|e| e.to_string())?;
        self.prepare_pull(keys).map_err(|e| e.to_string())?;
        let slots = std::mem::take(&mut self.batch_slots);
        for (i, &s) in slots.iter().enumerate() {
            let base = self.slot_base(s);
            let v = &vals[i * dim..(i + 1) * dim];
            self.values.update_span(base, dim, |w, off| w.copy_from_slice(&v[off..off + w.len()]));
            let st = s as usize * dim * spv;
            self.state[st..st + dim * spv].copy_from_slice(&state[i * dim * spv..(i + 1) * dim * spv]);
        }
        self.batch_slots = slots;
        Ok(())
    }

    /// Reads `dim` floats per key into `out`; keys never pushed read as zeros.
    pub fn pull(&mut self, batch: &[Key], out: &mut [f32]) -> Result<(), StoreError> {
        self.prepare_pull(batch)?;
        self.pull_prepared(out);
        Ok(())
    }

    /// The checking half of a pull: validates `batch` and finds its slots.
    pub fn prepare_pull(&mut self, batch: &[Key]) -> Result<(), StoreError> {
        self.lookup(batch).map(|_| ())
    }

    /// The reading half of a pull, for the batch of the last `prepare_pull`.
    pub fn pull_prepared(&self, out: &mut [f32]) {
        debug_assert_eq!(self.batch_slots.len() * self.dim, out.len());
        let batch = &self.batch_slots;
        let dim = self.dim;
        if dim > BLOCK_FLOATS {
            for (i, &s) in self.batch_slots.iter().enumerate() {
                let o = &mut out[i * dim..(i + 1) * dim];
                if s == NO_SLOT {
                    o.fill(0.0);
                } else {
                    self.values.read_span(self.slot_base(s), o);
                }
            }
            return;
        }
        // runs of keys whose slots share a block: one block lookup per run
        let spb = self.slots_per_block() as u32;
        let mut i = 0;
        while i < batch.len() {
            if self.batch_slots[i] == NO_SLOT {
                out[i * dim..(i + 1) * dim].fill(0.0);
                i += 1;
                continue;
            }
            let (block, first, j) = block_run(&self.batch_slots, i, spb);
            let data = self.values.block_data(block);
            for (n, &s) in self.batch_slots[i..j].iter().enumerate() {
                let at = (s - first) as usize * dim;
                out[(i + n) * dim..(i + n + 1) * dim].copy_from_slice(&data[at..at + dim]);
            }
            i = j;
        }
    }
}

/// The run of batch positions `i..j` whose slots lie in the same block as slot
/// `slots[i]`: returns (block, first slot of that block, j). One division per
/// run, not per key: slots of keys pushed together are mostly consecutive.
#[inline]
fn block_run(slots: &[u32], i: usize, spb: u32) -> (usize, u32, usize) {
    let block = slots[i] / spb;
    let first = block * spb;
    let end = first.saturating_add(spb);
    let mut j = i + 1;
    while j < slots.len() && slots[j] >= first && slots[j] < end {
        j += 1;
    }
    (block as usize, first, j)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::rules::{RuleRegistry, RuleSpec};

    fn rule(spec: RuleSpec) -> Arc<dyn UpdateRule> {
        RuleRegistry::default().build(&spec).unwrap()
    }

    #[test]
    fn dense_push_and_pull_across_blocks_and_ranges() {
        let table = KeyRange::new(100, 10_100);
        let owned = [KeyRange::new(100, 2_100), KeyRange::new(5_000, 7_000)];
        let mut d = DenseStore::new(table, 3, &owned, rule(RuleSpec::Sum)).unwrap();
        let k = Kernels::best();
        let start = (5_000 - 100) * 3 + 1; // mid-key, crosses many blocks
        let vals: Vec<f32> = (0..4000).map(|i| i as f32).collect();
        d.push(start, &vals, k).unwrap();
        d.push(start, &vals, k).unwrap();
        let mut out = vec![0.0; 4000];
        d.pull(start, &mut out).unwrap();
        assert!(out.iter().enumerate().all(|(i, v)| *v == 2.0 * i as f32));
        // spans that leave an owned range are refused, not clipped
        assert!(d.push((2_100 - 100) * 3 - 1, &[1.0, 1.0], k).is_err());
        assert!(d.push(u64::MAX - 1, &[1.0], k).is_err());
        for b in 0..d.values().blocks() {
            let (s, bb) = d.values().locate(b);
            assert_eq!(d.values().slabs()[s].version(bb) % 2, 0);
        }
    }

    /// What a one-sided reader computes from the layout must be where the
    /// shard keeps the values: read the slab bytes at the layout's offsets.
    #[test]
    fn dense_layout_locates_values_in_the_slab() {
        let table = KeyRange::new(100, 10_100);
        let owned = [KeyRange::new(100, 2_100), KeyRange::new(5_000, 7_000)];
        let mut d = DenseStore::new(table, 3, &owned, rule(RuleSpec::Sum)).unwrap();
        let k = Kernels::best();
        let start = (5_000 - 100) * 3 + 7;
        let vals: Vec<f32> = (0..3000).map(|i| i as f32 + 1.0).collect();
        d.push(start, &vals, k).unwrap();
        let layout = d.layout();
        let local = layout.local(start, 3000).expect("owned") as usize;
        let slab = d.values().slabs()[0].as_bytes();
        for (i, want) in vals.iter().enumerate() {
            let f = local + i;
            let (b, pos) = (f / BLOCK_FLOATS, f % BLOCK_FLOATS);
            let at = b * crate::limits::BLOCK_BYTES + 8 + pos * 4;
            assert_eq!(f32::from_le_bytes(slab[at..at + 4].try_into().unwrap()), *want, "float {i}");
        }
        // not owned, or leaving the range: no location
        assert_eq!(layout.local((2_100 - 100) * 3 - 1, 2), None);
        assert_eq!(layout.local((3_000 - 100) * 3, 1), None);
        assert_eq!(layout.local(u64::MAX - 1, 1), None);
    }

    #[test]
    fn sparse_matches_a_reference_map_for_every_rule_and_dim() {
        let k = Kernels::best();
        for spec in [RuleSpec::Sum, RuleSpec::Sgd { lr: 0.5 }, RuleSpec::Assign] {
            for dim in [1u32, 3, 8, 1020, 1500] {
                let mut rng = SplitMix64::new(dim as u64);
                let mut s = SparseStore::new(dim, vec![KeyRange::FULL], rule(spec.clone()), 4).unwrap();
                let mut reference = std::collections::BTreeMap::<u64, Vec<f32>>::new();
                for _round in 0..6 {
                    let mut keys: Vec<u64> = (0..200).map(|_| rng.below(1000) * 7919).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    let vals: Vec<f32> = (0..keys.len() * dim as usize).map(|_| rng.below(17) as f32 - 8.0).collect();
                    s.push(&keys, &vals, k).unwrap();
                    for (i, key) in keys.iter().enumerate() {
                        let e = reference.entry(*key).or_insert_with(|| vec![0.0; dim as usize]);
                        for (j, w) in e.iter_mut().enumerate() {
                            let g = vals[i * dim as usize + j];
                            *w = match spec {
                                RuleSpec::Sum => *w + g,
                                RuleSpec::Sgd { lr } => *w - lr * g,
                                _ => g,
                            };
                        }
                    }
                }
                let mut keys: Vec<u64> = reference.keys().copied().collect();
                keys.push(3); // never pushed: reads zero
                keys.sort_unstable();
                let mut out = vec![1.0; keys.len() * dim as usize];
                s.pull(&keys, &mut out).unwrap();
                for (i, key) in keys.iter().enumerate() {
                    let want = reference.get(key).cloned().unwrap_or(vec![0.0; dim as usize]);
                    assert_eq!(
                        &out[i * dim as usize..(i + 1) * dim as usize],
                        &want[..],
                        "{spec:?} dim {dim} key {key}"
                    );
                }
                assert_eq!(s.len(), reference.len());
            }
        }
    }

    #[test]
    fn sparse_refuses_keys_it_does_not_own() {
        let mut s = SparseStore::new(1, vec![KeyRange::new(10, 20)], rule(RuleSpec::Sum), 4).unwrap();
        assert_eq!(s.push(&[10, 25], &[1.0, 1.0], Kernels::best()), Err(StoreError::NotOwned(25)));
        assert!(s.is_empty(), "a refused batch changes nothing");
    }
}
