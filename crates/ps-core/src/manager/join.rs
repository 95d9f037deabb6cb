//! How a node enters the job: registration (its role checked against the one
//! it authenticated as, its rank asked for or given), the start of the job once
//! every expected node is in, and a node rejoining a new leader.
//!
//! Admission only: this file must never let more nodes in than the job
//! expects, give two nodes one rank, or let a node in as a role it did not
//! prove in its handshake.

use std::time::Duration;

use super::{ManagerCore, ManagerError, Node, Phase};
use crate::control::{ClusterView, Control, Role, ServerInfo};
use crate::transport::{FrameSink, PeerHello, PeerId};

impl ManagerCore {
    /// A node that registered with an earlier leader connects to this one.
    pub(super) fn rejoin(
        &mut self,
        peer: PeerId,
        role: Role,
        rank: u32,
        pid: u32,
        now: Duration,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let Some(i) = self.nodes.iter().position(|n| n.role == role && n.rank == rank && n.pid == pid) else {
            return Err(self.refuse(tx, peer, ManagerError::UnknownNode { role: role.name(), rank, pid }));
        };
        if self.dead(role, rank) {
            return Err(self.refuse(tx, peer, ManagerError::FoundDead(self.nodes[i].describe())));
        }
        let n = &mut self.nodes[i];
        if n.connected {
            self.by_peer.remove(&n.peer);
        }
        n.peer = peer;
        n.connected = true;
        n.rejoining = false;
        n.last_seen = now;
        self.by_peer.insert(peer, i);
        self.log.push(format!("{} rejoined", self.nodes[i].describe()));
        if let Some(v) = self.view.clone() {
            self.send(tx, peer, &Control::View { view: v });
        }
        if self.phase == Phase::Stopping && role != Role::Manager {
            self.send(tx, peer, &Control::Shutdown { reason: "all workers finished".into() });
        }
        Ok(())
    }

    /// Tells `peer` why it is turned away (an `Abort`), and gives that back.
    fn refuse(&mut self, tx: &mut dyn FrameSink, peer: PeerId, e: ManagerError) -> ManagerError {
        self.send(tx, peer, &Control::Abort { reason: e.to_string() });
        e
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn register(
        &mut self,
        peer: PeerId,
        hello: PeerHello,
        role: Role,
        host: String,
        ports: Vec<u16>,
        pid: u32,
        asked: Option<u32>,
        now: Duration,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        if Role::from_u8(hello.role) != Some(role) {
            return Err(ManagerError::WrongRole { action: "registered", role: role.name(), authenticated: hello.role });
        }
        if self.by_peer.contains_key(&peer) {
            return Err(ManagerError::RegisteredTwice);
        }
        let (have, want) = match role {
            Role::Server => (self.count(Role::Server), self.expect_servers),
            Role::Worker => (self.count(Role::Worker), self.expect_workers),
            Role::Manager => return Err(ManagerError::ManagerRegistered),
        };
        if self.phase != Phase::Registering || have >= want {
            return Err(self.refuse(tx, peer, ManagerError::JobFull { role: role.name(), want }));
        }
        if role == Role::Server && (ports.is_empty() || ports.len() > 1024) {
            return Err(ManagerError::ShardPorts(ports.len()));
        }
        let taken = |r: u32| self.nodes.iter().any(|n| n.role == role && n.rank == r);
        let rank = match asked {
            Some(r) if r >= want || taken(r) => {
                return Err(self.refuse(tx, peer, ManagerError::RankTaken { role: role.name(), rank: r, want }));
            }
            Some(r) => r,
            None => (0..want).find(|&r| !taken(r)).expect("fewer than `want` registered"),
        };
        let node =
            Node { peer, role, rank, host, ports, pid, last_seen: now, connected: true, done: false, rejoining: false };
        self.log.push(format!("{} registered", node.describe()));
        self.by_peer.insert(peer, self.nodes.len());
        self.nodes.push(node);
        if self.count(Role::Server) == self.expect_servers && self.count(Role::Worker) == self.expect_workers {
            self.start(now, tx);
        }
        Ok(())
    }

    fn start(&mut self, now: Duration, tx: &mut dyn FrameSink) {
        let mut servers: Vec<ServerInfo> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Server)
            .map(|n| ServerInfo::new(n.rank, &n.host, n.ports.clone(), n.pid))
            .collect();
        servers.sort_by_key(|s| s.rank);
        let view = ClusterView::new(self.job.clone(), servers, self.expect_workers);
        if let Err(e) = view.ring() {
            self.abort(tx, format!("cannot build the ring: {e}"));
            return;
        }
        let targets: Vec<(PeerId, u32)> = self.nodes.iter().map(|n| (n.peer, n.rank)).collect();
        for (peer, rank) in targets {
            self.send(tx, peer, &Control::Welcome { rank, view: view.clone() });
        }
        self.phase = Phase::Running;
        self.phase_since = now;
        self.log.push(format!(
            "all {} servers and {} workers registered; job running",
            self.expect_servers, self.expect_workers
        ));
        self.view = Some(view);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testkit::*;
    use crate::control::Control;
    use crate::control::Role;
    use crate::manager::{ManagerCore, ManagerTimeouts};
    use crate::transport::PeerId;

    #[test]
    fn asked_ranks_are_honoured_and_clashes_refused() {
        let mut m = ManagerCore::new(job(), 2, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        let reg_as = |m: &mut ManagerCore, out: &mut Out, i: u32, rank: Option<u32>| {
            ctl(
                m,
                out,
                i,
                Role::Server,
                Control::Register { role: Role::Server, host: "h".into(), ports: vec![1], pid: i, rank },
                Duration::ZERO,
            )
        };
        reg_as(&mut m, &mut out, 0, Some(1)).unwrap();
        assert!(reg_as(&mut m, &mut out, 1, Some(1)).unwrap_err().to_string().contains("taken"));
        assert!(reg_as(&mut m, &mut out, 2, Some(2)).unwrap_err().to_string().contains("not below 2"));
        reg_as(&mut m, &mut out, 3, None).unwrap();
        reg(&mut m, &mut out, 4, Role::Worker, Duration::ZERO);
        let ranks: Vec<(PeerId, u32)> = out
            .msgs()
            .into_iter()
            .filter_map(|(p, c)| match c {
                Control::Welcome { rank, .. } => Some((p, rank)),
                _ => None,
            })
            .collect();
        assert!(ranks.contains(&(p(0), 1)) && ranks.contains(&(p(3), 0)), "{ranks:?}");
    }

    #[test]
    fn role_must_match_the_authenticated_one() {
        let mut m = ManagerCore::new(job(), 1, 1, ManagerTimeouts::default());
        let mut out = Out::default();
        let r = ctl(
            &mut m,
            &mut out,
            0,
            Role::Worker,
            Control::Register { role: Role::Server, host: "h".into(), ports: vec![1], pid: 1, rank: None },
            Duration::ZERO,
        );
        assert!(r.unwrap_err().to_string().contains("authenticated as role 3"));
    }
}
