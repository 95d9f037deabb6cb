//! Answers coming back: each response frame is matched to the pending
//! operation of its timestamp (and to the chunk it answers), pulled values
//! land where the caller's buffer wants them, and an operation whose last
//! answer came is settled. Anything a shard sends that does not fit (an
//! unknown timestamp, one answer too many, values outside the request) is a
//! protocol violation returned as an error, never a panic.

use std::ops::Range;

use super::cached::CachedRead;
use super::{OwnedKeys, WorkerCore};
use crate::error::PsError;
use crate::keys::TableId;
use crate::ring::Owner;
use crate::transport::{PeerId, Received};
use crate::wire::{self, DataHeader, Frame, Kind, RefreshHeader};

/// How a shard's frame broke the protocol: the worker drops the connection
/// it came on (the text follows "protocol violation from PEER: ").
#[derive(Debug, thiserror::Error)]
pub(super) enum Violation {
    /// A dense answer starts before the request's first value.
    #[error("response before the request")]
    BeforeRequest,
    /// A dense answer ends after the request's last value.
    #[error("response beyond the request")]
    BeyondRequest,
    /// A sparse answer to a chunk never sent.
    #[error("unknown sub {0}")]
    UnknownSub(u32),
    /// A sparse answer with values that do not fit its chunk's keys.
    #[error("sub {sub} carries {values} values for {keys} keys")]
    SubValues { sub: u32, values: u64, keys: usize },
    /// An answer to a timestamp not pending.
    #[error("response for unknown timestamp {0}")]
    UnknownResponse(u64),
    /// A refusal of a timestamp not pending.
    #[error("error for unknown timestamp {0}")]
    UnknownError(u64),
    /// More answers than the operation sent frames.
    #[error("too many responses for timestamp {0}")]
    TooManyResponses(u64),
    /// Values in answer to a push.
    #[error("values for push {0}")]
    ValuesForPush(u64),
    /// A refresh of a table no `Watch` asked for.
    #[error("a refresh of table {0} nobody watched for")]
    UnwatchedRefresh(u32),
    /// A refresh of a table the job does not have.
    #[error("a refresh of unknown table {0}")]
    RefreshUnknownTable(u32),
    /// A refresh whose values do not fit its keys.
    #[error("a refresh of {keys} keys with {values} values (dim {dim})")]
    RefreshValues { keys: u64, values: u64, dim: u32 },
    /// A refresh of keys outside the table's range.
    #[error("a refresh of keys outside table {0}")]
    RefreshOutside(u32),
}

/// Where a pull's answers land.
#[derive(Debug)]
pub(super) struct PullOut {
    pub(super) vals: Vec<f32>,
    pub(super) dim: usize,
    /// dense: first flat float of the request
    pub(super) base: u64,
    /// sparse: per sub, a slice of `ranges`
    pub(super) subs: Vec<Range<usize>>,
    pub(super) ranges: Vec<Range<usize>>,
}

impl PullOut {
    /// Where a pull of `keys` keys of `dim` values lands: `out` itself when
    /// it has the right length (every value is overwritten by a response, or
    /// the operation fails, so no memset per pull), else `out` cleared and
    /// zeroed to that length. `base`: a dense pull's first flat float.
    pub(super) fn new(mut out: Vec<f32>, keys: u64, dim: usize, base: u64) -> Self {
        if out.len() != keys as usize * dim {
            out.clear();
            out.resize(keys as usize * dim, 0.0);
        }
        Self { vals: out, dim, base, subs: Vec::new(), ranges: Vec::new() }
    }

    /// The next frame of a sparse pull went out: its answer holds the keys
    /// of `ranges` (runs of the request's keys), in order.
    pub(super) fn expect_sub(&mut self, ranges: &[Range<usize>]) {
        let s = self.ranges.len();
        self.ranges.extend_from_slice(ranges);
        self.subs.push(s..self.ranges.len());
    }

    /// A dense answer: `h.b` floats from flat float `h.a`.
    fn land_dense(&mut self, h: &DataHeader, vals: &[u8]) -> Result<(), Violation> {
        let off = h.a.checked_sub(self.base).ok_or(Violation::BeforeRequest)? as usize;
        let dst = off
            .checked_add(h.b as usize)
            .and_then(|end| self.vals.get_mut(off..end))
            .ok_or(Violation::BeyondRequest)?;
        wire::copy_vals(dst, vals);
        Ok(())
    }

    /// A sparse answer: the values of the keys of chunk `h.sub`, in order.
    fn land_sparse(&mut self, h: &DataHeader, vals: &[u8]) -> Result<(), Violation> {
        let sub = self.subs.get(h.sub as usize).cloned().ok_or(Violation::UnknownSub(h.sub))?;
        let keys: usize = self.ranges[sub.clone()].iter().map(|r| r.len()).sum();
        if keys * self.dim != h.b as usize {
            return Err(Violation::SubValues { sub: h.sub, values: h.b, keys });
        }
        let mut at = 0;
        for r in &self.ranges[sub] {
            let n = r.len() * self.dim;
            wire::copy_vals(&mut self.vals[r.start * self.dim..r.end * self.dim], &vals[at..at + n * 4]);
            at += n * 4;
        }
        Ok(())
    }
}

/// An operation sent and not finished (or finished and not yet taken).
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) frames_left: u32,
    pub(super) error: Option<PsError>,
    pub(super) pull: Option<PullOut>,
    /// a read of a cached table: fills the cache when it completes
    pub(super) read: Option<CachedRead>,
    /// a push into a cached table: released in the cache when it completes
    pub(super) pushed: Option<(TableId, OwnedKeys)>,
}

impl Pending {
    pub(super) fn new(frames_left: u32, error: Option<PsError>, pull: Option<PullOut>) -> Self {
        Self { frames_left, error, pull, read: None, pushed: None }
    }
}

impl WorkerCore {
    /// Handles one response frame. An `Err` means the frame broke the protocol:
    /// drop the connection it came on.
    pub fn on_frame(&mut self, peer: PeerId, frame: &[u8]) -> Result<(), PsError> {
        let bad = |what: String| PsError::Transport(format!("protocol violation from {peer:?}: {what}"));
        match wire::decode(frame, self.body_max).map_err(|e| bad(e.to_string()))? {
            Frame::Data { h, keys, vals } if h.kind == Kind::Refresh => {
                let h = RefreshHeader::try_from(h).map_err(|e| bad(e.to_string()))?;
                self.on_refresh(peer, h, keys, vals).map_err(|e| bad(e.to_string()))
            }
            // a Bind's answer (failover)
            Frame::Data { h, .. } if h.kind == Kind::Ack && h.ts == 0 && self.failover.is_some() => Ok(()),
            Frame::Data { h, vals, .. } if matches!(h.kind, Kind::Ack | Kind::PullResp) => {
                self.on_answer(peer, &h, vals).map_err(|e| bad(e.to_string()))
            }
            Frame::Error { h, message } => self.on_error(peer, &h, message).map_err(|e| bad(e.to_string())),
            other => Err(bad(format!("unexpected frame {other:?}"))),
        }
    }

    /// An `Ack` or a `PullResp`: one frame of `h.ts` answered.
    fn on_answer(&mut self, peer: PeerId, h: &DataHeader, vals: &[u8]) -> Result<(), Violation> {
        self.answered(peer, h);
        let p = self.pending.get_mut(&h.ts).ok_or(Violation::UnknownResponse(h.ts))?;
        if p.frames_left == 0 {
            return Err(Violation::TooManyResponses(h.ts));
        }
        if h.kind == Kind::PullResp {
            let Some(out) = p.pull.as_mut() else { return Err(Violation::ValuesForPush(h.ts)) };
            if h.dense {
                out.land_dense(h, vals)?;
            } else {
                out.land_sparse(h, vals)?;
            }
            if let Some(r) = p.read.as_mut() {
                r.stamp = r.stamp.min(wire::stamp_of(h));
            }
        }
        p.frames_left -= 1;
        if p.frames_left == 0 {
            self.settle(h.ts);
        }
        Ok(())
    }

    /// A shard refused one frame of `h.ts`: the operation fails with the
    /// first such reason once all its frames are answered.
    fn on_error(&mut self, peer: PeerId, h: &DataHeader, message: &str) -> Result<(), Violation> {
        let owner = self.peer_owner.get(&peer).copied().unwrap_or(Owner { server: u32::MAX, shard: u32::MAX });
        self.answered(peer, h);
        let p = self.pending.get_mut(&h.ts).ok_or(Violation::UnknownError(h.ts))?;
        if p.frames_left == 0 {
            return Err(Violation::TooManyResponses(h.ts));
        }
        p.frames_left -= 1;
        p.error.get_or_insert(PsError::Rejected {
            server: owner.server,
            shard: owner.shard,
            reason: message.to_string(),
        });
        if p.frames_left == 0 {
            self.settle(h.ts);
        }
        Ok(())
    }

    /// Handles what a transport received: a frame ([`WorkerCore::on_frame`]),
    /// or a pull's answer the transport served and decoded itself, handled
    /// as the `PullResp` frame it stands for would be, without a frame.
    pub fn on_received(&mut self, peer: PeerId, r: Received<'_>) -> Result<(), PsError> {
        let (h, vals) = match r {
            Received::Frame(frame) => return self.on_frame(peer, frame),
            Received::Answer { h, vals } => (h, vals),
        };
        let bad = |what: String| PsError::Transport(format!("protocol violation from {peer:?}: {what}"));
        if h.kind != Kind::PullResp || h.payload_parts() != Some((0, vals.len())) {
            return Err(bad(format!("a landed answer {h:?} with {} bytes of values", vals.len())));
        }
        self.on_answer(peer, &h, vals).map_err(|v| bad(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, answer, dense_value, drain, forged, refusal, sparse_value, spread_keys};
    use super::super::testkit::{DENSE, SPARSE};
    use super::super::Keys;
    use crate::error::PsError;
    use crate::sim::SimSink;
    use crate::wire::{DataHeader, Kind};

    #[test]
    fn answers_are_matched_to_their_own_timestamp() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(100);
        let vals = vec![1.0; keys.len() * 2];
        let t1 = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vals), None).unwrap();
        let first = drain(&mut sink);
        let t2 = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vals), None).unwrap();
        let second = drain(&mut sink);
        for s in &second {
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
        }
        assert!(w.is_done(t2).unwrap());
        assert!(!w.is_done(t1).unwrap(), "answers to t2 do not count for t1");
        for s in &first {
            assert!(!w.is_done(t1).unwrap());
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
        }
        assert!(w.is_done(t1).unwrap());
        assert_eq!(w.finish(t1).unwrap(), None);
        assert_eq!(w.finish(t2).unwrap(), None);
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn a_duplicate_unknown_or_misshapen_answer_is_refused_without_panicking() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(40);
        let push = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 80]), None).unwrap();
        let pushes = drain(&mut sink);
        let pull = w.issue(&mut sink, Kind::Pull, SPARSE, Keys::List(&keys), None, Some(Vec::new())).unwrap();
        let pulls = drain(&mut sink);
        let dense = w.issue(&mut sink, Kind::Pull, DENSE, Keys::Range { first: 10, count: 5 }, None, Some(vec![]));
        let dense = (dense.unwrap(), drain(&mut sink));
        let refused = |w: &mut super::WorkerCore, s: &super::super::testkit::Sent, f: Vec<u8>| {
            let e = w.on_frame(s.peer, &f).expect_err("a bad answer accepted");
            assert!(matches!(e, PsError::Transport(ref m) if m.contains("protocol violation")), "{e:?}");
        };
        let (p0, q0, d0) = (&pushes[0], &pulls[0], &dense.1[0]);
        // unknown timestamp, values for a push, a sub never sent, the wrong count
        refused(&mut w, p0, forged(DataHeader { ts: 999, ..answer_header(p0, Kind::Ack) }, &[]));
        refused(&mut w, p0, forged(DataHeader { b: 2, ..answer_header(p0, Kind::PullResp) }, &[1.0, 2.0]));
        refused(&mut w, q0, forged(DataHeader { sub: 999, b: 2, ..answer_header(q0, Kind::PullResp) }, &[1.0; 2]));
        let n = q0.keys.len() as u64 * 2;
        refused(
            &mut w,
            q0,
            forged(DataHeader { b: n + 2, ..answer_header(q0, Kind::PullResp) }, &vec![0.0; n as usize + 2]),
        );
        // dense values before or beyond the request
        let dh = answer_header(d0, Kind::PullResp);
        refused(&mut w, d0, forged(DataHeader { a: dh.a - 1, ..dh }, &vec![0.0; dh.b as usize]));
        refused(&mut w, d0, forged(DataHeader { b: dh.b + 1, ..dh }, &vec![0.0; dh.b as usize + 1]));
        // bytes that are no frame at all
        assert!(w.on_frame(p0.peer, &[0xAB; 13]).is_err());
        // none of that counted: each operation still needs all its answers
        for s in pushes.iter().chain(&pulls).chain(&dense.1) {
            assert!(!w.is_done(s.h.ts).unwrap());
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
        }
        assert!(w.is_done(push).unwrap() && w.is_done(pull).unwrap() && w.is_done(dense.0).unwrap());
        // one answer too many
        refused(&mut w, p0, answer(p0, 2, 0));
        refused(&mut w, q0, answer(q0, 2, 0));
        assert_eq!(w.finish(pull).unwrap().unwrap().len(), keys.len() * 2);
    }

    fn answer_header(s: &super::super::testkit::Sent, kind: Kind) -> DataHeader {
        DataHeader { kind, ..s.h }
    }

    #[test]
    fn a_sparse_pull_lands_each_value_at_its_keys_offset_in_any_answer_order() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(300);
        // a stale buffer of the right length is reused and overwritten everywhere
        let ts = w.issue(&mut sink, Kind::Pull, SPARSE, Keys::List(&keys), None, Some(vec![-1.0; 600])).unwrap();
        let mut frames = drain(&mut sink);
        assert!(frames.len() > 4);
        frames.reverse();
        for s in &frames {
            assert!(s.vals.is_empty(), "a pull carries no values");
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
        }
        let got = w.finish(ts).unwrap().unwrap();
        let want: Vec<f32> = keys.iter().flat_map(|&k| [sparse_value(k, 0), sparse_value(k, 1)]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_dense_pull_lands_each_run_at_its_offset_in_any_answer_order() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let (first, count) = (50u64, 700u64);
        let ts = w.issue(&mut sink, Kind::Pull, DENSE, Keys::Range { first, count }, None, Some(vec![7.0; 3])).unwrap();
        let mut frames = drain(&mut sink);
        assert!(frames.len() > 4);
        frames.reverse();
        for (i, s) in frames.iter().enumerate() {
            // the stamp rides in `sub` of a dense answer: matching goes by `a`
            w.on_frame(s.peer, &answer(s, 3, 1000 + i as u64)).unwrap();
        }
        let got = w.finish(ts).unwrap().unwrap();
        let want: Vec<f32> = (first * 3..(first + count) * 3).map(dense_value).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_refused_frame_fails_its_operation_once_every_frame_is_answered() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(100);
        let ts = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 200]), None).unwrap();
        let frames = drain(&mut sink);
        w.on_frame(frames[0].peer, &refusal(&frames[0], "no room")).unwrap();
        w.on_frame(frames[1].peer, &refusal(&frames[1], "a later reason")).unwrap();
        for s in &frames[2..] {
            assert!(!w.is_done(ts).unwrap());
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
        }
        let o = testkit::owner_of(frames[0].peer);
        match w.finish(ts) {
            Err(PsError::Rejected { server, shard, reason }) => {
                assert_eq!((server, shard, reason.as_str()), (o.server, o.shard, "no room"), "the first reason");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A dense pull answered by a transport that landed the values itself
    /// (`Received::Answer`, no frame) fills the same values as the frame
    /// would; an answer whose counts disagree is refused.
    #[test]
    fn a_landed_answer_is_taken_as_its_frame_would_be() {
        use crate::transport::Received;
        use crate::wire::{self, Frame};
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let by_frame = w.issue(&mut sink, Kind::Pull, DENSE, Keys::Range { first: 10, count: 300 }, None, Some(vec![]));
        let by_frame = (by_frame.unwrap(), drain(&mut sink));
        let landed = w.issue(&mut sink, Kind::Pull, DENSE, Keys::Range { first: 10, count: 300 }, None, Some(vec![]));
        let landed = (landed.unwrap(), drain(&mut sink));
        for s in &by_frame.1 {
            w.on_received(s.peer, Received::Frame(&answer(s, 2, 0))).unwrap();
        }
        for s in &landed.1 {
            let f = answer(s, 2, 0);
            let Ok(Frame::Data { h, vals, .. }) = wire::decode(&f, 1 << 20) else { panic!() };
            let short = Received::Answer { h, vals: &vals[4..] };
            assert!(w.on_received(s.peer, short).is_err(), "values short of h.b");
            let ack = Received::Answer { h: DataHeader { kind: Kind::Ack, ..h }, vals };
            assert!(w.on_received(s.peer, ack).is_err(), "an answer is a PullResp");
            w.on_received(s.peer, Received::Answer { h, vals }).unwrap();
        }
        let want = w.finish(by_frame.0).unwrap().unwrap();
        assert_eq!(want.len(), 300 * 3, "300 keys of dim 3");
        assert_eq!(w.finish(landed.0).unwrap().unwrap(), want);
    }
}
