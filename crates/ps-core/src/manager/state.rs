//! What the Raft-replicated manager replicates (`consensus`): [`ManagerState`],
//! taken after every change, and the restore a new leader runs from the last
//! committed one.
//!
//! No connection and no clock is replicated: this file must never put a peer
//! id or a time into the state, and a restored node counts as connected only
//! once it rejoins.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{ManagerCore, ManagerTimeouts, Node, Phase};
use crate::control::{ClusterView, JobSpec, Role};
use crate::transport::PeerId;

/// A node as the replicated state keeps it (no connection, no clock).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeRecord {
    pub role: Role,
    pub rank: u32,
    pub host: String,
    pub ports: Vec<u16>,
    pub pid: u32,
    pub done: bool,
}

/// Everything a manager replica must know to take over as leader: what the
/// leader replicates after every change (`consensus`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ManagerState {
    pub(crate) job: JobSpec,
    pub(crate) expect_servers: u32,
    pub(crate) expect_workers: u32,
    pub(crate) nodes: Vec<NodeRecord>,
    /// The job's phase: [`Phase::Ended`] once its outcome is final.
    pub phase: Phase,
    pub(crate) barriers: BTreeMap<String, BTreeSet<u32>>,
    /// `Ok(summary)` once the job ended well, `Err(reason)` once it failed.
    pub outcome: Option<Result<String, super::JobFailed>>,
    pub(crate) view: Option<ClusterView>,
    pub(crate) losses: Vec<String>,
}

/// The peer of a node restored from the replicated state, until it rejoins.
const NO_PEER: PeerId = PeerId { index: u32::MAX, generation: u32::MAX - 1 };

impl ManagerCore {
    /// What the replicas replicate (see [`ManagerState`]).
    pub fn state(&self) -> ManagerState {
        ManagerState {
            job: self.job.clone(),
            expect_servers: self.expect_servers,
            expect_workers: self.expect_workers,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeRecord {
                    role: n.role,
                    rank: n.rank,
                    host: n.host.clone(),
                    ports: n.ports.clone(),
                    pid: n.pid,
                    done: n.done,
                })
                .collect(),
            phase: self.phase,
            barriers: self.barriers.clone(),
            outcome: self.outcome.clone(),
            view: self.view.clone(),
            losses: self.losses.clone(),
        }
    }

    /// A new leader's manager, from the last committed state: every node is
    /// expected to rejoin (`Control::Rejoin`) within the heartbeat timeout,
    /// else it is lost as a silent node would be.
    pub fn restore(state: ManagerState, timeouts: ManagerTimeouts, now: Duration) -> Self {
        let mut m = Self::new(state.job, state.expect_servers, state.expect_workers, timeouts);
        m.nodes = state
            .nodes
            .into_iter()
            .map(|r| Node {
                peer: NO_PEER,
                role: r.role,
                rank: r.rank,
                host: r.host,
                ports: r.ports,
                pid: r.pid,
                last_seen: now,
                connected: false,
                done: r.done,
                rejoining: true,
            })
            .collect();
        m.phase = state.phase;
        m.phase_since = now;
        m.barriers = state.barriers;
        m.outcome = state.outcome;
        m.view = state.view;
        m.losses = state.losses;
        m.log.push(format!("took over as leader: {} nodes to rejoin, phase {:?}", m.nodes.len(), m.phase));
        m
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testkit::*;
    use crate::control::{Control, Role};
    use crate::manager::{ManagerCore, ManagerState, ManagerTimeouts, Phase};

    #[test]
    fn a_new_leader_takes_over_from_the_replicated_state_and_its_nodes_rejoin() {
        let mut m = ManagerCore::new(job(), 1, 2, ManagerTimeouts::default());
        let mut out = Out::default();
        reg(&mut m, &mut out, 0, Role::Server, Duration::ZERO);
        reg(&mut m, &mut out, 1, Role::Worker, Duration::ZERO);
        reg(&mut m, &mut out, 2, Role::Worker, Duration::ZERO);
        ctl(&mut m, &mut out, 1, Role::Worker, Control::Barrier { name: "b".into() }, Duration::ZERO).unwrap();
        out.msgs();
        // the state survives serialisation, as the Raft log carries it
        let state = m.state();
        let bytes = serde_json::to_vec(&state).unwrap();
        let state: ManagerState = serde_json::from_slice(&bytes).unwrap();
        let t = Duration::from_secs(100);
        let mut n = ManagerCore::restore(state, ManagerTimeouts::default(), t);
        assert_eq!(n.phase(), Phase::Running);
        assert_eq!(n.state(), m.state(), "nothing lost in the hand-over");
        // the server and worker 0 rejoin on new connections and get the view
        let rejoin = |n: &mut ManagerCore, out: &mut Out, peer: u32, role: Role, rank: u32, pid: u32| {
            ctl(n, out, peer, role, Control::Rejoin { role, rank, pid }, t)
        };
        rejoin(&mut n, &mut out, 10, Role::Server, 0, 0).unwrap();
        rejoin(&mut n, &mut out, 11, Role::Worker, 0, 1).unwrap();
        assert_eq!(views(&mut out).len(), 2);
        // a stranger is turned away
        assert!(rejoin(&mut n, &mut out, 12, Role::Worker, 1, 999).is_err());
        out.msgs();
        // worker 1 (pid 2) never rejoins: lost after the heartbeat timeout, and the
        // barrier worker 0 reached before the hand-over lets it through
        ctl(&mut n, &mut out, 10, Role::Server, Control::Heartbeat, t + Duration::from_secs(6)).unwrap();
        ctl(&mut n, &mut out, 11, Role::Worker, Control::Heartbeat, t + Duration::from_secs(6)).unwrap();
        n.on_tick(t + Duration::from_secs(6), &mut out);
        assert_eq!(n.phase(), Phase::Running);
        let msgs = out.msgs();
        assert!(msgs.iter().any(|(_, c)| matches!(c, Control::View { view } if view.dead_workers == vec![1])));
        assert!(msgs.iter().any(|(p, c)| *p == super::tests::p(11) && matches!(c, Control::Released { .. })));
    }
}
