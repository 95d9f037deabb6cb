//! [`SparseStore`]: one shard's part of a sparse table: the slot table
//! (`SlotIndex`) walked in step with each sorted batch, slots handed out in
//! arrival order, values in slot-sized pieces of blocks, the rule's state
//! beside them.
//!
//! A batch is checked whole (sorted, owned) before anything changes: this file
//! must never leave a refused batch half applied, nor allocate per request once
//! its scratch vectors are warm.

use std::sync::Arc;

use super::{BlockStore, StoreError};
use crate::checkpoint::CheckpointError;
use crate::kernels::Kernels;
use crate::keys::{Key, KeyRange};
use crate::rules::UpdateRule;
use crate::slab::BLOCK_FLOATS;
use crate::slot_index::SlotIndex;

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
    /// An empty sparse table over the key ranges `owned`, `dim` floats per key,
    /// merged by `rule`, growing by slabs of `blocks_per_slab` blocks.
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

    /// Keys that have a slot (were ever pushed).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if no key was ever pushed.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The values, one `dim`-float row per slot.
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
    pub fn restore(&mut self, keys: &[Key], vals: &[f32], state: &[f32]) -> Result<(), CheckpointError> {
        let (dim, spv) = (self.dim, self.rule.state_per_value());
        if !self.index.is_empty() {
            return Err(CheckpointError::NotEmpty);
        }
        if vals.len() != keys.len() * dim || state.len() != keys.len() * dim * spv {
            return Err(CheckpointError::SparseCounts { keys: keys.len(), values: vals.len(), state: state.len() });
        }
        crate::keys::check_sorted(keys).map_err(CheckpointError::Keys)?;
        self.prepare_pull(keys)?;
        self.insert_missing(keys)?;
        self.prepare_pull(keys)?;
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
    use super::super::rule;
    use crate::kernels::Kernels;
    use crate::keys::KeyRange;
    use crate::rng::SplitMix64;
    use crate::rules::RuleSpec;
    use crate::store::{SparseStore, StoreError};

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
