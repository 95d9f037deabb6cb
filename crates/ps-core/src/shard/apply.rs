//! Merges and reads of a shard's stores: a checked request becomes a push
//! into its table (with the rule's kernel) and an `Ack`, or a read and a
//! `PullResp` (sent straight from the slab blocks where it can).
//!
//! Must never: wait for a clock (that was decided before: `clocks`,
//! `parked`), write half a response before a refusal (a refusal is one
//! `Error` frame and nothing else), or trust a count the frame gives.

use crate::kernels::Kernels;
use crate::keys::{check_sorted, Key, TableId};
use crate::ring::Owner;
use crate::store::{DenseStore, StoreError};
use crate::transport::{FrameSink, PeerId, GATHER_PARTS_MAX};
use crate::wire::{self, DataHeader, Kind};

use super::{Refusal, ShardCore, TableStore};

/// The answer to a pull: its header (stamped on a table with a clock bound)
/// and the length of its frame.
struct Response {
    head: DataHeader,
    len: usize,
}

impl ShardCore {
    /// What `apply` would refuse a push for, without merging it.
    pub(super) fn check_push(&mut self, h: &DataHeader, keys_b: &[u8]) -> Result<(), Refusal> {
        let owner = self.owner;
        let Some((dim, store)) = self.tables.get(&TableId(h.table)) else {
            return Err(no_table(h, owner));
        };
        let keys = wire::keys_of(keys_b, &mut self.keys_scratch);
        let bad = |e: StoreError| refused_by_store(owner, e);
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

    /// Serves a request whose clocks allow it now: a push (or a push-pull's
    /// push half) is merged and, if `ack`, acknowledged; a pull (or the pull
    /// half) is answered with the values. Every check comes before the first
    /// byte of an answer, so a refusal is one error frame and nothing else.
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
        let table = TableId(h.table);
        let stamp = self.boards.contains_key(&table).then_some(self.min_clock);
        let Some((dim, store)) = self.tables.get_mut(&table) else {
            return Err(no_table(h, owner));
        };
        let keys = wire::keys_of(keys_b, &mut self.keys_scratch);
        check_shape(h, store, *dim as u64, keys)?;
        if matches!(h.kind, Kind::Push | Kind::PushPull) {
            self.stats.push_frames += 1;
            let vals = wire::vals_of(vals_b, &mut self.vals_scratch);
            merge(store, h, keys, vals, self.kernels).map_err(|e| refused_by_store(owner, e))?;
            if let Some(e) = self.eager.get_mut(&table) {
                Self::track(e, h, keys_b, peer, true);
            }
        }
        if h.kind == Kind::Push {
            if ack {
                self.stats.bytes_out += send_ack(h, peer, tx)? as u64;
            }
            return Ok(());
        }
        // Pull or PushPull: answer with the values
        self.stats.pull_frames += 1;
        let resp = pull_response(h, stamp, self.body_max)?;
        // validate before reserving the response, so a refusal is one error frame and nothing else
        check_read(store, h, keys).map_err(|e| refused_by_store(owner, e))?;
        if let Some(e) = self.eager.get_mut(&table) {
            Self::track(e, h, keys_b, peer, false);
        }
        let gathered = match &*store {
            TableStore::Dense(d) if h.dense => send_from_slab(d, h, &resp, peer, tx)?,
            _ => false,
        };
        if !gathered {
            write_pull(store, h, keys, &resp, &mut self.vals_scratch, peer, tx)?;
        }
        self.stats.bytes_out += resp.len as u64;
        Ok(())
    }
}

/// A request for a table this shard does not hold.
fn no_table(h: &DataHeader, owner: Owner) -> Refusal {
    Refusal(format!("table {} does not exist on server {} shard {}", h.table, owner.server, owner.shard))
}

/// A store's refusal, said with the shard it came from.
fn refused_by_store(owner: Owner, e: StoreError) -> Refusal {
    Refusal(format!("server {} shard {}: {e}", owner.server, owner.shard))
}

/// A request's shape against its table, before anything is merged or read:
/// key lists in order and with `dim` values a key, ranges on dense tables only.
fn check_shape(h: &DataHeader, store: &TableStore, dim: u64, keys: &[Key]) -> Result<(), Refusal> {
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
    Ok(())
}

/// Merges a push's values into its table with the rule's kernel.
fn merge(store: &mut TableStore, h: &DataHeader, keys: &[Key], vals: &[f32], k: &Kernels) -> Result<(), StoreError> {
    match store {
        TableStore::Dense(d) if h.dense => d.push(h.a, vals, k),
        TableStore::Dense(d) => d.push_keys(keys, vals, k),
        TableStore::Sparse(s) => s.push(keys, vals, k),
    }
}

/// Acknowledges a merged push; returns the bytes it sent.
pub(super) fn send_ack(h: &DataHeader, peer: PeerId, tx: &mut dyn FrameSink) -> Result<usize, Refusal> {
    let ack = DataHeader { kind: Kind::Ack, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: 0 };
    let len = ack.frame_len().expect("ack is small");
    ack.write(tx.frame(peer, len).map_err(|e| Refusal(e.to_string()))?);
    Ok(len)
}

/// The answer's header and length; refused if it does not fit one frame.
fn pull_response(h: &DataHeader, stamp: Option<u64>, body_max: usize) -> Result<Response, Refusal> {
    let mut head =
        DataHeader { kind: Kind::PullResp, dense: h.dense, table: h.table, sub: h.sub, ts: h.ts, a: h.a, b: h.b };
    if let Some(stamp) = stamp {
        wire::set_stamp(&mut head, stamp);
    }
    let len = head.frame_len().ok_or_else(|| Refusal("pull too large".into()))?;
    if len > body_max + wire::PREFIX_BYTES {
        return Err(Refusal(format!(
            "a pull of {} values does not fit one frame of {} bytes: split it",
            h.b, body_max
        )));
    }
    Ok(Response { head, len })
}

/// Checks a read against its table (a sparse table looks its rows up, ready
/// for `pull_prepared`).
fn check_read(store: &mut TableStore, h: &DataHeader, keys: &[Key]) -> Result<(), StoreError> {
    match store {
        TableStore::Dense(d) if h.dense => d.check_span(h.a, h.b),
        TableStore::Dense(d) => d.check_keys(keys),
        TableStore::Sparse(s) => s.prepare_pull(keys),
    }
}

/// Sends a dense range's answer straight from the slab blocks, no copy into
/// the send queue; `Ok(false)` if the range spans more blocks than one
/// gather takes (then it goes through `write_pull`).
fn send_from_slab(
    d: &DenseStore,
    h: &DataHeader,
    resp: &Response,
    peer: PeerId,
    tx: &mut dyn FrameSink,
) -> Result<bool, Refusal> {
    let n = h.b as usize;
    let hdr = resp.head.encode(resp.len);
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
    if !fits {
        return Ok(false);
    }
    parts[np] = &ZEROS[..resp.len - wire::DATA_HEADER_BYTES - n * 4];
    np += 1;
    tx.frame_gather(peer, &parts[..np]).map_err(|e| Refusal(e.to_string()))?;
    Ok(true)
}

/// Writes the answer into a frame of the send queue: the values read straight
/// into its payload where that is aligned for floats, through `scratch` where not.
fn write_pull(
    store: &mut TableStore,
    h: &DataHeader,
    keys: &[Key],
    resp: &Response,
    scratch: &mut Vec<f32>,
    peer: PeerId,
    tx: &mut dyn FrameSink,
) -> Result<(), Refusal> {
    let n = h.b as usize;
    let buf = tx.frame(peer, resp.len).map_err(|e| Refusal(e.to_string()))?;
    resp.head.write(buf);
    let payload = &mut buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4];
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
        read_into(store, h, keys, out);
    }
    if !aligned {
        buf[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + n * 4]
            .copy_from_slice(bytemuck::cast_slice(&scratch[..]));
    }
    Ok(())
}

/// Reads a checked pull's values into `out` (zeros if the check was wrong).
fn read_into(store: &mut TableStore, h: &DataHeader, keys: &[Key], out: &mut [f32]) {
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

const ZEROS: [u8; 8] = [0; 8];
