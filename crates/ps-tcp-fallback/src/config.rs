//! What a [`TcpTransport`](crate::TcpTransport) is told when it is made, and
//! the transport's own tunables (the bounds it shares with the rest of the job
//! live in `ps_core::limits`).
//!
//! Values only: this file must never open a socket, hold connection state, or
//! read a clock.

use std::time::Duration;

use ps_core::auth::JobSecret;
use ps_core::limits::{self, WireLimits};
use ps_core::transport::PeerHello;

/// Frames below this are copied out of the read buffer; larger ones are lent as they lie.
pub(crate) const SMALL_FRAME_BYTES: usize = 16 * 1024;

/// Frames below this are cheaper to copy into the queue than to `writev`.
pub(crate) const GATHER_DIRECT_BYTES_MIN: usize = 16 * 1024;

/// Who this transport is and what it accepts.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    pub(crate) secret: JobSecret,
    /// Frame and queue bounds; set them to the job's before connecting.
    pub limits: WireLimits,
    /// Our identity in outgoing handshakes.
    pub identity: PeerHello,
    /// Client mode: `frame()` waits (flushing, reading) until the queue has room.
    /// Listener mode (false): `frame()` refuses when full, and requests from a
    /// peer are not read while its queue lacks room for one response.
    pub blocking_tx: bool,
    /// How long a blocked `frame()` waits before giving up on the peer.
    pub tx_stall_timeout: Duration,
    /// A connection that has not finished the handshake within this is dropped.
    pub handshake_timeout: Duration,
    /// A peer that sent part of a frame and then nothing for this long is
    /// dropped (a peer we are not reading from, for back-pressure, never is).
    pub stall_timeout: Duration,
    /// A listener refuses connections beyond this many open ones.
    pub connections_max: usize,
}

impl TcpConfig {
    /// A config proving `secret`, introducing itself as `identity`, with the
    /// default limits and timeouts; `blocking_tx`: true for a client, false for a listener.
    pub fn new(secret: JobSecret, identity: PeerHello, blocking_tx: bool) -> Self {
        Self {
            secret,
            limits: WireLimits::default(),
            identity,
            blocking_tx,
            tx_stall_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_millis(limits::HANDSHAKE_TIMEOUT_MS),
            stall_timeout: Duration::from_millis(limits::FRAME_STALL_TIMEOUT_MS),
            connections_max: limits::CONNECTIONS_MAX,
        }
    }
}
