//! The chain's own frames: `Forward` (a counted frame wrapped with its
//! origin and number), `Ack`, `Bind`, and the halves of a push-pull.
//!
//! Must never: hold state, or send anything (it only builds and reads bytes);
//! a frame it reads comes from a peer, so a bad one is a `WireError`, never
//! a panic.

use crate::wire::{self, DataFrame, DataHeader, ForwardHeader, Frame, Kind, WireError};

pub(super) fn header_frame(h: DataHeader) -> Vec<u8> {
    let mut f = vec![0u8; h.frame_len().expect("a header frame is small")];
    h.write(&mut f);
    f
}

pub(super) fn forward_frame(origin: u32, seq: u64, inner: &[u8]) -> Vec<u8> {
    let h = ForwardHeader { origin: origin as u64, number: seq, inner_words: (inner.len() / 4) as u64 }.header();
    let mut f = vec![0u8; h.frame_len().expect("a forwarded request fits a frame")];
    h.write(&mut f);
    f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + inner.len()].copy_from_slice(inner);
    f
}

/// The header of a data frame (its payload checked as the kind says).
pub(super) fn data_header(frame: &[u8]) -> Result<DataHeader, WireError> {
    match wire::decode(frame, frame.len())? {
        Frame::Data { h, .. } => Ok(h),
        Frame::Error { h, .. } => Ok(h),
        _ => Err(WireError::Unexpected(Kind::Control)),
    }
}

/// A client's frame decoded once (every kind but a data frame is refused as
/// `Control` is), with the bound the shard decodes with.
pub(super) fn client_frame(frame: &[u8], body_max: usize) -> Result<DataFrame<'_>, WireError> {
    wire::decode_data(frame, body_max).map_err(|e| match e {
        WireError::Unexpected(_) => WireError::Unexpected(Kind::Control),
        e => e,
    })
}

/// A push-pull as the push it carries (what the next copies apply).
pub(super) fn push_of(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    wire::set_kind(&mut f, Kind::Push);
    f
}

/// A push-pull (decoded) as the pull it carries: the same header, the keys, no values.
pub(super) fn pull_of(d: &DataFrame<'_>) -> Result<Vec<u8>, WireError> {
    let keys = d.keys;
    let h = DataHeader { kind: Kind::Pull, ..d.h };
    let mut f = vec![0u8; h.frame_len().ok_or(WireError::Overflow("pull"))?];
    h.write(&mut f);
    f[wire::DATA_HEADER_BYTES..wire::DATA_HEADER_BYTES + keys.len()].copy_from_slice(keys);
    Ok(f)
}
