//! Decoding: one whole frame in, a [`Frame`] out that borrows its payload from
//! the receive buffer, and the views of that payload as keys and values. Every
//! count is checked against the bytes present; nothing here panics on any input.

use super::{
    padded_len, parse_prefix, DataHeader, Kind, WireError, DATA_HEADER_BYTES, FLAG_DENSE, MAC_BYTES, NONCE_BYTES,
    PREFIX_BYTES,
};
use crate::limits::CONTROL_BYTES_MAX;

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

/// A data frame decoded once, to hand down a hop (chain to shard) without
/// decoding it again: [`Frame::Data`]'s parts and the bytes they came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DataFrame<'a> {
    /// the header; its counts are checked against the payload
    pub h: DataHeader,
    /// as in [`Frame::Data`]
    pub keys: &'a [u8],
    /// as in [`Frame::Data`]
    pub vals: &'a [u8],
    /// the whole frame, prefix included (for code that keeps a copy of it)
    pub bytes: &'a [u8],
}

/// Decodes one whole frame that must be a data frame ([`decode`]'s checks);
/// any other is [`WireError::Unexpected`] with its kind.
pub fn decode_data(frame: &[u8], body_max: usize) -> Result<DataFrame<'_>, WireError> {
    match decode(frame, body_max)? {
        Frame::Data { h, keys, vals } => Ok(DataFrame { h, keys, vals, bytes: frame }),
        Frame::Error { .. } => Err(WireError::Unexpected(Kind::Error)),
        Frame::Challenge { .. } => Err(WireError::Unexpected(Kind::Challenge)),
        Frame::Hello { .. } => Err(WireError::Unexpected(Kind::Hello)),
        Frame::Welcome { .. } => Err(WireError::Unexpected(Kind::Welcome)),
        Frame::Control(_) => Err(WireError::Unexpected(Kind::Control)),
    }
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
