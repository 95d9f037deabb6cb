//! The datapath: reading a socket into pooled buffers and cutting frames out
//! of them, send queues and gathered sends, the event loop, and the
//! [`Transport`] implementation a shard or worker calls per burst.
//!
//! Every length prefix is checked before a byte of its body is buffered, and
//! nothing here allocates per frame once the pools are warm. It must never
//! admit a connection or skip the bounds (frames queued per connection, send
//! queue bytes, response room) that keep a peer from growing our memory.

use std::io::{self, IoSlice, Read, Write};
use std::time::{Duration, Instant};

use mio::Token;
use ps_core::limits;
use ps_core::transport::{FrameSink, PeerEvent, PeerId, Transport, TransportError, TxError};
use ps_core::wire::{self, PREFIX_BYTES};

use crate::config::{GATHER_DIRECT_BYTES_MIN, SMALL_FRAME_BYTES};
use crate::conn::{State, TcpRx};
use crate::transport::{TcpTransport, EXTRA, LISTENER, WAKER};

fn io_err(e: io::Error) -> TransportError {
    TransportError::Io(e.to_string())
}

impl TcpTransport {
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
                self.drop_conn(i, &why.to_string(), true);
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
    pub(crate) fn flush_conn(&mut self, i: usize) {
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
