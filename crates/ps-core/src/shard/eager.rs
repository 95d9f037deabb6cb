//! Eager (ESSP) tables: the shard remembers which rows each connection
//! read (its subscriptions) and which rows pushes changed; when the slowest
//! worker finishes a clock, each subscriber's changed rows become due with
//! the new stamp and go out as `Refresh` frames, one per `Watch` the worker
//! sent.
//!
//! Must never: send a frame no `Watch` asked for (every frame a shard sends
//! answers one request), refresh a reader past the subscription cap
//! (`ESSP_SUBSCRIBED_KEYS_MAX`), or send rows it did not read now.

use std::collections::{HashMap, HashSet};

use crate::keys::{Key, TableId};
use crate::transport::{FrameSink, PeerId};
use crate::wire::{self, DataHeader, RefreshHeader};

use super::{ShardCore, ShardError, TableStore};

/// One connection's subscription to an eager table.
#[derive(Debug, Default)]
pub(super) struct Reader {
    pub(super) keys: HashSet<Key>,
    /// changed rows not sent yet, and the stamp they are due with
    pub(super) due: std::collections::BTreeSet<Key>,
    pub(super) stamp: u64,
    /// the stamp of the last refresh finished (its last frame sent)
    pub(super) sent: u64,
}

/// An eager table's subscriptions and the rows pushed since the last refresh.
#[derive(Debug)]
pub(super) struct Eager {
    /// the table's first key (dense frames address floats from it)
    pub(super) begin: Key,
    pub(super) dim: u64,
    pub(super) readers: HashMap<PeerId, Reader>,
    /// readers that passed the subscription cap: refreshed no more, since a
    /// refresh tells a worker all its rows of this shard are that fresh
    pub(super) overflowed: HashSet<PeerId>,
    pub(super) dirty: HashSet<Key>,
}

impl Eager {
    /// The keys a dense frame's span `a .. a + b` (floats) covers.
    fn span(&self, a: u64, b: u64) -> std::ops::Range<Key> {
        let first = a / self.dim;
        let end = (a + b).div_ceil(self.dim);
        self.begin + first..self.begin + end
    }
}

impl ShardCore {
    /// Keys `peer` is subscribed to for refreshes of `table` (eager tables).
    pub fn subscribed(&self, table: TableId, peer: PeerId) -> usize {
        self.eager.get(&table).and_then(|e| e.readers.get(&peer)).map_or(0, |r| r.keys.len())
    }

    /// The slowest worker finished a clock: each subscriber's changed rows of
    /// every eager table become due with the new stamp, and every connection
    /// with a `Watch` outstanding gets its refresh.
    pub(super) fn refresh(&mut self, tx: &mut dyn FrameSink) {
        let stamp = self.min_clock;
        for e in self.eager.values_mut() {
            for r in e.readers.values_mut() {
                r.due.extend(e.dirty.iter().copied().filter(|k| r.keys.contains(k)));
                r.stamp = stamp;
            }
            e.dirty.clear();
        }
        // in a fixed order, so a simulation's seed replays exactly
        let mut watching: Vec<(PeerId, TableId)> = self.watching.iter().copied().collect();
        watching.sort_unstable_by_key(|(p, t)| (p.index, p.generation, t.0));
        for (peer, table) in watching {
            if let Err(err) = self.serve_watch(peer, table, tx) {
                self.failed.push((peer, err));
            }
        }
    }

    /// Answers `peer`'s outstanding `Watch` of `table` with one `Refresh`
    /// frame if something is due: up to half a frame of its due rows, read now
    /// (so at least as fresh as their stamp); the last frame of a refresh says
    /// so, and may be empty (the stamp alone moved on).
    pub(super) fn serve_watch(
        &mut self,
        peer: PeerId,
        table: TableId,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ShardError> {
        if !self.watching.contains(&(peer, table)) {
            return Ok(());
        }
        // a refresh answers one request, so it is no larger than a response
        let chunk = self.refresh_bytes;
        let Some(e) = self.eager.get_mut(&table) else { return Ok(()) };
        let Some(r) = e.readers.get_mut(&peer) else { return Ok(()) };
        if r.due.is_empty() && r.stamp <= r.sent {
            return Ok(());
        }
        let per_frame = (chunk / (8 + 4 * e.dim as usize)).max(1);
        let mut keys = Vec::with_capacity(per_frame.min(r.due.len()));
        while keys.len() < per_frame {
            let Some(k) = r.due.pop_first() else { break };
            keys.push(k);
        }
        let last = r.due.is_empty();
        if last {
            r.sent = r.stamp;
        }
        let stamp = r.stamp;
        self.watching.remove(&(peer, table));
        self.send_refresh(peer, table, &keys, stamp, last, tx)
    }

    fn send_refresh(
        &mut self,
        peer: PeerId,
        table: TableId,
        keys: &[Key],
        stamp: u64,
        last: bool,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ShardError> {
        let Some((dim, store)) = self.tables.get_mut(&table) else { return Ok(()) };
        let n = keys.len() * *dim as usize;
        self.vals_scratch.clear();
        self.vals_scratch.resize(n, 0.0);
        let read = match store {
            TableStore::Dense(d) => d.pull_keys(keys, &mut self.vals_scratch).map_err(|e| e.to_string()),
            TableStore::Sparse(s) => {
                s.prepare_pull(keys).map(|_| s.pull_prepared(&mut self.vals_scratch)).map_err(|e| e.to_string())
            }
        };
        // cannot happen (only checked pulls subscribe); if it did, this reader
        // gets no more refreshes rather than rows it was never sent
        let (keys, n, last) = if read.is_ok() {
            (keys, n, last)
        } else {
            if let Some(e) = self.eager.get_mut(&table) {
                e.readers.remove(&peer);
                e.overflowed.insert(peer);
            }
            (&[][..], 0, false)
        };
        let h = RefreshHeader { table: table.0, keys: keys.len() as u64, values: n as u64, stamp, last }.header();
        let len = h.frame_len().expect("a refresh is at most a chunk");
        let buf = tx.frame(peer, len)?;
        h.write(buf);
        let kb = keys.len() * 8;
        buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + kb].copy_from_slice(bytemuck::cast_slice(keys));
        buf[wire::DATA_HEADER_BYTES + kb..wire::DATA_HEADER_BYTES + kb + n * 4]
            .copy_from_slice(bytemuck::cast_slice(&self.vals_scratch));
        buf[wire::DATA_HEADER_BYTES + kb + n * 4..].fill(0);
        self.stats.bytes_out += len as u64;
        Ok(())
    }

    /// An eager table's bookkeeping for one checked request: a merged push
    /// marks its rows changed (`pushed`), an answered pull subscribes its
    /// reader to them (up to the cap).
    pub(super) fn track(e: &mut Eager, h: &DataHeader, keys_b: &[u8], peer: PeerId, pushed: bool) {
        let span = h.dense.then(|| e.span(h.a, h.b));
        let each = |f: &mut dyn FnMut(Key)| {
            if let Some(span) = span.clone() {
                span.for_each(&mut *f);
            } else {
                keys_b.chunks_exact(8).for_each(|k| f(u64::from_le_bytes(k.try_into().expect("8 bytes"))));
            }
        };
        if pushed {
            each(&mut |k| {
                e.dirty.insert(k);
            });
        } else if !e.overflowed.contains(&peer) {
            let subs = &mut e.readers.entry(peer).or_default().keys;
            let mut over = false;
            each(&mut |k| {
                if subs.len() < crate::limits::ESSP_SUBSCRIBED_KEYS_MAX {
                    subs.insert(k);
                } else {
                    over |= !subs.contains(&k);
                }
            });
            if over {
                e.readers.remove(&peer);
                e.overflowed.insert(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::clock::Consistency;
    use crate::keys::TableId;
    use crate::shard::testing::{clock, dense_pull, frame, kinds, shard, A, B};
    use crate::sim::SimSink;
    use crate::wire::{self, DataHeader, Frame, Kind};

    #[test]
    fn eager_tables_refresh_their_readers_when_the_slowest_worker_clocks() {
        let mut s = shard(Consistency::Essp { staleness: 1 });
        let mut sink = SimSink::default();
        // A reads keys 0..10 (subscribes), then B pushes key 3
        s.handle(A, &dense_pull(1), &mut sink).unwrap();
        let (_, resp) = sink.frames.pop().unwrap();
        let Frame::Data { h, .. } = wire::decode(&resp, 1 << 30).unwrap() else { panic!() };
        assert_eq!((h.kind, wire::stamp_of(&h)), (Kind::PullResp, 0));
        let push = frame(DataHeader { kind: Kind::Push, dense: false, table: 0, sub: 0, ts: 2, a: 1, b: 1 }, &[3]);
        s.handle(B, &push, &mut sink).unwrap();
        sink.frames.clear();
        assert_eq!(s.subscribed(TableId(0), A), 10);
        // A watches: nothing is due yet, so nothing is sent
        let watch = frame(DataHeader { kind: Kind::Watch, dense: false, table: 0, sub: 0, ts: 0, a: 0, b: 0 }, &[]);
        // a watch of a table that is not eager breaks the protocol
        let mut lazy = shard(Consistency::Bounded { staleness: 1 });
        assert!(lazy.handle(A, &watch, &mut sink).is_err());
        s.handle(A, &watch, &mut sink).unwrap();
        assert!(sink.frames.is_empty());
        // the minimum clock moves only when both have finished clock 0
        s.handle(A, &clock(0, 1), &mut sink).unwrap();
        assert_eq!(kinds(&mut sink), vec![(A, Kind::Ack)]);
        s.handle(B, &clock(1, 1), &mut sink).unwrap();
        let refresh =
            sink.frames.iter().find(|(p, f)| *p == A && wire::peek_kind(f) == Some(Kind::Refresh)).expect("a refresh");
        let Frame::Data { h, keys, vals } = wire::decode(&refresh.1, 1 << 30).unwrap() else { panic!() };
        assert_eq!((wire::stamp_of(&h), h.a, h.sub), (1, 1, 1));
        assert_eq!(keys, 3u64.to_le_bytes());
        assert_eq!(vals, 0f32.to_le_bytes());
        // B read nothing and watched nothing: no refresh for it
        assert!(!sink.frames.iter().any(|(p, f)| *p == B && wire::peek_kind(f) == Some(Kind::Refresh)));
        sink.frames.clear();
        // one refresh per watch: the next clock's waits for A's next watch, and
        // with nothing changed it is empty (the stamp alone moved on)
        s.handle(A, &clock(0, 2), &mut sink).unwrap();
        s.handle(B, &clock(1, 2), &mut sink).unwrap();
        assert!(!sink.frames.iter().any(|(_, f)| wire::peek_kind(f) == Some(Kind::Refresh)));
        s.handle(A, &watch, &mut sink).unwrap();
        let empty =
            sink.frames.iter().find(|(_, f)| wire::peek_kind(f) == Some(Kind::Refresh)).expect("an empty refresh");
        let Frame::Data { h, .. } = wire::decode(&empty.1, 1 << 30).unwrap() else { panic!() };
        assert_eq!((wire::stamp_of(&h), h.a, h.sub), (2, 0, 1));
        sink.frames.clear();
        s.handle(A, &watch, &mut sink).unwrap();
        assert!(sink.frames.is_empty(), "nothing new: the watch waits");
        s.on_closed(A);
        assert_eq!(s.subscribed(TableId(0), A), 0);
    }
}
