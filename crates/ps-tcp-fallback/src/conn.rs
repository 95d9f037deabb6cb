//! One connection's state (where its handshake stands, its read buffer, its
//! send queue) and the frame a receive lends out.
//!
//! Plain data shared by the control path and the datapath: nothing here does
//! I/O, and nothing here must decide when a connection opens or closes.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;
use ps_core::transport::{PeerHello, PeerId, RxFrame};
use ps_core::wire::NONCE_BYTES;

use crate::buf::{AlignedBuf, TxQueue};

/// Where a connection's handshake stands.
#[derive(Debug)]
pub(crate) enum State {
    /// we sent a challenge with this nonce and wait for the Hello
    Challenged {
        nonce: [u8; NONCE_BYTES],
        deadline: Instant,
    },
    Open {
        hello: PeerHello,
    },
}

/// One connection: its socket, read buffer and send queue.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) sock: TcpStream,
    pub(crate) addr: SocketAddr,
    pub(crate) state: State,
    pub(crate) rbuf: AlignedBuf,
    pub(crate) rstart: usize,
    pub(crate) rfill: usize,
    pub(crate) tx: TxQueue,
    /// the socket may hold unread bytes (edge-triggered: we must come back)
    pub(crate) readable: bool,
    /// frames of this connection sitting in `ready`
    pub(crate) queued: usize,
    /// when bytes last arrived
    pub(crate) last_read: Instant,
}

/// A frame lent out by [`TcpTransport::rx_burst`](crate::TcpTransport); give it back with `release`.
#[derive(Debug)]
pub struct TcpRx {
    pub(crate) peer: PeerId,
    pub(crate) buf: AlignedBuf,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) small: bool,
}

impl RxFrame for TcpRx {
    fn peer(&self) -> PeerId {
        self.peer
    }
    fn bytes(&self) -> &[u8] {
        &self.buf.bytes()[self.start..self.start + self.len]
    }
}
