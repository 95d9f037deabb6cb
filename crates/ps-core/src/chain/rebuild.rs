//! The rebuild of a copy lost with its server: the chain's tail sends the
//! new copy a snapshot of its whole state at one point of its stream
//! (`Snapshot` frames), then every counted frame it applies after (the
//! *shadow* stream, not waited for); the new copy says when it has the
//! snapshot (`CopySynced`), the manager makes it a member, the shadow link
//! carries on as the tail's downstream, and once it acknowledged what was
//! answered before, it is ready (`CopyReady`).
//!
//! Must never: let the shadow stream grow past `CHAIN_LOG_BYTES_MAX` (the
//! rebuild is abandoned instead), accept a snapshot chunk out of order or
//! larger than `SNAPSHOT_BYTES_MAX`, or make the tail wait for a copy that
//! has no snapshot yet.

use std::collections::VecDeque;

use crate::limits::CHAIN_LOG_BYTES_MAX;
use crate::shard::ShardError;
use crate::transport::{FrameSink, PeerId};
use crate::wire::{self, ForwardAck, Frame, Kind, SnapshotHeader, WireError};

use super::frames::{data_header, forward_frame};
use super::protocol::{Conn, Entry};
use super::ChainCore;

/// The tail's link to a copy being rebuilt: the snapshot, then the frames
/// applied after it, not waited for until the copy joins the chain.
#[derive(Debug)]
pub(super) struct Shadow {
    pub(super) server: u32,
    pub(super) placement: u64,
    pub(super) peer: PeerId,
    /// frames not yet handed to the transport: the snapshot's chunks, then forwards
    pub(super) out: VecDeque<Vec<u8>>,
    /// forwards sent, not yet acknowledged: the downstream's log once it joins
    pub(super) unacked: VecDeque<Entry>,
    /// bytes of forwards in `out` and `unacked`
    pub(super) forward_bytes: usize,
}

/// The largest snapshot a copy being rebuilt accepts (a bound on what a peer
/// can make it allocate).
const SNAPSHOT_BYTES_MAX: u64 = 1 << 40;

impl ChainCore {
    /// Whether this copy got its snapshot since the last call (a copy being
    /// rebuilt: the server tells the manager, `Control::CopySynced`).
    pub fn take_synced(&mut self) -> bool {
        std::mem::take(&mut self.synced)
    }

    /// The placement of a rebuilt copy that has acknowledged every frame this
    /// tail answered before it waited for it, once (`Control::CopyReady`).
    pub fn take_caught_up(&mut self) -> Option<u64> {
        self.caught_up.take()
    }

    /// The server of the copy being rebuilt that this copy (the tail) must
    /// link to and send its state: the server thread connects and calls
    /// [`ChainCore::shadow_linked`].
    pub fn shadow_wanted(&self) -> Option<u32> {
        if self.shadow.is_some() || self.down.server.is_some() || self.rebuild.is_some() || !self.is_member() {
            return None;
        }
        self.joining.map(|(server, _)| server)
    }

    /// The link to the copy being rebuilt on `server` is open: the snapshot
    /// of this copy now goes first, then every counted frame it applies.
    pub fn shadow_linked(&mut self, peer: PeerId, server: u32) {
        let shard = self.core.live_snapshot();
        let applied: Vec<(u32, u64)> = self.applied.iter().map(|(o, n)| (*o, *n)).collect();
        let json = serde_json::to_vec(&applied).expect("numbers serialise");
        let mut bytes = Vec::with_capacity(8 + shard.len() + json.len());
        bytes.extend_from_slice(&(shard.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&shard);
        bytes.extend_from_slice(&json);
        let chunk = crate::limits::CHUNK_BYTES;
        let total = bytes.len() as u64;
        let mut out = VecDeque::new();
        for (i, part) in bytes.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= bytes.len();
            let h =
                SnapshotHeader { offset: (i * chunk) as u64, total, chunk_words: part.len().div_ceil(4) as u64, last }
                    .header();
            let mut f = vec![0u8; h.frame_len().expect("a chunk fits a frame")];
            h.write(&mut f);
            f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + part.len()].copy_from_slice(part);
            out.push_back(f);
        }
        self.stats.snapshots += 1;
        self.stats.snapshot_bytes += total;
        self.log.push(format!(
            "{}: rebuilding the copy on server {server}: {total} bytes of state, then the frames after it",
            self.describe()
        ));
        let placement = self.joining.map_or(0, |(_, id)| id);
        self.shadow = Some(Shadow { server, placement, peer, out, unacked: VecDeque::new(), forward_bytes: 0 });
    }

    /// The link to the copy being rebuilt (for the server's send budget).
    pub fn shadow_peer(&self) -> Option<PeerId> {
        self.shadow.as_ref().map(|s| s.peer)
    }

    /// Hands the transport what waits for the copy being rebuilt, up to
    /// `budget` bytes (the snapshot is sent as the link drains).
    pub fn pump_shadow(&mut self, tx: &mut dyn FrameSink, mut budget: usize) {
        let Some(sh) = self.shadow.as_mut() else { return };
        let mut first = true;
        while let Some(f) = sh.out.front() {
            // at least one frame a call, so a small budget still makes progress
            if f.len() > budget && !first {
                return;
            }
            first = false;
            if tx.frame_gather(sh.peer, &[f]).is_err() {
                // the link is going (its close abandons the rebuild)
                return;
            }
            budget = budget.saturating_sub(f.len());
            sh.out.pop_front();
        }
    }

    /// A counted frame this tail applied goes to the copy being rebuilt too.
    pub(super) fn shadow_send(&mut self, origin: u32, seq: u64, inner: &[u8]) {
        let Some(sh) = self.shadow.as_mut() else { return };
        let frame = forward_frame(origin, seq, inner);
        sh.forward_bytes += 2 * frame.len();
        if sh.forward_bytes > CHAIN_LOG_BYTES_MAX {
            let server = sh.server;
            self.shadow = None;
            self.log.push(format!(
                "{}: the copy being rebuilt on server {server} does not keep up; rebuild abandoned",
                self.describe()
            ));
            return;
        }
        sh.out.push_back(frame.clone());
        sh.unacked.push_back(Entry { origin, seq, frame, release: Vec::new() });
    }

    pub(super) fn on_shadow_ack(&mut self, frame: &[u8]) -> Result<(), ShardError> {
        let ack = ForwardAck::try_from(data_header(frame)?)?;
        let sh = self.shadow.as_mut().expect("called for the shadow's peer");
        let Some(e) = sh.unacked.front() else {
            return Err(
                WireError::Control("an acknowledgement for nothing sent to the copy being rebuilt".into()).into()
            );
        };
        if (e.origin as u64, e.seq) != (ack.origin, ack.number) {
            return Err(WireError::Control("the copy being rebuilt acknowledged out of order".into()).into());
        }
        let e = sh.unacked.pop_front().expect("looked at");
        sh.forward_bytes -= 2 * e.frame.len();
        Ok(())
    }

    /// A chunk of the tail's snapshot (this copy is being rebuilt).
    pub(super) fn on_snapshot(&mut self, peer: PeerId, frame: &[u8]) -> Result<(), ShardError> {
        let (h, payload) = match wire::decode(frame, frame.len())? {
            Frame::Data { h, vals, .. } if h.kind == Kind::Snapshot => (SnapshotHeader::try_from(h)?, vals),
            _ => return Err(WireError::Unexpected(Kind::Snapshot).into()),
        };
        let Some(buf) = self.rebuild.as_mut() else {
            return Err(WireError::Control(format!("{} is not being rebuilt", self.describe())).into());
        };
        if h.offset == 0 {
            // a new tail starts over
            buf.clear();
        }
        if h.offset != buf.len() as u64 || h.total > SNAPSHOT_BYTES_MAX || h.offset > h.total {
            return Err(WireError::Control("a snapshot chunk out of order or too large".into()).into());
        }
        self.conns.insert(peer, Conn::Upstream);
        let take = ((h.total - h.offset) as usize).min(payload.len());
        buf.extend_from_slice(&payload[..take]);
        if !h.last {
            return Ok(());
        }
        if buf.len() as u64 != h.total {
            return Err(WireError::Control("a snapshot's last chunk before its end".into()).into());
        }
        let bytes = self.rebuild.take().expect("looked at");
        let bad = |e: String| ShardError::from(WireError::Control(format!("a snapshot: {e}")));
        let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("cut short".into()))?.try_into().expect("8"));
        let end = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).filter(|&e| e <= bytes.len());
        let end = end.ok_or_else(|| bad("cut short".into()))?;
        self.core.restore_live(&bytes[8..end]).map_err(|e| bad(e.to_string()))?;
        let applied: Vec<(u32, u64)> = serde_json::from_slice(&bytes[end..]).map_err(|e| bad(e.to_string()))?;
        self.applied = applied.into_iter().collect();
        self.synced = true;
        self.log.push(format!("{}: rebuilt from its chain's tail ({} bytes)", self.describe(), bytes.len()));
        Ok(())
    }

    /// The rebuilt copy has its snapshot and the view made it the last
    /// member: its shadow link carries on as this tail's downstream.
    pub(super) fn shadow_joins(&mut self, sh: Shadow, tx: &mut dyn FrameSink) {
        // the rebuilt copy has its snapshot: its link carries on as the
        // downstream, and this tail waits for it from now on; it is a
        // member once it acknowledged what was answered before
        for f in &sh.out {
            let _ = tx.frame_gather(sh.peer, &[f]);
        }
        self.down.peer = Some(sh.peer);
        self.down.log_bytes = sh.unacked.iter().map(|e| e.frame.len()).sum();
        let before = sh.unacked.len();
        self.down.log = sh.unacked;
        if before == 0 {
            self.caught_up = Some(sh.placement);
        } else {
            self.catching_up = Some((sh.placement, before));
        }
        self.log.push(format!(
            "{}: waits for the rebuilt copy on server {} from now on ({before} earlier frames to come)",
            self.describe(),
            sh.server
        ));
    }
}
