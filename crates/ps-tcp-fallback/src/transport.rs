//! The [`TcpTransport`] value: its poller, its connection table (slots with
//! generation counters, so a stale [`PeerId`] never reaches a new connection),
//! its buffer pools, and the accessors the binary and the tests read.
//!
//! The handshake and closes are in `control`, reading and writing frames in
//! `datapath`; this file must never read or write a socket.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use ps_core::limits::{self, WireLimits};
use ps_core::transport::{PeerEvent, PeerId};

use crate::buf::Pool;
use crate::config::{TcpConfig, SMALL_FRAME_BYTES};
use crate::conn::{Conn, TcpRx};

pub(crate) const LISTENER: Token = Token(usize::MAX - 1);
pub(crate) const WAKER: Token = Token(usize::MAX - 2);
pub(crate) const EXTRA: Token = Token(usize::MAX - 3);

/// Counters, for the end-of-run report and the memory-bound test.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpStats {
    /// incoming connections accepted (before their handshake)
    pub accepted: u64,
    /// incoming connections refused at the `connections_max` bound
    pub refused: u64,
    /// connections dropped: bad framing, a failed or late handshake, a stall, or `close`
    pub dropped: u64,
    /// frames received
    pub frames_in: u64,
    /// bytes read from sockets
    pub bytes_in: u64,
    /// bytes written to sockets
    pub bytes_out: u64,
}

/// The TCP transport of one thread: its listener (if any), its connections
/// and their buffers; implements `ps_core::transport::Transport`.
#[derive(Debug)]
pub struct TcpTransport {
    pub(crate) poll: Poll,
    pub(crate) events: Events,
    pub(crate) listener: Option<TcpListener>,
    pub(crate) conns: Vec<Option<Conn>>,
    pub(crate) generations: Vec<u32>,
    pub(crate) cfg: TcpConfig,
    pub(crate) small_pool: Pool,
    pub(crate) large_pool: Pool,
    pub(crate) ready: VecDeque<TcpRx>,
    pub(crate) events_out: Vec<PeerEvent>,
    pub(crate) stats: TcpStats,
    /// the fd given to `watch_fd` became readable
    pub(crate) extra_ready: bool,
}

impl TcpTransport {
    /// A transport with no listener (a worker, or a node's link to the manager).
    pub fn client(cfg: TcpConfig) -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(256),
            listener: None,
            conns: Vec::new(),
            generations: Vec::new(),
            small_pool: Pool::new(SMALL_FRAME_BYTES, limits::RX_POOL_BUFFERS_MAX),
            large_pool: Pool::new(limits::RX_BUFFER_BYTES_MIN, limits::RX_POOL_BUFFERS_MAX),
            cfg,
            ready: VecDeque::new(),
            events_out: Vec::new(),
            stats: TcpStats::default(),
            extra_ready: false,
        })
    }

    /// The address the listener is bound to (`None` for a client).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A waker that makes a blocked `rx_burst` return (for shutdown).
    pub fn waker(&self) -> io::Result<Arc<Waker>> {
        Ok(Arc::new(Waker::new(self.poll.registry(), WAKER)?))
    }

    /// Makes a blocked `rx_burst` also return when `fd` becomes readable (the RDMA
    /// transport's completion channel), so one poll(2) waits for both.
    /// [`TcpTransport::take_extra_ready`] says whether it did.
    pub fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.poll.registry().register(&mut mio::unix::SourceFd(&fd), EXTRA, Interest::READABLE)
    }

    /// True (once) if the watched fd was readable in a poll since the last call.
    pub fn take_extra_ready(&mut self) -> bool {
        std::mem::take(&mut self.extra_ready)
    }

    /// Replaces the wire limits (a listener bound before the job's limits were known).
    pub fn set_limits(&mut self, limits: WireLimits) {
        self.cfg.limits = limits;
    }

    /// The counters so far.
    pub fn stats(&self) -> TcpStats {
        self.stats
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// Bytes held in receive buffers and send queues: bounded by connections x
    /// (frame bound + queue bound), whatever peers send.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.iter().flatten().map(|c| c.rbuf.capacity() + c.tx.pending()).sum()
    }

    pub(crate) fn peer_of(&self, i: usize) -> PeerId {
        PeerId { index: i as u32, generation: self.generations[i] }
    }

    pub(crate) fn conn_index(&self, peer: PeerId) -> Option<usize> {
        let i = peer.index as usize;
        (self.generations.get(i) == Some(&peer.generation) && self.conns.get(i).is_some_and(|c| c.is_some()))
            .then_some(i)
    }

    pub(crate) fn insert(&mut self, conn: Conn) -> io::Result<usize> {
        let i = match self.conns.iter().position(|c| c.is_none()) {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.generations.push(0);
                self.conns.len() - 1
            }
        };
        let mut conn = conn;
        self.poll.registry().register(&mut conn.sock, Token(i), Interest::READABLE | Interest::WRITABLE)?;
        self.conns[i] = Some(conn);
        Ok(i)
    }
}
