//! Barriers: a worker's arrival, and the release of every barrier that every
//! live worker has reached (a worker lost on the way no longer holds one up).
//!
//! Only workers take part; this file must never release a barrier a live
//! worker has not reached.

use std::collections::BTreeSet;

use super::{ManagerCore, ManagerError};
use crate::control::{Control, Role};
use crate::transport::{FrameSink, PeerId};

impl ManagerCore {
    /// A worker reached barrier `name`.
    pub(super) fn on_barrier(
        &mut self,
        peer: PeerId,
        name: String,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let node = self.node_of(peer)?;
        if node.role != Role::Worker {
            return Err(ManagerError::BarrierNotWorker);
        }
        let rank = node.rank;
        self.barriers.entry(name).or_default().insert(rank);
        self.release_barriers(tx);
        Ok(())
    }

    /// Releases every barrier every live worker has reached.
    pub(super) fn release_barriers(&mut self, tx: &mut dyn FrameSink) {
        let live: BTreeSet<u32> = (0..self.expect_workers).filter(|&w| !self.dead(Role::Worker, w)).collect();
        let ready: Vec<String> =
            self.barriers.iter().filter(|(_, set)| live.is_subset(set)).map(|(n, _)| n.clone()).collect();
        for name in ready {
            self.barriers.remove(&name);
            self.broadcast(tx, &[Role::Worker], &Control::Released { name });
        }
    }
}
