//! The worker's side of the process cache (`crate::cache`) of tables with a
//! staleness bound: which tables may be cached, the bookkeeping when an
//! operation on one settles, and the eager tables' watches and refreshes.
//! What a cached read may return is decided in `cache.rs`; this file only
//! feeds it.

use std::collections::HashMap;

use super::responses::{PullOut, Violation};
use super::{key_iter, Keys, OwnedKeys, Timestamp, WorkerCore};
use crate::cache::{Cache, CacheStats, Lookup};
use crate::clock::Consistency;
use crate::error::PsError;
use crate::keys::{Key, KeyRange, TableId};
use crate::ring::{position, Ring};
use crate::rules::RuleSpec;
use crate::table::TableSpec;
use crate::transport::{FrameSink, PeerId};
use crate::wire::{self, Kind, RefreshHeader, WatchHeader};

/// A read of a cached table in flight: fills the cache when it completes.
#[derive(Debug)]
pub(super) struct CachedRead {
    pub(super) table: TableId,
    pub(super) keys: OwnedKeys,
    /// the reader's clock when it asked
    pub(super) clock: u64,
    /// the least stamp of the responses so far
    pub(super) stamp: u64,
}

impl WorkerCore {
    /// Tables whose reads a process cache may answer: a staleness bound to
    /// allow it, and the `Sum` rule so my own pushes can be added in locally.
    /// Not sequential tables: there my pushes show only from the next clock.
    pub(super) fn cacheable(t: &TableSpec) -> bool {
        t.consistency.staleness().is_some() && t.consistency != Consistency::Sequential && t.rule == RuleSpec::Sum
    }

    /// Turns the process cache of a table on (the default for `Sum` tables
    /// with a staleness bound) or off (every read goes to the shards, for the
    /// freshest values the bound allows; the cached rows are dropped).
    pub fn set_cache(&mut self, table: TableId, on: bool) -> Result<(), PsError> {
        let t = self.table(table)?.clone();
        if !on {
            self.caches.remove(&table);
        } else if Self::cacheable(&t) {
            let owners = self.peers.iter().map(|r| r.len()).sum();
            self.caches.entry(table).or_insert_with(|| Cache::new(t.dim as usize, t.consistency.is_eager(), owners));
            if t.consistency.is_eager() {
                self.watch_due = all_watches(&self.peers, &self.caches);
            }
        } else {
            return Err(PsError::Rejected {
                server: u32::MAX,
                shard: u32::MAX,
                reason: format!(
                    "table {} cannot be cached: it needs a staleness bound (not sequential) and the sum rule",
                    t.name
                ),
            });
        }
        Ok(())
    }

    /// Hits, misses and the staleness of reads of a cached table.
    pub fn cache_stats(&self, table: TableId) -> Option<CacheStats> {
        self.caches.get(&table).map(|c| c.stats())
    }

    /// A pull of a cached table the cache holds fresh enough: its values are
    /// in `pull` now and nothing need go out.
    pub(super) fn read_from_cache(
        &mut self,
        kind: Kind,
        t: &TableSpec,
        keys: &Keys<'_>,
        pull: &mut Option<PullOut>,
    ) -> bool {
        let Some(cache) = self.caches.get_mut(&t.id) else { return false };
        if kind != Kind::Pull {
            return false;
        }
        let needed = t.consistency.needed(self.clocks).unwrap_or(0);
        let out = pull.as_mut().expect("a pull has its buffer");
        let Lookup::Hit { stamp } = cache.lookup(key_iter(keys), needed, &mut out.vals) else { return false };
        cache.record(self.clocks, stamp);
        true
    }

    /// An operation on a cached table going out: a push is added in locally
    /// now (and released when it settles), a read fills the cache when it
    /// settles. Returns the read and the push to remember, if any.
    pub(super) fn note_in_cache(
        &mut self,
        kind: Kind,
        t: &TableSpec,
        keys: &Keys<'_>,
        vals: Option<&[f32]>,
    ) -> (Option<CachedRead>, Option<(TableId, OwnedKeys)>) {
        let Some(cache) = self.caches.get_mut(&t.id) else { return (None, None) };
        let mut pushed = None;
        if kind != Kind::Pull {
            cache.push(key_iter(keys), vals.expect("a push has values"));
            pushed = Some((t.id, OwnedKeys::of(keys)));
        }
        let read = (kind != Kind::Push).then(|| CachedRead {
            table: t.id,
            keys: OwnedKeys::of(keys),
            clock: self.clocks,
            stamp: u64::MAX,
        });
        (read, pushed)
    }

    /// The flat owner index of `key` of a table spanning `range`.
    fn owner_index(ring: &Ring, base: &[u32], range: KeyRange, key: Key) -> u32 {
        let o = ring.owner_of_partition(ring.partition_of(position(range, key)));
        base[o.server as usize] + o.shard
    }

    /// An operation has all its answers: its cache bookkeeping is done now, so
    /// a later read sees what it brought.
    pub(super) fn settle(&mut self, ts: Timestamp) {
        let Some(p) = self.pending.get_mut(&ts) else { return };
        let ok = p.error.is_none();
        let (read, pushed) = (p.read.take(), p.pushed.take());
        if let Some((table, keys)) = pushed {
            if let Some(c) = self.caches.get_mut(&table) {
                c.pushed(key_iter(&keys.as_keys()), ok);
            }
        }
        let Some(r) = read else { return };
        let (Some(c), Some(out), true) = (self.caches.get_mut(&r.table), p.pull.as_ref(), ok) else { return };
        let Some(t) = self.tables.get(&r.table) else { return };
        let stamp = if r.stamp == u64::MAX { 0 } else { r.stamp };
        let (ring, base, range) = (&self.ring, &self.owner_base, t.keys());
        c.fill(key_iter(&r.keys.as_keys()), &out.vals, stamp, |k| Self::owner_index(ring, base, range, k));
        c.record(r.clock, stamp);
    }

    /// Sends a `Watch` for every (shard, eager table) due one and without one
    /// outstanding; the caller flushes.
    pub(super) fn send_watches(&mut self, tx: &mut dyn FrameSink) {
        for (peer, table) in std::mem::take(&mut self.watch_due) {
            if self.watch_out.contains(&(peer, table)) {
                continue;
            }
            let h = WatchHeader { table: table.0 }.header();
            let len = h.frame_len().expect("a watch is small");
            match tx.frame(peer, len) {
                Ok(buf) => {
                    h.write(buf);
                    self.watch_out.insert((peer, table));
                }
                // the connection is going: nothing to watch on it
                Err(_) => continue,
            }
        }
    }

    /// A shard's eager refresh of rows this worker read.
    pub(super) fn on_refresh(
        &mut self,
        peer: PeerId,
        h: RefreshHeader,
        keys_b: &[u8],
        vals_b: &[u8],
    ) -> Result<(), Violation> {
        let table = TableId(h.table);
        if !self.watch_out.remove(&(peer, table)) {
            return Err(Violation::UnwatchedRefresh(h.table));
        }
        // watch for the next one (sent by `pump`) while the table is cached
        if self.caches.contains_key(&table) {
            self.watch_due.push((peer, table));
        }
        let Some(t) = self.tables.get(&TableId(h.table)) else {
            return Err(Violation::RefreshUnknownTable(h.table));
        };
        let Some(c) = self.caches.get_mut(&TableId(h.table)) else { return Ok(()) };
        if h.values != h.keys.saturating_mul(t.dim as u64) {
            return Err(Violation::RefreshValues { keys: h.keys, values: h.values, dim: t.dim });
        }
        let keys: Vec<Key> = keys_b.chunks_exact(8).map(|k| u64::from_le_bytes(k.try_into().expect("8"))).collect();
        let range = t.keys();
        if keys.iter().any(|&k| !range.contains(k)) {
            return Err(Violation::RefreshOutside(h.table));
        }
        let mut vals = vec![0.0f32; h.values as usize];
        wire::copy_vals(&mut vals, vals_b);
        let stamp = h.stamp;
        let (ring, base) = (&self.ring, &self.owner_base);
        c.fill(keys.iter().copied(), &vals, stamp, |k| Self::owner_index(ring, base, range, k));
        if h.last {
            // the last frame of a refresh: every row read from this shard is this fresh
            if let Some(o) = self.peer_owner.get(&peer) {
                c.owner_advanced((base[o.server as usize] + o.shard) as usize, stamp);
            }
        }
        Ok(())
    }
}

/// A watch on every shard for every eager table cached.
pub(super) fn all_watches(peers: &[Vec<PeerId>], caches: &HashMap<TableId, Cache>) -> Vec<(PeerId, TableId)> {
    let mut eager: Vec<TableId> = caches.iter().filter(|(_, c)| c.is_eager()).map(|(t, _)| *t).collect();
    eager.sort_unstable_by_key(|t| t.0);
    peers.iter().flatten().flat_map(|&p| eager.iter().map(move |&t| (p, t))).collect()
}
