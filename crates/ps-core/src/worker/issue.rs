//! Issuing an operation: the push filters and the process cache get their
//! say, the operation is planned (`plan`), and its chunks go out as request
//! frames, one round per owner at a time, recorded as pending until their
//! answers come (`responses`).

use super::cached::CachedRead;
use super::responses::{Pending, PullOut};
use super::{key_iter, tx_error, Keys, OwnedKeys, Timestamp, WorkerCore};
use crate::cache::Lookup;
use crate::error::PsError;
use crate::filter::{has_codecs, PushFilter};
use crate::keys::{Key, TableId, TableSpec};
use crate::transport::{FrameSink, GATHER_PARTS_MAX};
use crate::wire::{self, DataHeader, Kind};

const ZEROS: [u8; 8] = [0; 8];

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
        let table = t.id;
        let n = match keys {
            Keys::List(k) => k.len() as u64,
            Keys::Range { count, .. } => count,
        };
        self.plan(&t, &keys);
        let dim = t.dim as usize;
        let dense = matches!(keys, Keys::Range { .. });
        let mut pull = out.map(|mut v| {
            // every value is overwritten by a response (or the op fails), so a
            // buffer of the right length is reused as it is: no memset per pull
            if v.len() != n as usize * dim {
                v.clear();
                v.resize(n as usize * dim, 0.0);
            }
            PullOut {
                vals: v,
                dim,
                base: match keys {
                    Keys::Range { first, .. } => (first - t.keys().begin) * dim as u64,
                    Keys::List(_) => 0,
                },
                subs: Vec::new(),
                ranges: Vec::new(),
            }
        });
        let mut read = None;
        let mut pushed = None;
        if let Some(cache) = self.caches.get_mut(&table) {
            let needed = t.consistency.needed(self.clocks).unwrap_or(0);
            if kind == Kind::Pull {
                let out = pull.as_mut().expect("a pull has its buffer");
                if let Lookup::Hit { stamp } = cache.lookup(key_iter(&keys), needed, &mut out.vals) {
                    cache.record(self.clocks, stamp);
                    self.pending.insert(ts, Pending::new(0, None, pull));
                    return Ok(ts);
                }
            }
            if kind != Kind::Pull {
                cache.push(key_iter(&keys), vals.expect("a push has values"));
                pushed = Some((table, OwnedKeys::of(&keys)));
            }
            if kind != Kind::Push {
                read = Some(CachedRead { table, keys: OwnedKeys::of(&keys), clock: self.clocks, stamp: u64::MAX });
            }
        }
        let base_float = pull.as_ref().map(|p| p.base).unwrap_or(match keys {
            Keys::Range { first, .. } => (first - t.keys().begin) * dim as u64,
            Keys::List(_) => 0,
        });
        // interleave: chunk i of every owner, then chunk i+1 ...
        let rounds = self.chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut sub = 0u32;
        let mut sent = 0u32;
        for i in 0..rounds {
            for g in 0..self.chunks.len() {
                let Some(c) = self.chunks[g].get(i) else { continue };
                let h = DataHeader { kind, dense, table: table.0, sub, ts, a: c.a, b: c.b };
                let mut len = h.frame_len().expect("chunk sizes are bounded");
                let peer = self.peers[c.owner.server as usize][c.owner.shard as usize];
                let content = wire::DATA_HEADER_BYTES
                    + if dense { 0 } else { c.a as usize * 8 }
                    + if kind == Kind::Pull { 0 } else { c.b as usize * 4 };
                let ranges = &self.chunk_ranges[c.ranges.clone()];
                let carries_vals = kind != Kind::Pull && vals.is_some();
                // gather the frame from the caller's slices: no copy on this side
                // when the transport can send from them
                let hdr = h.encode(len);
                let mut parts: [&[u8]; GATHER_PARTS_MAX] = [&[]; GATHER_PARTS_MAX];
                let need = 2 + if dense { 1 } else { ranges.len() * (1 + carries_vals as usize) };
                let coded = has_codecs(&t.filters) && !(dense && kind == Kind::Pull);
                let fill = |buf: &mut [u8]| {
                    buf[..wire::DATA_HEADER_BYTES].copy_from_slice(&hdr);
                    let mut at = wire::DATA_HEADER_BYTES;
                    if let (true, Some(v), true) = (dense, vals, carries_vals) {
                        let off = (c.a - base_float) as usize;
                        let src: &[u8] = bytemuck::cast_slice(&v[off..off + c.b as usize]);
                        crate::kernels::copy_bytes(&mut buf[at..at + src.len()], src);
                    } else if let Keys::List(k) = keys {
                        for r in ranges {
                            let src: &[u8] = bytemuck::cast_slice(&k[r.clone()]);
                            crate::kernels::copy_bytes(&mut buf[at..at + src.len()], src);
                            at += src.len();
                        }
                        if let (Some(v), true) = (vals, carries_vals) {
                            for r in ranges {
                                let src: &[u8] = bytemuck::cast_slice(&v[r.start * dim..r.end * dim]);
                                crate::kernels::copy_bytes(&mut buf[at..at + src.len()], src);
                                at += src.len();
                            }
                        }
                    }
                    buf[content..].fill(0);
                };
                let r = if coded || self.failover.is_some() {
                    let mut plain = vec![0u8; len];
                    fill(&mut plain);
                    let (wire, kept) = if coded {
                        let dim = t.dim as usize;
                        let f = match self.encoder.encode(peer, table, &t.filters, &plain, dim, !self.lossless) {
                            Ok(f) => f,
                            Err(e) => return Err(PsError::Transport(format!("filter coding: {e}"))),
                        };
                        // what the shard will apply, for sending again after a failover
                        let kept = match self.failover.as_mut() {
                            Some(fo) => Some(
                                fo.mirror
                                    .decode(peer, &f, fo.body_max)
                                    .map_err(|e| PsError::Transport(format!("filter coding: {e}")))?,
                            ),
                            None => None,
                        };
                        (f, kept)
                    } else {
                        (plain, None)
                    };
                    len = wire.len();
                    Self::send_owned(&mut self.failover, tx, g, peer, ts, sub, kind, wire, kept)
                } else if need <= GATHER_PARTS_MAX {
                    let mut n = 0;
                    macro_rules! put {
                        ($p:expr) => {{
                            parts[n] = $p;
                            n += 1;
                        }};
                    }
                    put!(&hdr[..]);
                    if dense {
                        if let (Some(v), true) = (vals, carries_vals) {
                            let off = (c.a - base_float) as usize;
                            put!(bytemuck::cast_slice(&v[off..off + c.b as usize]));
                        }
                    } else if let Keys::List(k) = keys {
                        for r in ranges {
                            put!(bytemuck::cast_slice(&k[r.clone()]));
                        }
                        if let (Some(v), true) = (vals, carries_vals) {
                            for r in ranges {
                                put!(bytemuck::cast_slice(&v[r.start * dim..r.end * dim]));
                            }
                        }
                    }
                    put!(&ZEROS[..len - content]);
                    tx.frame_gather(peer, &parts[..n])
                } else {
                    tx.frame(peer, len).map(fill)
                };
                if let Err(e) = r {
                    // frames already queued for this ts will be answered; account for them
                    let mut p = Pending::new(sent, Some(tx_error(e)), None);
                    p.pushed = pushed;
                    self.pending.insert(ts, p);
                    if sent == 0 {
                        self.settle(ts);
                    }
                    return Err(PsError::Transport("send queue refused a frame mid-request".into()));
                }
                self.bytes_sent += len as u64;
                if let (Some(p), false) = (pull.as_mut(), dense) {
                    let s = p.ranges.len();
                    p.ranges.extend_from_slice(ranges);
                    p.subs.push(s..p.ranges.len());
                }
                sub += 1;
                sent += 1;
            }
        }
        self.pending.insert(ts, Pending { frames_left: sent, error: None, pull, read, pushed });
        if sent == 0 {
            self.settle(ts);
        }
        Ok(ts)
    }
}
