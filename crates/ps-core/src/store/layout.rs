//! [`DenseLayout`]: how one shard lays out its part of a dense table in its
//! slab. The shard builds it, the view carries it, and a one-sided reader
//! (ps-rdma) turns a table-global float span into a slab offset with it.
//!
//! A pure function of the owned ranges: it must never depend on what was
//! pushed, and must answer `None` rather than clip a span it does not hold.

use crate::keys::{Key, KeyRange};

/// How one shard lays out its part of a dense table in its (single) slab: what a
/// worker needs to turn a table-global float span into block addresses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DenseLayout {
    /// the table's first key: flat indices count from it
    pub table_begin: Key,
    /// floats per key
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

#[cfg(test)]
mod tests {
    use super::super::rule;
    use crate::kernels::Kernels;
    use crate::keys::KeyRange;
    use crate::rules::RuleSpec;
    use crate::slab::BLOCK_FLOATS;
    use crate::store::DenseStore;

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
}
