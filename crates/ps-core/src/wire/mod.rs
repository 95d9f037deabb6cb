//! The wire format: versioned, length-prefixed binary frames, little-endian.
//!
//! ```text
//! prefix (8 bytes, every frame)
//!   0 u32 body_len   bytes after the prefix; a multiple of 8; checked against a bound
//!   4 u8  version    WIRE_VERSION
//!   5 u8  kind       see `Kind`
//!   6 u16 flags      bit 0: dense (data frames)
//! data frames (push, pull, push-pull, ack, pull-response, error, clock): 32 more bytes
//!   8 u32 table    12 u32 sub (chunk number within the request)
//!  16 u64 ts (the worker's timestamp)
//!  24 u64 a        dense: first flat float (key offset * dim + j); sparse: number of keys
//!  32 u64 b        number of f32 values in the payload
//!  40 payload      sparse: a x u64 keys, then b x f32 values; dense: b x f32 values
//!     padding      zeros up to a multiple of 8
//! flags bit 1 (coded): the payload is a table filter's coding (`filter`)
//! ```
//! Every frame is a multiple of 8 bytes and starts 8-aligned in a receive buffer,
//! so keys (at offset 40) are 8-aligned and values 4-aligned: the decoder hands
//! out slices of the receive buffer, with no copy.
//!
//! What `a`, `b`, `ts` and `sub` hold depends on the kind ([`DataHeader`]);
//! the per-kind views (`BindHeader`, `ClockHeader`, ...; `views.rs`) name them.
//!
//! [`decode`] checks the version, the kind, every count against the bytes present
//! (with overflow-checked arithmetic), and never panics on any input (a property
//! test feeds it random bytes).

use crate::limits::HANDSHAKE_FRAME_BYTES_MAX;

mod control;
mod frame;
mod header;
mod peek;
#[cfg(test)]
mod tests;
mod views;

pub use control::{control_len, encode_challenge, encode_hello, encode_welcome, error_len, write_control, write_error};
pub use frame::{copy_vals, decode, decode_data, keys_of, vals_of, DataFrame, Frame};
pub use header::{set_stamp, stamp_of, DataHeader};
pub use peek::{is_coded, mark_coded, peek_flags, peek_header, peek_kind, set_kind};
pub use views::{
    BindHeader, CheckpointHeader, ClockHeader, ForwardAck, ForwardHeader, RefreshHeader, RequestHeader, SnapshotHeader,
    Span, WatchHeader,
};

/// The version byte every frame carries; a node refuses frames of any other
/// ([`WireError::Version`]).
pub const WIRE_VERSION: u8 = 1;
/// Size of the prefix every frame starts with, bytes.
pub const PREFIX_BYTES: usize = 8;
/// Size of a data frame's prefix and header together, bytes; its payload starts here.
pub const DATA_HEADER_BYTES: usize = 40;
/// Size of a handshake nonce, bytes.
pub const NONCE_BYTES: usize = 32;
/// Size of a handshake MAC (HMAC-SHA256), bytes.
pub const MAC_BYTES: usize = 32;
/// Flags bit 0: a data frame addresses a range of a dense table (`a` is a flat
/// float offset, no keys in the payload) rather than a list of keys.
pub const FLAG_DENSE: u16 = 1;
/// the payload is coded by the table's filters (`filter::Decoder` undoes it)
pub const FLAG_CODED: u16 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
/// What a frame is: byte 5 of its prefix.
pub enum Kind {
    /// server -> client: a fresh nonce to prove knowledge of the job secret against
    Challenge = 1,
    /// client -> server: who I am, my nonce, and the MAC over both nonces
    Hello = 2,
    /// server -> client: the server's MAC, so the client knows the server is in the job too
    Welcome = 3,
    /// worker -> shard: merge values into a table (sparse: `a` keys and `b`
    /// values; dense: `b` values from flat float `a`); answered with an `Ack`
    Push = 10,
    /// worker -> shard: read values (sparse: `a` keys, `b` values wanted;
    /// dense: `b` values from flat float `a`); answered with a `PullResp`
    Pull = 11,
    /// worker -> shard: a push, then a pull of the same keys or range after
    /// it is merged; answered with a `PullResp`
    PushPull = 12,
    /// shard -> worker (or copy -> copy): one request frame is done; echoes
    /// the request's `table`, `sub`, `ts` and `a`, with no payload
    Ack = 13,
    /// shard -> worker, the answer to a `Pull` or `PushPull`: `b` values, in
    /// the request's key order (see [`stamp_of`] for bounded staleness)
    PullResp = 14,
    /// shard -> worker: one request frame was refused; echoes its `table`,
    /// `sub` and `ts`, and carries `b` bytes of UTF-8 message
    Error = 15,
    /// worker -> shard: "I have finished `a` clocks" (`b`: my worker rank);
    /// answered with an `Ack`
    Clock = 16,
    /// shard -> worker, the answer to a `Watch` (eager SSP): fresh values of
    /// rows the worker read before, laid out as a sparse push (`a` keys, `b`
    /// values); `ts` is the clock stamp (see [`stamp_of`]) the values have;
    /// `sub` is 1 on the last frame of a refresh (then every row the worker
    /// read from this shard is as fresh as the stamp)
    Refresh = 17,
    /// worker -> shard: "answer with a `Refresh` when there is one". A worker
    /// keeps one outstanding per shard, so every frame a shard sends still
    /// answers exactly one request (the RDMA rings' credit rule)
    Watch = 18,
    /// worker -> shard: "write a checkpoint labelled `a` of your tables";
    /// answered with an `Ack` once it is on disk (or an `Error`)
    Checkpoint = 19,
    /// a JSON control message (manager traffic)
    Control = 20,
    /// client -> a copy of a replicated shard (`chain`): "I am origin `a`;
    /// the first push, push-pull or clock frame after this one is my frame
    /// number `b` to this shard". Answered with an `Ack` (ts 0), or the
    /// connection is dropped when this copy is not the head of its chain
    Bind = 21,
    /// a copy -> the next copy of its chain: one request frame of origin `a`,
    /// its number `ts` among that origin's pushes and clocks to this shard,
    /// the frame itself (decoded, prefix included: `b` x 4 bytes) as payload.
    /// Answered, in order, with an `Ack` (ts and a echoed) once applied
    Forward = 22,
    /// a chain's tail -> a copy being rebuilt: chunk of the tail's whole
    /// state (`ts`: offset, `a`: total bytes, `b` x 4 bytes of payload; `sub`
    /// is 1 on the last chunk), sent before the frames it applies after
    Snapshot = 23,
}

impl Kind {
    /// The kind whose byte is `v`, or `None` for an unknown byte.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Challenge,
            2 => Kind::Hello,
            3 => Kind::Welcome,
            10 => Kind::Push,
            11 => Kind::Pull,
            12 => Kind::PushPull,
            13 => Kind::Ack,
            14 => Kind::PullResp,
            15 => Kind::Error,
            16 => Kind::Clock,
            17 => Kind::Refresh,
            18 => Kind::Watch,
            19 => Kind::Checkpoint,
            20 => Kind::Control,
            21 => Kind::Bind,
            22 => Kind::Forward,
            23 => Kind::Snapshot,
            _ => return None,
        })
    }

    /// Whether this is one of the kinds with a [`DataHeader`]. It leaves out
    /// `Watch`, although a `Watch` is sent with a header and [`decode`] reads
    /// it as [`Frame::Data`]; nothing in the workspace calls it today.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            Kind::Push
                | Kind::Pull
                | Kind::PushPull
                | Kind::Ack
                | Kind::PullResp
                | Kind::Error
                | Kind::Clock
                | Kind::Refresh
                | Kind::Checkpoint
                | Kind::Bind
                | Kind::Forward
                | Kind::Snapshot
        )
    }
}

/// Why a frame was refused. The connection that sent it is dropped with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The prefix carries another wire version (the one given): the peer runs
    /// another build; run one build across the job.
    #[error("wire version {0}, this node speaks {WIRE_VERSION}: mixed builds in one job?")]
    Version(u8),
    /// The prefix's kind byte (given) is no [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A body (or a control message's JSON) is longer than this connection
    /// allows; before the handshake the bound is [`HANDSHAKE_BODY_MAX`].
    #[error("frame body of {len} bytes is above the bound of {max}")]
    TooLong {
        /// length the frame claims, bytes
        len: usize,
        /// the bound, bytes
        max: usize,
    },
    /// The prefix's body length (given, bytes) is not a multiple of 8.
    #[error("frame body of {0} bytes is not a multiple of 8")]
    Unaligned(usize),
    /// The frame holds fewer bytes than its prefix or header says it has.
    #[error("{kind:?} frame is {len} bytes; its header says it needs {need}")]
    Short {
        /// the frame's kind (`Control` when even the prefix is incomplete)
        kind: Kind,
        /// bytes present, prefix included
        len: usize,
        /// bytes its prefix or header calls for, prefix included
        need: usize,
    },
    /// The frame is longer than its payload and padding: the header's
    /// counts do not match the prefix's length.
    #[error("{kind:?} frame carries {extra} bytes beyond its payload and padding")]
    Trailing {
        /// the frame's kind
        kind: Kind,
        /// bytes beyond the padded payload
        extra: usize,
    },
    /// A count in the header does not fit the address space (the text says
    /// which one).
    #[error("counts overflow: {0}")]
    Overflow(&'static str),
    /// A well-formed frame of a kind the receiver does not take in its
    /// state (a handshake frame after the handshake, say).
    #[error("{0:?} frame is not allowed here")]
    Unexpected(Kind),
    /// A control message that is not valid JSON for [`crate::control::Control`],
    /// or one the chain protocol refuses; the text says why.
    #[error("control message is not valid: {0}")]
    Control(String),
}

/// The 8-byte prefix, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// what the frame is
    pub kind: Kind,
    /// [`FLAG_DENSE`] and [`FLAG_CODED`]; other bits are ignored
    pub flags: u16,
    /// whole frame, prefix included
    pub frame_len: usize,
}

/// Parses and bounds-checks a prefix. `body_max` is the bound for this connection
/// (tiny before the handshake, `frame_bytes_max` after).
pub fn parse_prefix(p: &[u8; 8], body_max: usize) -> Result<Prefix, WireError> {
    let body = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
    if p[4] != WIRE_VERSION {
        return Err(WireError::Version(p[4]));
    }
    let kind = Kind::from_u8(p[5]).ok_or(WireError::UnknownKind(p[5]))?;
    if body > body_max {
        return Err(WireError::TooLong { len: body, max: body_max });
    }
    if !body.is_multiple_of(8) {
        return Err(WireError::Unaligned(body));
    }
    Ok(Prefix { kind, flags: u16::from_le_bytes([p[6], p[7]]), frame_len: PREFIX_BYTES + body })
}

/// Total bytes of a frame whose content after the prefix is `content` bytes.
pub fn padded_len(content: usize) -> usize {
    PREFIX_BYTES + content.div_ceil(8) * 8
}

fn write_prefix(buf: &mut [u8], kind: Kind, flags: u16) {
    let body = (buf.len() - PREFIX_BYTES) as u32;
    buf[..4].copy_from_slice(&body.to_le_bytes());
    buf[4] = WIRE_VERSION;
    buf[5] = kind as u8;
    buf[6..8].copy_from_slice(&flags.to_le_bytes());
}

/// The handshake frames are tiny; this is the bound to use before authentication.
pub const HANDSHAKE_BODY_MAX: usize = HANDSHAKE_FRAME_BYTES_MAX - PREFIX_BYTES;
