//! Losing a node: a connection that ends too early, a node that goes silent
//! past the heartbeat timeout (or does not rejoin a new leader in time), and
//! the registration and stopping deadlines. A dead server is failed over when
//! every chain keeps a live copy (and its copies are placed again), a dead
//! worker is left behind while others remain; anything else ends the job.
//!
//! This file must never go on with a key range whose last copy is gone, nor
//! let a node presumed dead go on as if it were in the job.

use std::time::Duration;

use super::{ManagerCore, Phase};
use crate::control::{Control, Role};
use crate::ring::Owner;
use crate::transport::{FrameSink, PeerId};

impl ManagerCore {
    /// Node `i` died (or went silent) while the job runs: a server is failed
    /// over when every chain keeps a live copy, a worker is left behind (the
    /// application decides what happens to its data); anything else aborts.
    pub(super) fn lose(&mut self, i: usize, why: String, now: Duration, tx: &mut dyn FrameSink) {
        let (role, rank, peer, connected) = {
            let n = &self.nodes[i];
            (n.role, n.rank, n.peer, n.connected)
        };
        let who = self.nodes[i].describe();
        if self.phase != Phase::Running || self.dead(role, rank) {
            if !self.dead(role, rank) {
                self.abort(tx, format!("{who} {why}"));
            }
            return;
        }
        let Some(v) = self.view.as_mut() else { return };
        match role {
            Role::Server if v.copies() > 1 => {
                v.dead_servers.push(rank);
                let orphan = (0..v.servers.len() as u32).find_map(|s| {
                    let shards = v.servers[s as usize].ports.len() as u32;
                    (0..shards).map(|h| Owner { server: s, shard: h }).find(|&o| v.head(o).is_none())
                });
                if let Some(o) = orphan {
                    let reason = format!(
                        "{who} {why}, and with it the last copy of server {} shard {}'s key ranges",
                        o.server, o.shard
                    );
                    self.abort(tx, reason);
                    return;
                }
                self.log.push(format!("{who} {why}: failing over to the next copies (view {})", v.epoch + 1));
                self.losses.push(format!("{who} (failed over)"));
                // every chain short of a copy gets one placed on the next live
                // server that holds none
                // rebuilds not finished start over (their source may have been the dead one)
                v.placed.retain(|p| p.server != rank && p.ready);
                for line in v.place_copies() {
                    self.log.push(line);
                }
            }
            Role::Worker if v.dead_workers.len() + 1 < self.expect_workers as usize => {
                v.dead_workers.push(rank);
                self.log.push(format!("{who} {why}: the job goes on without it (view {})", v.epoch + 1));
                self.losses.push(format!("{who} (left behind)"));
            }
            _ => {
                self.abort(tx, format!("{who} {why}"));
                return;
            }
        }
        if connected {
            // presumed dead but still there: it must not go on as if it were in the job
            self.send(tx, peer, &Control::Abort { reason: format!("the manager presumed {who} dead: {why}") });
        }
        self.publish(tx);
        self.release_barriers(tx);
        self.check_done(now, tx);
    }

    /// A connection ended.
    pub fn on_closed(&mut self, peer: PeerId, reason: &str, now: Duration, tx: &mut dyn FrameSink) {
        let Some(&i) = self.by_peer.get(&peer) else { return };
        self.nodes[i].connected = false;
        let node = &self.nodes[i];
        let expected = self.phase == Phase::Ended
            || (node.role == Role::Worker && node.done)
            || (self.phase == Phase::Stopping && node.role == Role::Server)
            || self.dead(node.role, node.rank);
        if !expected {
            self.lose(i, format!("disconnected: {reason}"), now, tx);
            return;
        }
        self.check_stopped(now);
    }

    /// Periodic check: heartbeats, registration and stopping deadlines.
    pub fn on_tick(&mut self, now: Duration, tx: &mut dyn FrameSink) {
        match self.phase {
            Phase::Registering if now.saturating_sub(self.phase_since) > self.timeouts.registration => {
                let reason = format!(
                    "only {}/{} servers and {}/{} workers registered within {:?}",
                    self.count(Role::Server),
                    self.expect_servers,
                    self.count(Role::Worker),
                    self.expect_workers,
                    self.timeouts.registration
                );
                self.abort(tx, reason);
            }
            Phase::Running | Phase::Registering => {
                let silent = self.nodes.iter().position(|n| {
                    (n.connected || n.rejoining)
                        && !n.done
                        && !self.dead(n.role, n.rank)
                        && now.saturating_sub(n.last_seen) > self.timeouts.heartbeat
                });
                if let Some(i) = silent {
                    let n = &self.nodes[i];
                    let why = if n.rejoining {
                        format!(
                            "did not rejoin the new leader within {:.1} s: presumed dead",
                            self.timeouts.heartbeat.as_secs_f64()
                        )
                    } else {
                        format!(
                            "sent nothing for {:.1} s (heartbeat timeout {:.1} s): presumed dead",
                            now.saturating_sub(n.last_seen).as_secs_f64(),
                            self.timeouts.heartbeat.as_secs_f64()
                        )
                    };
                    let who = n.describe();
                    self.nodes[i].rejoining = false;
                    if self.phase == Phase::Registering {
                        self.abort(tx, format!("{who} {why}"));
                    } else {
                        self.lose(i, why, now, tx);
                    }
                }
            }
            Phase::Stopping if now.saturating_sub(self.phase_since) > self.timeouts.stopping => {
                self.log.push("servers did not all disconnect in time after shutdown; ending anyway".into());
                self.phase = Phase::Ended;
                self.outcome = Some(Ok("workers finished; some servers did not confirm shutdown".into()));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testkit::*;
    use crate::control::{Control, Role};
    use crate::manager::{JobFailed, ManagerCore, ManagerTimeouts, Phase};
    use crate::ring::Owner;

    #[test]
    fn a_silent_node_is_reported_and_the_job_aborted() {
        let mut m = ManagerCore::new(job(), 1, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::from_secs(0));
        reg(&mut m, &mut out, 1, Role::Worker, Duration::from_secs(0));
        out.msgs();
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Heartbeat, Duration::from_secs(4)).unwrap();
        m.on_tick(Duration::from_secs(4), &mut out);
        assert_eq!(m.phase(), Phase::Running);
        m.on_tick(Duration::from_secs(6), &mut out);
        assert_eq!(m.phase(), Phase::Ended);
        let Some(Err(JobFailed { reason })) = m.outcome() else { panic!() };
        assert!(reason.contains("server 0") && reason.contains("presumed dead"), "{reason}");
        assert!(out.msgs().iter().any(|(peer, c)| *peer == p(1) && matches!(c, Control::Abort { .. })));
    }

    #[test]
    fn a_node_that_disconnects_early_fails_the_job() {
        let mut m = ManagerCore::new(job(), 1, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        reg(&mut m, &mut out, 1, Role::Worker, Duration::ZERO);
        m.on_closed(p(0), "connection reset", Duration::ZERO, &mut out);
        let Some(Err(JobFailed { reason })) = m.outcome() else { panic!() };
        assert!(reason.contains("server 0") && reason.contains("connection reset"), "{reason}");
    }

    #[test]
    fn a_replicated_job_fails_over_a_dead_server_until_a_chain_would_lose_its_last_copy() {
        let mut j = job();
        j.copies = 2;
        let mut m = ManagerCore::new(j, 3, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        for i in 0..3 {
            reg(&mut m, &mut out, i, Role::Server, Duration::ZERO);
        }
        reg(&mut m, &mut out, 3, Role::Worker, Duration::ZERO);
        out.msgs();
        for i in 0..3 {
            ctl(&mut m, &mut out, i, Role::Server, Control::Copies { ports: vec![2000 + i as u16] }, Duration::ZERO)
                .unwrap();
        }
        let v = views(&mut out);
        assert!(v.iter().all(|v| v.copies_reported()) && !v.is_empty(), "one view once every copy is known");
        // server 1 dies: its chain's next copy (server 2) is the head now
        m.on_closed(p(1), "reset", Duration::ZERO, &mut out);
        assert_eq!(m.phase(), Phase::Running);
        let v = views(&mut out);
        assert_eq!(v.last().unwrap().dead_servers, vec![1]);
        assert_eq!(v.last().unwrap().head(Owner { server: 1, shard: 0 }), Some(2));
        // server 2 dies too: shard (1, 0) had its copies on 1 and 2 only
        m.on_closed(p(2), "reset", Duration::ZERO, &mut out);
        let Some(Err(JobFailed { reason })) = m.outcome() else { panic!("{:?}", m.outcome()) };
        assert!(reason.contains("last copy of server 1 shard 0"), "{reason}");
    }

    #[test]
    fn a_lost_worker_is_left_behind_barriers_and_the_end_count_the_live_ones() {
        let mut m = ManagerCore::new(job(), 1, 3, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        for i in 1..4 {
            reg(&mut m, &mut out, i, Role::Worker, Duration::ZERO);
        }
        out.msgs();
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Barrier { name: "b".into() }, Duration::ZERO).unwrap();
        ctl(&mut m, &mut out, 2, Role::Worker, Control::Barrier { name: "b".into() }, Duration::ZERO).unwrap();
        assert!(out.msgs().is_empty(), "worker 2 has not arrived");
        // worker 2 (peer 3) goes silent: presumed dead, the barrier lets the others through
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Heartbeat, Duration::from_secs(6)).unwrap();
        ctl(&mut m, &mut out, 2, Role::Worker, Control::Heartbeat, Duration::from_secs(6)).unwrap();
        ctl(&mut m, &mut out, 0, Role::Server, Control::Heartbeat, Duration::from_secs(6)).unwrap();
        m.on_tick(Duration::from_secs(6), &mut out);
        assert_eq!(m.phase(), Phase::Running);
        let msgs = out.msgs();
        assert!(msgs.iter().any(|(_, c)| matches!(c, Control::View { view } if view.dead_workers == vec![2])));
        assert!(msgs.iter().any(|(_, c)| matches!(c, Control::Released { .. })));
        // told it is presumed dead, in case it is alive after all
        assert!(msgs.iter().any(|(peer, c)| *peer == p(3) && matches!(c, Control::Abort { .. })));
        for i in 1..3 {
            ctl(&mut m, &mut out, i, Role::Worker, Control::Done { ok: true, message: "ok".into() }, Duration::ZERO)
                .unwrap();
        }
        assert_eq!(m.phase(), Phase::Stopping);
        m.on_closed(p(0), "eof", Duration::ZERO, &mut out);
        let Some(Ok(summary)) = m.outcome() else { panic!() };
        assert!(summary.contains("worker 2") && summary.contains("left behind"), "{summary}");
    }

    #[test]
    fn losing_every_worker_fails_the_job() {
        let mut m = ManagerCore::new(job(), 1, 2, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        reg(&mut m, &mut out, 1, Role::Worker, Duration::ZERO);
        reg(&mut m, &mut out, 2, Role::Worker, Duration::ZERO);
        m.on_closed(p(1), "reset", Duration::ZERO, &mut out);
        assert_eq!(m.phase(), Phase::Running);
        m.on_closed(p(2), "reset", Duration::ZERO, &mut out);
        assert!(matches!(m.outcome(), Some(Err(_))));
    }
}
