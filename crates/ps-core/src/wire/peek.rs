//! Reading (and patching) a frame's prefix and header in place, without
//! decoding it: for routing a frame to the code that decodes it, and for the
//! frames a node built itself. Nothing here checks a payload's counts: a
//! frame from a peer is decoded once ([`super::decode`]) before it is used.

use super::{DataHeader, Kind, DATA_HEADER_BYTES, FLAG_CODED, FLAG_DENSE, PREFIX_BYTES};

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The kind of a frame (its prefix's kind byte), or `None` when the bytes
/// are shorter than a prefix or the byte is no [`Kind`]. The version and
/// the lengths are not checked: route by it, then decode.
pub fn peek_kind(frame: &[u8]) -> Option<Kind> {
    frame.get(5).and_then(|&k| Kind::from_u8(k))
}

/// Sets the kind of a frame (at least a prefix) in place: the same header
/// and payload as another kind (a push-pull's push half).
pub fn set_kind(frame: &mut [u8], kind: Kind) {
    frame[5] = kind as u8;
}

/// The prefix's flags ([`FLAG_DENSE`], [`FLAG_CODED`]), or `None` when the
/// bytes are shorter than a prefix.
pub fn peek_flags(frame: &[u8]) -> Option<u16> {
    frame.get(6..PREFIX_BYTES).map(|f| u16::from_le_bytes([f[0], f[1]]))
}

/// Whether a frame (at least a prefix) is coded by a table filter.
pub fn is_coded(frame: &[u8]) -> bool {
    peek_flags(frame).is_some_and(|f| f & FLAG_CODED != 0)
}

/// Sets [`FLAG_CODED`] in a frame's prefix (a filter's coding of it follows the header).
pub fn mark_coded(frame: &mut [u8]) {
    let flags = peek_flags(frame).expect("a prefix") | FLAG_CODED;
    frame[6..PREFIX_BYTES].copy_from_slice(&flags.to_le_bytes());
}

/// The header of a data frame as its bytes say, coded or not, or `None` when
/// they are shorter than a header or the kind is unknown. No count is checked
/// against the payload (that is [`super::decode`]'s): for frames this node
/// built, and for a coded frame's header.
pub fn peek_header(frame: &[u8]) -> Option<DataHeader> {
    if frame.len() < DATA_HEADER_BYTES {
        return None;
    }
    Some(DataHeader {
        kind: peek_kind(frame)?,
        dense: peek_flags(frame)? & FLAG_DENSE != 0,
        table: u32_at(frame, 8),
        sub: u32_at(frame, 12),
        ts: u64_at(frame, 16),
        a: u64_at(frame, 24),
        b: u64_at(frame, 32),
    })
}
