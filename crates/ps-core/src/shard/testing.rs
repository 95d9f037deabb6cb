//! Helpers of the shard's unit tests: shards of small jobs, request
//! frames, and readers of what a shard sent.
//!
//! Must never: be compiled outside tests, or build a frame the wire module
//! would not (the tests hold the shard to real frames).

use crate::clock::Consistency;
use crate::control::{ClusterView, JobSpec, ServerInfo};
use crate::kernels::Kernels;
use crate::keys::KeyRange;
use crate::limits::WireLimits;
use crate::ring::Owner;
use crate::rules::{RuleRegistry, RuleSpec};
use crate::sim::SimSink;
use crate::table::TableSpec;
use crate::transport::PeerId;
use crate::wire::{self, ClockHeader, DataHeader, Frame, Kind};

use super::ShardCore;

pub(super) const A: PeerId = PeerId { index: 1, generation: 0 };
pub(super) const B: PeerId = PeerId { index: 2, generation: 0 };

pub(super) fn shard(model: Consistency) -> ShardCore {
    shard_of(vec![
        TableSpec::dense(0, "d", KeyRange::new(0, 1000), 1, RuleSpec::Sum).with_consistency(model),
        TableSpec::sparse(1, "s", KeyRange::FULL, 1, RuleSpec::Sum).with_consistency(model),
    ])
}

/// One shard owning everything of `tables`, in a job of two workers.
pub(super) fn shard_of(tables: Vec<TableSpec>) -> ShardCore {
    let job = JobSpec {
        tables,
        app: "test".into(),
        params: serde_json::Value::Null,
        limits: WireLimits::default(),
        partitions: 64,
        copies: 1,
    };
    let view = ClusterView::new(job, vec![ServerInfo::new(0, "t", vec![0], 0)], 2);
    ShardCore::new(&view, Owner { server: 0, shard: 0 }, &RuleRegistry::default(), Kernels::best()).unwrap()
}

pub(super) fn frame(h: DataHeader, keys: &[u64]) -> Vec<u8> {
    let mut f = vec![0u8; h.frame_len().unwrap()];
    h.write(&mut f);
    let k: &[u8] = bytemuck::cast_slice(keys);
    f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + k.len()].copy_from_slice(k);
    f
}

pub(super) fn clock(rank: u64, clocks: u64) -> Vec<u8> {
    frame(ClockHeader { ts: 1, sub: 0, clocks_done: clocks, rank }.header(), &[])
}

pub(super) fn dense_pull(ts: u64) -> Vec<u8> {
    frame(DataHeader { kind: Kind::Pull, dense: true, table: 0, sub: 0, ts, a: 0, b: 10 }, &[])
}

pub(super) fn kinds(sink: &mut SimSink) -> Vec<(PeerId, Kind)> {
    let k =
        sink.frames.iter().map(|(p, f)| (*p, wire::parse_prefix(f[..8].try_into().unwrap(), 1 << 30).unwrap().kind));
    let out = k.collect();
    sink.frames.clear();
    out
}

pub(super) fn values(sink: &mut SimSink) -> Vec<f32> {
    let out = sink
        .frames
        .iter()
        .filter_map(|(_, f)| match wire::decode(f, 1 << 30).unwrap() {
            Frame::Data { h, vals, .. } if h.kind == Kind::PullResp => {
                Some(vals.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect();
    sink.frames.clear();
    out
}
