//! [`DenseStore`]: one shard's owned key ranges of a dense table, back to back
//! in one slab (as its [`DenseLayout`] says), with the rule's state beside the
//! values.
//!
//! Every span and key is checked against the owned ranges before a float is
//! touched: this file must never clip a span that leaves an owned range, nor
//! change a value but through the block write protocol.

use std::sync::Arc;

use super::{BlockStore, DenseLayout, StoreError};
use crate::checkpoint::CheckpointError;
use crate::kernels::Kernels;
use crate::keys::{Key, KeyRange};
use crate::rules::UpdateRule;

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
    /// The part `owned` of the dense table `table_keys`, `dim` floats per key,
    /// zeroed, merged by `rule`. Fails only if the slab cannot be mapped.
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

    pub(crate) fn values(&self) -> &BlockStore {
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
    pub fn restore(&mut self, vals: &[f32], state: &[f32]) -> Result<(), CheckpointError> {
        let floats = self.layout.floats() as usize;
        if vals.len() != floats || state.len() != self.state.len() {
            return Err(CheckpointError::DenseCounts {
                values: vals.len(),
                state: state.len(),
                owned: floats,
                owned_state: self.state.len(),
            });
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

#[cfg(test)]
mod tests {
    use super::super::rule;
    use crate::kernels::Kernels;
    use crate::keys::KeyRange;
    use crate::rules::RuleSpec;
    use crate::store::DenseStore;

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
}
