//! # ps-tcp-fallback: the ps-core transport over TCP
//!
//! One [`TcpTransport`] per thread: a shard thread owns one with its own listener
//! (thread-per-core: no socket is shared between shards), a worker owns one with
//! a connection to every shard, the manager owns one with its listener.
//!
//! - **Authenticated.** A listener sends a `Challenge` to every new connection and
//!   admits it only after a `Hello` whose HMAC proves the job secret
//!   (`ps_core::auth`); it answers with its own proof. Before that, a peer may
//!   send at most `HANDSHAKE_FRAME_BYTES_MAX` bytes per frame and has
//!   `HANDSHAKE_TIMEOUT_MS` to finish.
//! - **Checked.** Every length prefix is checked against the bound before a byte
//!   of the body is buffered; a peer that breaks the framing is dropped with a
//!   logged reason, and everyone else keeps being served.
//! - **Bounded.** Each connection has a send queue of at most
//!   `tx_queue_bytes_max`; a listener does not read requests from a peer whose
//!   responses are piling up (back-pressure through TCP flow control), and a
//!   client's `frame()` waits for room. At most `CONNECTIONS_MAX` connections.
//! - **No allocation per message.** Frames are read into pooled 8-aligned
//!   buffers and lent out as they are; send queues grow to their high-water mark
//!   once and are reused.
//!
//! Control path (accept, connect, handshake) and datapath (read, parse, write)
//! are in this file's two halves; the datapath is `read_conn` / `flush_conn`.

mod buf;

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use ps_core::auth::JobSecret;
use ps_core::limits::{self, WireLimits};
use ps_core::transport::{FrameSink, PeerEvent, PeerHello, PeerId, RxFrame, Transport, TransportError, TxError};
use ps_core::wire::{self, Frame, Kind, NONCE_BYTES, PREFIX_BYTES};

pub use buf::AlignedBuf;
use buf::{Pool, TxQueue};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const EXTRA: Token = Token(usize::MAX - 3);
/// Frames below this are copied out of the read buffer; larger ones are lent as they lie.
const SMALL_FRAME_BYTES: usize = 16 * 1024;

/// Who this transport is and what it accepts.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    pub secret: JobSecret,
    pub limits: WireLimits,
    /// Our identity in outgoing handshakes.
    pub identity: PeerHello,
    /// Client mode: `frame()` waits (flushing, reading) until the queue has room.
    /// Listener mode (false): `frame()` refuses when full, and requests from a
    /// peer are not read while its queue lacks room for one response.
    pub blocking_tx: bool,
    /// How long a blocked `frame()` waits before giving up on the peer.
    pub tx_stall_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A peer that sent part of a frame and then nothing for this long is
    /// dropped (a peer we are not reading from, for back-pressure, never is).
    pub stall_timeout: Duration,
    pub connections_max: usize,
}

impl TcpConfig {
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

/// A failed outgoing connection, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {err} (is the node running and listening there?)")]
    Connect { addr: SocketAddr, err: io::Error },
    #[error("handshake with {addr} failed: {why}")]
    Handshake { addr: SocketAddr, why: String },
}

#[derive(Debug)]
enum State {
    /// we sent a challenge with this nonce and wait for the Hello
    Challenged {
        nonce: [u8; NONCE_BYTES],
        deadline: Instant,
    },
    Open {
        hello: PeerHello,
    },
}

#[derive(Debug)]
struct Conn {
    sock: TcpStream,
    addr: SocketAddr,
    state: State,
    rbuf: AlignedBuf,
    rstart: usize,
    rfill: usize,
    tx: TxQueue,
    /// the socket may hold unread bytes (edge-triggered: we must come back)
    readable: bool,
    /// frames of this connection sitting in `ready`
    queued: usize,
    /// when bytes last arrived
    last_read: Instant,
}

/// A frame lent out by [`TcpTransport::rx_burst`]; give it back with `release`.
#[derive(Debug)]
pub struct TcpRx {
    peer: PeerId,
    buf: AlignedBuf,
    start: usize,
    len: usize,
    small: bool,
}

impl RxFrame for TcpRx {
    fn peer(&self) -> PeerId {
        self.peer
    }
    fn bytes(&self) -> &[u8] {
        &self.buf.bytes()[self.start..self.start + self.len]
    }
}

/// Counters, for the end-of-run report and the memory-bound test.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpStats {
    pub accepted: u64,
    pub refused: u64,
    pub dropped: u64,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug)]
pub struct TcpTransport {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    conns: Vec<Option<Conn>>,
    generations: Vec<u32>,
    cfg: TcpConfig,
    small_pool: Pool,
    large_pool: Pool,
    ready: VecDeque<TcpRx>,
    events_out: Vec<PeerEvent>,
    stats: TcpStats,
    /// the fd given to `watch_fd` became readable
    extra_ready: bool,
}

fn io_err(e: io::Error) -> TransportError {
    TransportError::Io(e.to_string())
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

    /// A transport listening on `addr` (port 0: any free port; see `local_addr`).
    pub fn listen(cfg: TcpConfig, addr: SocketAddr) -> io::Result<Self> {
        let mut t = Self::client(cfg)?;
        let mut l = TcpListener::bind(addr)?;
        t.poll.registry().register(&mut l, LISTENER, Interest::READABLE)?;
        t.listener = Some(l);
        Ok(t)
    }

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

    pub fn stats(&self) -> TcpStats {
        self.stats
    }

    pub fn open_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// Bytes held in receive buffers and send queues: bounded by connections x
    /// (frame bound + queue bound), whatever peers send.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.iter().flatten().map(|c| c.rbuf.capacity() + c.tx.pending()).sum()
    }

    fn peer_of(&self, i: usize) -> PeerId {
        PeerId { index: i as u32, generation: self.generations[i] }
    }

    fn conn_index(&self, peer: PeerId) -> Option<usize> {
        let i = peer.index as usize;
        (self.generations.get(i) == Some(&peer.generation) && self.conns.get(i).is_some_and(|c| c.is_some()))
            .then_some(i)
    }

    fn insert(&mut self, conn: Conn) -> io::Result<usize> {
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

    // ---------------------------------------------------------------- control path

    /// Connects to a listener and runs the handshake (blocking, bounded by `timeout`).
    pub fn connect(&mut self, addr: SocketAddr, timeout: Duration) -> Result<PeerId, ConnectError> {
        let hs = |why: String| ConnectError::Handshake { addr, why };
        let mut s =
            std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|err| ConnectError::Connect { addr, err })?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(timeout)).ok();
        s.set_write_timeout(Some(timeout)).ok();
        let challenge = read_frame_blocking(&mut s, wire::HANDSHAKE_BODY_MAX).map_err(|e| hs(e.to_string()))?;
        let ns = match wire::decode(&challenge, wire::HANDSHAKE_BODY_MAX) {
            Ok(Frame::Challenge { nonce }) => *nonce,
            Ok(other) => return Err(hs(format!("expected a challenge, got {other:?}"))),
            Err(e) => return Err(hs(e.to_string())),
        };
        let nc = random_nonce().map_err(hs)?;
        let id = self.cfg.identity;
        let mac = self.cfg.secret.client_mac(&ns, &nc, id.role, id.node);
        s.write_all(&wire::encode_hello(id.role, id.node, &nc, &mac)).map_err(|e| hs(e.to_string()))?;
        let welcome = read_frame_blocking(&mut s, wire::HANDSHAKE_BODY_MAX)
            .map_err(|e| hs(format!("{e} (the peer closed the connection: most likely our job secret is wrong)")))?;
        match wire::decode(&welcome, wire::HANDSHAKE_BODY_MAX) {
            Ok(Frame::Welcome { mac }) if self.cfg.secret.verify_server(&ns, &nc, mac) => {}
            Ok(Frame::Welcome { .. }) => {
                return Err(hs("the peer does not know our job secret: not a node of this job".into()))
            }
            Ok(other) => return Err(hs(format!("expected a welcome, got {other:?}"))),
            Err(e) => return Err(hs(e.to_string())),
        }
        s.set_nonblocking(true).map_err(|e| hs(e.to_string()))?;
        let conn = Conn {
            sock: TcpStream::from_std(s),
            addr,
            state: State::Open { hello: PeerHello { role: 0, node: 0 } },
            rbuf: self.large_pool.get(0),
            rstart: 0,
            rfill: 0,
            tx: TxQueue::default(),
            readable: true,
            queued: 0,
            last_read: Instant::now(),
        };
        let i = self.insert(conn).map_err(|e| hs(e.to_string()))?;
        Ok(self.peer_of(i))
    }

    fn accept_all(&mut self) {
        loop {
            let Some(l) = self.listener.as_ref() else { return };
            let (sock, addr) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            };
            if self.open_connections() >= self.cfg.connections_max {
                self.stats.refused += 1;
                tracing::warn!("refused {addr}: already {} connections (the bound)", self.cfg.connections_max);
                continue;
            }
            sock.set_nodelay(true).ok();
            let nonce = match random_nonce() {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!("refused {addr}: {e}");
                    continue;
                }
            };
            let mut conn = Conn {
                sock,
                addr,
                state: State::Challenged { nonce, deadline: Instant::now() + self.cfg.handshake_timeout },
                // before the handshake a frame is at most HANDSHAKE_FRAME_BYTES_MAX:
                // an unauthenticated peer costs a few hundred bytes, not a pooled buffer
                rbuf: AlignedBuf::with_capacity(limits::HANDSHAKE_FRAME_BYTES_MAX),
                rstart: 0,
                rfill: 0,
                tx: TxQueue::default(),
                readable: true,
                queued: 0,
                last_read: Instant::now(),
            };
            conn.tx.reserve(wire::padded_len(NONCE_BYTES)).copy_from_slice(&wire::encode_challenge(&nonce));
            match self.insert(conn) {
                Ok(i) => {
                    self.stats.accepted += 1;
                    self.flush_conn(i);
                }
                Err(e) => tracing::warn!("could not register {addr}: {e}"),
            }
        }
    }

    /// A `Hello` on a challenged connection: admit it or drop it.
    fn on_hello(&mut self, i: usize, frame: &[u8]) -> Result<(), String> {
        let conn = self.conns[i].as_mut().expect("live conn");
        let State::Challenged { nonce: ns, .. } = conn.state else { return Err("handshake twice".into()) };
        let (role, node, nc, mac) = match wire::decode(frame, wire::HANDSHAKE_BODY_MAX) {
            Ok(Frame::Hello { role, node, nonce, mac }) => (role, node, *nonce, *mac),
            Ok(other) => return Err(format!("handshake failed: expected Hello, got {:?}", kind_of(&other))),
            Err(e) => return Err(format!("handshake failed: {e}")),
        };
        if !self.cfg.secret.verify_client(&ns, &nc, role, node, &mac) {
            return Err("handshake failed: bad MAC (a process without this job's secret)".into());
        }
        let hello = PeerHello { role, node };
        conn.state = State::Open { hello };
        let welcome = wire::encode_welcome(&self.cfg.secret.server_mac(&ns, &nc));
        conn.tx.reserve(welcome.len()).copy_from_slice(&welcome);
        let peer = self.peer_of(i);
        self.events_out.push(PeerEvent::Opened { peer, hello });
        self.flush_conn(i);
        Ok(())
    }

    fn drop_conn(&mut self, i: usize, reason: &str, bad: bool) {
        let Some(mut conn) = self.conns[i].take() else { return };
        let _ = self.poll.registry().deregister(&mut conn.sock);
        let peer = self.peer_of(i);
        if bad {
            self.stats.dropped += 1;
            tracing::warn!("dropped {} ({peer:?}): {reason}", conn.addr);
            // a dropped peer's unhandled frames are discarded
            let mut kept = VecDeque::with_capacity(self.ready.len());
            for f in self.ready.drain(..) {
                if f.peer == peer {
                    if f.small {
                        self.small_pool.put(f.buf);
                    } else {
                        self.large_pool.put(f.buf);
                    }
                } else {
                    kept.push_back(f);
                }
            }
            self.ready = kept;
        } else {
            tracing::debug!("closed {} ({peer:?}): {reason}", conn.addr);
        }
        let rbuf = std::mem::take(&mut conn.rbuf);
        if rbuf.capacity() >= limits::RX_BUFFER_BYTES_MIN {
            self.large_pool.put(rbuf);
        }
        self.generations[i] = self.generations[i].wrapping_add(1);
        self.events_out.push(PeerEvent::Closed { peer, reason: reason.to_string() });
    }

    /// Drops peers that did not finish the handshake in time, and peers that
    /// stopped mid-frame: a frame is partly here, the socket is drained, and
    /// nothing came for `stall_timeout`.
    fn expire_stalled(&mut self) {
        // nothing can be late without a handshake or a part-read frame: the
        // clock is not read then (every burst calls this; under the soft-RoCE
        // VM's HPET clock source a read is a system call)
        let may_be_late = |c: &Conn| matches!(c.state, State::Challenged { .. }) || (c.rfill > c.rstart && !c.readable);
        if !self.conns.iter().flatten().any(may_be_late) {
            return;
        }
        let now = Instant::now();
        let stall = self.cfg.stall_timeout;
        let late: Vec<(usize, &'static str)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                Some(Conn { state: State::Challenged { deadline, .. }, .. }) if *deadline < now => {
                    Some((i, "handshake timed out"))
                }
                Some(c) if c.rfill > c.rstart && !c.readable && now.duration_since(c.last_read) > stall => {
                    Some((i, "sent part of a frame, then nothing: stalled"))
                }
                _ => None,
            })
            .collect();
        for (i, why) in late {
            self.drop_conn(i, why, true);
        }
    }

    // ---------------------------------------------------------------- datapath

    /// Listener mode: room in `i`'s send queue for the largest response to every
    /// request read so far plus one more? (Shards answer one request with at most
    /// `response_bytes_max`.) This is what bounds a shard's memory against a peer
    /// that sends requests but never reads the answers.
    fn has_response_room(&self, i: usize) -> bool {
        let resp = self.cfg.limits.response_bytes_max();
        self.conns[i]
            .as_ref()
            .is_some_and(|c| c.tx.pending() + (c.queued + 1) * resp <= self.cfg.limits.tx_queue_bytes_max)
    }

    /// Who `peer` proved to be in its handshake (listener side).
    pub fn peer_hello(&self, peer: PeerId) -> Option<PeerHello> {
        let i = self.conn_index(peer)?;
        match self.conns[i].as_ref()?.state {
            State::Open { hello } => Some(hello),
            State::Challenged { .. } => None,
        }
    }

    /// Reads what the socket has into frames on `ready`, up to the per-connection bound.
    fn read_conn(&mut self, i: usize) {
        loop {
            let Some(conn) = self.conns[i].as_mut() else { return };
            if !conn.readable || conn.queued >= limits::RX_FRAMES_QUEUED_MAX {
                return;
            }
            let open = matches!(conn.state, State::Open { .. });
            if !self.cfg.blocking_tx && open && !self.has_response_room(i) {
                return; // back-pressure: come back when the responses drained
            }
            let conn = self.conns[i].as_mut().expect("live conn");
            let body_max = if open { self.cfg.limits.frame_bytes_max } else { wire::HANDSHAKE_BODY_MAX };
            // how much the frame at rstart needs
            let need = if conn.rfill - conn.rstart >= PREFIX_BYTES {
                let p: [u8; 8] = conn.rbuf.bytes()[conn.rstart..conn.rstart + 8].try_into().expect("8");
                match wire::parse_prefix(&p, body_max) {
                    Ok(p) => p.frame_len,
                    Err(e) => return self.drop_conn(i, &format!("bad frame: {e}"), true),
                }
            } else {
                PREFIX_BYTES
            };
            if conn.rfill - conn.rstart >= need {
                // a whole frame is buffered
                self.take_frame(i, need);
                continue;
            }
            if conn.rstart + need > conn.rbuf.capacity() {
                if conn.rstart > 0 {
                    let (s, f) = (conn.rstart, conn.rfill);
                    conn.rbuf.bytes_mut().copy_within(s..f, 0);
                    conn.rfill -= s;
                    conn.rstart = 0;
                }
                conn.rbuf.reserve_total(need.max(limits::RX_BUFFER_BYTES_MIN.min(body_max + PREFIX_BYTES)));
            }
            let cap = conn.rbuf.capacity();
            let fill = conn.rfill;
            match conn.sock.read(&mut conn.rbuf.bytes_mut()[fill..cap]) {
                Ok(0) => {
                    let reason =
                        if conn.rfill > conn.rstart { "peer closed mid-frame" } else { "peer closed the connection" };
                    let bad = conn.rfill > conn.rstart;
                    return self.drop_conn(i, reason, bad);
                }
                Ok(n) => {
                    conn.rfill += n;
                    conn.last_read = Instant::now();
                    self.stats.bytes_in += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(i, &format!("read error: {e}"), false),
            }
        }
    }

    /// Moves the whole frame of `len` bytes at `rstart` out of the read buffer.
    fn take_frame(&mut self, i: usize, len: usize) {
        let peer = self.peer_of(i);
        let conn = self.conns[i].as_mut().expect("live conn");
        if matches!(conn.state, State::Challenged { .. }) {
            let frame = conn.rbuf.bytes()[conn.rstart..conn.rstart + len].to_vec();
            conn.rstart += len;
            if let Err(why) = self.on_hello(i, &frame) {
                self.drop_conn(i, &why, true);
            }
            return;
        }
        self.stats.frames_in += 1;
        let rx = if len < SMALL_FRAME_BYTES {
            let mut b = self.small_pool.get(len);
            b.bytes_mut()[..len].copy_from_slice(&conn.rbuf.bytes()[conn.rstart..conn.rstart + len]);
            conn.rstart += len;
            TcpRx { peer, buf: b, start: 0, len, small: true }
        } else {
            // lend the read buffer itself; carry any bytes after the frame into a new one
            let trailing = conn.rfill - conn.rstart - len;
            let mut next = self.large_pool.get(trailing);
            let from = conn.rstart + len;
            next.bytes_mut()[..trailing].copy_from_slice(&conn.rbuf.bytes()[from..from + trailing]);
            let buf = std::mem::replace(&mut conn.rbuf, next);
            let start = conn.rstart;
            conn.rstart = 0;
            conn.rfill = trailing;
            TcpRx { peer, buf, start, len, small: false }
        };
        if conn.rstart == conn.rfill {
            conn.rstart = 0;
            conn.rfill = 0;
        }
        conn.queued += 1;
        self.ready.push_back(rx);
    }

    /// Writes as much of `i`'s queue as the socket takes.
    fn flush_conn(&mut self, i: usize) {
        let Some(conn) = self.conns[i].as_mut() else { return };
        while conn.tx.pending() > 0 {
            match conn.sock.write(conn.tx.unsent()) {
                Ok(0) => return self.drop_conn(i, "peer stopped reading (write returned 0)", false),
                Ok(n) => {
                    conn.tx.consume(n);
                    self.stats.bytes_out += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(i, &format!("write error: {e}"), false),
            }
        }
    }

    /// One round of the event loop: waits up to `timeout` and handles what happened.
    fn poll_io(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(io_err(e)),
        }
        let tokens: Vec<(Token, bool, bool)> = self
            .events
            .iter()
            .map(|e| (e.token(), e.is_readable() || e.is_read_closed() || e.is_error(), e.is_writable()))
            .collect();
        for (token, readable, writable) in tokens {
            match token {
                LISTENER => self.accept_all(),
                WAKER => {}
                EXTRA => self.extra_ready = true,
                Token(i) => {
                    if writable {
                        self.flush_conn(i);
                    }
                    if readable {
                        if let Some(c) = self.conns.get_mut(i).and_then(|c| c.as_mut()) {
                            c.readable = true;
                        }
                        self.read_conn(i);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads connections that still have bytes but were paused.
    fn read_paused(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].as_ref().is_some_and(|c| c.readable) {
                self.read_conn(i);
            }
        }
    }

    /// Blocks (flushing, reading) until `i`'s queue has room for `len` more bytes.
    fn wait_for_room(&mut self, i: usize, len: usize) -> Result<(), TxError> {
        let peer = self.peer_of(i);
        let start = Instant::now();
        loop {
            self.flush_conn(i);
            let Some(c) = self.conns[i].as_ref() else { return Err(TxError::Closed(peer)) };
            if c.tx.pending() + len <= self.cfg.limits.tx_queue_bytes_max {
                return Ok(());
            }
            if !self.cfg.blocking_tx {
                return Err(TxError::Full(peer));
            }
            if start.elapsed() > self.cfg.tx_stall_timeout {
                self.drop_conn(i, &format!("peer took nothing for {:?}", self.cfg.tx_stall_timeout), false);
                return Err(TxError::Closed(peer));
            }
            // keep reading meanwhile, so a peer blocked on writing to us can go on
            self.read_paused();
            let _ = self.poll_io(Some(Duration::from_millis(5)));
        }
    }
}

impl FrameSink for TcpTransport {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
        let max = self.cfg.limits.frame_bytes_max + PREFIX_BYTES;
        if len > max {
            return Err(TxError::TooLarge { len, max });
        }
        let i = self.conn_index(peer).ok_or(TxError::Closed(peer))?;
        self.wait_for_room(i, len)?;
        let conn = self.conns[i].as_mut().ok_or(TxError::Closed(peer))?;
        Ok(conn.tx.reserve(len))
    }

    /// Datapath: a large frame to a connection with nothing queued goes out with
    /// `writev` straight from the caller's slices; only what the socket does not
    /// take now is copied into the queue. Anything else takes the copying path,
    /// so frames stay in order.
    fn frame_gather(&mut self, peer: PeerId, parts: &[&[u8]]) -> Result<(), TxError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let i = self.conn_index(peer).ok_or(TxError::Closed(peer))?;
        let direct = len >= GATHER_DIRECT_BYTES_MIN
            && parts.len() <= ps_core::transport::GATHER_PARTS_MAX
            && len <= self.cfg.limits.frame_bytes_max + PREFIX_BYTES
            && self.conns[i].as_ref().is_some_and(|c| c.tx.pending() == 0);
        if !direct {
            let buf = self.frame(peer, len)?;
            copy_from(parts, 0, buf);
            return Ok(());
        }
        let mut written = 0;
        let conn = self.conns[i].as_mut().ok_or(TxError::Closed(peer))?;
        while written < len {
            let mut iov = [IoSlice::new(&[]); ps_core::transport::GATHER_PARTS_MAX];
            let (mut n, mut skip) = (0, written);
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                iov[n] = IoSlice::new(&p[skip..]);
                skip = 0;
                n += 1;
            }
            match conn.sock.write_vectored(&iov[..n]) {
                Ok(0) => break,
                Ok(k) => {
                    written += k;
                    self.stats.bytes_out += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.drop_conn(i, &format!("write error: {e}"), false);
                    return Err(TxError::Closed(peer));
                }
            }
        }
        if written < len {
            // the queue was empty, and one frame always fits in it
            let buf = conn.tx.reserve(len - written);
            copy_from(parts, written, buf);
        }
        Ok(())
    }
}

/// Frames below this are cheaper to copy into the queue than to `writev`.
const GATHER_DIRECT_BYTES_MIN: usize = 16 * 1024;

/// Copies the bytes of `parts` from offset `skip` on into `dst` (exactly).
fn copy_from(parts: &[&[u8]], mut skip: usize, dst: &mut [u8]) {
    let mut at = 0;
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let src = &p[skip..];
        skip = 0;
        dst[at..at + src.len()].copy_from_slice(src);
        at += src.len();
    }
    debug_assert_eq!(at, dst.len());
}

impl Transport for TcpTransport {
    type Rx = TcpRx;

    fn rx_burst(&mut self, out: &mut Vec<TcpRx>, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.expire_stalled();
        self.read_paused();
        if self.ready.is_empty() && self.events_out.is_empty() {
            self.poll_io(timeout)?;
            self.read_paused();
        } else {
            self.poll_io(Some(Duration::ZERO))?;
        }
        while let Some(f) = self.ready.pop_front() {
            if let Some(c) = self.conns.get_mut(f.peer.index as usize).and_then(|c| c.as_mut()) {
                c.queued = c.queued.saturating_sub(1);
            }
            out.push(f);
        }
        Ok(())
    }

    fn release(&mut self, rx: TcpRx) {
        if rx.small {
            self.small_pool.put(rx.buf);
        } else {
            self.large_pool.put(rx.buf);
        }
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        for i in 0..self.conns.len() {
            if self.conns[i].as_ref().is_some_and(|c| c.tx.pending() > 0) {
                self.flush_conn(i);
            }
        }
        Ok(())
    }

    fn events(&mut self, out: &mut Vec<PeerEvent>) {
        out.append(&mut self.events_out);
    }

    fn close(&mut self, peer: PeerId, reason: &str) {
        if let Some(i) = self.conn_index(peer) {
            self.flush_conn(i);
            self.drop_conn(i, reason, true);
        }
    }

    fn tx_pending_bytes(&self, peer: PeerId) -> usize {
        self.conn_index(peer).and_then(|i| self.conns[i].as_ref()).map_or(0, |c| c.tx.pending())
    }
}

fn kind_of(f: &Frame<'_>) -> Kind {
    match f {
        Frame::Challenge { .. } => Kind::Challenge,
        Frame::Hello { .. } => Kind::Hello,
        Frame::Welcome { .. } => Kind::Welcome,
        Frame::Data { h, .. } | Frame::Error { h, .. } => h.kind,
        Frame::Control(_) => Kind::Control,
    }
}

fn random_nonce() -> Result<[u8; NONCE_BYTES], String> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(|e| format!("the OS gave no random bytes: {e}"))?;
    Ok(n)
}

/// Reads one whole frame from a blocking socket (handshake only).
fn read_frame_blocking(s: &mut std::net::TcpStream, body_max: usize) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; 8];
    s.read_exact(&mut prefix)?;
    let p =
        wire::parse_prefix(&prefix, body_max).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut f = vec![0u8; p.frame_len];
    f[..8].copy_from_slice(&prefix);
    s.read_exact(&mut f[8..])?;
    Ok(f)
}

/// Fresh random bytes for a job secret.
pub fn generate_secret() -> Result<JobSecret, String> {
    let mut b = [0u8; ps_core::auth::SECRET_BYTES];
    getrandom::fill(&mut b).map_err(|e| format!("the OS gave no random bytes: {e}"))?;
    Ok(JobSecret::from_bytes(b))
}
