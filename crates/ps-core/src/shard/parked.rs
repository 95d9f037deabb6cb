//! Pulls parked for the clock bound: a read whose reader is ahead of what
//! the slowest worker has finished waits here (copied) and is served, in
//! arrival order, once the bound holds.
//!
//! Must never: serve a parked pull before its bound holds, reorder the pulls
//! it serves, or park more than `PARKED_PULL_BYTES_MAX`.

use crate::keys::TableId;
use crate::transport::{FrameSink, PeerId};
use crate::wire::{self, DataHeader, Frame, Kind};

use super::{Refusal, ShardCore};

/// A pull held back until the slowest worker has finished `needed` clocks.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) peer: PeerId,
    pub(super) table: TableId,
    pub(super) needed: u64,
    pub(super) frame: Vec<u8>,
}

impl ShardCore {
    /// Pulls waiting for the clock bound: (frames, bytes).
    pub fn parked(&self) -> (usize, usize) {
        (self.parked.len(), self.parked_bytes)
    }

    /// How many clocks every worker must have finished before this pull may be
    /// answered, if that is more than they have (`None`: answer it now).
    pub(super) fn must_wait(&self, peer: PeerId, h: &DataHeader) -> Option<u64> {
        if !matches!(h.kind, Kind::Pull | Kind::PushPull) {
            return None;
        }
        let (model, board) = self.boards.get(&TableId(h.table))?;
        let reader = self.peer_rank.get(&peer).map_or(0, |&r| self.clocks[r]);
        let needed = model.needed(reader)?;
        (!board.reached(board.space(), needed)).then_some(needed)
    }

    pub(super) fn park(&mut self, peer: PeerId, h: &DataHeader, needed: u64, frame: &[u8]) -> Result<(), Refusal> {
        if self.parked_bytes + frame.len() > crate::limits::PARKED_PULL_BYTES_MAX {
            return Err(Refusal(format!(
                "{} bytes of reads already wait for the clock bound on server {} shard {}: \
                 is a worker not calling clock()?",
                self.parked_bytes, self.owner.server, self.owner.shard
            )));
        }
        self.parked_bytes += frame.len();
        self.parked.push_back(Parked { peer, table: TableId(h.table), needed, frame: frame.to_vec() });
        Ok(())
    }

    /// Serves, in arrival order, every parked pull whose bound holds now.
    pub(super) fn release(&mut self, tx: &mut dyn FrameSink) {
        let mut i = 0;
        while i < self.parked.len() {
            let p = &self.parked[i];
            let ready = self.boards.get(&p.table).is_none_or(|(_, b)| b.reached(b.space(), p.needed));
            if !ready {
                i += 1;
                continue;
            }
            let p = self.parked.remove(i).expect("looked at");
            self.parked_bytes -= p.frame.len();
            let r = match wire::decode(&p.frame, self.body_max) {
                Ok(Frame::Data { h, keys, vals }) => {
                    let r = self.apply(&h, keys, vals, p.peer, tx, true);
                    self.answer(r, p.peer, &h, tx)
                }
                // cannot happen: the same bytes decoded as a data frame before
                _ => Ok(()),
            };
            if let Err(e) = r {
                self.failed.push((p.peer, e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::clock::Consistency;
    use crate::limits::PARKED_PULL_BYTES_MAX;
    use crate::shard::testing::{clock, dense_pull, frame, kinds, shard, A, B};
    use crate::sim::SimSink;
    use crate::transport::PeerId;
    use crate::wire::{DataHeader, Kind};

    #[test]
    fn a_pull_ahead_of_the_slowest_worker_waits_for_its_clock() {
        let mut s = shard(Consistency::Bounded { staleness: 1 });
        let mut sink = SimSink::default();
        s.handle(A, &clock(0, 3), &mut sink).unwrap();
        s.handle(A, &dense_pull(7), &mut sink).unwrap();
        // worker 0 reads at clock 3: bounded(1) needs 2 clocks of everyone; worker 1 has 0
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack)]);
        assert_eq!(s.parked().0, 1);
        s.handle(B, &clock(1, 1), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Ack)]);
        s.handle(B, &clock(1, 2), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Ack), (A, Kind::PullResp)]);
        assert_eq!(s.parked(), (0, 0));
        // a reader that never clocked reads at clock 0 and never waits
        s.handle(PeerId { index: 9, generation: 0 }, &dense_pull(8), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink).len(), 1);
        // and under eventual consistency nothing waits
        let mut e = shard(Consistency::Eventual);
        e.handle(A, &clock(0, 50), &mut sink).unwrap();
        e.handle(A, &dense_pull(9), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack), (A, Kind::PullResp)]);
        // eventual tables can be read one-sided; bounded ones cannot
        assert_eq!(e.dense_slabs().len(), 1);
        assert_eq!(s.dense_slabs().len(), 0);
    }

    #[test]
    fn parked_reads_are_bounded_and_go_with_their_reader() {
        let mut s = shard(Consistency::Sequential);
        let mut sink = SimSink::default();
        s.handle(A, &clock(0, 1_000), &mut sink).unwrap();
        let keys: Vec<u64> = (0..20_000).collect();
        let pull =
            frame(DataHeader { kind: Kind::Pull, dense: false, table: 1, sub: 0, ts: 2, a: 20_000, b: 20_000 }, &keys);
        let mut errors = 0;
        for _ in 0..(PARKED_PULL_BYTES_MAX / pull.len() + 10) {
            s.handle(A, &pull, &mut sink).unwrap();
            errors += kinds(&mut sink).iter().filter(|(_, k)| *k == Kind::Error).count();
        }
        let (n, bytes) = s.parked();
        assert!(bytes <= PARKED_PULL_BYTES_MAX && n > 0, "{n} parked, {bytes} bytes");
        assert!(errors >= 10, "reads beyond the bound are refused: {errors}");
        s.on_closed(A);
        assert_eq!(s.parked(), (0, 0));
    }
}
