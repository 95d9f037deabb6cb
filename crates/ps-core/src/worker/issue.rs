//! Issuing an operation: the push filters and the process cache get their
//! say, the operation is planned (`plan`), and its chunks go out as request
//! frames (`frames`), chunk i of every owner before chunk i+1 of any, each
//! recorded as pending until its answer comes (`responses`).
//!
//! A chunk's frame goes out one of two ways: gathered straight from the
//! caller's slices, or, when the table codes its frames or failover must keep
//! a copy, built in memory first (`send_in_memory`).

use std::ops::Range;

use super::frames::{ChunkFrame, Payload};
use super::plan::Chunk;
use super::responses::{Pending, PullOut};
use super::{key_iter, tx_error, Keys, Timestamp, WorkerCore};
use crate::error::PsError;
use crate::filter::{has_codecs, PushFilter};
use crate::keys::{Key, TableId};
use crate::table::TableSpec;
use crate::transport::{FrameSink, PeerId, TxError};
use crate::wire::{DataHeader, Kind, RequestHeader, Span};

/// One operation on its way out, as each of its chunks' frames needs it.
#[derive(Debug)]
struct Outgoing<'a> {
    ts: Timestamp,
    kind: Kind,
    table: &'a TableSpec,
    keys: Keys<'a>,
    /// the values the frames carry: none for a pull
    vals: Option<&'a [f32]>,
    /// dense: the flat float the operation starts at (0 for a key list)
    first_float: u64,
    /// the frames are coded by the table's filters
    coded: bool,
}

impl Outgoing<'_> {
    fn dense(&self) -> bool {
        matches!(self.keys, Keys::Range { .. })
    }

    /// What chunk `c`'s frame carries (`chunk_ranges`: the planned runs).
    fn payload<'s>(&'s self, c: &Chunk, chunk_ranges: &'s [Range<usize>]) -> Payload<'s> {
        match self.keys {
            Keys::Range { .. } => Payload::Dense {
                vals: self.vals.map(|v| {
                    let off = (c.a - self.first_float) as usize;
                    &v[off..off + c.b as usize]
                }),
            },
            Keys::List(keys) => Payload::Sparse {
                keys,
                ranges: &chunk_ranges[c.ranges.clone()],
                vals: self.vals,
                dim: self.table.dim as usize,
            },
        }
    }
}

/// Why an operation's frames stopped going out before the last.
#[derive(Debug)]
enum Stop {
    /// the table's filters could not code a frame
    Coding(PsError),
    /// the transport refused a frame
    Refused(TxError),
}

/// The flat float a dense operation starts at; 0 for a key list.
fn first_float(t: &TableSpec, keys: &Keys<'_>) -> u64 {
    match *keys {
        Keys::Range { first, .. } => (first - t.keys().begin) * t.dim as u64,
        Keys::List(_) => 0,
    }
}

fn key_count(keys: &Keys<'_>) -> u64 {
    match *keys {
        Keys::List(k) => k.len() as u64,
        Keys::Range { count, .. } => count,
    }
}

impl WorkerCore {
    /// Issues one operation. `kind` is Push, Pull or PushPull; `vals` is given for
    /// pushes; `out` (resized here) receives pulled values.
    pub fn issue(
        &mut self,
        tx: &mut dyn FrameSink,
        kind: Kind,
        table: TableId,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if self.pending.len() + self.deferred.len() >= self.in_flight_max {
            return Err(PsError::TooManyInFlight(self.pending.len() + self.deferred.len()));
        }
        let t = self.table(table)?.clone();
        Self::check_keys(&t, &keys, vals)?;
        let ts = self.next_ts;
        self.next_ts += 1;
        if let (Kind::Push, Some(filters), Some(v)) = (kind, self.push_filters.get_mut(&table), vals) {
            // the push filters choose what goes: on owned copies
            let mut k: Vec<Key> = key_iter(&keys).collect();
            let mut v = v.to_vec();
            for f in filters.iter_mut() {
                f.filter(&mut k, &mut v, t.dim as usize);
            }
            return self.issue_at(tx, ts, kind, &t, Keys::List(&k), Some(&v), out);
        }
        self.issue_at(tx, ts, kind, &t, keys, vals, out)
    }

    /// Adds a user's push filter to `table`, after the filters of its spec
    /// (the worker side only: a push filter changes what is pushed, not how
    /// it is coded, so the shards need not know it).
    pub fn add_push_filter(&mut self, table: TableId, filter: Box<dyn PushFilter>) -> Result<(), PsError> {
        self.table(table)?;
        self.push_filters.entry(table).or_default().push(filter);
        Ok(())
    }

    /// Pushes everything the filters of `table` held back (residuals of the
    /// push filters and of quantisation), with exact values: after it, the
    /// servers have every update pushed so far. Returns the pushes' timestamps.
    pub fn flush_filters(&mut self, tx: &mut dyn FrameSink, table: TableId) -> Result<Vec<Timestamp>, PsError> {
        let t = self.table(table)?.clone();
        let dim = t.dim as usize;
        let mut held: Vec<(Vec<Key>, Vec<f32>)> = Vec::new();
        if let Some(filters) = self.push_filters.get_mut(&table) {
            held.extend(filters.iter_mut().map(|f| f.flush(dim)));
        }
        held.push(self.encoder.flush(table, dim));
        let mut out = Vec::new();
        for (k, v) in held.into_iter().filter(|(k, _)| !k.is_empty()) {
            let ts = self.next_ts;
            self.next_ts += 1;
            self.lossless = true;
            let r = self.issue_at(tx, ts, Kind::Push, &t, Keys::List(&k), Some(&v), None);
            self.lossless = false;
            out.push(r?);
        }
        Ok(out)
    }

    /// Sends an operation already checked and numbered `ts`: a pull the
    /// process cache answers in full ends here; otherwise every chunk goes
    /// out and the operation is pending until each has its answer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn issue_at(
        &mut self,
        tx: &mut dyn FrameSink,
        ts: Timestamp,
        kind: Kind,
        t: &TableSpec,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        let t = t.clone();
        self.plan(&t, &keys);
        let first_float = first_float(&t, &keys);
        let mut pull = out.map(|v| PullOut::new(v, key_count(&keys), t.dim as usize, first_float));
        if self.read_from_cache(kind, &t, &keys, &mut pull) {
            self.pending.insert(ts, Pending::new(0, None, pull));
            return Ok(ts);
        }
        let (read, pushed) = self.note_in_cache(kind, &t, &keys, vals);
        let coded = has_codecs(&t.filters) && !(matches!(keys, Keys::Range { .. }) && kind == Kind::Pull);
        let vals = vals.filter(|_| kind != Kind::Pull);
        let op = Outgoing { ts, kind, table: &t, keys, vals, first_float, coded };
        let (sent, stopped) = self.send_chunks(tx, &op, &mut pull);
        match stopped {
            None => {}
            Some(Stop::Coding(e)) => return Err(e),
            Some(Stop::Refused(e)) => {
                // frames already queued for this ts will be answered; account for them
                let why = format!("frame {sent} of the request refused: {e}");
                let mut p = Pending::new(sent, Some(tx_error(e)), None);
                p.pushed = pushed;
                self.pending.insert(ts, p);
                if sent == 0 {
                    self.settle(ts);
                }
                return Err(PsError::Transport(why));
            }
        }
        self.pending.insert(ts, Pending { frames_left: sent, error: None, pull, read, pushed });
        if sent == 0 {
            self.settle(ts);
        }
        Ok(ts)
    }

    /// Sends the planned chunks of `op`, chunk i of every owner before chunk
    /// i+1 of any, numbering the frames (`sub`) in the order they go; a
    /// sparse pull learns which keys each frame's answer holds. Returns the
    /// frames sent, and why the rest did not go if they did not.
    fn send_chunks(
        &mut self,
        tx: &mut dyn FrameSink,
        op: &Outgoing<'_>,
        pull: &mut Option<PullOut>,
    ) -> (u32, Option<Stop>) {
        let rounds = self.chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut sent = 0u32;
        for i in 0..rounds {
            for g in 0..self.chunks.len() {
                let Some(c) = self.chunks[g].get(i).cloned() else { continue };
                match self.send_chunk(tx, op, g, sent, &c) {
                    Ok(len) => self.bytes_sent += len as u64,
                    Err(stop) => return (sent, Some(stop)),
                }
                if let (Some(p), false) = (pull.as_mut(), op.dense()) {
                    p.expect_sub(&self.chunk_ranges[c.ranges]);
                }
                sent += 1;
            }
        }
        (sent, None)
    }

    /// Sends chunk `c` of `op` to flat owner `g` as frame `sub`; returns the
    /// bytes that went on the wire.
    fn send_chunk(
        &mut self,
        tx: &mut dyn FrameSink,
        op: &Outgoing<'_>,
        g: usize,
        sub: u32,
        c: &Chunk,
    ) -> Result<usize, Stop> {
        let span = if op.dense() { Span::Dense { first_float: c.a } } else { Span::Sparse { keys: c.a } };
        let h = RequestHeader { kind: op.kind, table: op.table.id.0, sub, ts: op.ts, span, values: c.b }.header();
        let peer = self.peers[c.owner.server as usize][c.owner.shard as usize];
        let frame = ChunkFrame::new(&h, op.payload(c, &self.chunk_ranges));
        if !op.coded && self.failover.is_none() {
            // gathered from the caller's slices: no copy on this side when
            // the transport can send from them
            return frame.send(tx, peer).map(|()| frame.len()).map_err(Stop::Refused);
        }
        let mut plain = vec![0u8; frame.len()];
        frame.write(&mut plain);
        self.send_in_memory(tx, op, g, peer, &h, plain)
    }

    /// Sends a chunk's frame built in memory (`plain`): coded by the table's
    /// filters if it has codecs, and with failover on kept until answered
    /// (as the shard will apply it). Returns the bytes that went on the wire.
    fn send_in_memory(
        &mut self,
        tx: &mut dyn FrameSink,
        op: &Outgoing<'_>,
        g: usize,
        peer: PeerId,
        h: &DataHeader,
        plain: Vec<u8>,
    ) -> Result<usize, Stop> {
        let (wire, kept) = if op.coded { self.encode_chunk(op, peer, plain)? } else { (plain, None) };
        let len = wire.len();
        Self::send_owned(&mut self.failover, tx, g, peer, h.ts, h.sub, h.kind, wire, kept).map_err(Stop::Refused)?;
        Ok(len)
    }

    /// Codes `plain` by the table's filters for `peer`; with failover on,
    /// also what the shard will apply, for sending again after a failover.
    fn encode_chunk(
        &mut self,
        op: &Outgoing<'_>,
        peer: PeerId,
        plain: Vec<u8>,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), Stop> {
        let coding = |e: crate::wire::WireError| Stop::Coding(PsError::Transport(format!("filter coding: {e}")));
        let t = op.table;
        let f = self.encoder.encode(peer, t.id, &t.filters, &plain, t.dim as usize, !self.lossless).map_err(coding)?;
        let kept = match self.failover.as_mut() {
            Some(fo) => Some(fo.mirror.decode(peer, &f, fo.body_max).map_err(coding)?),
            None => None,
        };
        Ok((f, kept))
    }
}
