//! Virtual peers: the shard state machine of every copy sees one peer per
//! origin (a worker rank, or a fresh origin for a client that did not bind),
//! whatever connection the origin's frames came on; `Routed` sends what the
//! shard writes to such a peer to the origin's current connection, into a
//! capture, or nowhere.
//!
//! Must never: send a frame to a virtual peer's id (a transport never reaches
//! it), or decide anything about the chain (that is `protocol`).

use std::collections::HashMap;

use crate::shard::ShardCore;
use crate::transport::{FrameSink, PeerId, TxError};

use super::ChainCore;

/// The generation of virtual peers: a transport never reaches it.
const VIRTUAL_GENERATION: u32 = u32::MAX;

pub(super) fn virtual_peer(origin: u32) -> PeerId {
    PeerId { index: origin, generation: VIRTUAL_GENERATION }
}

pub(super) fn origin_of(peer: PeerId) -> Option<u32> {
    (peer.generation == VIRTUAL_GENERATION).then_some(peer.index)
}

/// The frames a shard writes, routed: to a virtual peer's current client
/// connection, into `captured` while its origin is being captured, or nowhere
/// (an origin with no connection here: the copies after the head).
struct Routed<'a> {
    inner: &'a mut dyn FrameSink,
    clients: &'a HashMap<u32, PeerId>,
    capture: Option<u32>,
    captured: &'a mut Vec<Vec<u8>>,
    void: &'a mut Vec<u8>,
}

impl FrameSink for Routed<'_> {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
        let Some(origin) = origin_of(peer) else { return self.inner.frame(peer, len) };
        if self.capture == Some(origin) {
            self.captured.push(vec![0u8; len]);
            return Ok(self.captured.last_mut().expect("just pushed"));
        }
        match self.clients.get(&origin) {
            Some(&real) => self.inner.frame(real, len),
            None => {
                self.void.clear();
                self.void.resize(len, 0);
                Ok(&mut self.void[..])
            }
        }
    }

    fn frame_gather(&mut self, peer: PeerId, parts: &[&[u8]]) -> Result<(), TxError> {
        match origin_of(peer) {
            Some(origin) if self.capture != Some(origin) => match self.clients.get(&origin) {
                Some(&real) => self.inner.frame_gather(real, parts),
                None => Ok(()),
            },
            Some(_) => {
                let len = parts.iter().map(|p| p.len()).sum();
                crate::transport::gather_into(self.frame(peer, len)?, parts);
                Ok(())
            }
            None => self.inner.frame_gather(peer, parts),
        }
    }
}

impl ChainCore {
    /// Runs `f` on the shard with its frames routed (`Routed`): to virtual
    /// peers' current connections, into `captured` for `capture`'s origin.
    pub(super) fn routed<R>(
        &mut self,
        tx: &mut dyn FrameSink,
        capture: Option<u32>,
        f: impl FnOnce(&mut ShardCore, &mut dyn FrameSink) -> R,
    ) -> R {
        let mut sink =
            Routed { inner: tx, clients: &self.clients, capture, captured: &mut self.captured, void: &mut self.void };
        f(&mut self.core, &mut sink)
    }
}
