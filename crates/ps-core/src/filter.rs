//! Filters: what a table's traffic goes through to cost fewer bytes (OSDI
//! 2014 §3.5). Declared per table in the job spec ([`FilterSpec`], applied in
//! the order given), so worker and shard agree on them. Two kinds:
//!
//! - **push filters** ([`PushFilter`], a trait users implement too) run on the
//!   worker before a push is encoded and choose what is sent:
//!   significantly-modified (send a value once it has moved more than a
//!   threshold) and random skip. Neither loses an update: what is not sent is
//!   kept as a residual and added to the key's next push, and
//!   `WorkerCore::flush_filters` sends every residual left (call it before the
//!   job's last clock);
//! - **codecs** change how a request frame is written, and the shard undoes
//!   them before anything else looks at the frame ([`Decoder`]):
//!   key caching (a key list sent before on this connection goes as its 64-bit
//!   hash; both ends keep the same bounded FIFO of lists, so the sender knows
//!   what the receiver holds), fixed-point quantisation of values to 8 or 16
//!   bits with unbiased stochastic rounding (the rounding error is kept as a
//!   residual like a push filter's), and LZ4 compression of the whole payload.
//!
//! A coded frame is a data frame with `FLAG_CODED` whose header keeps the
//! logical counts (`a` keys, `b` values) and whose payload is:
//!
//! ```text
//!  0 u8  what: 1 keys by hash, 2 remember these keys, 4 values quantised, 8 lz4
//!  1 u8  bits of a quantised value (8 or 16)
//!  2 u16 0
//!  4 u32 body bytes (after decompression)
//!  8 u32 stored bytes (the body, or its LZ4 block)
//! 12 u32 0
//! 16     body, or its LZ4 block: [u64 hash | a x u64 keys | nothing (dense)]
//!        then [dim x f32 scale (one per value column), b x i8/i16 | b x f32]
//! ```
//!
//! Pull requests of key lists use key caching too; responses are not coded.
//! Dense range pushes are not quantised (they carry no keys to keep residuals
//! by). The sender remembers a key list when it codes the frame: a frame the
//! transport then refuses leaves the two FIFOs apart, and the next list sent
//! by hash is refused by the shard, which drops the connection (a refused
//! frame already fails the worker's request and means the connection is
//! going).
//! Coded frames travel through both transports unchanged (over RDMA, pushes
//! are ring frames; a coded pull is never served by a one-sided READ).

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::keys::{Key, TableId};
use crate::limits::{KEY_CACHE_BYTES_MAX, KEY_CACHE_LISTS_MAX};
use crate::rng::{mix64, SplitMix64};
use crate::transport::PeerId;
use crate::wire::{self, DataHeader, Kind, WireError, DATA_HEADER_BYTES};

/// A table's filter, as the job spec names it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "filter")]
pub enum FilterSpec {
    /// A key list sent before on the connection goes as its hash.
    KeyCache,
    /// LZ4 over the whole payload.
    Lz4,
    /// Values as `bits`-bit fixed point (8 or 16), stochastic rounding, residual kept.
    Quantize {
        /// bits of a coded value: 8 or 16
        bits: u8,
    },
    /// Send a value once the sum not yet sent moved more than `threshold`.
    SignificantlyModified {
        /// a key's values go once any of them (residual included) is above
        /// it in magnitude (>= 0)
        threshold: f32,
    },
    /// Hold back each value with probability `p` (seeded), residual kept.
    RandomSkip {
        /// chance that a key's values are held back from one push, in [0, 1)
        p: f32,
        /// seeds the draws, mixed with the table id (not the worker's rank)
        seed: u64,
    },
}

impl FilterSpec {
    /// Checks the parameters; the error names the filter and what it needs.
    pub fn validate(&self) -> Result<(), FilterError> {
        match *self {
            FilterSpec::Quantize { bits } if bits != 8 && bits != 16 => Err(FilterError::QuantizeBits(bits)),
            FilterSpec::SignificantlyModified { threshold } if !(threshold.is_finite() && threshold >= 0.0) => {
                Err(FilterError::Threshold(threshold))
            }
            FilterSpec::RandomSkip { p, .. } if !(0.0..1.0).contains(&p) => Err(FilterError::SkipChance(p)),
            _ => Ok(()),
        }
    }

    fn is_codec(&self) -> bool {
        matches!(self, FilterSpec::KeyCache | FilterSpec::Lz4 | FilterSpec::Quantize { .. })
    }
}

/// A filter's parameter out of range (see [`FilterSpec::validate`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FilterError {
    /// `quantize` takes 8 or 16 bits (the bits given).
    #[error("quantize: bits must be 8 or 16, got {0}")]
    QuantizeBits(u8),
    /// `significantly_modified` needs a threshold of zero or above (the one given).
    #[error("significantly_modified: threshold must be zero or positive, got {0}")]
    Threshold(f32),
    /// `random_skip` needs a chance in [0, 1) (the one given).
    #[error("random_skip: p must be in [0, 1), got {0}")]
    SkipChance(f32),
}

/// A filter on the push path, run on the worker before the push is encoded
/// (built-ins from the table spec; yours with `WorkerCore::add_push_filter`).
/// It may drop entries and change values of `keys` (ascending, kept
/// ascending) with `dim` values each; what it drops it should keep and send
/// later ([`PushFilter::flush`]), so no update is lost.
pub trait PushFilter: Send + std::fmt::Debug {
    /// The filter's name, for logs (a built-in's is its spec's name).
    fn name(&self) -> &str;
    /// Filters one push in place: `keys` ascending, `vals` `dim` per key.
    fn filter(&mut self, keys: &mut Vec<Key>, vals: &mut Vec<f32>, dim: usize);
    /// Everything held back, to be pushed as it is (keys ascending).
    fn flush(&mut self, dim: usize) -> (Vec<Key>, Vec<f32>);
}

/// Values held back per key, added to the key's next push.
#[derive(Debug, Default)]
pub struct Residuals {
    held: HashMap<Key, Vec<f32>>,
}

impl Residuals {
    /// Adds what is held for `key` into `v` and forgets it.
    pub fn take_into(&mut self, key: Key, v: &mut [f32]) {
        if let Some(r) = self.held.remove(&key) {
            v.iter_mut().zip(r).for_each(|(v, r)| *v += r);
        }
    }

    /// Adds `v` to what is held for `key` (an all-zero `v` is not kept).
    pub fn keep(&mut self, key: Key, v: &[f32]) {
        if v.iter().any(|&x| x != 0.0) {
            let r = self.held.entry(key).or_insert_with(|| vec![0.0; v.len()]);
            r.iter_mut().zip(v).for_each(|(r, v)| *r += v);
        }
    }

    /// Everything held, keys ascending with `dim` values each, and forgets it.
    pub fn flush(&mut self, dim: usize) -> (Vec<Key>, Vec<f32>) {
        let mut held: Vec<(Key, Vec<f32>)> = self.held.drain().collect();
        held.sort_unstable_by_key(|(k, _)| *k);
        let keys = held.iter().map(|(k, _)| *k).collect();
        let vals = held.into_iter().flat_map(|(_, v)| v.into_iter().chain(std::iter::repeat(0.0)).take(dim)).collect();
        (keys, vals)
    }

    /// Number of keys with something held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Keeps only entries whose residual-included value moved more than `threshold`.
fn sparsify(
    res: &mut Residuals,
    keys: &mut Vec<Key>,
    vals: &mut Vec<f32>,
    dim: usize,
    mut send: impl FnMut(&[f32]) -> bool,
) {
    let mut out = 0;
    for i in 0..keys.len() {
        let mut v: Vec<f32> = vals[i * dim..(i + 1) * dim].to_vec();
        res.take_into(keys[i], &mut v);
        if send(&v) {
            keys[out] = keys[i];
            vals[out * dim..(out + 1) * dim].copy_from_slice(&v);
            out += 1;
        } else {
            res.keep(keys[i], &v);
        }
    }
    keys.truncate(out);
    vals.truncate(out * dim);
}

/// The significantly-modified filter.
#[derive(Debug)]
pub struct SignificantlyModified {
    /// see [`FilterSpec::SignificantlyModified`]
    pub threshold: f32,
    /// what was held back, per key
    pub residuals: Residuals,
}

impl PushFilter for SignificantlyModified {
    fn name(&self) -> &str {
        "significantly_modified"
    }
    fn filter(&mut self, keys: &mut Vec<Key>, vals: &mut Vec<f32>, dim: usize) {
        let t = self.threshold;
        sparsify(&mut self.residuals, keys, vals, dim, |v| v.iter().any(|x| x.abs() > t));
    }
    fn flush(&mut self, dim: usize) -> (Vec<Key>, Vec<f32>) {
        self.residuals.flush(dim)
    }
}

/// The random-skip filter.
#[derive(Debug)]
pub struct RandomSkip {
    /// chance that a key is held back from one push, in [0, 1)
    pub p: f32,
    /// draws one number per key per push
    pub rng: SplitMix64,
    /// what was held back, per key
    pub residuals: Residuals,
}

impl PushFilter for RandomSkip {
    fn name(&self) -> &str {
        "random_skip"
    }
    fn filter(&mut self, keys: &mut Vec<Key>, vals: &mut Vec<f32>, dim: usize) {
        let (p, rng) = (self.p as f64, &mut self.rng);
        sparsify(&mut self.residuals, keys, vals, dim, |_| rng.next_f64() >= p);
    }
    fn flush(&mut self, dim: usize) -> (Vec<Key>, Vec<f32>) {
        self.residuals.flush(dim)
    }
}

/// The push filters of a table's spec, built.
pub fn push_filters(specs: &[FilterSpec], table: TableId) -> Vec<Box<dyn PushFilter>> {
    specs
        .iter()
        .filter_map(|s| -> Option<Box<dyn PushFilter>> {
            match *s {
                FilterSpec::SignificantlyModified { threshold } => {
                    Some(Box::new(SignificantlyModified { threshold, residuals: Residuals::default() }))
                }
                FilterSpec::RandomSkip { p, seed } => Some(Box::new(RandomSkip {
                    p,
                    rng: SplitMix64::new(mix64(seed ^ (table.0 as u64) << 32)),
                    residuals: Residuals::default(),
                })),
                _ => None,
            }
        })
        .collect()
}

/// The 64-bit hash a key list is cached under (count included).
pub fn key_list_hash(keys: &[u8]) -> u64 {
    let mut h = mix64(keys.len() as u64 ^ 0x6b65_795f_6c69_7374);
    for c in keys.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = mix64(h ^ u64::from_le_bytes(w)).rotate_left(23) ^ h;
    }
    mix64(h)
}

/// One end's copy of the key lists a connection has remembered for a table:
/// the same FIFO on both ends, evicted by count and bytes.
#[derive(Debug, Default)]
struct KeyLists {
    order: VecDeque<(u64, usize)>,
    bytes: usize,
    lists: HashMap<u64, Vec<u8>>,
    hashes: HashSet<u64>,
}

impl KeyLists {
    /// Remembers a list; `keep_bytes` says whether to keep its bytes (the receiver) or only its hash (the sender).
    fn remember(&mut self, hash: u64, keys: &[u8], keep_bytes: bool) {
        if !self.hashes.insert(hash) {
            return;
        }
        self.order.push_back((hash, keys.len()));
        self.bytes += keys.len();
        if keep_bytes {
            self.lists.insert(hash, keys.to_vec());
        }
        while self.order.len() > KEY_CACHE_LISTS_MAX || self.bytes > KEY_CACHE_BYTES_MAX {
            let (h, n) = self.order.pop_front().expect("not empty");
            self.bytes -= n;
            self.hashes.remove(&h);
            self.lists.remove(&h);
        }
    }
}

/// Whether a frame's key list is small enough to be worth remembering.
fn cacheable(keys: &[u8]) -> bool {
    keys.len() >= 64 && keys.len() <= KEY_CACHE_BYTES_MAX / 4
}

/// The worker's side: encodes request frames of tables with codecs.
#[derive(Debug, Default)]
pub struct Encoder {
    sent: HashMap<(PeerId, TableId), KeyLists>,
    /// per table: quantisation residuals and the rounding stream
    quant: HashMap<TableId, (Residuals, SplitMix64)>,
}

const WHAT_HASH: u8 = 1;
const WHAT_REMEMBER: u8 = 2;
const WHAT_QUANT: u8 = 4;
const WHAT_LZ4: u8 = 8;
const CODED_HEAD: usize = 16;

/// Whether a table's spec has codecs (its requests are coded).
pub fn has_codecs(specs: &[FilterSpec]) -> bool {
    specs.iter().any(FilterSpec::is_codec)
}

impl Encoder {
    /// A connection closed: the key lists it was sent are gone with the
    /// shard's side of it, so the next frames send them whole again.
    pub fn forget(&mut self, peer: PeerId) {
        self.sent.retain(|(p, _), _| *p != peer);
    }

    /// Encodes the plain frame `plain` (a Push, Pull or PushPull of `table`
    /// for `peer`, values `dim` per key) by `specs`. `lossy` false sends
    /// values exactly (a flush of residuals).
    pub fn encode(
        &mut self,
        peer: PeerId,
        table: TableId,
        specs: &[FilterSpec],
        plain: &[u8],
        dim: usize,
        lossy: bool,
    ) -> Result<Vec<u8>, WireError> {
        let wire::Frame::Data { h, keys, vals } = wire::decode(plain, usize::MAX >> 1)? else {
            return Err(WireError::Unexpected(Kind::Control));
        };
        let mut what = 0u8;
        let mut body = Vec::with_capacity(keys.len() + vals.len() + 8);
        if specs.contains(&FilterSpec::KeyCache) && cacheable(keys) {
            let hash = key_list_hash(keys);
            let lists = self.sent.entry((peer, table)).or_default();
            if lists.hashes.contains(&hash) {
                what |= WHAT_HASH;
                body.extend_from_slice(&hash.to_le_bytes());
            } else {
                what |= WHAT_REMEMBER;
                lists.remember(hash, keys, false);
                body.extend_from_slice(keys);
            }
        } else {
            body.extend_from_slice(keys);
        }
        let bits = specs.iter().find_map(|s| match s {
            FilterSpec::Quantize { bits } => Some(*bits),
            _ => None,
        });
        match bits {
            Some(bits) if lossy && !vals.is_empty() && !h.dense => {
                what |= WHAT_QUANT;
                let (res, rng) = self
                    .quant
                    .entry(table)
                    .or_insert_with(|| (Residuals::default(), SplitMix64::new(mix64(0x7175_616e ^ table.0 as u64))));
                let mut v = vec![0f32; vals.len() / 4];
                wire::copy_vals(&mut v, vals);
                let klist: Vec<Key> =
                    keys.chunks_exact(8).map(|k| u64::from_le_bytes(k.try_into().expect("8"))).collect();
                for (i, &k) in klist.iter().enumerate() {
                    res.take_into(k, &mut v[i * dim..(i + 1) * dim]);
                }
                // one scale per value column (a key's j-th value): columns
                // differ in size (a gradient beside a curvature)
                let levels = if bits == 8 { 127.0 } else { 32767.0 };
                let scales: Vec<f32> = (0..dim)
                    .map(|j| {
                        let max = v.iter().skip(j).step_by(dim).fold(0f32, |m, x| m.max(x.abs()));
                        if max > 0.0 && max.is_finite() {
                            max / levels
                        } else {
                            1.0
                        }
                    })
                    .collect();
                scales.iter().for_each(|s| body.extend_from_slice(&s.to_le_bytes()));
                let mut err = vec![0f32; dim];
                for (i, &k) in klist.iter().enumerate() {
                    for j in 0..dim {
                        let x = v[i * dim + j] / scales[j];
                        // unbiased: round up with probability frac(x)
                        let q = (x.floor() + (rng.next_f64() < (x - x.floor()) as f64) as i32 as f32)
                            .clamp(-levels, levels);
                        err[j] = v[i * dim + j] - q * scales[j];
                        if bits == 8 {
                            body.push(q as i8 as u8);
                        } else {
                            body.extend_from_slice(&(q as i16).to_le_bytes());
                        }
                    }
                    res.keep(k, &err);
                }
            }
            _ => body.extend_from_slice(vals),
        }
        let body_len = body.len();
        if specs.contains(&FilterSpec::Lz4) {
            let packed = lz4_flex::block::compress(&body);
            if packed.len() < body.len() {
                what |= WHAT_LZ4;
                body = packed;
            }
        }
        let hdr = DataHeader { kind: h.kind, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: h.b };
        let len = (DATA_HEADER_BYTES + CODED_HEAD + body.len()).next_multiple_of(8);
        let mut f = vec![0u8; len];
        f[..DATA_HEADER_BYTES].copy_from_slice(&hdr.encode(len));
        wire::mark_coded(&mut f);
        f[DATA_HEADER_BYTES] = what;
        f[DATA_HEADER_BYTES + 1] = bits.unwrap_or(0);
        f[DATA_HEADER_BYTES + 4..DATA_HEADER_BYTES + 8].copy_from_slice(&(body_len as u32).to_le_bytes());
        f[DATA_HEADER_BYTES + 8..DATA_HEADER_BYTES + 12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        f[DATA_HEADER_BYTES + CODED_HEAD..DATA_HEADER_BYTES + CODED_HEAD + body.len()].copy_from_slice(&body);
        Ok(f)
    }

    /// Quantisation residuals of `table` left to send.
    pub fn flush(&mut self, table: TableId, dim: usize) -> (Vec<Key>, Vec<f32>) {
        self.quant.get_mut(&table).map(|(r, _)| r.flush(dim)).unwrap_or_default()
    }
}

/// Whether `frame` (at least a prefix) is coded.
pub fn is_coded(frame: &[u8]) -> bool {
    wire::is_coded(frame)
}

/// The shard's side: turns coded frames back into plain ones, per connection.
#[derive(Debug, Default)]
pub struct Decoder {
    lists: HashMap<(PeerId, TableId), KeyLists>,
}

impl Decoder {
    /// The plain frame a coded `frame` from `peer` stands for. Every count is
    /// checked against `body_max` before anything is allocated; an `Err`
    /// means drop the connection.
    pub fn decode(&mut self, peer: PeerId, frame: &[u8], body_max: usize) -> Result<Vec<u8>, WireError> {
        let short = |need| WireError::Short { kind: Kind::Push, len: frame.len(), need };
        let p = wire::parse_prefix(frame.get(..8).ok_or(short(8))?.try_into().expect("8"), body_max)?;
        if p.frame_len != frame.len() {
            return Err(short(p.frame_len));
        }
        if !matches!(p.kind, Kind::Push | Kind::Pull | Kind::PushPull) {
            return Err(WireError::Unexpected(p.kind));
        }
        if frame.len() < DATA_HEADER_BYTES + CODED_HEAD {
            return Err(short(DATA_HEADER_BYTES + CODED_HEAD));
        }
        // the prefix parsed, the header present: the plain frame's header
        let h = wire::peek_header(frame).ok_or(short(DATA_HEADER_BYTES))?;
        let c = &frame[DATA_HEADER_BYTES..];
        let (what, bits) = (c[0], c[1]);
        let body_len = u32::from_le_bytes(c[4..8].try_into().expect("4")) as usize;
        if body_len > body_max {
            return Err(WireError::TooLong { len: body_len, max: body_max });
        }
        let (kb, vb) = h.payload_parts().ok_or(WireError::Overflow("payload counts"))?;
        let plain_len = DATA_HEADER_BYTES
            .checked_add(kb)
            .and_then(|x| x.checked_add(vb))
            .ok_or(WireError::Overflow("payload counts"))?;
        if plain_len > body_max + 8 {
            return Err(WireError::TooLong { len: plain_len, max: body_max });
        }
        let stored = u32::from_le_bytes(c[8..12].try_into().expect("4")) as usize;
        let packed = c[CODED_HEAD..].get(..stored).ok_or(short(DATA_HEADER_BYTES + CODED_HEAD + stored))?;
        if c.len() - CODED_HEAD - stored >= 8 {
            return Err(WireError::Trailing { kind: h.kind, extra: c.len() - CODED_HEAD - stored });
        }
        let body: std::borrow::Cow<[u8]> = if what & WHAT_LZ4 != 0 {
            let mut out = vec![0u8; body_len];
            let n = lz4_flex::block::decompress_into(packed, &mut out).map_err(|_| WireError::Overflow("lz4 block"))?;
            if n != body_len {
                return Err(WireError::Overflow("lz4 block length"));
            }
            out.into()
        } else {
            if stored != body_len {
                return Err(WireError::Overflow("stored and body lengths differ without lz4"));
            }
            packed.into()
        };
        let table = TableId(h.table);
        let mut at = 0usize;
        let take = |at: &mut usize, n: usize| -> Result<&[u8], WireError> {
            let s = body
                .get(*at..at.checked_add(n).ok_or(WireError::Overflow("coded body"))?)
                .ok_or(WireError::Overflow("coded body"))?;
            *at += n;
            Ok(s)
        };
        let keys: Vec<u8> = if what & WHAT_HASH != 0 {
            let hash = u64::from_le_bytes(take(&mut at, 8)?.try_into().expect("8"));
            let list = self.lists.get(&(peer, table)).and_then(|l| l.lists.get(&hash));
            let list =
                list.ok_or(WireError::Control(format!("a key list by hash {hash:016x} this shard does not hold")))?;
            if list.len() != kb {
                return Err(WireError::Overflow("cached key list length"));
            }
            list.clone()
        } else {
            let k = take(&mut at, kb)?.to_vec();
            if what & WHAT_REMEMBER != 0 {
                self.lists.entry((peer, table)).or_default().remember(key_list_hash(&k), &k, true);
            }
            k
        };
        let mut out = Vec::with_capacity(plain_len.next_multiple_of(8));
        let len = plain_len.next_multiple_of(8);
        out.extend_from_slice(&h.encode(len));
        out.extend_from_slice(&keys);
        if what & WHAT_QUANT != 0 {
            let per = match bits {
                8 => 1,
                16 => 2,
                _ => return Err(WireError::Overflow("quantised bits")),
            };
            // values per key: the frame's own counts say it
            if h.a == 0 || !h.b.is_multiple_of(h.a) || h.b / h.a > 1 << 16 {
                return Err(WireError::Overflow("quantised values per key"));
            }
            let dim = (h.b / h.a) as usize;
            let scales: Vec<f32> =
                take(&mut at, dim * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
            let q = take(&mut at, (h.b as usize).checked_mul(per).ok_or(WireError::Overflow("values"))?)?;
            for (i, c) in q.chunks_exact(per).enumerate() {
                let v = if per == 1 { c[0] as i8 as f32 } else { i16::from_le_bytes([c[0], c[1]]) as f32 };
                out.extend_from_slice(&(v * scales[i % dim]).to_le_bytes());
            }
        } else {
            out.extend_from_slice(take(&mut at, vb)?);
        }
        if at != body.len() {
            return Err(WireError::Trailing { kind: h.kind, extra: body.len() - at });
        }
        out.resize(len, 0);
        Ok(out)
    }

    /// A connection closed: forget its lists.
    pub fn forget(&mut self, peer: PeerId) {
        self.lists.retain(|(p, _), _| *p != peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u32) -> PeerId {
        PeerId { index: i, generation: 0 }
    }

    fn plain(kind: Kind, keys: &[Key], vals: &[f32]) -> Vec<u8> {
        let h = DataHeader { kind, dense: false, table: 3, sub: 0, ts: 9, a: keys.len() as u64, b: vals.len() as u64 };
        let len = h.frame_len().unwrap();
        let mut f = h.encode(len).to_vec();
        f.extend(keys.iter().flat_map(|k| k.to_le_bytes()));
        f.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        f.resize(len, 0);
        f
    }

    fn vals_of(frame: &[u8]) -> Vec<f32> {
        let wire::Frame::Data { vals, .. } = wire::decode(frame, 1 << 24).unwrap() else { panic!() };
        vals.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn exact_codecs_round_trip_and_key_lists_go_as_hashes_the_second_time() {
        let keys: Vec<Key> = (0..500).map(|i| i * 3 + 1).collect();
        let vals: Vec<f32> = (0..500).map(|i| (i % 7) as f32).collect();
        let specs = [FilterSpec::KeyCache, FilterSpec::Lz4];
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let f = plain(Kind::Push, &keys, &vals);
        let first = enc.encode(peer(1), TableId(3), &specs, &f, 1, true).unwrap();
        assert_eq!(dec.decode(peer(1), &first, 1 << 24).unwrap(), f);
        let second = enc.encode(peer(1), TableId(3), &specs, &f, 1, true).unwrap();
        assert!(
            second.len() < first.len() && second.len() < f.len() / 4,
            "{} {} {}",
            second.len(),
            first.len(),
            f.len()
        );
        assert_eq!(dec.decode(peer(1), &second, 1 << 24).unwrap(), f);
        // another connection never saw the list: the hash is refused, not guessed
        assert!(dec.decode(peer(2), &second, 1 << 24).is_err());
        // a pull's key list is cached the same way
        let pull = plain(Kind::Pull, &keys, &[]);
        let a = enc.encode(peer(1), TableId(3), &specs, &pull, 1, true).unwrap();
        assert_eq!(dec.decode(peer(1), &a, 1 << 24).unwrap(), pull);
    }

    #[test]
    fn quantisation_keeps_its_error_and_loses_nothing() {
        for bits in [8u8, 16] {
            let specs = [FilterSpec::Quantize { bits }];
            let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
            let keys: Vec<Key> = (0..64).collect();
            let mut rng = SplitMix64::new(bits as u64);
            let (mut sent, mut got) = (vec![0f64; 64], vec![0f64; 64]);
            for _ in 0..50 {
                let vals: Vec<f32> = (0..64).map(|_| (rng.normal() * 0.01) as f32).collect();
                vals.iter().zip(&mut sent).for_each(|(v, s)| *s += *v as f64);
                let f = plain(Kind::Push, &keys, &vals);
                let coded = enc.encode(peer(1), TableId(3), &specs, &f, 1, true).unwrap();
                assert!(coded.len() <= f.len() - 64 * (4 - bits as usize / 8) + 24, "{} {}", coded.len(), f.len());
                let back = vals_of(&dec.decode(peer(1), &coded, 1 << 24).unwrap());
                back.iter().zip(&mut got).for_each(|(v, g)| *g += *v as f64);
            }
            let (k, v) = enc.flush(TableId(3), 1);
            for (k, v) in k.iter().zip(v) {
                got[*k as usize] += v as f64;
            }
            for (s, g) in sent.iter().zip(&got) {
                assert!((s - g).abs() < 1e-5, "{bits} bits: sent {s}, arrived {g}");
            }
        }
    }

    #[test]
    fn push_filters_hold_back_and_flush_everything() {
        for spec in [FilterSpec::SignificantlyModified { threshold: 0.5 }, FilterSpec::RandomSkip { p: 0.7, seed: 5 }] {
            let mut f = push_filters(std::slice::from_ref(&spec), TableId(0)).pop().unwrap();
            let mut rng = SplitMix64::new(1);
            let (mut sent, mut got) = (vec![0f64; 32], vec![0f64; 32]);
            let mut skipped = 0;
            for _ in 0..40 {
                let mut keys: Vec<Key> = (0..32).filter(|_| rng.next_f64() < 0.6).collect();
                let mut vals: Vec<f32> = keys.iter().flat_map(|_| [(rng.normal() * 0.3) as f32, 0.01]).collect();
                for (k, v) in keys.iter().zip(vals.chunks_exact(2)) {
                    sent[*k as usize] += v[0] as f64;
                }
                let n = keys.len();
                f.filter(&mut keys, &mut vals, 2);
                skipped += n - keys.len();
                assert!(keys.windows(2).all(|w| w[0] < w[1]));
                for (k, v) in keys.iter().zip(vals.chunks_exact(2)) {
                    got[*k as usize] += v[0] as f64;
                }
            }
            assert!(skipped > 0, "{spec:?} held nothing back");
            let (keys, vals) = f.flush(2);
            for (k, v) in keys.iter().zip(vals.chunks_exact(2)) {
                got[*k as usize] += v[0] as f64;
            }
            for (s, g) in sent.iter().zip(&got) {
                assert!((s - g).abs() < 1e-4, "{spec:?}: sent {s}, arrived {g}");
            }
        }
    }

    #[test]
    fn decoder_never_panics_on_garbage() {
        let mut dec = Decoder::default();
        let mut rng = SplitMix64::new(7);
        let f = plain(Kind::Push, &(0..40).collect::<Vec<_>>(), &[1.0; 40]);
        let mut enc = Encoder::default();
        let coded =
            enc.encode(peer(1), TableId(3), &[FilterSpec::Lz4, FilterSpec::Quantize { bits: 8 }], &f, 1, true).unwrap();
        for _ in 0..20_000 {
            let mut g = coded.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(g.len() as u64) as usize;
                g[i] = rng.next_u64() as u8;
            }
            let _ = dec.decode(peer(1), &g, 1 << 20);
        }
    }
}
