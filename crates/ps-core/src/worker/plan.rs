//! Planning an operation: its keys checked against the table, then cut into
//! chunks per owning shard, each small enough for one request frame
//! (`chunk_bytes`). Pure bookkeeping over the worker's scratch vectors: no
//! frame is written here.

use std::ops::Range;

use super::{Keys, WorkerCore};
use crate::error::PsError;
use crate::keys::{check_sorted, TableSpec};
use crate::ring::{position, Owner};

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
