//! The transport trait: the one seam between the protocol and the network.
//!
//! Small and batched, after eRPC's `Transport` (tx_burst / rx_burst): a burst of
//! received frames comes out of [`Transport::rx_burst`] in reused buffers, frames
//! are written straight into the transport's send queues by [`FrameSink::frame`]
//! and go out together on [`Transport::flush`] (one syscall or one doorbell per
//! peer per burst). Implementations: `ps-tcp-fallback` (TCP), `ps-rdma` (verbs)
//! and [`crate::sim`] (in memory, seeded, for tests).
//!
//! One-sided operations hide behind it: over RDMA a push is written with
//! WRITE_WITH_IMM into a mailbox ring and surfaces on the shard as a received
//! frame, and a dense range pull frame is not sent at all but served by READs of
//! the shard's slab blocks, the transport handing back the answer the shard
//! would have sent, decoded ([`Received::Answer`]: no frame is built for it).
//! So neither the shard nor the worker code changes.

use std::time::Duration;

use crate::wire::DataHeader;

/// A connection, as the transport that owns it numbers it. Reused after close only
/// with a new generation, so a stale id never reaches a new peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId {
    /// the connection's slot in the transport's table
    pub index: u32,
    /// how many times the slot was reused before this connection
    pub generation: u32,
}

/// Who a peer said it was in its (verified) handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHello {
    /// its [`crate::control::Role`], as the byte the handshake carries
    pub role: u8,
    /// the number it gave itself (see [`crate::wire::Frame::Hello`])
    pub node: u32,
}

/// Something that happened to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer connected and passed the handshake.
    Opened {
        /// the new connection
        peer: PeerId,
        /// who the peer proved to be
        hello: PeerHello,
    },
    /// A connection ended; `reason` says why (peer closed, bad frame, failed handshake...).
    Closed {
        /// the connection that ended; its id is not used again
        peer: PeerId,
        /// why, for the log
        reason: String,
    },
}

/// Why [`FrameSink::frame`] gave no space for a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The peer's send queue is full: flush, handle received frames, try again.
    #[error("send queue of {0:?} is full")]
    Full(PeerId),
    /// The connection is closed (or was never opened): the frame cannot go.
    #[error("no open connection {0:?}")]
    Closed(PeerId),
    /// The frame is larger than one frame to this peer may be (TCP: the
    /// job's `frame_bytes_max` plus the prefix; RDMA: a ring slot): split it.
    #[error("frame of {len} bytes is above the bound of {max}")]
    TooLarge {
        /// the frame's size, bytes
        len: usize,
        /// the bound, bytes
        max: usize,
    },
}

/// Where encoded frames go. The shard, worker and manager state machines only
/// ever see this, never a socket.
pub trait FrameSink {
    /// Space for one whole frame of `len` bytes to `peer`, queued for sending as
    /// soon as the returned slice is filled (the caller must fill all of it).
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError>;

    /// Queues one frame made of `parts`, concatenated (their total is the frame
    /// length). The default copies them into [`FrameSink::frame`]; a transport
    /// may instead send straight from the parts (TCP: `writev` when nothing is
    /// queued ahead), saving the sender's copy of large payloads.
    fn frame_gather(&mut self, peer: PeerId, parts: &[&[u8]]) -> Result<(), TxError> {
        let len = parts.iter().map(|p| p.len()).sum();
        gather_into(self.frame(peer, len)?, parts);
        Ok(())
    }
}

/// Copies `parts`, concatenated, into `buf` (exactly their total length).
pub fn gather_into(buf: &mut [u8], parts: &[&[u8]]) {
    let mut at = 0;
    for p in parts {
        crate::kernels::copy_bytes(&mut buf[at..at + p.len()], p);
        at += p.len();
    }
}

/// Most parts a [`FrameSink::frame_gather`] call carries (header, payload runs,
/// padding): enough for a chunk of `limits::CHUNK_BYTES` read from slab blocks.
pub const GATHER_PARTS_MAX: usize = 128;

/// What a received buffer holds ([`RxFrame::received`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Received<'a> {
    /// A whole frame, prefix included, 8-byte aligned: decode it.
    Frame(&'a [u8]),
    /// The answer to a pull that a one-sided transport served itself (RDMA:
    /// READs of a shard's dense slab), decoded already: the header of the
    /// `PullResp` the shard would have sent, and its `h.b` values
    /// (little-endian f32s).
    Answer {
        /// the `PullResp` header (kind, table, sub, ts, a and b as the shard's)
        h: DataHeader,
        /// `h.b` x 4 bytes of values
        vals: &'a [u8],
    },
}

/// A received frame in a buffer the transport lends out.
pub trait RxFrame {
    /// The connection it came in on.
    fn peer(&self) -> PeerId;
    /// The whole frame, prefix included, 8-byte aligned; empty when the
    /// buffer holds a [`Received::Answer`] (no frame was built for it).
    fn bytes(&self) -> &[u8];
    /// What the buffer holds: by default the frame of [`RxFrame::bytes`].
    fn received(&self) -> Received<'_> {
        Received::Frame(self.bytes())
    }
}

/// Why a transport call failed as a whole (not one connection: those end
/// with [`PeerEvent::Closed`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// An operating-system or device error, as its text.
    #[error("{0}")]
    Io(String),
    /// Waited this long and it did not happen.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A batched, message-oriented transport.
pub trait Transport: FrameSink {
    /// A received frame, lent until [`Transport::release`].
    type Rx: RxFrame;

    /// Appends received frames to `out`, waiting up to `timeout` if none is ready.
    /// Frames from one peer come in the order it sent them.
    fn rx_burst(&mut self, out: &mut Vec<Self::Rx>, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// Gives a received buffer back for reuse.
    fn release(&mut self, rx: Self::Rx);

    /// Sends what is queued, as far as the network takes it now.
    fn flush(&mut self) -> Result<(), TransportError>;

    /// Moves connection events (opened, closed with reason) into `out`.
    fn events(&mut self, out: &mut Vec<PeerEvent>);

    /// Drops a connection, saying why (logged, and reported as `Closed`).
    fn close(&mut self, peer: PeerId, reason: &str);

    /// Frames queued but not yet sent, to `peer`.
    fn tx_pending_bytes(&self, peer: PeerId) -> usize;
}
