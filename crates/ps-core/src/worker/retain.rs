//! Failover retention (replicated jobs, `crate::chain`): with failover on,
//! every request frame is kept, per owner and in order, until its answer
//! comes; when a connection breaks the owner waits for a rebind to the new
//! head of its chain, which gets every unanswered request again. Without
//! failover a lost connection fails every operation in flight.
//!
//! Nothing here decides *when* to rebind: the caller learns the new head
//! (`lost_owners`, then `rebind`).

use std::collections::VecDeque;

use super::{tx_error, Timestamp, WorkerCore};
use crate::error::PsError;
use crate::filter::Decoder;
use crate::keys::TableId;
use crate::ring::Owner;
use crate::transport::{FrameSink, PeerId, TxError};
use crate::wire::{DataHeader, Kind};

/// A request frame with no answer yet, kept for failover (replicated jobs):
/// what the shard applies (a coded frame decoded), and its number among the
/// counted frames to its owner (`chain::is_counted`).
#[derive(Debug)]
struct Unanswered {
    ts: Timestamp,
    sub: u32,
    /// the request's `a`: a dense pull's answer carries its stamp in `sub`
    /// (`wire::stamp_of`) and is matched by `a` instead
    a: u64,
    seq: Option<u64>,
    frame: Vec<u8>,
}

/// One owner's stream, as failover needs it.
#[derive(Debug, Default)]
struct OwnerStream {
    /// sent (or to send), not answered, in order
    unanswered: VecDeque<Unanswered>,
    /// the number the next counted frame gets
    next_seq: u64,
    /// the connection broke: why (until `rebind`)
    lost: Option<String>,
    /// rebound, and no request answered on the new connection yet
    resumed: bool,
}

impl OwnerStream {
    /// The number of the first counted frame with no answer (`next_seq` if
    /// none), after checking that the unanswered counted frames are the end
    /// of the stream, as answers to counted frames come in order.
    fn first_unanswered(&self, owner: Owner) -> Result<u64, PsError> {
        let first = self.unanswered.iter().find_map(|u| u.seq).unwrap_or(self.next_seq);
        let seqs: Vec<u64> = self.unanswered.iter().filter_map(|u| u.seq).collect();
        if seqs.iter().enumerate().any(|(i, &q)| q != first + i as u64) || first + seqs.len() as u64 != self.next_seq {
            return Err(PsError::Transport(format!(
                "server {} shard {}: unanswered frames {seqs:?} are not the end of the stream (next {})",
                owner.server, owner.shard, self.next_seq
            )));
        }
        Ok(first)
    }
}

/// Chain replication on the worker's side (`chain`): it binds to every head
/// as `origin`, keeps every request until it is answered, and after a lost
/// connection binds to the new head and sends the unanswered ones again.
#[derive(Debug)]
pub(super) struct Failover {
    origin: u32,
    streams: Vec<OwnerStream>,
    /// decodes this worker's own coded frames as the shard will
    pub(super) mirror: Decoder,
    pub(super) body_max: usize,
    /// owners answered since their rebind (`take_resumed`)
    resumed: Vec<Owner>,
}

impl WorkerCore {
    /// Turns on failover for a replicated job (every shard is a chain of
    /// copies, `chain`): binds to every shard as `origin` (the worker's rank),
    /// and from now on keeps each request until it is answered, so that when
    /// a connection breaks the operations in flight wait for [`WorkerCore::rebind`]
    /// to the new head instead of failing.
    pub fn enable_failover(&mut self, tx: &mut dyn FrameSink, origin: u32) -> Result<(), PsError> {
        let owners = self.peers.iter().map(|r| r.len()).sum();
        self.failover = Some(Failover {
            origin,
            streams: (0..owners).map(|_| OwnerStream::default()).collect(),
            mirror: Decoder::default(),
            body_max: self.body_max,
            resumed: Vec::new(),
        });
        for &peer in self.peers.iter().flatten() {
            let f = crate::chain::bind_frame(origin, 0);
            match tx.frame(peer, f.len()) {
                Ok(b) => b.copy_from_slice(&f),
                // the head died between connecting and now (a server killed while
                // the job starts): its close event comes next, the owner is lost
                // like any other, and the rebind to the next copy binds there
                Err(TxError::Closed(_)) => {}
                Err(e) => return Err(tx_error(e)),
            }
        }
        Ok(())
    }

    /// Owners whose connection broke and that wait for [`WorkerCore::rebind`].
    pub fn lost_owners(&self) -> Vec<Owner> {
        let Some(f) = &self.failover else { return Vec::new() };
        f.streams.iter().enumerate().filter(|(_, s)| s.lost.is_some()).map(|(g, _)| self.owner_of_flat(g)).collect()
    }

    /// Requests kept for failover that have no answer yet (0 once every
    /// operation is answered: nothing is kept longer than it must be).
    pub fn unanswered(&self) -> usize {
        self.failover.as_ref().map_or(0, |f| f.streams.iter().map(|s| s.unanswered.len()).sum())
    }

    /// Owners that answered a request since they were rebound.
    pub fn take_resumed(&mut self) -> Vec<Owner> {
        self.failover.as_mut().map(|f| std::mem::take(&mut f.resumed)).unwrap_or_default()
    }

    /// `owner` is served on the new connection `peer` now (the head of its
    /// chain): binds there, saying the number of the first counted frame it
    /// has no answer for, and sends every unanswered request again, in order.
    /// The head answers again, without applying, what it applied already.
    pub fn rebind(&mut self, owner: Owner, peer: PeerId, tx: &mut dyn FrameSink) -> Result<(), PsError> {
        let g = self.flat(owner);
        let old = std::mem::replace(&mut self.peers[owner.server as usize][owner.shard as usize], peer);
        self.moved_peer(g, old, peer);
        let f = self.failover.as_mut().ok_or(PsError::Transport("rebind without failover".into()))?;
        f.mirror.forget(old);
        let stream = &mut f.streams[g];
        stream.lost = None;
        stream.resumed = true;
        let first = stream.first_unanswered(owner)?;
        let bind = crate::chain::bind_frame(f.origin, first);
        let mut send = |frame: &[u8]| tx.frame(peer, frame.len()).map(|b| b.copy_from_slice(frame));
        // a failed send means this connection is going too: its close comes next
        if send(&bind).is_ok() {
            for u in &stream.unanswered {
                if send(&u.frame).is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Flat owner `g` moved from connection `old` to `peer`: what was tied to
    /// the old one (codec state, watches, cached rows' freshness) starts over.
    fn moved_peer(&mut self, g: usize, old: PeerId, peer: PeerId) {
        self.peer_owner.remove(&old);
        self.peer_owner.insert(peer, self.owner_of_flat(g));
        self.encoder.forget(old);
        self.watch_out.retain(|(p, _)| *p != old);
        self.watch_due.retain(|(p, _)| *p != old);
        let mut eager: Vec<TableId> = self.caches.iter().filter(|(_, c)| c.is_eager()).map(|(t, _)| *t).collect();
        eager.sort_unstable_by_key(|t| t.0);
        self.watch_due.extend(eager.into_iter().map(|t| (peer, t)));
        for c in self.caches.values_mut() {
            c.owner_moved(g);
        }
    }

    /// Sends a frame built in memory to flat owner `g`: `wire` goes out (unless
    /// that owner's connection is down), and with failover on `kept` (what the
    /// shard applies: `wire` itself unless it is coded) is kept until answered.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_owned(
        failover: &mut Option<Failover>,
        tx: &mut dyn FrameSink,
        g: usize,
        peer: PeerId,
        ts: Timestamp,
        sub: u32,
        kind: Kind,
        wire: Vec<u8>,
        kept: Option<Vec<u8>>,
    ) -> Result<(), TxError> {
        let Some(f) = failover.as_mut() else {
            return tx.frame(peer, wire.len()).map(|b| b.copy_from_slice(&wire));
        };
        let stream = &mut f.streams[g];
        let seq = crate::chain::is_counted(kind).then_some(stream.next_seq);
        let a = crate::wire::peek_header(&wire).expect("a data frame").a;
        if stream.lost.is_none() {
            // TCP sends straight from the kept copy when nothing is queued ahead
            match tx.frame_gather(peer, &[&wire]) {
                // its close event comes next; the frame goes again after the rebind
                Ok(()) | Err(TxError::Closed(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if seq.is_some() {
            stream.next_seq += 1;
        }
        stream.unanswered.push_back(Unanswered { ts, sub, a, seq, frame: kept.unwrap_or(wire) });
        Ok(())
    }

    /// The request `h` answers (to `peer`) need not go again.
    pub(super) fn answered(&mut self, peer: PeerId, h: &DataHeader) {
        let Some(f) = self.failover.as_mut() else { return };
        let Some(&o) = self.peer_owner.get(&peer) else { return };
        let g = self.owner_base[o.server as usize] as usize + o.shard as usize;
        let stream = &mut f.streams[g];
        let by_a = h.kind == Kind::PullResp && h.dense;
        let hit = |u: &Unanswered| u.ts == h.ts && if by_a { u.a == h.a } else { u.sub == h.sub };
        if let Some(i) = stream.unanswered.iter().position(hit) {
            stream.unanswered.remove(i);
        }
        if std::mem::take(&mut stream.resumed) {
            f.resumed.push(o);
        }
    }

    /// A connection to a shard is gone. Without failover every operation in
    /// flight fails, and so does every later one; with it, the owner waits for
    /// [`WorkerCore::rebind`] and its requests for the new connection.
    pub fn on_closed(&mut self, peer: PeerId, reason: &str) {
        let owner = self.peer_owner.get(&peer).copied();
        let Some(owner) = owner else { return };
        if let Some(f) = self.failover.as_mut() {
            let g = self.owner_base[owner.server as usize] as usize + owner.shard as usize;
            f.streams[g].lost.get_or_insert_with(|| reason.to_string());
            f.mirror.forget(peer);
            self.encoder.forget(peer);
            self.watch_out.retain(|(p, _)| *p != peer);
            return;
        }
        let err = PsError::ServerLost { server: owner.server, shard: owner.shard, reason: reason.to_string() };
        for p in self.pending.values_mut() {
            p.frames_left = 0;
            p.error.get_or_insert(err.clone());
        }
        let all: Vec<Timestamp> = self.pending.keys().copied().collect();
        for ts in all {
            self.settle(ts);
        }
        self.broken.get_or_insert(err);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, answer, drain, owner_of, peer_of, spread_keys, Sent, DENSE, SPARSE};
    use super::super::Keys;
    use crate::error::PsError;
    use crate::ring::Owner;
    use crate::sim::SimSink;
    use crate::transport::{FrameSink, PeerId, TxError};
    use crate::wire::Kind;

    #[test]
    fn requests_kept_for_failover_are_exactly_the_unanswered_ones_and_go_again_in_order() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        w.enable_failover(&mut sink, 0).unwrap();
        assert_eq!(sink.frames.len(), 4, "a bind to every shard");
        sink.frames.clear();
        let keys = spread_keys(200);
        w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 400]), None).unwrap();
        w.issue(&mut sink, Kind::Pull, DENSE, Keys::Range { first: 0, count: 400 }, None, Some(Vec::new())).unwrap();
        let frames = drain(&mut sink);
        assert_eq!(w.unanswered(), frames.len());
        // each shard answers the first half of what it got, in order, as a
        // shard does (a dense answer carries a stamp in `sub`)
        let per_owner = |p: PeerId| frames.iter().filter(|s| s.peer == p).count();
        let mut seen = std::collections::HashMap::new();
        let (answered, kept): (Vec<_>, Vec<_>) = frames.iter().enumerate().partition(|(_, s)| {
            let n = seen.entry(s.peer).or_insert(0usize);
            *n += 1;
            *n <= per_owner(s.peer) / 2
        });
        assert!(!answered.is_empty() && !kept.is_empty());
        for (_, s) in &answered {
            w.on_frame(s.peer, &answer(s, 2, 77)).unwrap();
        }
        assert_eq!(w.unanswered(), kept.len());
        let lost = frames[1].peer;
        w.on_closed(lost, "test");
        assert_eq!(w.lost_owners(), vec![owner_of(lost)]);
        let new_peer = PeerId { index: 40, generation: 1 };
        w.rebind(owner_of(lost), new_peer, &mut sink).unwrap();
        assert!(w.lost_owners().is_empty());
        let again = drain(&mut sink);
        assert_eq!(again[0].h.kind, Kind::Bind);
        assert!(again.iter().all(|s| s.peer == new_peer));
        let want: Vec<&Vec<u8>> = kept.iter().filter(|(_, s)| s.peer == lost).map(|(_, s)| &s.bytes).collect();
        let got: Vec<&Vec<u8>> = again[1..].iter().map(|s| &s.bytes).collect();
        assert_eq!(got, want, "the unanswered requests of that owner, in order, and nothing else");
        assert!(w.take_resumed().is_empty());
        for (_, s) in &kept {
            let peer = if s.peer == lost { new_peer } else { s.peer };
            w.on_frame(peer, &answer(s, 2, 77)).unwrap();
        }
        assert_eq!(w.unanswered(), 0, "nothing is kept once answered");
        assert_eq!(w.take_resumed(), vec![owner_of(lost)]);
    }

    /// A head that died between the worker's connect and its failover set-up
    /// (a server killed while the job starts; seen in the soft-RoCE suite's
    /// rebuild job) is an owner lost like any other, not the worker's end.
    #[test]
    fn a_head_closed_before_failover_is_set_up_is_lost_then_rebound() {
        struct ClosedTo(PeerId, SimSink);
        impl FrameSink for ClosedTo {
            fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
                if peer == self.0 {
                    return Err(TxError::Closed(peer));
                }
                self.1.frame(peer, len)
            }
        }
        let mut w = testkit::worker();
        let dead = peer_of(Owner { server: 1, shard: 0 });
        let mut sink = ClosedTo(dead, SimSink::default());
        w.enable_failover(&mut sink, 0).expect("a closed head does not fail the set-up");
        assert_eq!(sink.1.frames.len(), 3, "a bind to every live shard");
        // its close event follows; requests for it wait for the rebind
        w.on_closed(dead, "killed");
        assert_eq!(w.lost_owners(), vec![owner_of(dead)]);
        let keys = spread_keys(200);
        w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 400]), None).unwrap();
        let new_peer = PeerId { index: 41, generation: 1 };
        w.rebind(owner_of(dead), new_peer, &mut sink.1).unwrap();
        let to_new: Vec<Sent> = drain(&mut sink.1).into_iter().filter(|s| s.peer == new_peer).collect();
        assert_eq!(to_new[0].h.kind, Kind::Bind);
        assert!(to_new.len() > 1, "the push's frames for the lost owner go to the new head");
    }

    #[test]
    fn without_failover_a_lost_connection_fails_everything_in_flight_and_later() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(50);
        let ts = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 100]), None).unwrap();
        let frames = drain(&mut sink);
        assert_eq!(w.unanswered(), 0, "nothing is kept without failover");
        w.on_closed(frames[0].peer, "gone");
        assert!(w.is_done(ts).unwrap());
        assert!(matches!(w.finish(ts), Err(PsError::ServerLost { .. })));
        let later = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 100]), None);
        assert!(matches!(later, Err(PsError::ServerLost { .. })));
        assert!(sink.frames.is_empty());
    }
}
