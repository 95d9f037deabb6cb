//! The control path: listening and accepting, connecting, the authenticated
//! handshake (challenge, `Hello` with the HMAC of the job secret, welcome),
//! dropping a connection, and expiring handshakes and stalled peers.
//!
//! Runs once per connection, not per frame. It must never let a peer that has
//! not proved the job secret reach the frames a transport lends out, and never
//! panic on what a peer sends.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::Interest;
use ps_core::auth::JobSecret;
use ps_core::limits;
use ps_core::transport::{PeerEvent, PeerHello, PeerId};
use ps_core::wire::{self, Frame, Kind, NONCE_BYTES};

use crate::buf::{AlignedBuf, TxQueue};
use crate::config::TcpConfig;
use crate::conn::{Conn, State};
use crate::transport::{TcpTransport, LISTENER};

/// A failed outgoing connection, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection itself failed: check that the node runs and listens at `addr`.
    #[error("cannot connect to {addr}: {err} (is the node running and listening there?)")]
    Connect {
        /// where we tried to connect
        addr: SocketAddr,
        /// what the OS said
        err: io::Error,
    },
    /// The peer answered but the handshake failed: most often a different job
    /// secret, or something else listening on that port.
    #[error("handshake with {addr} failed: {why}")]
    Handshake {
        /// the peer
        addr: SocketAddr,
        /// what went wrong
        why: String,
    },
}

/// Why an incoming connection's handshake was refused; the connection is
/// dropped with this as the reason.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    /// A second `Hello` on a connection that already passed the handshake.
    #[error("handshake twice (a second Hello on an open connection: a broken or hostile peer)")]
    Twice,
    /// The first frame was not a `Hello`: not a pslab client, or another version.
    #[error("handshake failed: expected Hello, got {0:?}")]
    NotHello(Kind),
    /// The first frame does not decode (the wire format's reason).
    #[error("handshake failed: {0}")]
    Decode(String),
    /// The client's MAC does not verify: it does not hold this job's secret.
    #[error("handshake failed: bad MAC (a process without this job's secret)")]
    BadMac,
}

/// The OS could not give random bytes (for a job secret or a handshake nonce).
#[derive(Debug, thiserror::Error)]
#[error("the OS gave no random bytes: {0} (is /dev/urandom readable, or getrandom(2) allowed?)")]
pub struct RandomError(getrandom::Error);

impl TcpTransport {
    /// A transport listening on `addr` (port 0: any free port; see `local_addr`).
    pub fn listen(cfg: TcpConfig, addr: SocketAddr) -> io::Result<Self> {
        let mut t = Self::client(cfg)?;
        let mut l = TcpListener::bind(addr)?;
        t.poll.registry().register(&mut l, LISTENER, Interest::READABLE)?;
        t.listener = Some(l);
        Ok(t)
    }

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
        let nc = random_nonce().map_err(|e| hs(e.to_string()))?;
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

    pub(crate) fn accept_all(&mut self) {
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
    pub(crate) fn on_hello(&mut self, i: usize, frame: &[u8]) -> Result<(), HelloError> {
        let conn = self.conns[i].as_mut().expect("live conn");
        let State::Challenged { nonce: ns, .. } = conn.state else { return Err(HelloError::Twice) };
        let (role, node, nc, mac) = match wire::decode(frame, wire::HANDSHAKE_BODY_MAX) {
            Ok(Frame::Hello { role, node, nonce, mac }) => (role, node, *nonce, *mac),
            Ok(other) => return Err(HelloError::NotHello(kind_of(&other))),
            Err(e) => return Err(HelloError::Decode(e.to_string())),
        };
        if !self.cfg.secret.verify_client(&ns, &nc, role, node, &mac) {
            return Err(HelloError::BadMac);
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

    pub(crate) fn drop_conn(&mut self, i: usize, reason: &str, bad: bool) {
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
    pub(crate) fn expire_stalled(&mut self) {
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

    /// Who `peer` proved to be in its handshake (listener side).
    pub fn peer_hello(&self, peer: PeerId) -> Option<PeerHello> {
        let i = self.conn_index(peer)?;
        match self.conns[i].as_ref()?.state {
            State::Open { hello } => Some(hello),
            State::Challenged { .. } => None,
        }
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

fn random_nonce() -> Result<[u8; NONCE_BYTES], RandomError> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(RandomError)?;
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
pub fn generate_secret() -> Result<JobSecret, RandomError> {
    let mut b = [0u8; ps_core::auth::SECRET_BYTES];
    getrandom::fill(&mut b).map_err(RandomError)?;
    Ok(JobSecret::from_bytes(b))
}
