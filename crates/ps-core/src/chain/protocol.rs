//! The replication protocol of one copy: a client binds to the head; the
//! head numbers each counted frame in its origin's stream, applies it and
//! forwards it; each copy applies what comes from upstream and passes it on;
//! the tail acknowledges, and acknowledgements travel back up the
//! forwarding log (`Down::log`), releasing the client's answers in order. A
//! frame sent again after a failover is answered again, never re-applied.
//!
//! Must never: answer a counted frame before its downstream acknowledged it,
//! apply a frame of an origin out of order, or grow the forwarding log past
//! `CHAIN_LOG_BYTES_MAX`.

use std::collections::VecDeque;

use crate::limits::CHAIN_LOG_BYTES_MAX;
use crate::shard::ShardError;
use crate::transport::{FrameSink, PeerId, TxError};
use crate::wire::{self, BindHeader, DataFrame, DataHeader, ForwardAck, ForwardHeader, Frame, Kind, WireError};

use super::frames::{client_frame, data_header, forward_frame, header_frame, pull_of, push_of};
use super::routing::virtual_peer;
use super::{is_counted, ChainCore};

/// Origins of clients that did not bind: above every worker rank, and apart
/// per server (`FRESH_ORIGIN_BASE | server << 20 | n`), so a new head never
/// hands out an origin an earlier head gave.
const FRESH_ORIGIN_BASE: u32 = 1 << 31;

/// What one connection is to this copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Conn {
    /// a client: its origin, and the number its next counted frame has
    Client { origin: u32, next_seq: u64 },
    /// the copy before this one in the chain
    Upstream,
}

/// What happens when the downstream acknowledges a forwarded frame.
#[derive(Debug)]
pub(super) enum Release {
    /// send this frame to this (real) connection, if it is still open
    Send(PeerId, Vec<u8>),
    /// serve the pull half of a push-pull of `origin` now that its push is on
    /// every copy (`frame` is the request, kind `Pull`)
    PullPart { origin: u32, frame: Vec<u8> },
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) origin: u32,
    pub(super) seq: u64,
    pub(super) frame: Vec<u8>,
    pub(super) release: Vec<Release>,
}

/// The link to the next live copy.
#[derive(Debug, Default)]
pub(super) struct Down {
    /// the server it should go to (`None`: this copy is the tail)
    pub(super) server: Option<u32>,
    /// the open link, once the server thread made it
    pub(super) peer: Option<PeerId>,
    /// forwarded, not yet acknowledged, in order
    pub(super) log: VecDeque<Entry>,
    pub(super) log_bytes: usize,
}

impl ChainCore {
    /// The link to `server`'s copy is open: everything not yet acknowledged
    /// goes down it again, in order.
    pub fn linked(&mut self, peer: PeerId, server: u32, tx: &mut dyn FrameSink) -> Result<(), TxError> {
        if self.down.server != Some(server) {
            // the view moved on while the server thread connected
            return Err(TxError::Closed(peer));
        }
        self.down.peer = Some(peer);
        for e in &self.down.log {
            tx.frame(peer, e.frame.len())?.copy_from_slice(&e.frame);
            self.stats.replayed += 1;
        }
        if !self.down.log.is_empty() {
            self.log.push(format!(
                "{}: linked to server {server}; sent it the {} frames not acknowledged yet",
                self.describe(),
                self.down.log.len()
            ));
        }
        Ok(())
    }

    pub(super) fn on_bind(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        let h = data_header(frame)?;
        if !self.is_head() {
            return Err(WireError::Control(format!(
                "{} is not the head of its chain (server {:?} is)",
                self.describe(),
                self.head()
            ))
            .into());
        }
        let bind = BindHeader::try_from(h)?;
        let origin = u32::try_from(bind.origin).map_err(|_| WireError::Overflow("origin"))?;
        if origin >= FRESH_ORIGIN_BASE {
            return Err(WireError::Control(format!("origin {origin} is reserved")).into());
        }
        if let Some(old) = self.clients.insert(origin, peer) {
            if old != peer {
                // the worker moved to a new connection: the old one answers no more
                self.conns.remove(&old);
                self.core.forget_connection(virtual_peer(origin));
            }
        }
        self.conns.insert(peer, Conn::Client { origin, next_seq: bind.next_counted });
        let ack = bind.ack();
        tx.frame(peer, ack.frame_len().expect("small"))?.copy_from_slice(&header_frame(ack));
        Ok(())
    }

    /// A counted frame `seq` of `origin` arrived (from a client or upstream):
    /// `Ok(true)` to apply it, `Ok(false)` if it was applied already.
    fn admit(&mut self, origin: u32, seq: u64) -> Result<bool, ShardError> {
        let n = self.applied.get(&origin).copied().unwrap_or(0);
        if seq > n {
            return Err(WireError::Control(format!(
                "{}: frame {seq} of origin {origin} arrived, but only {n} came before it (replication gap)",
                self.describe()
            ))
            .into());
        }
        if seq < n {
            self.stats.skipped += 1;
        }
        Ok(seq == n)
    }

    /// Attaches `r` to the log entry of (origin, seq) if it is still waiting
    /// for the downstream, else carries it out now.
    fn release_after(&mut self, origin: u32, seq: u64, r: Release, tx: &mut dyn FrameSink) {
        if let Some(e) = self.down.log.iter_mut().find(|e| e.origin == origin && e.seq == seq) {
            e.release.push(r);
        } else {
            self.release(vec![r], tx);
        }
    }

    pub(super) fn release(&mut self, rs: Vec<Release>, tx: &mut dyn FrameSink) {
        for r in rs {
            match r {
                Release::Send(peer, f) => {
                    // a connection that went meanwhile: its worker asks again elsewhere
                    if let Ok(buf) = tx.frame(peer, f.len()) {
                        buf.copy_from_slice(&f);
                    }
                }
                Release::PullPart { origin, frame } => {
                    // the request was checked when it came; a refusal is an error frame
                    let _ = self.routed(tx, None, |core, sink| core.handle(virtual_peer(origin), &frame, sink));
                }
            }
        }
    }

    /// Puts a frame in the log and sends it down the link (there is a downstream).
    fn forward(&mut self, origin: u32, seq: u64, inner: &[u8], release: Vec<Release>, tx: &mut dyn FrameSink) {
        let frame = forward_frame(origin, seq, inner);
        if let Some(p) = self.down.peer {
            // from the log's copy (TCP sends straight from it when it can)
            if tx.frame_gather(p, &[&frame]).is_err() {
                // the link is going: the frame goes again on the next one
                self.down.peer = None;
            }
        }
        self.stats.forwarded += 1;
        self.down.log_bytes += frame.len();
        self.down.log.push_back(Entry { origin, seq, frame, release });
    }

    /// A client's frame: served here if this copy is the head; counted ones
    /// are numbered, applied, forwarded, and answered once acknowledged.
    pub(super) fn on_client(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if !self.is_head() {
            return Err(WireError::Control(format!(
                "{} is not the head of its chain (server {:?} is): bind there",
                self.describe(),
                self.head()
            ))
            .into());
        }
        let conn = match self.conns.get(&peer) {
            Some(c) => *c,
            None => {
                // a client that did not bind (a tool, a benchmark): an origin of its own
                let origin = FRESH_ORIGIN_BASE | (self.me & 0x7ff) << 20 | (self.next_fresh & 0xf_ffff);
                self.next_fresh += 1;
                let c = Conn::Client { origin, next_seq: 0 };
                self.conns.insert(peer, c);
                self.clients.insert(origin, peer);
                c
            }
        };
        let Conn::Client { origin, next_seq } = conn else {
            return Err(WireError::Control("a copy upstream sent a client frame".into()).into());
        };
        // what came off the wire (the shard counts it), then the plain frame,
        // decoded once here and handed down to the shard
        let wire_bytes = frame.len();
        let plain;
        let frame = if wire::is_coded(frame) {
            plain = self.core.decode_coded(virtual_peer(origin), frame)?;
            &plain[..]
        } else {
            frame
        };
        let d = client_frame(frame, self.core.body_max())?;
        let kind = d.h.kind;
        let vpeer = virtual_peer(origin);
        if !is_counted(kind) {
            return self.routed(tx, None, |core, sink| core.handle_decoded(vpeer, wire_bytes, d, sink));
        }
        if self.down.log_bytes + frame.len() > CHAIN_LOG_BYTES_MAX {
            // not counted: the client sends it again when it binds anew
            return Err(WireError::Control(format!(
                "{}: {} bytes wait for the next copy's acknowledgement already; try again",
                self.describe(),
                self.down.log_bytes
            ))
            .into());
        }
        let seq = next_seq;
        self.conns.insert(peer, Conn::Client { origin, next_seq: seq + 1 });
        if !self.admit(origin, seq)? {
            // sent again after a failover: answer it again, without applying it
            let r = match kind {
                Kind::PushPull => Release::PullPart { origin, frame: pull_of(&d)? },
                _ => {
                    let h = d.h;
                    let ack = DataHeader {
                        kind: Kind::Ack,
                        dense: h.dense,
                        table: h.table,
                        sub: h.sub,
                        ts: h.ts,
                        a: h.a,
                        b: 0,
                    };
                    Release::Send(peer, header_frame(ack))
                }
            };
            self.release_after(origin, seq, r, tx);
            return Ok(());
        }
        let has_down = self.down.server.is_some();
        // what this copy applies and the next ones get: a push-pull's push
        // half when the pull must wait for them (`Release::PullPart`)
        let push_half = (kind == Kind::PushPull && has_down).then(|| push_of(frame));
        let applied = match push_half.as_deref() {
            // the same header and payload, as a push
            Some(bytes) => DataFrame { h: DataHeader { kind: Kind::Push, ..d.h }, bytes, ..d },
            None => d,
        };
        self.captured.clear();
        self.routed(tx, Some(origin), |core, sink| core.handle_decoded(vpeer, wire_bytes, applied, sink))?;
        *self.applied.entry(origin).or_default() += 1;
        let release: Vec<Release> = if kind == Kind::PushPull && has_down {
            // the push half's ack is not the client's answer: the pull half is, once replicated
            self.captured.clear();
            vec![Release::PullPart { origin, frame: pull_of(&d)? }]
        } else {
            self.captured.drain(..).map(|f| Release::Send(peer, f)).collect()
        };
        #[cfg(test)]
        let release = if super::planted::early_answer() && has_down {
            self.release(release, tx);
            Vec::new()
        } else {
            release
        };
        if has_down {
            self.forward(origin, seq, applied.bytes, release, tx);
        } else {
            self.release(release, tx);
            if self.shadow.is_some() {
                // what the next copies apply: a push-pull's push half
                let push = if kind == Kind::PushPull { push_of(frame) } else { frame.to_vec() };
                self.shadow_send(origin, seq, &push);
            }
        }
        Ok(())
    }

    /// A frame the copy before this one forwarded.
    pub(super) fn on_forward(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        if let Some(Conn::Client { .. }) = self.conns.get(&peer) {
            return Err(WireError::Control("a client sent a forwarded frame".into()).into());
        }
        if self.rebuild.is_some() {
            return Err(WireError::Control("a forwarded frame before the snapshot".into()).into());
        }
        self.conns.insert(peer, Conn::Upstream);
        let (h, inner) = match wire::decode(frame, frame.len())? {
            Frame::Data { h, vals, .. } if h.kind == Kind::Forward => (h, vals),
            _ => return Err(WireError::Unexpected(Kind::Forward).into()),
        };
        let fwd = ForwardHeader::try_from(h)?;
        let origin = u32::try_from(fwd.origin).map_err(|_| WireError::Overflow("origin"))?;
        let seq = fwd.number;
        let ack = header_frame(fwd.ack().header());
        // the inner frame, decoded once; a coded one (no copy forwards one)
        // goes to the shard as bytes, which undoes the coding
        let d = match wire::decode(inner, self.core.body_max())? {
            Frame::Data { h, keys, vals } if matches!(h.kind, Kind::Push | Kind::Clock) => {
                (!wire::is_coded(inner)).then_some(DataFrame { h, keys, vals, bytes: inner })
            }
            _ => return Err(WireError::Control("a forwarded frame must be a push or a clock".into()).into()),
        };
        if !self.admit(origin, seq)? {
            self.release_after(origin, seq, Release::Send(peer, ack), tx);
            return Ok(());
        }
        self.captured.clear();
        let vpeer = virtual_peer(origin);
        self.routed(tx, Some(origin), |core, sink| match d {
            Some(d) => core.handle_decoded(vpeer, inner.len(), d, sink),
            None => core.handle(vpeer, inner, sink),
        })?;
        // the head answers the client; what this copy would have said goes nowhere
        self.captured.clear();
        *self.applied.entry(origin).or_default() += 1;
        if self.down.server.is_some() {
            self.forward(origin, seq, inner, vec![Release::Send(peer, ack)], tx);
        } else {
            tx.frame(peer, ack.len())?.copy_from_slice(&ack);
            self.shadow_send(origin, seq, inner);
        }
        Ok(())
    }

    /// The downstream applied the oldest frame of the log.
    pub(super) fn on_down_ack(&mut self, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        let ack = ForwardAck::try_from(data_header(frame)?)?;
        let Some(e) = self.down.log.front() else {
            return Err(WireError::Control("an acknowledgement for nothing forwarded".into()).into());
        };
        if (e.origin as u64, e.seq) != (ack.origin, ack.number) {
            return Err(WireError::Control(format!(
                "the next copy acknowledged frame {} of origin {}, expected {} of {}",
                ack.number, ack.origin, e.seq, e.origin
            ))
            .into());
        }
        let e = self.down.log.pop_front().expect("looked at");
        self.down.log_bytes -= e.frame.len();
        self.release(e.release, tx);
        if let Some((id, left)) = self.catching_up.as_mut() {
            *left -= 1;
            if *left == 0 {
                self.caught_up = Some(*id);
                self.catching_up = None;
            }
        }
        Ok(())
    }

    /// The copies after this one are gone: it is the tail now, and every
    /// answer waiting in its log is released.
    pub(super) fn release_all(&mut self, tx: &mut dyn FrameSink) {
        // the tail now: what it holds is on every live copy
        let n = self.down.log.len();
        while let Some(e) = self.down.log.pop_front() {
            self.down.log_bytes -= e.frame.len();
            self.release(e.release, tx);
        }
        self.log.push(format!(
            "{}: the copies after it are gone; it is the tail now ({n} waiting answers released)",
            self.describe()
        ));
    }
}
