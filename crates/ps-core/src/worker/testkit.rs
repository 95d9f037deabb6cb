//! Fixtures for the worker's unit tests (compiled for tests only): a worker
//! over 2 servers x 2 shards with tiny chunks, the request frames it wrote
//! (decoded, as a shard reads them), and answers made by hand as a shard
//! would make them, so a test can hold answers back, reorder, repeat or
//! forge them. Pulled values are a function of the key (or the flat float),
//! so a test can tell whether each landed where it belongs.

use super::WorkerCore;
use crate::keys::{KeyRange, TableId};
use crate::limits::WireLimits;
use crate::ring::{position, Owner, Ring, RingServer};
use crate::rules::RuleSpec;
use crate::sim::SimSink;
use crate::table::TableSpec;
use crate::transport::PeerId;
use crate::wire::{self, DataHeader, Frame, Kind};

/// A sparse table, 2 values per key, every u64 key.
pub(super) const SPARSE: TableId = TableId(0);
/// A dense table, 3 values per key, keys 0..4096.
pub(super) const DENSE: TableId = TableId(1);
/// Small chunks, so requests of a few hundred keys take many frames.
pub(super) const CHUNK_BYTES: usize = 256;

pub(super) fn tables() -> Vec<TableSpec> {
    vec![
        TableSpec::sparse(0, "sparse2", KeyRange::FULL, 2, RuleSpec::Sum),
        TableSpec::dense(1, "dense3", KeyRange::new(0, 4096), 3, RuleSpec::Sum),
    ]
}

/// The connection to `owner`, as [`worker`] numbers them.
pub(super) fn peer_of(o: Owner) -> PeerId {
    PeerId { index: o.server * 2 + o.shard, generation: 0 }
}

pub(super) fn owner_of(p: PeerId) -> Owner {
    Owner { server: p.index / 2, shard: p.index % 2 }
}

pub(super) fn ring() -> Ring {
    Ring::new(&[RingServer { id: 0, nr_shards: 2 }, RingServer { id: 1, nr_shards: 2 }], 256).expect("a ring")
}

pub(super) fn worker() -> WorkerCore {
    let peers = (0..2).map(|s| (0..2).map(|h| peer_of(Owner { server: s, shard: h })).collect()).collect();
    let limits = WireLimits { chunk_bytes: CHUNK_BYTES, frame_bytes_max: 8192, tx_queue_bytes_max: 1 << 20 };
    WorkerCore::new(&tables(), ring(), peers, limits)
}

/// `n` distinct sparse keys spread over the ring, ascending.
pub(super) fn spread_keys(n: u64) -> Vec<u64> {
    let mut k: Vec<u64> = (0..n).map(|i| crate::rng::mix64(i + 1)).collect();
    k.sort_unstable();
    k.dedup();
    k
}

/// Who owns `key` of `table` on the test ring.
pub(super) fn owner_of_key(table: &TableSpec, key: u64) -> Owner {
    let r = ring();
    r.owner_of_partition(r.partition_of(position(table.keys(), key)))
}

/// A request frame as its shard reads it.
#[derive(Clone, Debug)]
pub(super) struct Sent {
    pub(super) peer: PeerId,
    pub(super) h: DataHeader,
    pub(super) keys: Vec<u64>,
    pub(super) vals: Vec<f32>,
    pub(super) bytes: Vec<u8>,
}

/// Takes every frame out of `sink`, decoded.
pub(super) fn drain(sink: &mut SimSink) -> Vec<Sent> {
    sink.frames
        .drain(..)
        .map(|(peer, bytes)| {
            let Frame::Data { h, keys, vals } = wire::decode(&bytes, usize::MAX >> 1).expect("a frame") else {
                panic!("not a data frame")
            };
            let keys = keys.chunks_exact(8).map(|k| u64::from_le_bytes(k.try_into().expect("8"))).collect();
            let vals = vals.chunks_exact(4).map(|v| f32::from_le_bytes(v.try_into().expect("4"))).collect();
            Sent { peer, h, keys, vals, bytes }
        })
        .collect()
}

/// The value the fake shards hold for value `j` of sparse `key`.
pub(super) fn sparse_value(key: u64, j: usize) -> f32 {
    (key % 100_000) as f32 * 4.0 + j as f32
}

/// The value the fake shards hold at flat float `f` of the dense table.
pub(super) fn dense_value(f: u64) -> f32 {
    f as f32 + 0.5
}

fn frame(h: DataHeader, vals: &[f32]) -> Vec<u8> {
    let mut f = vec![0u8; h.frame_len().expect("small")];
    h.write(&mut f);
    let at = wire::DATA_HEADER_BYTES;
    f[at..at + vals.len() * 4].copy_from_slice(bytemuck::cast_slice(vals));
    f
}

/// What a shard answers to `s`: an `Ack` to a push, the values to a pull
/// (`stamp` in the field its layout leaves free, as a real shard does).
pub(super) fn answer(s: &Sent, dim: usize, stamp: u64) -> Vec<u8> {
    if s.h.kind != Kind::Pull {
        return frame(DataHeader { kind: Kind::Ack, ..s.h }, &[]);
    }
    let mut h = DataHeader { kind: Kind::PullResp, ..s.h };
    let vals: Vec<f32> = if s.h.dense {
        (s.h.a..s.h.a + s.h.b).map(dense_value).collect()
    } else {
        h.b = s.keys.len() as u64 * dim as u64;
        s.keys.iter().flat_map(|&k| (0..dim).map(move |j| sparse_value(k, j))).collect()
    };
    wire::set_stamp(&mut h, stamp);
    frame(h, &vals)
}

/// An answer made by hand: header `h`, payload `vals`.
pub(super) fn forged(h: DataHeader, vals: &[f32]) -> Vec<u8> {
    frame(h, vals)
}

/// A shard's refusal of request `s`.
pub(super) fn refusal(s: &Sent, why: &str) -> Vec<u8> {
    let mut f = vec![0u8; wire::error_len(why)];
    wire::write_error(&mut f, &s.h, why);
    f
}
