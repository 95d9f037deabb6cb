//! The fixed header of a data frame ([`DataHeader`]): what each of its fields
//! holds per kind, how long the frame it describes is, how to write it (into a
//! frame, or apart for gathered sends), and where a response's clock stamp rides.

use super::{padded_len, write_prefix, Kind, DATA_HEADER_BYTES, FLAG_DENSE, PREFIX_BYTES, WIRE_VERSION};

/// The fixed header of a data frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
///
/// What `a`, `b`, `ts` and `sub` hold depends on the kind: see each field.
/// "Request" below means a `Push`, `Pull` or `PushPull` frame; "counted"
/// frames (the chain's word) are pushes, push-pulls and clocks.
pub struct DataHeader {
    /// what the frame is: any kind but the handshake's three and `Control`
    pub kind: Kind,
    /// [`FLAG_DENSE`]: the request addresses a range of a dense table
    /// (`a` a flat float offset, no keys in the payload); answers and errors
    /// echo it; false on every other kind
    pub dense: bool,
    /// the table ([`crate::keys::TableId`]) of a request, `Refresh` or
    /// `Watch`; answers and errors echo the request's. 0 on `Clock`,
    /// `Checkpoint`, `Bind`, `Forward`, `Snapshot` and the chain's own acks
    pub table: u32,
    /// - request, `Clock`, `Checkpoint`: the frame's number within its
    ///   timestamp, 0, 1, ... in the order the worker sent them; `Ack`,
    ///   `PullResp` and `Error` echo it (a sparse response's values are
    ///   placed by it), except a dense `PullResp` of a table with a
    ///   staleness bound, which carries the clock stamp here ([`stamp_of`])
    /// - `Refresh`: 1 on the last frame of a refresh, else 0
    /// - `Snapshot`: 1 on the last chunk, else 0
    /// - `Bind`, `Forward`, `Watch`: 0
    pub sub: u32,
    /// - request, `Clock`, `Checkpoint`: the worker's timestamp of the
    ///   operation (one per operation, shared by all its frames); `Ack`,
    ///   `PullResp` and `Error` echo it
    /// - `Refresh`: the clock stamp of its values ([`stamp_of`])
    /// - `Forward`: the inner frame's number among its origin's counted
    ///   frames to this shard; the `Ack` of a `Forward` echoes it
    /// - `Snapshot`: offset of this chunk in the whole state, bytes
    /// - `Bind`, `Watch`: 0 (so the `Ack` of a `Bind` has ts 0)
    pub ts: u64,
    /// - dense request: first flat float, `(key - table's first key) * dim + j`
    /// - sparse request, `Refresh`: number of keys in the payload
    /// - `Clock`: clocks the worker has finished
    /// - `Checkpoint`: the checkpoint's label
    /// - `Ack`, `PullResp`: echo the request's, except a sparse `PullResp`
    ///   of a table with a staleness bound, which carries the clock stamp
    /// - `Bind`, `Forward`: the origin (the client's number in the chain)
    /// - `Snapshot`: size of the whole state, bytes
    /// - `Error`, `Watch`: 0
    pub a: u64,
    /// - `Push`, `PushPull`, `Refresh`: number of f32 values in the payload
    ///   (keys * dim when sparse)
    /// - `Pull`: number of values asked for (no values in the payload)
    /// - `PullResp`: number of f32 values in the payload (the request's `b`)
    /// - `Clock`: the worker's rank
    /// - `Bind`: the number the origin's next counted frame has
    /// - `Forward`: size of the inner frame / 4 (frames are 8-aligned)
    /// - `Snapshot`: size of this chunk / 4, rounded up (the last chunk's
    ///   payload may end in padding: `a` tells the real size)
    /// - `Error`: size of the message, bytes (not a count of values)
    /// - `Ack`, `Checkpoint`, `Watch`: 0
    pub b: u64,
}

impl DataHeader {
    /// Bytes of the frame this header describes (payload implied by kind, a, b).
    pub fn frame_len(&self) -> Option<usize> {
        let content = (DATA_HEADER_BYTES - PREFIX_BYTES).checked_add(self.payload_len()?)?;
        content.checked_add(PREFIX_BYTES + 7).map(|_| padded_len(content))
    }

    /// (key bytes, value bytes) of the payload.
    pub fn payload_parts(&self) -> Option<(usize, usize)> {
        // counted only for the kinds that carry them: an ack or a clock echoes
        // a and b as numbers, whatever they are
        let keys = || if self.dense { Some(0) } else { usize::try_from(self.a).ok()?.checked_mul(8) };
        let vals = || usize::try_from(self.b).ok()?.checked_mul(4);
        Some(match self.kind {
            Kind::Push | Kind::PushPull | Kind::Refresh => (keys()?, vals()?),
            Kind::Forward | Kind::Snapshot => (0, vals()?),
            Kind::Pull => (keys()?, 0),
            Kind::PullResp => (0, vals()?),
            Kind::Ack => (0, 0),
            // an error frame's `b` counts message bytes, not values: `decode`
            // and `error_len` size it; `Clock`, `Checkpoint`, `Bind`, `Watch`
            // carry nothing
            _ => (0, 0),
        })
    }

    fn payload_len(&self) -> Option<usize> {
        let (k, v) = self.payload_parts()?;
        k.checked_add(v)
    }

    /// Prefix and header of a frame of `frame_len` bytes, for gathered sends.
    pub fn encode(&self, frame_len: usize) -> [u8; DATA_HEADER_BYTES] {
        let mut b = [0u8; DATA_HEADER_BYTES];
        b[..4].copy_from_slice(&((frame_len - PREFIX_BYTES) as u32).to_le_bytes());
        b[4] = WIRE_VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&(if self.dense { FLAG_DENSE } else { 0 }).to_le_bytes());
        b[8..12].copy_from_slice(&self.table.to_le_bytes());
        b[12..16].copy_from_slice(&self.sub.to_le_bytes());
        b[16..24].copy_from_slice(&self.ts.to_le_bytes());
        b[24..32].copy_from_slice(&self.a.to_le_bytes());
        b[32..40].copy_from_slice(&self.b.to_le_bytes());
        b
    }

    /// Writes prefix and header into `buf[..DATA_HEADER_BYTES]`; `buf` is the whole frame.
    pub fn write(&self, buf: &mut [u8]) {
        write_prefix(buf, self.kind, if self.dense { FLAG_DENSE } else { 0 });
        buf[8..12].copy_from_slice(&self.table.to_le_bytes());
        buf[12..16].copy_from_slice(&self.sub.to_le_bytes());
        buf[16..24].copy_from_slice(&self.ts.to_le_bytes());
        buf[24..32].copy_from_slice(&self.a.to_le_bytes());
        buf[32..40].copy_from_slice(&self.b.to_le_bytes());
    }
}

/// The clock stamp of a pull response (or refresh) of a table with a
/// staleness bound: the number of clocks every worker had finished when the
/// shard read the values, so they hold every update of the clocks before it.
/// A response has no spare field, so the stamp rides in one its layout leaves
/// unused: `sub` of a dense response (the worker places it by `a`), `a` of a
/// sparse one (the worker counts it by `b`), `ts` of a refresh.
pub fn stamp_of(h: &DataHeader) -> u64 {
    match (h.kind, h.dense) {
        (Kind::Refresh, _) => h.ts,
        (_, true) => h.sub as u64,
        (_, false) => h.a,
    }
}

/// Sets the stamp of a pull response (see [`stamp_of`]); a dense one
/// saturates at `u32::MAX` clocks.
pub fn set_stamp(h: &mut DataHeader, stamp: u64) {
    match (h.kind, h.dense) {
        (Kind::Refresh, _) => h.ts = stamp,
        (_, true) => h.sub = u32::try_from(stamp).unwrap_or(u32::MAX),
        (_, false) => h.a = stamp,
    }
}
