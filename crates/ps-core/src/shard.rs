//! The shard state machine: one per pinned core, owning its key ranges of every
//! table outright. It turns request frames into merges and reads of its stores
//! and writes the responses into a [`FrameSink`]; it never blocks, never locks,
//! and never trusts a frame: a malformed one is an `Err` (the caller drops the
//! peer), a well-formed but wrong request (unknown table, key not owned, counts
//! that disagree with the table's dim) gets an `Error` frame back.

use std::collections::BTreeMap;

use crate::control::ClusterView;
use crate::kernels::Kernels;
use crate::keys::{check_sorted, Layout, TableId};
use crate::ring::Owner;
use crate::rules::RuleRegistry;
use crate::store::{DenseStore, SparseStore};
use crate::transport::{FrameSink, PeerId, TxError, GATHER_PARTS_MAX};
use crate::wire::{self, DataHeader, Frame, Kind, WireError};

#[derive(Debug)]
enum TableStore {
    Dense(DenseStore),
    Sparse(SparseStore),
}

/// Counters a shard reports when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub push_frames: u64,
    pub pull_frames: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors_sent: u64,
}

/// Why a frame makes the shard drop its sender.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("send queue: {0}")]
    Tx(#[from] TxError),
}

#[derive(Debug)]
pub struct ShardCore {
    owner: Owner,
    tables: BTreeMap<TableId, (u32, TableStore)>,
    kernels: &'static Kernels,
    body_max: usize,
    keys_scratch: Vec<u64>,
    vals_scratch: Vec<f32>,
    stats: ShardStats,
}

impl ShardCore {
    /// Builds the stores of every table for the ranges `owner` holds in `view`.
    pub fn new(
        view: &ClusterView,
        owner: Owner,
        rules: &RuleRegistry,
        kernels: &'static Kernels,
    ) -> Result<Self, String> {
        let ring = view.ring().map_err(|e| e.to_string())?;
        let mut tables = BTreeMap::new();
        for t in &view.job.tables {
            let rule = rules.build(&t.rule).map_err(|e| format!("table {}: {e}", t.name))?;
            let owned = ring.owned_ranges(t.keys(), owner);
            let store = match t.layout {
                Layout::Dense { keys } => TableStore::Dense(
                    DenseStore::new(keys, t.dim, &owned, rule).map_err(|e| format!("table {}: slab: {e}", t.name))?,
                ),
                Layout::Sparse { .. } => TableStore::Sparse(
                    SparseStore::new(t.dim, owned, rule, crate::limits::SPARSE_SLAB_BLOCKS)
                        .map_err(|e| format!("table {}: slab: {e}", t.name))?,
                ),
            };
            tables.insert(t.id, (t.dim, store));
        }
        Ok(Self {
            owner,
            tables,
            kernels,
            body_max: view.job.limits.frame_bytes_max,
            keys_scratch: Vec::new(),
            vals_scratch: Vec::new(),
            stats: ShardStats::default(),
        })
    }

    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Every dense table's layout and slab bytes, for registering with a
    /// one-sided transport. A dense table is one slab that never moves or grows.
    pub fn dense_slabs(&self) -> Vec<(TableId, crate::store::DenseLayout, &[u8])> {
        self.tables
            .iter()
            .filter_map(|(id, (_, st))| match st {
                TableStore::Dense(d) => Some((*id, d.layout().clone(), d.values().slabs()[0].as_bytes())),
                TableStore::Sparse(_) => None,
            })
            .collect()
    }

    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Handles one whole frame from `peer`, writing any response into `tx`.
    pub fn handle(&mut self, peer: PeerId, frame: &[u8], tx: &mut dyn FrameSink) -> Result<(), ShardError> {
        self.stats.bytes_in += frame.len() as u64;
        let (h, keys_b, vals_b) = match wire::decode(frame, self.body_max)? {
            Frame::Data { h, keys, vals } if matches!(h.kind, Kind::Push | Kind::Pull | Kind::PushPull) => {
                (h, keys, vals)
            }
            Frame::Data { h, .. } => return Err(WireError::Unexpected(h.kind).into()),
            Frame::Error { .. } => return Err(WireError::Unexpected(Kind::Error).into()),
            Frame::Challenge { .. } => return Err(WireError::Unexpected(Kind::Challenge).into()),
            Frame::Hello { .. } => return Err(WireError::Unexpected(Kind::Hello).into()),
            Frame::Welcome { .. } => return Err(WireError::Unexpected(Kind::Welcome).into()),
            Frame::Control(_) => return Err(WireError::Unexpected(Kind::Control).into()),
        };
        match self.apply(&h, keys_b, vals_b, peer, tx) {
            Ok(()) => Ok(()),
            Err(Refusal(msg)) => {
                self.stats.errors_sent += 1;
                let buf = tx.frame(peer, wire::error_len(&msg))?;
                wire::write_error(buf, &h, &msg);
                Ok(())
            }
        }
    }

    fn apply(
        &mut self,
        h: &DataHeader,
        keys_b: &[u8],
        vals_b: &[u8],
        peer: PeerId,
        tx: &mut dyn FrameSink,
    ) -> Result<(), Refusal> {
        let owner = self.owner;
        let Some((dim, store)) = self.tables.get_mut(&TableId(h.table)) else {
            return Err(Refusal(format!(
                "table {} does not exist on server {} shard {}",
                h.table, owner.server, owner.shard
            )));
        };
        let dim = *dim as u64;
        let keys = wire::keys_of(keys_b, &mut self.keys_scratch);
        if !h.dense {
            if matches!(store, TableStore::Dense(_)) {
                // the sparse store checks order in its own pass over the keys
                check_sorted(keys).map_err(|e| Refusal(e.to_string()))?;
            }
            if h.b != h.a.saturating_mul(dim) {
                return Err(Refusal(format!(
                    "{} keys of table {} (dim {dim}) need {} values, frame says {}",
                    h.a,
                    h.table,
                    h.a.saturating_mul(dim),
                    h.b
                )));
            }
        } else if matches!(store, TableStore::Sparse(_)) {
            return Err(Refusal(format!("table {} is sparse: range operations need a dense table", h.table)));
        }
        let k = self.kernels;
        if matches!(h.kind, Kind::Push | Kind::PushPull) {
            self.stats.push_frames += 1;
            let vals = wire::vals_of(vals_b, &mut self.vals_scratch);
            let r = match store {
                TableStore::Dense(d) if h.dense => d.push(h.a, vals, k),
                TableStore::Dense(d) => d.push_keys(keys, vals, k),
                TableStore::Sparse(s) => s.push(keys, vals, k),
            };
            r.map_err(|e| Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard)))?;
        }
        if h.kind == Kind::Push {
            let ack =
                DataHeader { kind: Kind::Ack, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
            let len = ack.frame_len().expect("ack is small");
            ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
            self.stats.bytes_out += len as u64;
            return Ok(());
        }
        // Pull or PushPull: answer with the values
        self.stats.pull_frames += 1;
        let resp =
            DataHeader { kind: Kind::PullResp, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: h.b };
        let len = resp.frame_len().ok_or_else(|| Refusal("pull too large".into()))?;
        if len > self.body_max + wire::PREFIX_BYTES {
            return Err(Refusal(format!(
                "a pull of {} values does not fit one frame of {} bytes: split it",
                h.b, self.body_max
            )));
        }
        // validate before reserving the response, so a refusal is one error frame and nothing else
        let checked = match &mut *store {
            TableStore::Dense(d) if h.dense => d.check_span(h.a, h.b),
            TableStore::Dense(d) => d.check_keys(keys),
            TableStore::Sparse(s) => s.prepare_pull(keys),
        };
        checked.map_err(|e| Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard)))?;
        let n = h.b as usize;
        if let (TableStore::Dense(d), true) = (&*store, h.dense) {
            // send straight from the slab blocks: no copy into the send queue
            let hdr = resp.encode(len);
            let mut parts: [&[u8]; GATHER_PARTS_MAX] = [&[]; GATHER_PARTS_MAX];
            parts[0] = &hdr;
            let mut np = 1;
            let fits = d
                .for_each_slice(h.a, h.b, |slice| {
                    if np + 1 >= GATHER_PARTS_MAX {
                        return false;
                    }
                    parts[np] = bytemuck::cast_slice(slice);
                    np += 1;
                    true
                })
                .unwrap_or(false);
            if fits {
                parts[np] = &ZEROS[..len - wire::DATA_HEADER_BYTES - n * 4];
                np += 1;
                tx.frame_gather(peer, &parts[..np]).map_err(|e| Refusal(e.to_string()))?;
                self.stats.bytes_out += len as u64;
                return Ok(());
            }
        }
        let buf = tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?;
        resp.write(buf);
        let payload = &mut buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4];
        let scratch = &mut self.vals_scratch;
        let aligned = bytemuck::try_cast_slice_mut::<u8, f32>(payload).is_ok();
        if !aligned {
            scratch.clear();
            scratch.resize(n, 0.0);
        }
        {
            let out: &mut [f32] = if aligned {
                bytemuck::cast_slice_mut(&mut buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4])
            } else {
                &mut scratch[..]
            };
            let r = match store {
                TableStore::Dense(d) if h.dense => d.pull(h.a, out),
                TableStore::Dense(d) => d.pull_keys(keys, out),
                TableStore::Sparse(s) => {
                    s.pull_prepared(out);
                    Ok(())
                }
            };
            debug_assert!(r.is_ok(), "checked above: {r:?}");
            if r.is_err() {
                out.fill(0.0);
            }
        }
        if !aligned {
            buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4]
                .copy_from_slice(bytemuck::cast_slice(&scratch[..]));
        }
        self.stats.bytes_out += len as u64;
        Ok(())
    }
}

const ZEROS: [u8; 8] = [0; 8];

/// A request the shard refuses while keeping the connection.
struct Refusal(String);
