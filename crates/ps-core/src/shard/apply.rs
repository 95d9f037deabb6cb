//! Merges and reads of a shard's stores: a checked request becomes a push
//! into its table (with the rule's kernel) and an `Ack`, or a read and a
//! `PullResp` (sent straight from the slab blocks where it can).
//!
//! Must never: wait for a clock (that was decided before: `clocks`,
//! `parked`), write half a response before a refusal (a refusal is one
//! `Error` frame and nothing else), or trust a count the frame gives.

use crate::keys::{check_sorted, TableId};
use crate::transport::{FrameSink, PeerId, GATHER_PARTS_MAX};
use crate::wire::{self, DataHeader, Kind};

use super::{Refusal, ShardCore, TableStore};

impl ShardCore {
    /// What `apply` would refuse a push for, without merging it.
    pub(super) fn check_push(&mut self, h: &DataHeader, keys_b: &[u8]) -> Result<(), Refusal> {
        let owner = self.owner;
        let Some((dim, store)) = self.tables.get(&TableId(h.table)) else {
            return Err(Refusal(format!(
                "table {} does not exist on server {} shard {}",
                h.table, owner.server, owner.shard
            )));
        };
        let keys = wire::keys_of(keys_b, &mut self.keys_scratch);
        let bad = |e: crate::store::StoreError| Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard));
        match store {
            TableStore::Dense(d) if h.dense => d.check_span(h.a, h.b).map_err(bad),
            _ if h.dense => Err(Refusal(format!("table {} is sparse: range operations need a dense table", h.table))),
            _ if h.b != h.a.saturating_mul(*dim as u64) => Err(Refusal(format!(
                "{} keys of table {} (dim {dim}) need {} values, frame says {}",
                h.a,
                h.table,
                h.a.saturating_mul(*dim as u64),
                h.b
            ))),
            TableStore::Dense(d) => {
                check_sorted(keys).map_err(|e| Refusal(e.to_string()))?;
                d.check_keys(keys).map_err(bad)
            }
            TableStore::Sparse(_) => check_sorted(keys).map_err(|e| Refusal(e.to_string())),
        }
    }

    pub(super) fn apply(
        &mut self,
        h: &DataHeader,
        keys_b: &[u8],
        vals_b: &[u8],
        peer: PeerId,
        tx: &mut dyn FrameSink,
        ack: bool,
    ) -> Result<(), Refusal> {
        let owner = self.owner;
        let stamp = self.boards.contains_key(&TableId(h.table)).then_some(self.min_clock);
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
            if let Some(e) = self.eager.get_mut(&TableId(h.table)) {
                Self::track(e, h, keys_b, peer, true);
            }
        }
        if h.kind == Kind::Push {
            if !ack {
                return Ok(());
            }
            let ack =
                DataHeader { kind: Kind::Ack, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
            let len = ack.frame_len().expect("ack is small");
            ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
            self.stats.bytes_out += len as u64;
            return Ok(());
        }
        // Pull or PushPull: answer with the values
        self.stats.pull_frames += 1;
        let mut resp =
            DataHeader { kind: Kind::PullResp, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: h.b };
        if let Some(stamp) = stamp {
            wire::set_stamp(&mut resp, stamp);
        }
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
        if let Some(e) = self.eager.get_mut(&TableId(h.table)) {
            Self::track(e, h, keys_b, peer, false);
        }
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
