//! Worker clocks and held pushes: a `Clock` frame records how many clocks
//! a worker has finished; when the slowest worker's moves, the pushes held
//! for the clocks now finished (sequential tables, settling rules) are
//! merged in arrival order and settled, the eager readers refreshed, and
//! the parked pulls whose bound holds served.
//!
//! Must never: merge a held push before every worker has finished its
//! clock, merge the held pushes of one clock out of arrival order, or hold
//! more than `HELD_PUSH_BYTES_MAX`.

use crate::clock::Consistency;
use crate::keys::TableId;
use crate::transport::{FrameSink, PeerId};
use crate::wire::{self, ClockHeader, DataHeader, Frame, Kind};

use super::{Refusal, ShardCore, TableStore};

/// A push to a sequential table, merged once every worker has finished `clock`.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) peer: PeerId,
    pub(super) clock: u64,
    pub(super) frame: Vec<u8>,
}

impl ShardCore {
    /// Pushes to sequential tables waiting for the end of their clock: (frames, bytes).
    pub fn held(&self) -> (usize, usize) {
        (self.held.len(), self.held_bytes)
    }

    /// Worker `rank` is gone for good (the manager said so): its clock no
    /// longer holds anyone back. Pushes held for the clocks the others have
    /// finished are merged and the reads waiting for them served.
    pub fn worker_lost(&mut self, rank: u32, tx: &mut dyn FrameSink) {
        if self.clocks.get(rank as usize).is_none_or(|&c| c == u64::MAX) {
            return;
        }
        self.finish_clock(rank as usize, u64::MAX);
        self.clocks_moved(tx);
    }

    /// Worker `rank` has finished `clock` clocks (every table's board too).
    pub(super) fn finish_clock(&mut self, rank: usize, clock: u64) {
        self.clocks[rank] = clock;
        for (_, board) in self.boards.values_mut() {
            board.finish(rank, board.space(), clock);
        }
    }

    /// A worker's clock moved: if the slowest worker's did, the held pushes
    /// of the clocks now finished are merged and the eager readers refreshed;
    /// then every parked pull whose bound holds is served.
    fn clocks_moved(&mut self, tx: &mut dyn FrameSink) {
        let least = self.clocks.iter().copied().min().unwrap_or(0);
        if least > self.min_clock {
            self.min_clock = least;
            self.merge_held(tx);
            self.refresh(tx);
        }
        self.release(tx);
    }

    /// The clock a push to a sequential table belongs to, if it must wait for
    /// every worker to finish it (`None`: merge it now).
    pub(super) fn must_hold(&self, peer: PeerId, h: &DataHeader) -> Option<u64> {
        if !matches!(h.kind, Kind::Push | Kind::PushPull) {
            return None;
        }
        let (model, _) = self.boards.get(&TableId(h.table))?;
        if *model != Consistency::Sequential && !self.settling.contains(&TableId(h.table)) {
            return None;
        }
        let clock = self.peer_rank.get(&peer).map_or(0, |&r| self.clocks[r]);
        (clock >= self.min_clock).then_some(clock)
    }

    /// Checks a push to a sequential table as a merge would, acknowledges it,
    /// and keeps a copy to merge when its clock ends.
    pub(super) fn hold(
        &mut self,
        peer: PeerId,
        h: &DataHeader,
        clock: u64,
        keys_b: &[u8],
        frame: &[u8],
        tx: &mut dyn FrameSink,
    ) -> Result<(), Refusal> {
        if h.kind == Kind::PushPull {
            return Err(Refusal(format!(
                "table {}'s pushes show from the next clock (sequential, or a settling rule), so push and pull separately",
                h.table
            )));
        }
        if self.held_bytes + frame.len() > crate::limits::HELD_PUSH_BYTES_MAX {
            return Err(Refusal(format!(
                "{} bytes of pushes to sequential tables already wait for the end of a clock on server {} shard {}: \
                 is a worker not calling clock()?",
                self.held_bytes, self.owner.server, self.owner.shard
            )));
        }
        self.check_push(h, keys_b)?;
        self.held_bytes += frame.len();
        self.held.push_back(Held { peer, clock, frame: frame.to_vec() });
        self.stats.bytes_out += super::apply::send_ack(h, peer, tx)? as u64;
        Ok(())
    }

    /// Merges the held pushes of every clock all workers have finished: clock
    /// by clock, each clock's in arrival order, then settles the keys of
    /// settling tables that clock's pushes touched.
    fn merge_held(&mut self, tx: &mut dyn FrameSink) {
        while let Some(clock) = self.held.iter().map(|p| p.clock).filter(|&c| c < self.min_clock).min() {
            let mut i = 0;
            while i < self.held.len() {
                if self.held[i].clock != clock {
                    i += 1;
                    continue;
                }
                let p = self.held.remove(i).expect("looked at");
                self.held_bytes -= p.frame.len();
                if let Ok(Frame::Data { h, keys, vals }) = wire::decode(&p.frame, self.body_max) {
                    let table = TableId(h.table);
                    // checked when it was held; a refusal now could only be a full sparse slab
                    if self.apply(&h, keys, vals, p.peer, tx, false).is_err() {
                        self.stats.held_refused += 1;
                    } else if self.settling.contains(&table) {
                        let touched = self.touched.entry(table).or_default();
                        if h.dense {
                            if let Some((dim, TableStore::Dense(d))) = self.tables.get(&table) {
                                let (dim, begin) = (*dim as u64, d.layout().table_begin);
                                touched.extend(begin + h.a / dim..begin + (h.a + h.b).div_ceil(dim));
                            }
                        } else {
                            touched.extend(wire::keys_of(keys, &mut self.keys_scratch));
                        }
                    }
                }
            }
            for (table, mut keys) in std::mem::take(&mut self.touched) {
                keys.sort_unstable();
                keys.dedup();
                if let Some((_, TableStore::Dense(d))) = self.tables.get_mut(&table) {
                    // the keys were checked when their pushes were held
                    if d.settle_keys(&keys).is_err() {
                        self.stats.held_refused += 1;
                    }
                }
            }
        }
    }

    /// A worker finished `c.clocks_done` clocks: record it, acknowledge, and
    /// serve every parked pull whose bound now holds.
    pub(super) fn on_clock(&mut self, peer: PeerId, c: ClockHeader, tx: &mut dyn FrameSink) -> Result<(), Refusal> {
        let rank = usize::try_from(c.rank).ok().filter(|&r| r < self.clocks.len()).ok_or_else(|| {
            Refusal(format!("a clock from worker rank {}, but the job has {} workers", c.rank, self.clocks.len()))
        })?;
        match self.peer_rank.get(&peer) {
            Some(&r) if r != rank => {
                return Err(Refusal(format!("this connection sent clocks as worker {r}, now as {rank}")));
            }
            _ => {
                self.peer_rank.insert(peer, rank);
            }
        }
        if c.clocks_done > self.clocks[rank] {
            self.finish_clock(rank, c.clocks_done);
        }
        let ack = c.ack();
        let len = ack.frame_len().expect("ack is small");
        ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
        self.stats.bytes_out += len as u64;
        self.clocks_moved(tx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::clock::Consistency;
    use crate::keys::{KeyRange, TableId};
    use crate::rules::RuleSpec;
    use crate::shard::testing::{clock, dense_pull, frame, kinds, shard, shard_of, values, A, B};
    use crate::shard::ShardCore;
    use crate::sim::SimSink;
    use crate::table::TableSpec;
    use crate::transport::PeerId;
    use crate::wire::{self, DataHeader, Kind};

    /// A shard with one block_prox table (dim 2, keys 0..100, l1 = 1).
    fn prox_shard() -> ShardCore {
        shard_of(vec![TableSpec::dense(
            2,
            "w",
            KeyRange::new(0, 100),
            2,
            RuleSpec::BlockProx { l1: 1.0, l2: 0.0, max_step: 10.0 },
        )
        .with_consistency(Consistency::Bounded { staleness: 0 })])
    }

    #[test]
    fn a_settling_rule_steps_once_on_the_sum_of_a_clocks_pushes() {
        let mut s = prox_shard();
        let mut sink = SimSink::default();
        let push = |g: f32, u: f32| {
            let h = DataHeader { kind: Kind::Push, dense: false, table: 2, sub: 0, ts: 3, a: 1, b: 2 };
            let mut f = frame(h, &[5]);
            f[wire::DATA_HEADER_BYTES + 8..wire::DATA_HEADER_BYTES + 16].copy_from_slice(bytemuck::cast_slice(&[g, u]));
            f
        };
        let pull = frame(DataHeader { kind: Kind::Pull, dense: false, table: 2, sub: 0, ts: 4, a: 1, b: 2 }, &[5]);
        s.handle(A, &push(-3.0, 1.0), &mut sink).unwrap();
        // B's push goes coded (LZ4 over the payload): the shard undoes it first
        let coded = crate::filter::Encoder::default()
            .encode(B, TableId(2), &[crate::filter::FilterSpec::Lz4], &push(-1.0, 1.0), 2, true)
            .unwrap();
        assert!(crate::filter::is_coded(&coded));
        s.handle(B, &coded, &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack), (B, Kind::Ack)]);
        // a reader that never clocked reads at clock 0: nothing settled yet
        s.handle(PeerId { index: 9, generation: 0 }, &pull, &mut sink).unwrap();
        assert_eq!(values(&mut sink), [0.0, 0.0]);
        // A finishes clock 0 and reads at clock 1: it waits for B
        s.handle(A, &clock(0, 1), &mut sink).unwrap();
        s.handle(A, &pull, &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack)]);
        s.handle(B, &clock(1, 1), &mut sink).unwrap();
        // G = -4, U = 2: w = soft(0 + 4, 1) / 2 = 1.5, and G beside it; one step, not two
        assert_eq!(values(&mut sink), [1.5, -4.0]);
        // a push-pull cannot be answered before its own step: refused
        let mut pp = push(1.0, 1.0);
        wire::set_kind(&mut pp, Kind::PushPull);
        s.handle(A, &pp, &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Error)]);
    }

    #[test]
    fn a_clock_from_outside_the_job_is_refused_and_changes_nothing() {
        let mut s = shard(Consistency::Sequential);
        let mut sink = SimSink::default();
        s.handle(A, &clock(5, 3), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Error)]);
        s.handle(A, &clock(0, 3), &mut sink).unwrap();
        s.handle(A, &clock(1, 3), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack), (A, Kind::Error)]);
        // rank 1 has finished nothing: a read at clock 3 by rank 0 waits
        s.handle(A, &dense_pull(4), &mut sink).unwrap();
        assert_eq!(s.parked().0, 1);
    }
}
