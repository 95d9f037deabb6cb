//! Worker clocks over key ranges, and the consistency models a read is held to.
//!
//! A worker's *clock* counts the `clock()` calls it has made: the updates it
//! pushes between its k-th and (k+1)-th call belong to clock k. A server keeps,
//! per table and per worker, which clock that worker has finished on which keys
//! as a [`RangeClock`] (OSDI'14 §4.1, range vector clocks): a worker that ends
//! its clock on a sub-range of a segment splits that segment into at most three,
//! and neighbours with equal clocks merge again, so a worker that always clocks
//! whole tables costs one segment. [`ClockBoard`] holds every worker's and says
//! whether a read needing a given clock may go ahead.
//!
//! [`Consistency`] says what a read at clock `c` needs (Dai et al., AAAI'15):
//! under SSP with staleness `s`, every update of clocks `<= c - s - 1` from every
//! worker, i.e. every worker must have finished `c - s` clocks on the keys read.
//! Sequential is staleness 0; eventual never waits.
//!
//! The shard (`shard.rs`) parks reads until the bound holds and stamps what it
//! serves with the clocks every worker has finished; the worker (`worker.rs`)
//! caches rows with their stamps and answers a read from its cache while the
//! stamp is new enough. Under `essp` the shard also pushes rows that changed to
//! the workers that read them each time the slowest worker finishes a clock.

use serde::{Deserialize, Serialize};

use crate::keys::{Key, KeyRange};

/// A table's consistency model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "model")]
pub enum Consistency {
    /// A read sees every update of every earlier clock from every worker.
    Sequential,
    /// Stale synchronous parallel: a read at clock `c` reflects every update of
    /// clocks `<= c - staleness - 1` from every worker.
    Bounded {
        /// clocks a read may lag by: at clock `c` it waits for every update
        /// of clocks `<= c - staleness - 1`
        staleness: u32,
    },
    /// The same bound, with the server pushing fresh rows eagerly.
    Essp {
        /// clocks a read may lag the reader's own clock by, as in `Bounded`
        staleness: u32,
    },
    /// No waiting: a read sees whatever has been merged.
    #[default]
    Eventual,
}

/// A consistency model's name that does not parse (the text given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("consistency {0:?}: expected sequential, bounded:S, essp:S or eventual (S: staleness)")]
pub struct ParseConsistencyError(pub String);

impl std::str::FromStr for Consistency {
    type Err = ParseConsistencyError;

    /// `sequential`, `bounded:S` (or `ssp:S`), `essp:S`, `eventual`.
    fn from_str(s: &str) -> Result<Self, ParseConsistencyError> {
        let bad = || ParseConsistencyError(s.to_string());
        let (name, arg) = s.split_once(':').map_or((s, None), |(n, a)| (n, Some(a)));
        let staleness = || arg.and_then(|a| a.parse::<u32>().ok()).ok_or_else(bad);
        match (name, arg) {
            ("sequential", None) => Ok(Consistency::Sequential),
            ("eventual", None) => Ok(Consistency::Eventual),
            ("bounded" | "ssp", Some(_)) => Ok(Consistency::Bounded { staleness: staleness()? }),
            ("essp", Some(_)) => Ok(Consistency::Essp { staleness: staleness()? }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consistency::Sequential => write!(f, "sequential"),
            Consistency::Bounded { staleness } => write!(f, "bounded:{staleness}"),
            Consistency::Essp { staleness } => write!(f, "essp:{staleness}"),
            Consistency::Eventual => write!(f, "eventual"),
        }
    }
}

impl Consistency {
    /// Whether shards push fresh rows to their readers as clocks advance.
    pub fn is_eager(&self) -> bool {
        matches!(self, Consistency::Essp { .. })
    }

    /// The staleness bound (`None` under eventual consistency).
    pub fn staleness(&self) -> Option<u64> {
        match *self {
            Consistency::Sequential => Some(0),
            Consistency::Bounded { staleness } | Consistency::Essp { staleness } => Some(staleness as u64),
            Consistency::Eventual => None,
        }
    }

    /// How many clocks every worker must have finished on the keys before a
    /// read at `reader_clock` may be answered (`None`: it never waits).
    pub fn needed(&self, reader_clock: u64) -> Option<u64> {
        self.staleness().map(|s| reader_clock.saturating_sub(s))
    }
}

/// One worker's finished clocks over a key space: non-overlapping segments
/// covering it, in key order, each with the clock count finished there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeClock {
    /// `(begin, clock)`: segment i spans `begin_i .. begin_{i+1}` (the last one
    /// up to `space.end`); never two neighbours with the same clock
    segs: Vec<(Key, u64)>,
    space: KeyRange,
}

impl RangeClock {
    /// Every key of `space` at clock `clock`.
    pub fn new(space: KeyRange, clock: u64) -> Self {
        assert!(!space.is_empty(), "a range clock needs a non-empty key space");
        Self { segs: vec![(space.begin, clock)], space }
    }

    /// Segments, for tests and reports: `(range, clock)`.
    pub fn segments(&self) -> impl Iterator<Item = (KeyRange, u64)> + '_ {
        self.segs.iter().enumerate().map(|(i, &(b, c))| {
            let end = self.segs.get(i + 1).map_or(self.space.end, |s| s.0);
            (KeyRange { begin: b, end }, c)
        })
    }

    /// Index of the segment holding key `k` (`k` inside the space).
    fn seg_of(&self, k: Key) -> usize {
        self.segs.partition_point(|&(b, _)| b <= k) - 1
    }

    /// Sets the clock of every key of `range` (clipped to the space) to `clock`.
    pub fn set(&mut self, range: KeyRange, clock: u64) {
        let r = range.intersect(&self.space);
        if r.is_empty() {
            return;
        }
        let first = self.seg_of(r.begin);
        let last = self.seg_of(r.end - 1);
        // what the keys just after the range keep
        let after = (r.end < self.space.end).then(|| (r.end, self.segs[self.seg_of(r.end)].1));
        let mut mid = Vec::with_capacity(3);
        if self.segs[first].0 < r.begin {
            mid.push(self.segs[first]);
        }
        mid.push((r.begin, clock));
        if let Some(a) = after {
            if last + 1 >= self.segs.len() || self.segs[last + 1].0 != r.end {
                mid.push(a);
            }
        }
        let added = mid.len();
        self.segs.splice(first..=last, mid);
        // merge equal neighbours around the change: from the pair before it to
        // the pair after it
        let mut i = first.max(1);
        let mut end = (first + added + 1).min(self.segs.len());
        while i < end {
            if self.segs[i].1 == self.segs[i - 1].1 {
                self.segs.remove(i);
                end -= 1;
            } else {
                i += 1;
            }
        }
    }

    /// The least clock over the keys of `range` (clipped to the space; `None`
    /// if that is empty).
    pub fn min_over(&self, range: KeyRange) -> Option<u64> {
        let r = range.intersect(&self.space);
        if r.is_empty() {
            return None;
        }
        let (first, last) = (self.seg_of(r.begin), self.seg_of(r.end - 1));
        self.segs[first..=last].iter().map(|s| s.1).min()
    }
}

/// Every worker's [`RangeClock`] for one table on one shard.
#[derive(Clone, Debug)]
pub struct ClockBoard {
    space: KeyRange,
    workers: Vec<RangeClock>,
}

impl ClockBoard {
    /// `workers` workers, each at clock 0 on all of `space`.
    pub fn new(space: KeyRange, workers: usize) -> Self {
        Self { space, workers: vec![RangeClock::new(space, 0); workers] }
    }

    /// The keys the board covers (a table's key space).
    pub fn space(&self) -> KeyRange {
        self.space
    }

    /// Worker `w` finished `clock` clocks on `range`. Clocks only go forward: an
    /// older report (a duplicate, or one overtaken) changes nothing.
    pub fn finish(&mut self, w: usize, range: KeyRange, clock: u64) {
        let rc = &mut self.workers[w];
        // keys already past `clock` keep theirs: set only the segments behind
        let behind: Vec<KeyRange> =
            rc.segments().filter(|&(_, c)| c < clock).map(|(s, _)| s.intersect(&range)).collect();
        for s in behind.into_iter().filter(|s| !s.is_empty()) {
            rc.set(s, clock);
        }
    }

    /// The least clock any worker has finished on `range`.
    pub fn min_over(&self, range: KeyRange) -> Option<u64> {
        self.workers.iter().filter_map(|rc| rc.min_over(range)).min()
    }

    /// Whether every worker has finished `needed` clocks on `range` (a read
    /// that needs them may be answered; see [`Consistency::needed`]).
    pub fn reached(&self, range: KeyRange, needed: u64) -> bool {
        self.min_over(range).is_none_or(|m| m >= needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kr(a: u64, b: u64) -> KeyRange {
        KeyRange::new(a, b)
    }

    #[test]
    fn a_sub_range_splits_a_segment_in_three_and_merges_back() {
        let mut rc = RangeClock::new(kr(0, 100), 0);
        rc.set(kr(10, 20), 1);
        let segs: Vec<_> = rc.segments().collect();
        assert_eq!(segs, vec![(kr(0, 10), 0), (kr(10, 20), 1), (kr(20, 100), 0)]);
        rc.set(kr(0, 10), 1);
        rc.set(kr(20, 100), 1);
        assert_eq!(rc.segments().collect::<Vec<_>>(), vec![(kr(0, 100), 1)]);
        assert_eq!(rc.min_over(kr(5, 50)), Some(1));
        assert_eq!(rc.min_over(kr(100, 200)), None);
    }

    #[test]
    fn the_models_say_what_a_read_needs() {
        assert_eq!(Consistency::Sequential.needed(5), Some(5));
        assert_eq!(Consistency::Bounded { staleness: 2 }.needed(5), Some(3));
        assert_eq!(Consistency::Essp { staleness: 7 }.needed(5), Some(0));
        assert_eq!(Consistency::Eventual.needed(5), None);
        // SSP s=1 at clock 4 needs clocks <= 2 from everyone: 3 finished clocks
        let m = Consistency::Bounded { staleness: 1 };
        assert_eq!(m.needed(4), Some(3));
        let j: Consistency = serde_json::from_str(r#"{"model":"bounded","staleness":3}"#).unwrap();
        assert_eq!(j, Consistency::Bounded { staleness: 3 });
        for m in [
            Consistency::Sequential,
            Consistency::Eventual,
            Consistency::Bounded { staleness: 2 },
            Consistency::Essp { staleness: 0 },
        ] {
            assert_eq!(m.to_string().parse::<Consistency>(), Ok(m));
        }
        assert_eq!("ssp:4".parse::<Consistency>(), Ok(Consistency::Bounded { staleness: 4 }));
        for bad in ["bounded", "essp:x", "eventual:1", "strict", ""] {
            assert!(bad.parse::<Consistency>().is_err(), "{bad}");
        }
    }

    /// May a read of `range` at `reader_clock` be answered under `model`?
    fn ready(b: &ClockBoard, model: Consistency, range: KeyRange, reader_clock: u64) -> bool {
        model.needed(reader_clock).is_none_or(|n| b.reached(range, n))
    }

    #[test]
    fn a_board_waits_for_the_slowest_worker_on_the_keys_read() {
        let mut b = ClockBoard::new(kr(0, 1000), 3);
        let m = Consistency::Bounded { staleness: 1 };
        for w in 0..3 {
            b.finish(w, kr(0, 1000), 2);
        }
        b.finish(0, kr(0, 1000), 3);
        b.finish(1, kr(0, 1000), 3);
        // worker 2 finished clock 3 only on the first half
        b.finish(2, kr(0, 500), 3);
        assert!(ready(&b, m, kr(0, 500), 4));
        assert!(!ready(&b, m, kr(400, 600), 4));
        assert!(ready(&b, m, kr(400, 600), 3));
        // an old report changes nothing
        b.finish(2, kr(0, 1000), 1);
        assert_eq!(b.min_over(kr(0, 500)), Some(3));
        assert!(ready(&b, Consistency::Eventual, kr(0, 1000), 99));
    }

    proptest! {
        /// Against a clock per key: the same answers, and a set adds at most two segments.
        #[test]
        fn range_clock_matches_a_per_key_model(
            ops in prop::collection::vec((0u64..64, 0u64..64, 0u64..5), 1..40),
            probes in prop::collection::vec((0u64..64, 0u64..64), 1..20),
        ) {
            let mut rc = RangeClock::new(kr(0, 64), 0);
            let mut model = [0u64; 64];
            for &(a, b, c) in &ops {
                let (a, b) = (a.min(b), a.max(b));
                let before = rc.segments().count();
                rc.set(kr(a, b), c);
                for k in a..b {
                    model[k as usize] = c;
                }
                prop_assert!(rc.segments().count() <= before + 2);
                // segments tile the space, no equal neighbours
                let segs: Vec<_> = rc.segments().collect();
                prop_assert_eq!(segs[0].0.begin, 0);
                prop_assert_eq!(segs.last().unwrap().0.end, 64);
                for w in segs.windows(2) {
                    prop_assert_eq!(w[0].0.end, w[1].0.begin);
                    prop_assert_ne!(w[0].1, w[1].1);
                }
            }
            for &(a, b) in &probes {
                let (a, b) = (a.min(b), a.max(b));
                let want = (a..b).map(|k| model[k as usize]).min();
                prop_assert_eq!(rc.min_over(kr(a, b)), want);
            }
        }
    }
}
