//! A shard's state as bytes: checkpoints of its tables (written by the
//! server when a worker asks, restored before any worker connects) and the
//! live snapshot a copy being rebuilt takes (`chain`): tables, clocks, and
//! the pushes held for the end of a clock.
//!
//! Must never: restore a checkpoint of another server, shard or job (it is
//! refused with what differs), or answer a checkpoint request before the
//! server said its bytes are written.

use crate::checkpoint::{CheckpointError, WriteError};
use crate::transport::{FrameSink, PeerId};

use super::clocks::Held;
use super::{Refusal, ShardCore, TableStore};

/// The part of a shard's state that is not its tables (`live_snapshot`).
#[derive(serde::Serialize, serde::Deserialize)]
struct LiveState {
    clocks: Vec<u64>,
    min_clock: u64,
    ranks: Vec<(u32, u32, usize)>,
    held: Vec<(u32, u32, u64, Vec<u8>)>,
}

impl ShardCore {
    /// The label of a checkpoint a worker asked for: the server writes
    /// [`ShardCore::snapshot`] to disk, then calls [`ShardCore::checkpoint_written`].
    pub fn checkpoint_due(&self) -> Option<u64> {
        self.checkpoint.map(|(_, c)| c.label)
    }

    /// Every table's part on this shard, as a checkpoint's bytes
    /// (`checkpoint::encode`). Pushes held for the end of a clock are not in
    /// it: take checkpoints when every worker has finished the same clock.
    pub fn snapshot(&self, label: u64) -> Vec<u8> {
        let images: Vec<crate::checkpoint::TableImage> = self
            .tables
            .iter()
            .map(|(id, (dim, store))| match store {
                TableStore::Dense(d) => {
                    let (vals, state) = d.snapshot();
                    crate::checkpoint::TableImage { id: *id, dim: *dim, sparse: false, keys: vec![], vals, state }
                }
                TableStore::Sparse(s) => {
                    let (keys, vals, state) = s.snapshot();
                    crate::checkpoint::TableImage { id: *id, dim: *dim, sparse: true, keys, vals, state }
                }
            })
            .collect();
        crate::checkpoint::encode(self.owner.server, self.owner.shard, label, &images)
    }

    /// Everything this shard holds, for a copy being rebuilt (`chain`): the
    /// tables as a checkpoint, then (JSON) every worker's clocks, which
    /// connection's clocks named which worker, and the pushes held for the
    /// end of a clock.
    pub fn live_snapshot(&self) -> Vec<u8> {
        let tables = self.snapshot(0);
        let live = LiveState {
            clocks: self.clocks.clone(),
            min_clock: self.min_clock,
            ranks: self.peer_rank.iter().map(|(p, r)| (p.index, p.generation, *r)).collect(),
            held: self.held.iter().map(|h| (h.peer.index, h.peer.generation, h.clock, h.frame.clone())).collect(),
        };
        let json = serde_json::to_vec(&live).expect("the live state serialises");
        let mut out = Vec::with_capacity(8 + tables.len() + json.len());
        out.extend_from_slice(&(tables.len() as u64).to_le_bytes());
        out.extend_from_slice(&tables);
        out.extend_from_slice(&json);
        out
    }

    /// Takes the state of [`ShardCore::live_snapshot`] (this shard is new:
    /// nothing merged yet). Refused, with why, if it does not fit.
    pub fn restore_live(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8"))).ok_or(CheckpointError::LiveCut)?;
        let n = usize::try_from(n).map_err(|_| CheckpointError::LiveLength)?;
        let end = n.checked_add(8).filter(|&e| e <= bytes.len()).ok_or(CheckpointError::LiveCut)?;
        self.restore(&bytes[8..end])?;
        let live: LiveState =
            serde_json::from_slice(&bytes[end..]).map_err(|e| CheckpointError::LiveState(e.to_string()))?;
        if live.clocks.len() != self.clocks.len() {
            return Err(CheckpointError::LiveWorkers { snapshot: live.clocks.len(), job: self.clocks.len() });
        }
        for (rank, &c) in live.clocks.iter().enumerate() {
            self.finish_clock(rank, c);
        }
        self.min_clock = live.min_clock;
        for (index, generation, rank) in live.ranks {
            if rank < self.clocks.len() {
                self.peer_rank.insert(PeerId { index, generation }, rank);
            }
        }
        for (index, generation, clock, frame) in live.held {
            self.held_bytes += frame.len();
            self.held.push_back(Held { peer: PeerId { index, generation }, clock, frame });
        }
        Ok(())
    }

    /// Answers the checkpoint request: an `Ack` once written, or an `Error` with why not.
    pub fn checkpoint_written(&mut self, tx: &mut dyn FrameSink, r: Result<(), WriteError>) {
        let Some((peer, c)) = self.checkpoint.take() else { return };
        match r {
            Ok(()) => {
                let ack = c.ack();
                let len = ack.frame_len().expect("ack is small");
                if tx.frame(peer, len).map(|buf| ack.write(buf)).is_ok() {
                    self.stats.bytes_out += len as u64;
                }
            }
            // a peer that cannot take the error is going anyway
            Err(e) => drop(self.answer(Err(Refusal(format!("checkpoint {}: {e}", c.label))), peer, &c.header(), tx)),
        }
    }

    /// Puts back a checkpoint this shard wrote (before any worker connects);
    /// returns its label. Refused, with what differs, if the checkpoint is of
    /// another server or shard, or of other tables.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<u64, CheckpointError> {
        let (h, images) = crate::checkpoint::decode(bytes)?;
        if (h.server, h.shard) != (self.owner.server, self.owner.shard) {
            return Err(CheckpointError::OtherShard {
                server: h.server,
                shard: h.shard,
                this_server: self.owner.server,
                this_shard: self.owner.shard,
            });
        }
        if images.len() != self.tables.len() {
            return Err(CheckpointError::TableCount { checkpoint: images.len(), job: self.tables.len() });
        }
        for img in images {
            let Some((dim, store)) = self.tables.get_mut(&img.id) else {
                return Err(CheckpointError::UnknownTable(img.id.0));
            };
            if *dim != img.dim {
                return Err(CheckpointError::Dim { table: img.id.0, checkpoint: img.dim, job: *dim });
            }
            match store {
                TableStore::Dense(d) if !img.sparse => d.restore(&img.vals, &img.state),
                TableStore::Sparse(s) if img.sparse => s.restore(&img.keys, &img.vals, &img.state),
                _ => Err(CheckpointError::Layout),
            }
            .map_err(|e| CheckpointError::Table { table: img.id.0, source: Box::new(e) })?;
        }
        Ok(h.label)
    }
}

#[cfg(test)]
mod tests {
    use crate::keys::KeyRange;
    use crate::rules::RuleSpec;
    use crate::shard::testing::{frame, kinds, shard_of, values, A, B};
    use crate::sim::SimSink;
    use crate::table::TableSpec;
    use crate::wire::{self, DataHeader, Kind};

    #[test]
    fn a_checkpoint_restores_every_table_exactly_and_only_where_it_was_taken() {
        let tables = || {
            vec![
                TableSpec::dense(0, "d", KeyRange::new(0, 1000), 3, RuleSpec::Sum),
                TableSpec::sparse(
                    1,
                    "s",
                    KeyRange::FULL,
                    2,
                    RuleSpec::Adagrad { lr: 0.1, eps: 1e-6, initial_accumulator: 0.1 },
                ),
            ]
        };
        let mut s = shard_of(tables());
        let mut sink = SimSink::default();
        let mut r = crate::rng::SplitMix64::new(5);
        for round in 0..20u64 {
            let keys: Vec<u64> = (0..50).map(|i| i * 1_000_003 + round % 3).collect();
            let h = DataHeader { kind: Kind::Push, dense: false, table: 1, sub: 0, ts: 1, a: 50, b: 100 };
            let mut f = frame(h, &keys);
            let vals: Vec<f32> = (0..100).map(|_| r.normal() as f32).collect();
            f[wire::DATA_HEADER_BYTES + 400..wire::DATA_HEADER_BYTES + 800]
                .copy_from_slice(bytemuck::cast_slice(&vals));
            s.handle(A, &f, &mut sink).unwrap();
            let h = DataHeader { kind: Kind::Push, dense: true, table: 0, sub: 0, ts: 2, a: round * 30, b: 60 };
            let mut f = frame(h, &[]);
            f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + 240]
                .copy_from_slice(bytemuck::cast_slice(&vec![round as f32 + 0.5; 60]));
            s.handle(A, &f, &mut sink).unwrap();
        }
        // a worker asks; the shard answers only once told the bytes are written
        let ask = frame(DataHeader { kind: Kind::Checkpoint, dense: false, table: 0, sub: 0, ts: 9, a: 7, b: 0 }, &[]);
        sink.frames.clear();
        s.handle(B, &ask, &mut sink).unwrap();
        assert_eq!(s.checkpoint_due(), Some(7));
        assert!(sink.frames.is_empty());
        let bytes = s.snapshot(7);
        s.checkpoint_written(&mut sink, Ok(()));
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Ack)]);
        assert_eq!(s.checkpoint_due(), None);
        // a fresh shard of the same job takes it back bit for bit
        let mut back = shard_of(tables());
        assert_eq!(back.restore(&bytes), Ok(7));
        assert_eq!(back.snapshot(7), bytes);
        // and a pull reads the same values
        let keys: Vec<u64> = (0..50).map(|i| i * 1_000_003 + 1).collect();
        let pull = frame(DataHeader { kind: Kind::Pull, dense: false, table: 1, sub: 0, ts: 3, a: 50, b: 100 }, &keys);
        s.handle(A, &pull, &mut sink).unwrap();
        let want = values(&mut sink);
        back.handle(A, &pull, &mut sink).unwrap();
        assert_eq!(values(&mut sink), want);
        // another shard's, or another job's tables: refused with the reason
        let mut other = shard_of(vec![TableSpec::dense(0, "d", KeyRange::new(0, 1000), 2, RuleSpec::Sum)]);
        assert!(other.restore(&bytes).unwrap_err().to_string().contains("tables"));
        let mut wrong_dim = shard_of(vec![
            TableSpec::dense(0, "d", KeyRange::new(0, 1000), 2, RuleSpec::Sum),
            TableSpec::sparse(1, "s", KeyRange::FULL, 2, RuleSpec::Sum),
        ]);
        assert!(wrong_dim.restore(&bytes).unwrap_err().to_string().contains("dim"));
        assert!(shard_of(tables()).restore(&bytes[..bytes.len() / 2]).is_err());
        // a failed write is an error frame to the asker
        s.handle(B, &ask, &mut sink).unwrap();
        s.checkpoint_written(&mut sink, Err("disk full".into()));
        assert_eq!(kinds(&mut sink), vec![(B, Kind::Error)]);
    }
}
