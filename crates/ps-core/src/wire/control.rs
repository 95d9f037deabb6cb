//! The frames off the data path, encoded: the handshake's three (`Challenge`,
//! `Hello`, `Welcome`), control messages (JSON) and error frames. Their
//! decoding is [`super::decode`]'s.

use super::{padded_len, write_prefix, DataHeader, Kind, DATA_HEADER_BYTES, MAC_BYTES, NONCE_BYTES, PREFIX_BYTES};

/// The server's `Challenge` frame, carrying its nonce. Handshake and control
/// frames are small, so these allocate (fine off the data path).
pub fn encode_challenge(nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let mut f = vec![0u8; padded_len(NONCE_BYTES)];
    write_prefix(&mut f, Kind::Challenge, 0);
    f[8..40].copy_from_slice(nonce);
    f
}

/// The client's `Hello` frame (see [`Frame::Hello`](super::Frame::Hello) for the fields).
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
