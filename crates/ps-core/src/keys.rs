//! Keys, key ranges and tables.
//!
//! A key is a `u64`. A table holds a fixed-length vector of `dim` f32 values per
//! key, and is either **dense** (every key of its range exists from the start,
//! laid out contiguously, so a range of keys is a contiguous run of floats) or
//! **sparse** (keys come into being on their first push and live in a slot table).
//!
//! Every table has a key range; the ring maps a key's *relative position* in its
//! table's range onto the ring, so a small dense table (keys 0..1000) spreads over
//! all servers just as a sparse table spread over the whole u64 space does.

use serde::{Deserialize, Serialize};

/// A key of a table: any `u64` but `u64::MAX`.
pub type Key = u64;

/// A table's identity on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableId(pub u32);

/// A half-open range of keys `begin..end`. Key `u64::MAX` cannot be in any range;
/// [`KeyRange::FULL`] is every other key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRange {
    /// the first key in the range
    pub begin: Key,
    /// one past the last key in the range
    pub end: Key,
}

impl KeyRange {
    /// Every key but `u64::MAX`: `0..u64::MAX`.
    pub const FULL: KeyRange = KeyRange { begin: 0, end: u64::MAX };

    /// `begin..end`; panics if `begin > end`.
    pub fn new(begin: Key, end: Key) -> Self {
        assert!(begin <= end, "KeyRange {begin}..{end} is reversed");
        Self { begin, end }
    }

    /// Number of keys in the range.
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }

    /// Whether the range holds no key.
    pub fn is_empty(&self) -> bool {
        self.begin == self.end
    }

    /// Whether `k` is in `begin..end`.
    pub fn contains(&self, k: Key) -> bool {
        self.begin <= k && k < self.end
    }

    /// The part of `self` that is also in `other` (possibly empty).
    pub fn intersect(&self, other: &KeyRange) -> KeyRange {
        let begin = self.begin.max(other.begin);
        let end = self.end.min(other.end).max(begin);
        KeyRange { begin, end }
    }
}

/// How a table stores its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Layout {
    /// Every key of `keys` exists; values are zero until pushed.
    Dense {
        /// the table's keys
        keys: KeyRange,
    },
    /// Keys of `keys` come into being on their first push; a pull of a key never
    /// pushed reads zeros (and does not create it).
    Sparse {
        /// the keys the table may hold
        keys: KeyRange,
    },
}

impl Layout {
    /// The table's key range, whatever the layout.
    pub fn keys(&self) -> KeyRange {
        match *self {
            Layout::Dense { keys } | Layout::Sparse { keys } => keys,
        }
    }

    /// "dense" or "sparse", for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Dense { .. } => "dense",
            Layout::Sparse { .. } => "sparse",
        }
    }
}

/// Checks the worker API's key contract: strictly ascending.
pub fn check_sorted(keys: &[Key]) -> Result<(), crate::PsError> {
    for (i, w) in keys.windows(2).enumerate() {
        if w[1] <= w[0] {
            return Err(crate::PsError::KeysNotSorted { index: i + 1, key: w[1] });
        }
    }
    Ok(())
}

/// Sorts `(keys, vals)` pairs by key and sums the values of repeated keys, so the
/// result meets the worker API's contract. `vals` has `dim` floats per key.
pub fn sort_merge(keys: &[Key], vals: &[f32], dim: usize) -> (Vec<Key>, Vec<f32>) {
    assert_eq!(keys.len() * dim, vals.len(), "sort_merge: vals must hold dim floats per key");
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_unstable_by_key(|&i| keys[i]);
    let mut out_k: Vec<Key> = Vec::with_capacity(keys.len());
    let mut out_v: Vec<f32> = Vec::with_capacity(vals.len());
    for i in order {
        let v = &vals[i * dim..(i + 1) * dim];
        if out_k.last() == Some(&keys[i]) {
            let n = out_v.len();
            for (a, b) in out_v[n - dim..].iter_mut().zip(v) {
                *a += *b;
            }
        } else {
            out_k.push(keys[i]);
            out_v.extend_from_slice(v);
        }
    }
    (out_k, out_v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_merge_sums_duplicates() {
        let (k, v) = sort_merge(&[5, 1, 5, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 2);
        assert_eq!(k, vec![1, 3, 5]);
        assert_eq!(v, vec![3.0, 4.0, 7.0, 8.0, 1.0 + 5.0, 2.0 + 6.0]);
        assert!(check_sorted(&k).is_ok());
    }

    #[test]
    fn check_sorted_names_the_offender() {
        assert_eq!(check_sorted(&[1, 2, 2]), Err(crate::PsError::KeysNotSorted { index: 2, key: 2 }));
        assert!(check_sorted(&[]).is_ok());
    }

    #[test]
    fn intersect() {
        let a = KeyRange::new(0, 10);
        assert_eq!(a.intersect(&KeyRange::new(5, 20)), KeyRange::new(5, 10));
        assert!(a.intersect(&KeyRange::new(10, 20)).is_empty());
    }
}
