//! The sparse key -> slot index of one shard's table: a two-level B+-tree of
//! sorted pages (at most `PAGE_KEYS_MAX` keys each) under a sorted array of
//! their first keys.
//!
//! Why this shape: batches arrive sorted, so a lookup is a walk with a cursor
//! that only moves forward (galloping over page heads, then within a page):
//! sequential memory, a few nanoseconds per key. A key that is new costs a
//! binary search and a move of at most one page (12 KiB), not the O(table)
//! rebuild a flat sorted array needs, so a 10M-key model with small minibatches
//! stays cheap. A batch of many new keys (the first push of a big model) is
//! merged in one pass instead.

use crate::keys::Key;

/// Keys per page at most; a fuller page splits in two.
pub const PAGE_KEYS_MAX: usize = 1024;
/// Keys per page when pages are built in bulk (room left for inserts).
const PAGE_KEYS_BULK: usize = 768;

#[derive(Debug, Default, Clone)]
struct Page {
    keys: Vec<Key>,
    slots: Vec<u32>,
}

/// Maps a sparse table's keys to their slots (indices into the store's
/// value and state arrays).
#[derive(Debug, Default, Clone)]
pub struct SlotIndex {
    pages: Vec<Page>,
    /// first key of each page, ascending
    firsts: Vec<Key>,
    len: usize,
}

/// A forward-only position for looking up an ascending run of keys; it keeps
/// the current page's slices, so a key in the same page costs one comparison
/// against the next page's head plus a short gallop.
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    index: &'a SlotIndex,
    page: usize,
    pos: usize,
    keys: &'a [Key],
    slots: &'a [u32],
    /// first key of the next page (u64::MAX past the last page)
    next_first: Key,
}

impl<'a> Cursor<'a> {
    fn enter(&mut self, p: usize) {
        let ix = self.index;
        self.page = p;
        self.pos = 0;
        self.keys = &ix.pages[p].keys;
        self.slots = &ix.pages[p].slots;
        self.next_first = ix.firsts.get(p + 1).copied().unwrap_or(Key::MAX);
    }

    /// The slot of `k`. Successive calls must pass ascending keys.
    #[inline]
    pub fn seek(&mut self, k: Key) -> Option<u32> {
        let f = &self.index.firsts;
        if f.is_empty() || f[self.page] > k {
            return None; // below every key at or after the cursor
        }
        if k >= self.next_first {
            // the last page whose first key is <= k: gallop, then search
            let (mut lo, mut hi, mut step) = (self.page + 1, self.page + 2, 1);
            while hi < f.len() && f[hi] <= k {
                lo = hi;
                hi += step;
                step *= 2;
            }
            let hi = hi.min(f.len());
            self.enter(lo + f[lo..hi].partition_point(|&x| x <= k) - 1);
        }
        let keys = self.keys;
        let (mut lo, mut hi, mut step) = (self.pos, self.pos, 1);
        while hi < keys.len() && keys[hi] < k {
            lo = hi + 1;
            hi += step;
            step *= 2;
        }
        let hi = hi.min(keys.len());
        lo += keys[lo..hi].partition_point(|&x| x < k);
        self.pos = lo;
        (lo < keys.len() && keys[lo] == k).then(|| self.slots[lo])
    }
}

impl SlotIndex {
    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (key, slot), keys ascending.
    pub fn iter(&self) -> impl Iterator<Item = (Key, u32)> + '_ {
        self.pages.iter().flat_map(|p| p.keys.iter().copied().zip(p.slots.iter().copied()))
    }

    /// A cursor at the start, for one ascending run of lookups.
    pub fn cursor(&self) -> Cursor<'_> {
        let mut c = Cursor { index: self, page: 0, pos: 0, keys: &[], slots: &[], next_first: Key::MAX };
        if !self.pages.is_empty() {
            c.enter(0);
        }
        c
    }

    /// Adds `new` (ascending keys, none already present).
    pub fn insert_sorted(&mut self, new: &[(Key, u32)]) {
        if new.is_empty() {
            return;
        }
        if new.len() * 8 >= self.len {
            return self.rebuild_with(new);
        }
        for &(k, s) in new {
            let p = self.firsts.partition_point(|&f| f <= k).saturating_sub(1);
            let page = &mut self.pages[p];
            let i = page.keys.partition_point(|&x| x < k);
            debug_assert!(page.keys.get(i) != Some(&k), "key {k} inserted twice");
            page.keys.insert(i, k);
            page.slots.insert(i, s);
            if i == 0 {
                self.firsts[p] = k;
            }
            if page.keys.len() > PAGE_KEYS_MAX {
                let half = page.keys.len() / 2;
                let right = Page { keys: page.keys.split_off(half), slots: page.slots.split_off(half) };
                self.firsts.insert(p + 1, right.keys[0]);
                self.pages.insert(p + 1, right);
            }
            self.len += 1;
        }
    }

    /// One merge pass of everything with `new`, into fresh pages.
    fn rebuild_with(&mut self, new: &[(Key, u32)]) {
        let old = std::mem::take(&mut self.pages);
        self.firsts.clear();
        let total = self.len + new.len();
        let mut out: Vec<Page> = Vec::with_capacity(total.div_ceil(PAGE_KEYS_BULK));
        let mut push = |k: Key, s: u32| {
            if out.last().is_none_or(|p| p.keys.len() == PAGE_KEYS_BULK) {
                out.push(Page {
                    keys: Vec::with_capacity(PAGE_KEYS_MAX + 1),
                    slots: Vec::with_capacity(PAGE_KEYS_MAX + 1),
                });
            }
            let p = out.last_mut().expect("just pushed");
            p.keys.push(k);
            p.slots.push(s);
        };
        let mut it = old.iter().flat_map(|p| p.keys.iter().copied().zip(p.slots.iter().copied())).peekable();
        let mut jt = new.iter().copied().peekable();
        loop {
            match (it.peek(), jt.peek()) {
                (Some(&(a, sa)), Some(&(b, _))) if a < b => {
                    push(a, sa);
                    it.next();
                }
                (_, Some(&(b, sb))) => {
                    push(b, sb);
                    jt.next();
                }
                (Some(&(a, sa)), None) => {
                    push(a, sa);
                    it.next();
                }
                (None, None) => break,
            }
        }
        self.firsts = out.iter().map(|p| p.keys[0]).collect();
        self.pages = out;
        self.len = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use std::collections::BTreeMap;

    fn check(ix: &SlotIndex, reference: &BTreeMap<Key, u32>, probe: &[Key]) {
        let mut c = ix.cursor();
        for &k in probe {
            assert_eq!(c.seek(k), reference.get(&k).copied(), "key {k}");
        }
        assert_eq!(ix.len(), reference.len());
        for w in ix.firsts.windows(2) {
            assert!(w[0] < w[1]);
        }
        assert!(ix.pages.iter().all(|p| p.keys.len() <= PAGE_KEYS_MAX && !p.keys.is_empty()));
    }

    #[test]
    fn matches_a_btreemap_through_bulk_builds_small_inserts_and_splits() {
        let mut r = SplitMix64::new(5);
        let mut ix = SlotIndex::default();
        let mut reference = BTreeMap::new();
        let mut next = 0u32;
        for round in 0..300 {
            let n = if round == 0 { 20_000 } else { 1 + r.below(60) as usize };
            let mut batch: Vec<Key> = (0..n).map(|_| r.below(100_000)).collect();
            batch.sort_unstable();
            batch.dedup();
            let new: Vec<(Key, u32)> = batch
                .iter()
                .filter(|k| !reference.contains_key(*k))
                .map(|&k| {
                    next += 1;
                    (k, next)
                })
                .collect();
            ix.insert_sorted(&new);
            reference.extend(new.iter().copied());
            if round % 50 == 0 || round == 299 {
                let mut probe: Vec<Key> = (0..3000).map(|_| r.below(100_001)).collect();
                probe.extend(reference.keys().step_by(7).copied());
                probe.sort_unstable();
                probe.dedup();
                check(&ix, &reference, &probe);
            }
        }
        assert!(ix.pages.len() > 20, "pages split as they filled");
    }

    #[test]
    fn empty_and_edges() {
        let ix = SlotIndex::default();
        assert_eq!(ix.cursor().seek(5), None);
        let mut ix = SlotIndex::default();
        ix.insert_sorted(&[(10, 1), (20, 2)]);
        ix.insert_sorted(&[(0, 3)]); // below every page head
        ix.insert_sorted(&[(u64::MAX - 1, 4)]);
        let mut c = ix.cursor();
        assert_eq!([0, 5, 10, 20, u64::MAX - 1].map(|k| c.seek(k)), [Some(3), None, Some(1), Some(2), Some(4)]);
    }
}
