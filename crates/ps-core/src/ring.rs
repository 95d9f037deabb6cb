//! The hash ring: which `(server, shard)` owns which keys.
//!
//! ## Design
//! The ring is the 64-bit position space. A key's position is its *relative* place
//! in its table's key range, scaled to 2^64 (`position`), so contiguous keys have
//! contiguous positions and every table, small dense or huge sparse, spans the
//! whole ring.
//!
//! The ring is cut into `P` equal partitions (P a power of two); each partition is
//! a virtual node. Plain consistent hashing, with tokens at random positions, gives
//! each server a share with a coefficient of variation of about 1/sqrt(vnodes):
//! 12% at 64 vnodes, so some server is 20-30% over the mean. We want better than
//! 10%, so partitions are equal-sized (Dynamo's "strategy 3") and assigned by
//! **rendezvous hashing with bounded load**: each partition ranks the servers by
//! `mix(partition, server id)` and goes to the best-ranked server that still has
//! room under `ceil(P / S)`. Loads differ by at most one partition, and the
//! assignment is a pure function of the server ids, so every node computes the
//! same ring from the same view. Adding a server moves about 1/(S+1) of the
//! partitions to it plus a small cascade (tested below).
//!
//! Inside a server, its partitions (in ring order) go round-robin to its shards.

use crate::keys::{Key, KeyRange};
use crate::rng::mix64;
use crate::table::TableSpec;

/// Who owns a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// Index of the server in the view's server list (its rank).
    pub server: u32,
    /// The shard on that server, 0..its shard count.
    pub shard: u32,
}

/// One server as the ring sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingServer {
    /// A stable identity (the server's rank): the rendezvous hash input.
    pub id: u32,
    /// Its shards (at least 1); its partitions go to them round-robin.
    pub nr_shards: u32,
}

/// Why a ring cannot be built from a view; fix the job's `partitions` or servers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The server list is empty.
    #[error("the ring needs at least one server")]
    NoServers,
    /// The partition count (given) is not a power of two.
    #[error("partitions ({0}) must be a power of two")]
    NotPowerOfTwo(u32),
    /// Too few partitions per server to balance load: raise the job's
    /// partitions to `need`.
    #[error("{partitions} partitions over {servers} servers is {per} virtual nodes each; at least {min} are needed for balance: raise ring partitions to {need}")]
    TooFewVnodes {
        /// the job's partitions
        partitions: u32,
        /// the servers in the view
        servers: usize,
        /// partitions per server, rounded down
        per: u32,
        /// the least allowed (`limits::RING_VNODES_PER_SERVER_MIN`)
        min: u32,
        /// the smallest power of two that gives every server `min`
        need: u32,
    },
    /// A server (this id) has no shards.
    #[error("server {0} has no shards")]
    NoShards(u32),
}

/// The ring of one view: the owner of each of its partitions.
#[derive(Clone, Debug)]
pub struct Ring {
    owners: Vec<Owner>,
    shift: u32,
    servers: Vec<RingServer>,
}

/// Position of `key` on the ring for a table whose keys are `range`.
#[inline]
pub fn position(range: KeyRange, key: Key) -> u64 {
    let n = range.len() as u128;
    (((key - range.begin) as u128) << 64).checked_div(n).unwrap_or(0) as u64
}

/// The smallest key of `range` whose position is at least `pos` (or `range.end`).
#[inline]
pub fn first_key_at(range: KeyRange, pos: u128) -> Key {
    let n = range.len() as u128;
    // smallest off with off * 2^64 >= pos * n
    let off = (pos * n).div_ceil(1u128 << 64);
    range.begin + off.min(n) as u64
}

impl Ring {
    /// The ring over `servers` cut into `partitions` (a power of two, at
    /// least `RING_VNODES_PER_SERVER_MIN` per server); a pure function of the
    /// servers' ids and shard counts.
    pub fn new(servers: &[RingServer], partitions: u32) -> Result<Ring, RingError> {
        if servers.is_empty() {
            return Err(RingError::NoServers);
        }
        if !partitions.is_power_of_two() {
            return Err(RingError::NotPowerOfTwo(partitions));
        }
        let per = partitions / servers.len() as u32;
        let min = crate::limits::RING_VNODES_PER_SERVER_MIN;
        if per < min {
            let need = (min * servers.len() as u32).next_power_of_two();
            return Err(RingError::TooFewVnodes { partitions, servers: servers.len(), per, min, need });
        }
        if let Some(s) = servers.iter().find(|s| s.nr_shards == 0) {
            return Err(RingError::NoShards(s.id));
        }
        let cap = partitions.div_ceil(servers.len() as u32);
        let mut load = vec![0u32; servers.len()];
        let mut server_of = Vec::with_capacity(partitions as usize);
        let mut prefs: Vec<(u64, usize)> = Vec::with_capacity(servers.len());
        for p in 0..partitions {
            prefs.clear();
            prefs.extend(servers.iter().enumerate().map(|(i, s)| {
                (mix64(mix64(p as u64 ^ 0x5eed_0000_0000_0000) ^ (s.id as u64).wrapping_mul(0x9E37_79B9)), i)
            }));
            prefs.sort_unstable_by(|a, b| b.cmp(a));
            let (_, i) = *prefs.iter().find(|(_, i)| load[*i] < cap).expect("capacity covers all partitions");
            load[i] += 1;
            server_of.push(i);
        }
        let mut next_shard = vec![0u32; servers.len()];
        let owners = server_of
            .into_iter()
            .map(|i| {
                let shard = next_shard[i] % servers[i].nr_shards;
                next_shard[i] += 1;
                Owner { server: i as u32, shard }
            })
            .collect();
        Ok(Ring { owners, shift: 64 - partitions.trailing_zeros(), servers: servers.to_vec() })
    }

    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The servers it was built over, in the order given.
    pub fn servers(&self) -> &[RingServer] {
        &self.servers
    }

    /// The partition a ring position (see [`position`]) falls in.
    #[inline]
    pub fn partition_of(&self, pos: u64) -> usize {
        if self.shift == 64 {
            0
        } else {
            (pos >> self.shift) as usize
        }
    }

    /// Positions `[begin, end)` of partition `p` (end may be 2^64).
    pub fn partition_span(&self, p: usize) -> (u128, u128) {
        let w = 1u128 << self.shift;
        (p as u128 * w, (p as u128 + 1) * w)
    }

    /// Who owns partition `p` (panics if `p` is not below [`Ring::partitions`]).
    pub fn owner_of_partition(&self, p: usize) -> Owner {
        self.owners[p]
    }

    /// Who owns `key` of `table`.
    #[inline]
    pub fn owner(&self, table: &TableSpec, key: Key) -> Owner {
        self.owners[self.partition_of(position(table.keys(), key))]
    }

    /// The keys of partition `p` in a table whose range is `range`.
    pub fn partition_keys(&self, range: KeyRange, p: usize) -> KeyRange {
        let (b, e) = self.partition_span(p);
        KeyRange { begin: first_key_at(range, b), end: first_key_at(range, e) }
    }

    /// Walks sorted keys and calls `f(owner, index_range)` for each maximal run of
    /// keys in one partition, in key order. O(P log n), not O(n).
    pub fn split_sorted(&self, range: KeyRange, keys: &[Key], mut f: impl FnMut(Owner, std::ops::Range<usize>)) {
        let mut start = 0usize;
        while start < keys.len() {
            let p = self.partition_of(position(range, keys[start]));
            let end_key = self.partition_keys(range, p).end;
            let end = start + keys[start..].partition_point(|&k| k < end_key);
            f(self.owners[p], start..end);
            start = end;
        }
    }

    /// Key ranges of a table owned by `owner`, ascending, adjacent ones merged.
    pub fn owned_ranges(&self, range: KeyRange, owner: Owner) -> Vec<KeyRange> {
        let mut out: Vec<KeyRange> = Vec::new();
        for (p, o) in self.owners.iter().enumerate() {
            if *o != owner {
                continue;
            }
            let r = self.partition_keys(range, p);
            if r.is_empty() {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == r.begin => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }
}

/// The server ranks holding copies of `owner`, head first: `copies` of them
/// (at most `servers`), the owner's own server and the next ones, wrapping.
pub fn chain_of(owner: Owner, servers: u32, copies: u32) -> Vec<u32> {
    (0..copies.min(servers)).map(|i| (owner.server + i) % servers).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn servers(n: u32, shards: u32) -> Vec<RingServer> {
        (0..n).map(|id| RingServer { id, nr_shards: shards }).collect()
    }

    #[test]
    fn uniform_keys_are_balanced_within_ten_percent() {
        for nr_servers in [2u32, 3, 5, 8, 16] {
            let partitions = (64 * nr_servers).next_power_of_two();
            let ring = Ring::new(&servers(nr_servers, 2), partitions).unwrap();
            let mut counts = vec![0u64; nr_servers as usize];
            let mut rng = SplitMix64::new(nr_servers as u64);
            let n = 400_000u64;
            let table = TableSpec::sparse(0, "t", KeyRange::FULL, 1, crate::RuleSpec::Sum);
            for _ in 0..n {
                counts[ring.owner(&table, rng.below(u64::MAX)).server as usize] += 1;
            }
            let mean = n as f64 / nr_servers as f64;
            for (s, c) in counts.iter().enumerate() {
                let dev = (*c as f64 - mean).abs() / mean;
                assert!(dev < 0.10, "{nr_servers} servers: server {s} has {c} keys, {:.1}% off the mean", dev * 100.0);
            }
        }
    }

    #[test]
    fn small_dense_tables_spread_over_servers_and_shards() {
        let ring = Ring::new(&servers(4, 3), 256).unwrap();
        let table = TableSpec::dense(0, "t", KeyRange::new(0, 10_000), 1, crate::RuleSpec::Sum);
        let mut counts = std::collections::HashMap::new();
        for k in 0..10_000 {
            *counts.entry(ring.owner(&table, k)).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 12, "every (server, shard) owns keys");
        for c in counts.values() {
            assert!((*c as f64 - 833.0).abs() < 0.2 * 833.0, "shard load {c}");
        }
    }

    #[test]
    fn adding_a_server_moves_few_partitions() {
        for s in [2u32, 4, 8] {
            let p = 1024;
            let a = Ring::new(&servers(s, 1), p).unwrap();
            let b = Ring::new(&servers(s + 1, 1), p).unwrap();
            let moved =
                (0..p as usize).filter(|&i| a.owner_of_partition(i).server != b.owner_of_partition(i).server).count();
            let ideal = p as f64 / (s + 1) as f64;
            // the new server must take about its share; the cascade of the load bound adds a little
            assert!(moved as f64 >= ideal * 0.9, "{s}->{}: moved {moved}, ideal {ideal}", s + 1);
            assert!((moved as f64) < ideal * 1.6, "{s}->{}: moved {moved}, ideal {ideal}", s + 1);
        }
    }

    #[test]
    fn split_sorted_agrees_with_owner_per_key() {
        let ring = Ring::new(&servers(3, 2), 256).unwrap();
        for range in [KeyRange::FULL, KeyRange::new(100, 5_000)] {
            let table = TableSpec::sparse(0, "t", range, 1, crate::RuleSpec::Sum);
            let mut rng = SplitMix64::new(3);
            let mut keys: Vec<u64> = (0..3000).map(|_| range.begin + rng.below(range.len())).collect();
            keys.sort_unstable();
            keys.dedup();
            let mut covered = 0;
            ring.split_sorted(range, &keys, |owner, idx| {
                assert_eq!(idx.start, covered);
                covered = idx.end;
                for &k in &keys[idx] {
                    assert_eq!(ring.owner(&table, k), owner);
                }
            });
            assert_eq!(covered, keys.len());
        }
    }

    #[test]
    fn owned_ranges_partition_the_table() {
        let ring = Ring::new(&servers(2, 2), 128).unwrap();
        let range = KeyRange::new(7, 1_007);
        let mut total = 0;
        for server in 0..2 {
            for shard in 0..2 {
                let owner = Owner { server, shard };
                let table = TableSpec::dense(0, "t", range, 1, crate::RuleSpec::Sum);
                for r in ring.owned_ranges(range, owner) {
                    total += r.len();
                    for k in r.begin..r.end {
                        assert_eq!(ring.owner(&table, k), owner);
                    }
                }
            }
        }
        assert_eq!(total, 1_000);
    }

    #[test]
    fn refuses_too_few_vnodes_with_the_fix() {
        let e = Ring::new(&servers(4, 1), 128).unwrap_err();
        assert!(e.to_string().contains("raise ring partitions to 256"), "{e}");
    }

    #[test]
    fn first_key_at_is_the_inverse_of_position() {
        let mut rng = SplitMix64::new(9);
        for _ in 0..1000 {
            let b = rng.below(1 << 40);
            let r = KeyRange::new(b, b + 1 + rng.below(1 << 30));
            let k = r.begin + rng.below(r.len());
            let p = position(r, k) as u128;
            assert_eq!(first_key_at(r, p), k.min(first_key_at(r, p)));
            assert!(first_key_at(r, p) <= k);
            assert!(position(r, first_key_at(r, p)) as u128 >= p);
        }
    }
}
