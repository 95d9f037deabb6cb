//! Planning an operation: its keys checked against the table, then cut into
//! chunks per owning shard, each small enough for one request frame
//! (`chunk_bytes`). Pure bookkeeping over the worker's scratch vectors: no
//! frame is written here.

use std::ops::Range;

use super::{Keys, WorkerCore};
use crate::error::PsError;
use crate::keys::check_sorted;
use crate::ring::{position, Owner};
use crate::table::TableSpec;

/// One chunk to send.
#[derive(Clone, Debug)]
pub(super) struct Chunk {
    pub(super) owner: Owner,
    /// dense: first flat float; sparse: number of keys
    pub(super) a: u64,
    /// dense: floats; sparse: values (keys * dim)
    pub(super) b: u64,
    /// sparse: slice of `chunk_ranges`
    pub(super) ranges: Range<usize>,
}

impl WorkerCore {
    pub(super) fn check_keys(t: &TableSpec, keys: &Keys<'_>, vals: Option<&[f32]>) -> Result<u64, PsError> {
        let range = t.keys();
        let out_of_range = |key| PsError::KeyOutOfRange { table: t.id, key, begin: range.begin, end: range.end };
        let n = match *keys {
            Keys::List(k) => {
                check_sorted(k)?;
                if let (Some(&first), Some(&last)) = (k.first(), k.last()) {
                    if !range.contains(first) {
                        return Err(out_of_range(first));
                    }
                    if !range.contains(last) {
                        return Err(out_of_range(last));
                    }
                }
                k.len() as u64
            }
            Keys::Range { first, count } => {
                if !t.is_dense() {
                    return Err(PsError::WrongLayout { table: t.id, layout: "sparse", needed: "dense" });
                }
                if count > 0 {
                    let last = first.checked_add(count - 1).ok_or(out_of_range(first))?;
                    if !range.contains(first) {
                        return Err(out_of_range(first));
                    }
                    if !range.contains(last) {
                        return Err(out_of_range(last));
                    }
                }
                count
            }
        };
        if let Some(v) = vals {
            let expected = n as usize * t.dim as usize;
            if v.len() != expected {
                return Err(PsError::WrongValueCount {
                    table: t.id,
                    dim: t.dim,
                    keys: n as usize,
                    expected,
                    got: v.len(),
                });
            }
        }
        Ok(n)
    }

    /// Plans the chunks of an operation into `self.chunks` (per owner).
    pub(super) fn plan(&mut self, t: &TableSpec, keys: &Keys<'_>) {
        for g in &mut self.groups {
            g.clear();
        }
        for c in &mut self.chunks {
            c.clear();
        }
        self.chunk_ranges.clear();
        match *keys {
            Keys::List(k) => self.plan_list(t, k),
            Keys::Range { first, count } => self.plan_range(t, first, count),
        }
    }

    /// A key list: split by owner (`groups`, runs of `k`), each owner's runs
    /// cut into chunks of at most `per_chunk` keys (a chunk may span runs).
    fn plan_list(&mut self, t: &TableSpec, k: &[crate::keys::Key]) {
        let dim = t.dim as u64;
        let range = t.keys();
        let ring = &self.ring;
        let mut groups = std::mem::take(&mut self.groups);
        ring.split_sorted(range, k, |o, r| groups[self.flat(o)].push(r));
        let per_chunk = (self.chunk_bytes as u64 / (8 + 4 * dim)).max(1) as usize;
        for (g, group) in groups.iter().enumerate() {
            let owner = self.owner_of_flat(g);
            let mut start = self.chunk_ranges.len();
            let mut n = 0usize;
            for r in group {
                let mut at = r.start;
                while at < r.end {
                    let take = (r.end - at).min(per_chunk - n);
                    self.chunk_ranges.push(at..at + take);
                    n += take;
                    at += take;
                    if n == per_chunk {
                        let end = self.chunk_ranges.len();
                        self.chunks[g].push(Chunk { owner, a: n as u64, b: n as u64 * dim, ranges: start..end });
                        start = end;
                        n = 0;
                    }
                }
            }
            if n > 0 {
                let end = self.chunk_ranges.len();
                self.chunks[g].push(Chunk { owner, a: n as u64, b: n as u64 * dim, ranges: start..end });
            }
        }
        self.groups = groups;
    }

    /// A dense range: runs of consecutive partitions with one owner, each cut
    /// into chunks of at most `chunk_bytes / 4` floats.
    fn plan_range(&mut self, t: &TableSpec, first: crate::keys::Key, count: u64) {
        let dim = t.dim as u64;
        let range = t.keys();
        let end = first + count;
        let per_chunk = (self.chunk_bytes / 4) as u64;
        let mut k = first;
        while k < end {
            let p = self.ring.partition_of(position(range, k));
            let mut stop = self.ring.partition_keys(range, p).end.min(end);
            let owner = self.ring.owner_of_partition(p);
            // extend over following partitions with the same owner
            while stop < end {
                let q = self.ring.partition_of(position(range, stop));
                if self.ring.owner_of_partition(q) != owner {
                    break;
                }
                stop = self.ring.partition_keys(range, q).end.min(end);
            }
            let g = self.flat(owner);
            let (mut f, fend) = ((k - range.begin) * dim, (stop - range.begin) * dim);
            while f < fend {
                let n = per_chunk.min(fend - f);
                self.chunks[g].push(Chunk { owner, a: f, b: n, ranges: 0..0 });
                f += n;
            }
            k = stop;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, drain, owner_of, owner_of_key, spread_keys, CHUNK_BYTES, DENSE, SPARSE};
    use super::super::Keys;
    use crate::error::PsError;
    use crate::sim::SimSink;
    use crate::wire::Kind;
    use std::collections::BTreeMap;

    #[test]
    fn a_sparse_push_bigger_than_a_chunk_carries_every_key_once_in_order() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(500);
        let vals: Vec<f32> = (0..keys.len() * 2).map(|i| i as f32).collect();
        let ts = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vals), None).unwrap();
        let frames = drain(&mut sink);
        let per_chunk = CHUNK_BYTES / (8 + 4 * 2);
        assert!(frames.len() >= keys.len() / per_chunk, "{} frames", frames.len());
        let table = &testkit::tables()[0];
        // per owner, in the order the frames went: their keys and values
        let mut got: BTreeMap<u32, Vec<(u64, [f32; 2])>> = BTreeMap::new();
        for (i, f) in frames.iter().enumerate() {
            assert_eq!((f.h.ts, f.h.sub as usize), (ts, i), "frames are numbered in the order they go");
            assert!(f.keys.len() <= per_chunk && !f.keys.is_empty());
            assert_eq!(f.vals.len(), f.keys.len() * 2);
            for (k, v) in f.keys.iter().zip(f.vals.chunks_exact(2)) {
                assert_eq!(owner_of_key(table, *k), owner_of(f.peer), "key {k} went to its owner");
                got.entry(f.peer.index).or_default().push((*k, [v[0], v[1]]));
            }
        }
        let mut all = Vec::new();
        for run in got.values() {
            assert!(run.windows(2).all(|p| p[0].0 < p[1].0), "an owner's keys arrive ascending");
            all.extend_from_slice(run);
        }
        all.sort_unstable_by_key(|(k, _)| *k);
        let want: Vec<(u64, [f32; 2])> =
            keys.iter().enumerate().map(|(i, &k)| (k, [vals[2 * i], vals[2 * i + 1]])).collect();
        assert_eq!(all, want, "every key once, with its own values");
    }

    #[test]
    fn a_dense_push_is_cut_into_runs_that_tile_its_floats() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let (first, count) = (100u64, 1000u64);
        let vals: Vec<f32> = (0..count * 3).map(|i| i as f32).collect();
        w.issue(&mut sink, Kind::Push, DENSE, Keys::Range { first, count }, Some(&vals), None).unwrap();
        let mut frames = drain(&mut sink);
        assert!(frames.iter().all(|f| f.h.dense && f.h.b as usize <= CHUNK_BYTES / 4 && f.keys.is_empty()));
        frames.sort_unstable_by_key(|f| f.h.a);
        let mut at = first * 3;
        for f in &frames {
            assert_eq!(f.h.a, at, "runs follow each other with no gap or overlap");
            let off = (at - first * 3) as usize;
            assert_eq!(f.vals, vals[off..off + f.h.b as usize]);
            at += f.h.b;
        }
        assert_eq!(at, (first + count) * 3);
    }

    #[test]
    fn keys_out_of_order_or_range_and_wrong_value_counts_are_refused_before_anything_goes() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let bad = |w: &mut super::WorkerCore, sink: &mut SimSink, table, keys, vals: Option<&[f32]>| {
            let r = w.issue(sink, Kind::Push, table, keys, vals, None);
            assert!(r.is_err(), "{keys:?} accepted");
            r.unwrap_err()
        };
        bad(&mut w, &mut sink, SPARSE, Keys::List(&[5, 3]), Some(&[0.0; 4]));
        let e = bad(&mut w, &mut sink, DENSE, Keys::List(&[1, 4096]), Some(&[0.0; 6]));
        assert!(matches!(e, PsError::KeyOutOfRange { key: 4096, .. }), "{e:?}");
        let e = bad(&mut w, &mut sink, DENSE, Keys::Range { first: 4000, count: 97 }, Some(&[0.0; 291]));
        assert!(matches!(e, PsError::KeyOutOfRange { .. }), "{e:?}");
        let e = bad(&mut w, &mut sink, SPARSE, Keys::List(&[1, 2]), Some(&[0.0; 3]));
        assert!(matches!(e, PsError::WrongValueCount { expected: 4, got: 3, .. }), "{e:?}");
        let e = bad(&mut w, &mut sink, SPARSE, Keys::Range { first: 0, count: 2 }, Some(&[0.0; 4]));
        assert!(matches!(e, PsError::WrongLayout { .. }), "{e:?}");
        assert!(sink.frames.is_empty());
        assert_eq!(w.in_flight(), 0);
        // the negative twin: the same shapes done right go out
        w.issue(&mut sink, Kind::Push, DENSE, Keys::Range { first: 4000, count: 96 }, Some(&[0.0; 288]), None).unwrap();
        assert!(!sink.frames.is_empty());
    }
}
