//! Dependencies between operations (OSDI's execute-after-finished, the
//! client's `push_after` / `pull_after`): an operation issued after others is
//! checked and numbered at once, held here, and sent by `pump` once every
//! timestamp it depends on has all its answers; it fails if one of them did.

use super::responses::Pending;
use super::{Keys, OwnedKeys, Timestamp, WorkerCore};
use crate::error::PsError;
use crate::keys::TableId;
use crate::transport::FrameSink;
use crate::wire::Kind;

/// An operation waiting for the timestamps it was issued after.
#[derive(Debug)]
pub(super) struct Deferred {
    pub(super) ts: Timestamp,
    deps: Vec<Timestamp>,
    kind: Kind,
    table: TableId,
    keys: OwnedKeys,
    vals: Option<Vec<f32>>,
    pub(super) out: Option<Vec<f32>>,
}

impl WorkerCore {
    /// Issues an operation to run only once every timestamp in `deps` has all
    /// its answers (OSDI's execute-after-finished): it is checked now and gets
    /// its timestamp now, and its frames go out from [`WorkerCore::pump`]. If a
    /// dependency failed, so does it. A dependency already waited on counts as
    /// finished. Under a staleness bound it reads at the clock it runs at.
    #[allow(clippy::too_many_arguments)]
    pub fn issue_after(
        &mut self,
        tx: &mut dyn FrameSink,
        deps: &[Timestamp],
        kind: Kind,
        table: TableId,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        if let Some(&d) = deps.iter().find(|&&d| d >= self.next_ts) {
            return Err(PsError::FutureTimestamp(d));
        }
        if deps.iter().all(|&d| self.finished(d)) {
            return self.issue(tx, kind, table, keys, vals, out);
        }
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.pending.len() + self.deferred.len() >= self.in_flight_max {
            return Err(PsError::TooManyInFlight(self.pending.len() + self.deferred.len()));
        }
        let t = self.table(table)?;
        Self::check_keys(t, &keys, vals)?;
        let ts = self.next_ts;
        self.next_ts += 1;
        self.deferred.push(Deferred {
            ts,
            deps: deps.to_vec(),
            kind,
            table,
            keys: OwnedKeys::of(&keys),
            vals: vals.map(|v| v.to_vec()),
            out,
        });
        Ok(ts)
    }

    /// Whether `ts` has all its answers (or was waited on already).
    fn finished(&self, ts: Timestamp) -> bool {
        match self.pending.get(&ts) {
            Some(p) => p.frames_left == 0,
            None => !self.deferred.iter().any(|d| d.ts == ts),
        }
    }

    /// Sends every deferred operation whose dependencies have finished, in
    /// issue order; the caller flushes. Call it after handling responses.
    pub fn pump(&mut self, tx: &mut dyn FrameSink) {
        if let Some(e) = self.broken.clone() {
            for d in std::mem::take(&mut self.deferred) {
                self.pending.insert(d.ts, Pending::new(0, Some(e.clone()), None));
            }
            return;
        }
        self.send_watches(tx);
        let mut i = 0;
        while i < self.deferred.len() {
            if !self.deferred[i].deps.iter().all(|&d| self.finished(d)) {
                i += 1;
                continue;
            }
            let d = self.deferred.remove(i);
            self.run_deferred(tx, d);
        }
    }

    /// Sends `d`, whose dependencies have finished, or fails it with the
    /// first dependency's error.
    fn run_deferred(&mut self, tx: &mut dyn FrameSink, d: Deferred) {
        let failed = d.deps.iter().find_map(|&dep| {
            let e = self.pending.get(&dep)?.error.as_ref()?;
            Some(PsError::DependencyFailed { dep, reason: e.to_string() })
        });
        let r = match (failed, self.table(d.table).cloned()) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(t)) => self.issue_at(tx, d.ts, d.kind, &t, d.keys.as_keys(), d.vals.as_deref(), d.out),
        };
        if let Err(e) = r {
            // issue_at leaves a pending entry when frames went out; otherwise record the failure
            self.pending.entry(d.ts).or_insert_with(|| Pending::new(0, Some(e), None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, answer, drain, refusal, sparse_value, spread_keys, SPARSE};
    use super::super::Keys;
    use crate::error::PsError;
    use crate::sim::SimSink;
    use crate::wire::Kind;

    #[test]
    fn an_operation_issued_after_another_goes_out_only_once_it_has_finished() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(60);
        let push = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&vec![1.0; 120]), None).unwrap();
        let pushes = drain(&mut sink);
        let pull = w.issue_after(&mut sink, &[push], Kind::Pull, SPARSE, Keys::List(&keys), None, Some(vec![]));
        let pull = pull.unwrap();
        assert!(pull > push && sink.frames.is_empty() && w.is_pull(pull));
        let (last, rest) = pushes.split_last().unwrap();
        for s in rest {
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
            w.pump(&mut sink);
            assert!(sink.frames.is_empty(), "held while its dependency has answers to come");
        }
        assert!(!w.is_done(pull).unwrap());
        w.on_frame(last.peer, &answer(last, 2, 0)).unwrap();
        w.pump(&mut sink);
        let pulls = drain(&mut sink);
        assert!(!pulls.is_empty() && pulls.iter().all(|s| s.h.ts == pull && s.h.kind == Kind::Pull));
        for s in &pulls {
            w.on_frame(s.peer, &answer(s, 2, 0)).unwrap();
        }
        let got = w.finish(pull).unwrap().unwrap();
        assert_eq!(got[..2], [sparse_value(keys[0], 0), sparse_value(keys[0], 1)]);
    }

    #[test]
    fn a_failed_dependency_fails_the_dependent_and_nothing_goes_out() {
        let mut w = testkit::worker();
        let mut sink = SimSink::default();
        let keys = spread_keys(10);
        let push = w.issue(&mut sink, Kind::Push, SPARSE, Keys::List(&keys), Some(&[1.0; 20]), None).unwrap();
        let pushes = drain(&mut sink);
        let after = w.issue_after(&mut sink, &[push], Kind::Push, SPARSE, Keys::List(&keys), Some(&[2.0; 20]), None);
        let after = after.unwrap();
        for s in &pushes {
            w.on_frame(s.peer, &refusal(s, "full")).unwrap();
        }
        w.pump(&mut sink);
        assert!(sink.frames.is_empty());
        assert!(matches!(w.finish(after), Err(PsError::DependencyFailed { dep, .. }) if dep == push));
        // a dependency on a timestamp not yet issued is refused
        let e = w.issue_after(&mut sink, &[after + 5], Kind::Pull, SPARSE, Keys::List(&keys), None, Some(vec![]));
        assert!(matches!(e, Err(PsError::FutureTimestamp(_))));
    }
}
