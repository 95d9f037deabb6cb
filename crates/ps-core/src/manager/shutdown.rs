//! The end of the job: a node reports it is done (a failed worker ends the job
//! with its reason), every live worker done stops the servers, and the servers
//! gone ends the job with its summary.
//!
//! This file must never stop the servers while a live worker is still at work.

use std::time::Duration;

use super::{ManagerCore, ManagerError, Phase};
use crate::control::{Control, Role};
use crate::transport::{FrameSink, PeerId};

impl ManagerCore {
    /// A node is done: `ok`, or failed with `message`.
    pub(super) fn on_done(
        &mut self,
        peer: PeerId,
        ok: bool,
        message: String,
        now: Duration,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let i = *self.by_peer.get(&peer).ok_or(ManagerError::DoneBeforeRegister)?;
        self.nodes[i].done = true;
        let who = self.nodes[i].describe();
        if !ok {
            self.abort(tx, format!("{who} failed: {message}"));
            return Ok(());
        }
        self.log.push(format!("{who} finished: {message}"));
        self.check_done(now, tx);
        Ok(())
    }

    /// Every live worker is done: the servers are told to stop.
    pub(super) fn check_done(&mut self, now: Duration, tx: &mut dyn FrameSink) {
        let done = self.nodes.iter().filter(|n| n.role == Role::Worker && n.done && !self.dead(Role::Worker, n.rank));
        let all = done.count() as u32;
        if all == self.live_workers() && self.phase == Phase::Running {
            self.phase = Phase::Stopping;
            self.phase_since = now;
            self.log.push(format!("all {all} workers finished; stopping the servers"));
            self.broadcast(
                tx,
                &[Role::Server, Role::Worker],
                &Control::Shutdown { reason: "all workers finished".into() },
            );
        }
    }

    /// Every server gone after the shutdown: the job ended, with its summary.
    pub(super) fn check_stopped(&mut self, _now: Duration) {
        if self.phase == Phase::Stopping && self.nodes.iter().all(|n| n.role != Role::Server || !n.connected) {
            self.phase = Phase::Ended;
            let live = self.expect_servers - self.view.as_ref().map_or(0, |v| v.dead_servers.len() as u32);
            let mut summary = format!("{} workers finished; {live} servers stopped", self.live_workers());
            if !self.losses.is_empty() {
                summary += &format!("; lost and gone on without: {}", self.losses.join(", "));
            }
            self.outcome = Some(Ok(summary));
        }
    }
}
