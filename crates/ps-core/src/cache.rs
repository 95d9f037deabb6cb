//! The worker's process cache of a table with a staleness bound (as Bösen
//! keeps one): rows it read, each with the stamp the shard served it with (the
//! clocks every worker had finished then, so the row holds every update of
//! the clocks before it). A read at clock `c` is answered from here when every
//! row it asks for is cached with a stamp of at least `c - s`; otherwise it
//! goes to the shards, which park it until the bound holds.
//!
//! A worker sees its own writes: a push adds its values into the cached rows
//! at once (the cache is kept only for tables whose rule is `Sum`, where that
//! is what the shard will do), and while a push of a row is unacknowledged no
//! response or refresh overwrites that row, since it may have been read before
//! the push was merged. A push that fails drops its rows from the cache.
//!
//! Under `essp` the shards answer the worker's `Watch` with `Refresh` frames
//! when the slowest worker finishes a clock: the changed rows a worker read,
//! with the new stamp. After the last frame of a refresh every subscribed row
//! of that shard is as fresh as the stamp, so the cache also keeps a stamp per owner and a row's stamp is the
//! larger of its own and its owner's, unless a refresh of the row was skipped
//! for an unacknowledged push (then only its own counts).
//!
//! Every read records its staleness, `c` minus the stamp it saw, in a
//! histogram: the measure Dai et al. compare SSP and ESSP by.

use std::collections::HashMap;

use crate::keys::Key;

/// Reads staler than this are counted in the last bucket.
pub const STALENESS_BUCKETS: usize = 33;

#[derive(Clone, Copy, Debug)]
struct Row {
    /// first value in `vals`
    at: usize,
    stamp: u64,
    /// flat owner index (which shard's refreshes cover this row)
    owner: u32,
    /// a refresh was skipped: the owner's stamp does not apply
    behind: bool,
}

/// What the cache answers a read with.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// every row is cached fresh enough: the values were copied out; the stamp
    /// is the least of the rows'
    Hit {
        /// clocks every worker had finished when the stalest row was served
        stamp: u64,
    },
    /// a row is missing or too stale: the read goes to the shards (nothing
    /// was copied)
    Miss,
}

/// One table's cache on one worker: rows, their stamps, and read counters.
#[derive(Debug)]
pub struct Cache {
    dim: usize,
    /// whether shards refresh this table (owner stamps apply)
    eager: bool,
    rows: HashMap<Key, Row>,
    vals: Vec<f32>,
    /// per flat owner: the stamp of its last refresh
    owner_stamp: Vec<u64>,
    /// unacknowledged pushes per key
    inflight: HashMap<Key, u32>,
    staleness: [u64; STALENESS_BUCKETS],
    hits: u64,
    misses: u64,
}

/// Read counters of one table's cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// reads answered from the cache
    pub hits: u64,
    /// reads that went to the shards
    pub misses: u64,
    /// reads by staleness (clock minus stamp), the last bucket open-ended
    pub staleness: Vec<u64>,
}

impl Cache {
    /// An empty cache of a table with `dim` values a key; `eager`: the
    /// shards refresh it (`essp`); `owners`: the job's shards, all servers
    /// together (flat owner indices are below it).
    pub fn new(dim: usize, eager: bool, owners: usize) -> Self {
        Self {
            dim,
            eager,
            rows: HashMap::new(),
            vals: Vec::new(),
            owner_stamp: vec![0; owners],
            inflight: HashMap::new(),
            staleness: [0; STALENESS_BUCKETS],
            hits: 0,
            misses: 0,
        }
    }

    /// Whether shards refresh this table (it is `essp`).
    pub fn is_eager(&self) -> bool {
        self.eager
    }

    fn stamp_of(&self, r: &Row) -> u64 {
        if self.eager && !r.behind {
            r.stamp.max(self.owner_stamp[r.owner as usize])
        } else {
            r.stamp
        }
    }

    /// Answers a read of `keys` needing stamp `needed` into `out` (`dim` per key)
    /// if every row is cached fresh enough.
    pub fn lookup(&mut self, keys: impl Iterator<Item = Key> + Clone, needed: u64, out: &mut [f32]) -> Lookup {
        let mut least = u64::MAX;
        for k in keys.clone() {
            match self.rows.get(&k).map(|r| self.stamp_of(r)) {
                Some(stamp) if stamp >= needed => least = least.min(stamp),
                _ => {
                    self.misses += 1;
                    return Lookup::Miss;
                }
            }
        }
        let d = self.dim;
        for (i, k) in keys.enumerate() {
            let at = self.rows[&k].at;
            out[i * d..(i + 1) * d].copy_from_slice(&self.vals[at..at + d]);
        }
        self.hits += 1;
        Lookup::Hit { stamp: if least == u64::MAX { needed } else { least } }
    }

    /// Counts a read at clock `clock` that saw stamp `stamp`.
    pub fn record(&mut self, clock: u64, stamp: u64) {
        let s = clock.saturating_sub(stamp) as usize;
        self.staleness[s.min(STALENESS_BUCKETS - 1)] += 1;
    }

    /// Stores rows the shards served (a pull's values, or a refresh) with their
    /// stamp, except rows with a push in flight. `owner` maps a key to its flat owner.
    pub fn fill(&mut self, keys: impl Iterator<Item = Key>, vals: &[f32], stamp: u64, owner: impl Fn(Key) -> u32) {
        let d = self.dim;
        for (i, k) in keys.enumerate() {
            let src = &vals[i * d..(i + 1) * d];
            if self.inflight.contains_key(&k) {
                if let Some(r) = self.rows.get_mut(&k) {
                    r.behind = true;
                }
                continue;
            }
            match self.rows.get(&k).copied() {
                Some(r) => {
                    if stamp >= self.stamp_of(&r) {
                        self.vals[r.at..r.at + d].copy_from_slice(src);
                        self.rows.insert(k, Row { stamp, behind: false, ..r });
                    }
                }
                None => {
                    let at = self.vals.len();
                    self.vals.extend_from_slice(src);
                    self.rows.insert(k, Row { at, stamp, owner: owner(k), behind: false });
                }
            }
        }
    }

    /// A refresh from flat owner `owner` at `stamp`: its other subscribed rows are that fresh too.
    pub fn owner_advanced(&mut self, owner: usize, stamp: u64) {
        if let Some(s) = self.owner_stamp.get_mut(owner) {
            *s = (*s).max(stamp);
        }
    }

    /// Flat owner `owner` is served by another copy now (failover): that copy
    /// knows nothing of what this worker read, so its refreshes do not vouch
    /// for the rows read before; each is as fresh as its own stamp.
    pub fn owner_moved(&mut self, owner: usize) {
        for r in self.rows.values_mut().filter(|r| r.owner as usize == owner) {
            r.behind = true;
        }
    }

    /// My push of `vals` to `keys`: added into the cached rows, and the rows
    /// held against overwrites until `pushed` says it was acknowledged.
    pub fn push(&mut self, keys: impl Iterator<Item = Key>, vals: &[f32]) {
        let d = self.dim;
        for (i, k) in keys.enumerate() {
            *self.inflight.entry(k).or_insert(0) += 1;
            if let Some(r) = self.rows.get(&k) {
                for (dst, src) in self.vals[r.at..r.at + d].iter_mut().zip(&vals[i * d..(i + 1) * d]) {
                    *dst += *src;
                }
            }
        }
    }

    /// My push to `keys` is over: acknowledged (`ok`), or failed, which drops
    /// the rows it was added into.
    pub fn pushed(&mut self, keys: impl Iterator<Item = Key>, ok: bool) {
        for k in keys {
            if let Some(n) = self.inflight.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.inflight.remove(&k);
                }
            }
            if !ok {
                // the value slots stay allocated; the row is fetched again
                self.rows.remove(&k);
            }
        }
    }

    /// Forgets every row (a read after this goes to the shards).
    pub fn clear(&mut self) {
        self.rows.clear();
        self.vals.clear();
    }

    /// The read counters so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats { hits: self.hits, misses: self.misses, staleness: self.staleness.to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(eager: bool) -> Cache {
        Cache::new(2, eager, 2)
    }

    #[test]
    fn a_read_is_answered_only_while_every_row_is_fresh_enough() {
        let mut c = cache(false);
        let mut out = [0.0; 4];
        assert_eq!(c.lookup([1, 2].into_iter(), 0, &mut out), Lookup::Miss);
        c.fill([1, 2].into_iter(), &[1.0, 1.5, 2.0, 2.5], 3, |_| 0);
        assert_eq!(c.lookup([1, 2].into_iter(), 3, &mut out), Lookup::Hit { stamp: 3 });
        assert_eq!(out, [1.0, 1.5, 2.0, 2.5]);
        assert_eq!(c.lookup([1, 2].into_iter(), 4, &mut out), Lookup::Miss);
        assert_eq!(c.lookup([1, 3].into_iter(), 0, &mut out), Lookup::Miss);
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 3));
    }

    #[test]
    fn my_writes_show_at_once_and_survive_an_older_response() {
        let mut c = cache(false);
        let mut out = [0.0; 2];
        c.fill([7].into_iter(), &[1.0, 1.0], 2, |_| 0);
        c.push([7].into_iter(), &[0.5, 0.25]);
        c.lookup([7].into_iter(), 0, &mut out);
        assert_eq!(out, [1.5, 1.25]);
        // a response read before my push was merged does not undo it
        c.fill([7].into_iter(), &[9.0, 9.0], 5, |_| 0);
        c.lookup([7].into_iter(), 0, &mut out);
        assert_eq!(out, [1.5, 1.25]);
        c.pushed([7].into_iter(), true);
        c.fill([7].into_iter(), &[4.0, 4.0], 5, |_| 0);
        assert_eq!(c.lookup([7].into_iter(), 5, &mut out), Lookup::Hit { stamp: 5 });
        assert_eq!(out, [4.0, 4.0]);
    }

    #[test]
    fn a_failed_push_drops_its_rows() {
        let mut c = cache(false);
        let mut out = [0.0; 2];
        c.fill([7].into_iter(), &[1.0, 1.0], 2, |_| 0);
        c.push([7].into_iter(), &[0.5, 0.5]);
        c.pushed([7].into_iter(), false);
        assert_eq!(c.lookup([7].into_iter(), 0, &mut out), Lookup::Miss);
    }

    #[test]
    fn an_owner_refresh_makes_its_unchanged_rows_fresh_unless_one_was_skipped() {
        let mut c = cache(true);
        let mut out = [0.0; 4];
        c.fill([1, 2].into_iter(), &[1.0; 4], 1, |k| (k % 2) as u32);
        c.owner_advanced(1, 4); // key 1's owner
        assert_eq!(c.lookup([1].into_iter(), 4, &mut out[..2]), Lookup::Hit { stamp: 4 });
        assert_eq!(c.lookup([2].into_iter(), 4, &mut out[..2]), Lookup::Miss);
        // a refresh of key 1 skipped for my push in flight: its own stamp only
        c.push([1].into_iter(), &[1.0, 1.0]);
        c.fill([1].into_iter(), &[5.0, 5.0], 6, |_| 1);
        c.owner_advanced(1, 6);
        assert_eq!(c.lookup([1].into_iter(), 2, &mut out[..2]), Lookup::Miss);
        // a lazy (non-eager) cache never uses owner stamps
        let mut l = cache(false);
        l.fill([1].into_iter(), &[1.0, 1.0], 1, |_| 1);
        l.owner_advanced(1, 9);
        assert_eq!(l.lookup([1].into_iter(), 2, &mut out[..2]), Lookup::Miss);
    }

    #[test]
    fn staleness_is_counted_per_read() {
        let mut c = cache(false);
        c.record(5, 3);
        c.record(5, 5);
        c.record(100, 0);
        let s = c.stats().staleness;
        assert_eq!((s[0], s[2], s[STALENESS_BUCKETS - 1]), (1, 1, 1));
    }
}
