//! Copies of a shard on other servers (`copies > 1`): the ports every server
//! reports for the copies it holds, and the steps of a rebuilt copy (placed by
//! failover) from its port to synced to ready, when it joins its chain.
//!
//! Reports only: this file must never place a copy (failover does), and never
//! count a copy in its chain before the chain's tail says it is ready.

use super::{ManagerCore, ManagerError};
use crate::control::Role;
use crate::ring::Owner;
use crate::transport::{FrameSink, PeerId};

impl ManagerCore {
    /// A server's ports for the copies it holds of other servers' shards.
    pub(super) fn on_copies(
        &mut self,
        peer: PeerId,
        ports: Vec<u16>,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let node = self.node_of(peer)?;
        if node.role != Role::Server {
            return Err(ManagerError::CopiesNotServer);
        }
        let rank = node.rank;
        let Some(v) = self.view.as_mut() else { return Err(ManagerError::NotStarted("copies")) };
        let want = (v.copies() as usize - 1) * v.servers[rank as usize].ports.len();
        if ports.len() != want {
            return Err(ManagerError::CopyPorts { rank, got: ports.len(), want });
        }
        if v.servers[rank as usize].copy_ports == ports {
            // told again after it rejoined a new leader: nothing changed
            return Ok(());
        }
        v.servers[rank as usize].copy_ports = ports;
        if v.copies_reported() {
            self.log.push(format!("every server reported its copies: {} copies of every shard", v.copies()));
            self.publish(tx);
        }
        Ok(())
    }

    /// A server listens for the rebuilt copy `id` of `owner` placed on it.
    pub(super) fn on_copy_added(
        &mut self,
        peer: PeerId,
        owner: Owner,
        id: u64,
        port: u16,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let rank = self.node_of(peer)?.rank;
        let Some(v) = self.view.as_mut() else { return Err(ManagerError::NotStarted("a copy")) };
        let Some(p) = v.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.server == rank && p.port == 0)
        else {
            return Ok(()); // told again after a new leader: known already
        };
        p.port = port;
        self.publish(tx);
        Ok(())
    }

    /// A rebuilt copy caught up with its source.
    pub(super) fn on_copy_synced(
        &mut self,
        peer: PeerId,
        owner: Owner,
        id: u64,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let rank = self.node_of(peer)?.rank;
        let Some(v) = self.view.as_mut() else { return Err(ManagerError::NotStarted("a copy")) };
        let Some(p) = v.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.server == rank && !p.synced)
        else {
            return Ok(());
        };
        p.synced = true;
        self.publish(tx);
        Ok(())
    }

    /// A rebuilt copy joined its chain.
    pub(super) fn on_copy_ready(
        &mut self,
        peer: PeerId,
        owner: Owner,
        id: u64,
        tx: &mut dyn FrameSink,
    ) -> Result<(), ManagerError> {
        let rank = self.node_of(peer)?.rank;
        let Some(v) = self.view.as_mut() else { return Err(ManagerError::NotStarted("a copy")) };
        // from the chain's tail, which saw the copy acknowledge what it answered before
        if !v.chain(owner).contains(&rank) {
            return Err(ManagerError::NoCopy { rank, server: owner.server, shard: owner.shard });
        }
        let Some(p) = v.placed.iter_mut().find(|p| p.id == id && p.owner == owner && p.synced && !p.ready) else {
            return Ok(());
        };
        p.ready = true;
        let rank = p.server;
        let n = v.live_copies(owner);
        self.log.push(format!(
            "server {rank}'s rebuilt copy of shard ({}, {}) joined its chain: {n} copies again",
            owner.server, owner.shard
        ));
        self.publish(tx);
        Ok(())
    }
}
