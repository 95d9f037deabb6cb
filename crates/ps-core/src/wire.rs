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
//! [`decode`] checks the version, the kind, every count against the bytes present
//! (with overflow-checked arithmetic), and never panics on any input (a property
//! test feeds it random bytes).

use crate::limits::{CONTROL_BYTES_MAX, HANDSHAKE_FRAME_BYTES_MAX};

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

/// A decoded frame, borrowing its payload from the receive buffer.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    /// The server's first handshake frame ([`Kind::Challenge`]).
    Challenge {
        /// the server's fresh nonce
        nonce: &'a [u8; NONCE_BYTES],
    },
    /// The client's handshake frame ([`Kind::Hello`]).
    Hello {
        /// the client's [`crate::control::Role`], as its byte
        role: u8,
        /// a number the client gives itself (the node runtime: a pid, a
        /// shard or replica index); covered by the MAC, checked by no one
        node: u32,
        /// the client's fresh nonce
        nonce: &'a [u8; NONCE_BYTES],
        /// [`crate::auth::JobSecret::client_mac`] over both nonces, `role` and `node`
        mac: &'a [u8; MAC_BYTES],
    },
    /// The server's last handshake frame ([`Kind::Welcome`]).
    Welcome {
        /// [`crate::auth::JobSecret::server_mac`] over both nonces
        mac: &'a [u8; MAC_BYTES],
    },
    /// Any data frame but an error. keys: little-endian u64s; vals:
    /// little-endian f32s (read them with [`keys_of`] and [`vals_of`])
    Data {
        /// the header; its counts are checked against the payload
        h: DataHeader,
        /// `a` keys of a sparse push, pull, push-pull or refresh (8 bytes each); else empty
        keys: &'a [u8],
        /// the values (4 bytes each), or the inner frame of a `Forward`, or
        /// the chunk of a `Snapshot`; empty for the kinds with no payload
        vals: &'a [u8],
    },
    /// A shard refused one frame ([`Kind::Error`]).
    Error {
        /// the refused frame's `table`, `sub`, `ts` and `dense`; `b` the message length
        h: DataHeader,
        /// why, for a person; `"(not utf-8)"` if the bytes were not
        message: &'a str,
    },
    /// The JSON bytes of a control message (parse with
    /// [`crate::control::Control::from_json`]).
    Control(&'a [u8]),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes one whole frame (prefix included). Never panics.
pub fn decode(frame: &[u8], body_max: usize) -> Result<Frame<'_>, WireError> {
    if frame.len() < PREFIX_BYTES {
        return Err(WireError::Short { kind: Kind::Control, len: frame.len(), need: PREFIX_BYTES });
    }
    let p = parse_prefix(frame[..8].try_into().expect("8 bytes"), body_max)?;
    if p.frame_len != frame.len() {
        return Err(WireError::Short { kind: p.kind, len: frame.len(), need: p.frame_len });
    }
    let need = |n: usize| {
        if frame.len() < n {
            Err(WireError::Short { kind: p.kind, len: frame.len(), need: n })
        } else {
            Ok(())
        }
    };
    match p.kind {
        Kind::Challenge => {
            need(8 + NONCE_BYTES)?;
            Ok(Frame::Challenge { nonce: frame[8..40].try_into().expect("32") })
        }
        Kind::Hello => {
            need(16 + NONCE_BYTES + MAC_BYTES)?;
            Ok(Frame::Hello {
                role: frame[8],
                node: u32_at(frame, 12),
                nonce: frame[16..48].try_into().expect("32"),
                mac: frame[48..80].try_into().expect("32"),
            })
        }
        Kind::Welcome => {
            need(8 + MAC_BYTES)?;
            Ok(Frame::Welcome { mac: frame[8..40].try_into().expect("32") })
        }
        Kind::Control => {
            need(16)?;
            let n = u64_at(frame, 8);
            let n = usize::try_from(n).map_err(|_| WireError::Overflow("control length"))?;
            if n > CONTROL_BYTES_MAX {
                return Err(WireError::TooLong { len: n, max: CONTROL_BYTES_MAX });
            }
            let end = 16usize.checked_add(n).ok_or(WireError::Overflow("control length"))?;
            need(end)?;
            if padded_len(end - 8) != frame.len() {
                return Err(WireError::Trailing { kind: p.kind, extra: frame.len() - padded_len(end - 8) });
            }
            Ok(Frame::Control(&frame[16..end]))
        }
        kind => {
            need(DATA_HEADER_BYTES)?;
            let h = DataHeader {
                kind,
                dense: p.flags & FLAG_DENSE != 0,
                table: u32_at(frame, 8),
                sub: u32_at(frame, 12),
                ts: u64_at(frame, 16),
                a: u64_at(frame, 24),
                b: u64_at(frame, 32),
            };
            if kind == Kind::Error {
                let n = usize::try_from(h.b).map_err(|_| WireError::Overflow("error length"))?;
                let end = DATA_HEADER_BYTES.checked_add(n).ok_or(WireError::Overflow("error length"))?;
                need(end)?;
                let message = std::str::from_utf8(&frame[DATA_HEADER_BYTES..end]).unwrap_or("(not utf-8)");
                return Ok(Frame::Error { h, message });
            }
            let (kb, vb) = h.payload_parts().ok_or(WireError::Overflow("payload counts"))?;
            let end = DATA_HEADER_BYTES
                .checked_add(kb)
                .and_then(|x| x.checked_add(vb))
                .ok_or(WireError::Overflow("payload counts"))?;
            need(end)?;
            let padded = padded_len(end - PREFIX_BYTES);
            if padded != frame.len() {
                return Err(WireError::Trailing { kind, extra: frame.len().saturating_sub(padded) });
            }
            let keys = &frame[DATA_HEADER_BYTES..DATA_HEADER_BYTES + kb];
            let vals = &frame[DATA_HEADER_BYTES + kb..end];
            Ok(Frame::Data { h, keys, vals })
        }
    }
}

/// The server's `Challenge` frame, carrying its nonce. Handshake and control
/// frames are small, so these allocate (fine off the data path).
pub fn encode_challenge(nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let mut f = vec![0u8; padded_len(NONCE_BYTES)];
    write_prefix(&mut f, Kind::Challenge, 0);
    f[8..40].copy_from_slice(nonce);
    f
}

/// The client's `Hello` frame (see [`Frame::Hello`] for the fields).
pub fn encode_hello(role: u8, node: u32, nonce: &[u8; NONCE_BYTES], mac: &[u8; MAC_BYTES]) -> Vec<u8> {
    let mut f = vec![0u8; padded_len(8 + NONCE_BYTES + MAC_BYTES)];
    write_prefix(&mut f, Kind::Hello, 0);
    f[8] = role;
    f[12..16].copy_from_slice(&node.to_le_bytes());
    f[16..48].copy_from_slice(nonce);
    f[48..80].copy_from_slice(mac);
    f
}

/// The server's `Welcome` frame, carrying its MAC.
pub fn encode_welcome(mac: &[u8; MAC_BYTES]) -> Vec<u8> {
    let mut f = vec![0u8; padded_len(MAC_BYTES)];
    write_prefix(&mut f, Kind::Welcome, 0);
    f[8..40].copy_from_slice(mac);
    f
}

/// Frame length of a control message with `n` JSON bytes.
pub fn control_len(n: usize) -> usize {
    padded_len(8 + n)
}

/// Writes a control frame around `json` into `buf` (exactly `control_len(json.len())`).
pub fn write_control(buf: &mut [u8], json: &[u8]) {
    buf.fill(0);
    write_prefix(buf, Kind::Control, 0);
    buf[8..16].copy_from_slice(&(json.len() as u64).to_le_bytes());
    buf[16..16 + json.len()].copy_from_slice(json);
}

/// Frame length of an error frame carrying `msg`.
pub fn error_len(msg: &str) -> usize {
    padded_len(DATA_HEADER_BYTES - PREFIX_BYTES + msg.len())
}

/// Writes an error frame (answering request `h`) into `buf` (exactly `error_len(msg)`).
pub fn write_error(buf: &mut [u8], h: &DataHeader, msg: &str) {
    buf.fill(0);
    let e = DataHeader {
        kind: Kind::Error,
        dense: h.dense,
        table: h.table,
        sub: h.sub,
        ts: h.ts,
        a: 0,
        b: msg.len() as u64,
    };
    e.write(buf);
    buf[DATA_HEADER_BYTES..DATA_HEADER_BYTES + msg.len()].copy_from_slice(msg.as_bytes());
}

/// Views little-endian u64 payload bytes as keys: no copy when aligned (always,
/// for frames in this crate's receive buffers), else a copy into `scratch`.
pub fn keys_of<'a>(bytes: &'a [u8], scratch: &'a mut Vec<u64>) -> &'a [u64] {
    match bytemuck::try_cast_slice(bytes) {
        Ok(k) => k,
        Err(_) => {
            scratch.clear();
            scratch.extend(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))));
            scratch
        }
    }
}

/// Views little-endian f32 payload bytes as values (see [`keys_of`]).
pub fn vals_of<'a>(bytes: &'a [u8], scratch: &'a mut Vec<f32>) -> &'a [f32] {
    match bytemuck::try_cast_slice(bytes) {
        Ok(v) => v,
        Err(_) => {
            scratch.clear();
            scratch.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))));
            scratch
        }
    }
}

/// Copies little-endian f32 bytes into `dst` (whatever the alignment of `src`).
pub fn copy_vals(dst: &mut [f32], src: &[u8]) {
    crate::kernels::copy_bytes(bytemuck::cast_slice_mut::<f32, u8>(dst), src);
}

/// The handshake frames are tiny; this is the bound to use before authentication.
pub const HANDSHAKE_BODY_MAX: usize = HANDSHAKE_FRAME_BYTES_MAX - PREFIX_BYTES;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(h: DataHeader, keys: &[u64], vals: &[f32]) -> Vec<u8> {
        let mut f = vec![0u8; h.frame_len().unwrap()];
        h.write(&mut f);
        let kb: &[u8] = bytemuck::cast_slice(keys);
        f[40..40 + kb.len()].copy_from_slice(kb);
        let vb: &[u8] = bytemuck::cast_slice(vals);
        f[40 + kb.len()..40 + kb.len() + vb.len()].copy_from_slice(vb);
        f
    }

    #[test]
    fn encode_matches_write() {
        let h = DataHeader { kind: Kind::PushPull, dense: true, table: 3, sub: 9, ts: 99, a: 12, b: 5 };
        let mut f = vec![0u8; h.frame_len().unwrap()];
        h.write(&mut f);
        assert_eq!(h.encode(f.len())[..], f[..DATA_HEADER_BYTES]);
    }

    #[test]
    fn data_round_trip() {
        let h = DataHeader { kind: Kind::Push, dense: false, table: 3, sub: 1, ts: 99, a: 2, b: 3 };
        let f = data(h, &[5, 9], &[1.0, 2.0, 3.0]);
        assert_eq!(f.len() % 8, 0);
        match decode(&f, 1 << 20).unwrap() {
            Frame::Data { h: h2, keys, vals } => {
                assert_eq!(h2, h);
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                assert_eq!(keys_of(keys, &mut ks), &[5, 9]);
                assert_eq!(vals_of(vals, &mut vs), &[1.0, 2.0, 3.0]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_and_error_round_trip() {
        let json = br#"{"hello":1}"#;
        let mut f = vec![0u8; control_len(json.len())];
        write_control(&mut f, json);
        assert_eq!(decode(&f, 1 << 20).unwrap(), Frame::Control(json));
        let h = DataHeader { kind: Kind::Pull, dense: true, table: 1, sub: 0, ts: 7, a: 0, b: 0 };
        let mut e = vec![0u8; error_len("no such table")];
        write_error(&mut e, &h, "no such table");
        match decode(&e, 1 << 20).unwrap() {
            Frame::Error { h, message } => {
                assert_eq!((h.ts, message), (7, "no such table"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lies_about_lengths_are_refused() {
        let h = DataHeader { kind: Kind::Push, dense: false, table: 0, sub: 0, ts: 0, a: 2, b: 2 };
        let mut f = data(h, &[1, 2], &[1.0, 2.0]);
        // claim more keys than present
        f[24..32].copy_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(decode(&f, 1 << 20), Err(WireError::Short { .. })));
        // counts that overflow
        f[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&f, 1 << 20), Err(WireError::Overflow(_))));
        // prefix above the bound
        assert!(matches!(parse_prefix(&[0, 0, 0, 1, 1, 10, 0, 0], 1 << 20), Err(WireError::TooLong { .. })));
        assert!(matches!(parse_prefix(&[8, 0, 0, 0, 2, 10, 0, 0], 1 << 20), Err(WireError::Version(2))));
        assert!(matches!(parse_prefix(&[3, 0, 0, 0, 1, 10, 0, 0], 1 << 20), Err(WireError::Unaligned(3))));
        assert!(matches!(parse_prefix(&[8, 0, 0, 0, 1, 99, 0, 0], 1 << 20), Err(WireError::UnknownKind(99))));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, 1 << 20);
        }

        #[test]
        fn decode_never_panics_on_valid_prefixes(kind in prop::sample::select(vec![1u8,2,3,10,11,12,13,14,15,20]),
                                                 flags in any::<u16>(), body in proptest::collection::vec(any::<u8>(), 0..40)) {
            let n = body.len() / 8 * 8;
            let mut f = vec![0u8; 8 + n];
            f[..4].copy_from_slice(&(n as u32).to_le_bytes());
            f[4] = WIRE_VERSION;
            f[5] = kind;
            f[6..8].copy_from_slice(&flags.to_le_bytes());
            f[8..].copy_from_slice(&body[..n]);
            let _ = decode(&f, 1 << 20);
        }
    }
}
