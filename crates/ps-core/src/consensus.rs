//! The manager's replicated log: Raft (tikv's `raft` crate, which is I/O-free
//! like the rest of this crate: ticks, messages and proposals are handed in,
//! messages to send and committed entries come out). The manager replicas
//! replicate one thing through it, the manager's whole state after each
//! change (`manager::ManagerState`, small: who is in the job, the view, the
//! barriers); the leader alone acts on it, and only once it is committed, so
//! what any node was told survives the leader's death.
//!
//! The log lives in memory: a replica that dies stays out of the group (one
//! restarted with an empty log would break Raft's promises); the group goes
//! on while a majority lives.

use raft::prelude::{Entry, EntryType, Message};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};

/// Ticks a follower waits for the leader before it stands for election
/// (randomised up to twice this); with `TICK_MS` ticks, 0.5 to 1 s.
pub const ELECTION_TICKS: usize = 10;
/// Ticks between the leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// Milliseconds per tick, as the manager's loop drives it.
pub const TICK_MS: u64 = 50;

const _: () = assert!(HEARTBEAT_TICKS < ELECTION_TICKS, "a leader must beat faster than followers time out");

/// Why a replica could not be set up, or refused a message or a proposal.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// Raft refused the replica's configuration (the ticks above are wrong).
    #[error("raft config: {0}")]
    Config(raft::Error),
    /// Raft refused a step: a message from another replica, or a proposal
    /// (`ProposalDropped`: this replica does not lead, or leads no more).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Bytes from another replica that are not a Raft message (drop that link).
    #[error("a raft message: {0}")]
    Message(protobuf::ProtobufError),
}

/// One manager replica's Raft node.
pub struct Replica {
    node: RawNode<MemStorage>,
    messages: Vec<(u64, Vec<u8>)>,
    committed: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("id", &self.node.raft.id).field("leader", &self.leader()).finish()
    }
}

impl Replica {
    /// Replica `id` (1-based) of a group of `replicas`.
    pub fn new(id: u64, replicas: u64) -> Result<Self, ConsensusError> {
        let cfg = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            // a leader that cannot reach a majority steps down; a partitioned
            // replica does not disrupt the group when it comes back
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        cfg.validate().map_err(ConsensusError::Config)?;
        let storage = MemStorage::new_with_conf_state(((1..=replicas).collect::<Vec<u64>>(), vec![]));
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&cfg, storage, &logger)?;
        if replicas == 1 {
            // alone: lead at once
            node.campaign()?;
        }
        let mut r = Self { node, messages: Vec::new(), committed: Vec::new() };
        r.pump();
        Ok(r)
    }

    /// This replica's id (1-based).
    pub fn id(&self) -> u64 {
        self.node.raft.id
    }

    /// Advances Raft's logical clock by one tick (elections and heartbeats
    /// count ticks); call it every [`TICK_MS`].
    pub fn tick(&mut self) {
        self.node.tick();
        self.pump();
    }

    /// A message from another replica (its bytes as `take_messages` gave them there).
    pub fn step(&mut self, bytes: &[u8]) -> Result<(), ConsensusError> {
        let m: Message = protobuf::Message::parse_from_bytes(bytes).map_err(ConsensusError::Message)?;
        self.node.step(m)?;
        self.pump();
        Ok(())
    }

    /// Proposes `data` (the leader only; it is committed or lost with the leadership).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), ConsensusError> {
        self.node.propose(vec![], data)?;
        self.pump();
        Ok(())
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The replica this one believes leads (`None` during an election).
    pub fn leader(&self) -> Option<u64> {
        Some(self.node.raft.leader_id).filter(|&l| l != raft::INVALID_ID)
    }

    /// The Raft term this replica is in.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// Messages to send: (replica id, bytes).
    pub fn take_messages(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.messages)
    }

    /// The data of entries committed since the last call, in log order.
    pub fn take_committed(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.committed)
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let bytes = protobuf::Message::write_to_bytes(&m).expect("a raft message encodes");
            self.messages.push((m.to, bytes));
        }
    }

    fn commit(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                self.committed.push(e.data.to_vec());
            }
        }
    }

    /// Persists what Raft made ready (in memory), queues its messages and
    /// committed entries, and lets it go on.
    fn pump(&mut self) {
        while self.node.has_ready() {
            let mut ready = self.node.ready();
            let msgs = ready.take_messages();
            self.send(msgs);
            let store = self.node.mut_store().clone();
            if !ready.snapshot().is_empty() {
                store.wl().apply_snapshot(ready.snapshot().clone()).expect("an in-memory snapshot applies");
            }
            let entries = ready.take_committed_entries();
            self.commit(entries);
            if !ready.entries().is_empty() {
                store.wl().append(ready.entries()).expect("in-memory entries append");
            }
            if let Some(hs) = ready.hs() {
                store.wl().set_hardstate(hs.clone());
            }
            let persisted = ready.take_persisted_messages();
            self.send(persisted);
            let mut light = self.node.advance(ready);
            if let Some(commit) = light.commit_index() {
                store.wl().mut_hard_state().set_commit(commit);
            }
            let msgs = light.take_messages();
            self.send(msgs);
            let entries = light.take_committed_entries();
            self.commit(entries);
            self.node.advance_apply();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three replicas over a perfect in-memory network, with one cut off at will.
    fn deliver(rs: &mut [Replica], down: Option<usize>) {
        loop {
            let mut moved = false;
            for i in 0..rs.len() {
                for (to, m) in rs[i].take_messages() {
                    let j = to as usize - 1;
                    if Some(i) != down && Some(j) != down {
                        rs[j].step(&m).unwrap();
                        moved = true;
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn run(rs: &mut [Replica], ticks: usize, down: Option<usize>) {
        for _ in 0..ticks {
            for (i, r) in rs.iter_mut().enumerate() {
                if Some(i) != down {
                    r.tick();
                }
            }
            deliver(rs, down);
        }
    }

    #[test]
    fn three_replicas_elect_a_leader_commit_and_elect_another_when_it_dies() {
        let mut rs: Vec<Replica> = (1..=3).map(|id| Replica::new(id, 3).unwrap()).collect();
        run(&mut rs, 4 * ELECTION_TICKS, None);
        let leaders: Vec<usize> = (0..3).filter(|&i| rs[i].is_leader()).collect();
        assert_eq!(leaders.len(), 1, "one leader");
        let l = leaders[0];
        rs[l].propose(b"state 1".to_vec()).unwrap();
        deliver(&mut rs, None);
        run(&mut rs, 2, None);
        for r in rs.iter_mut() {
            assert_eq!(r.take_committed(), vec![b"state 1".to_vec()], "replica {}", r.id());
        }
        // the leader dies: the others elect one of themselves and keep the log
        run(&mut rs, 4 * ELECTION_TICKS, Some(l));
        let next: Vec<usize> = (0..3).filter(|&i| i != l && rs[i].is_leader()).collect();
        assert_eq!(next.len(), 1, "a new leader among the living");
        rs[next[0]].propose(b"state 2".to_vec()).unwrap();
        run(&mut rs, 2, Some(l));
        for i in (0..3).filter(|&i| i != l) {
            assert_eq!(rs[i].take_committed(), vec![b"state 2".to_vec()]);
        }
    }

    #[test]
    fn a_lone_replica_leads_at_once_and_commits_by_itself() {
        let mut r = Replica::new(1, 1).unwrap();
        assert!(r.is_leader());
        r.propose(b"x".to_vec()).unwrap();
        assert_eq!(r.take_committed(), vec![b"x".to_vec()]);
    }

    #[test]
    fn garbage_from_a_peer_is_an_error_not_a_panic() {
        let mut r = Replica::new(1, 3).unwrap();
        for n in 0..200u32 {
            let bytes: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
            let _ = r.step(&bytes);
        }
    }
}
