//! The per-job secret and the mutual HMAC-SHA256 challenge-response every
//! connection runs before its first data frame (DESIGN.md invariant 5).
//!
//! ```text
//! server -> client  Challenge { ns }                       ns: 32 random bytes
//! client -> server  Hello { role, node, nc, mac_c }        mac_c = HMAC(secret, "pslab/client/1" | ns | nc | role | node)
//! server -> client  Welcome { mac_s }                      mac_s = HMAC(secret, "pslab/server/1" | nc | ns)
//! ```
//! Fresh nonces on both sides mean a recorded exchange cannot be replayed, and
//! the server proves itself too, so a worker never sends parameters to an
//! impostor. MACs are compared in constant time. Randomness comes from the caller
//! (the transport asks the OS): this crate does no I/O.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{MAC_BYTES, NONCE_BYTES};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a job secret.
pub const SECRET_BYTES: usize = 32;

/// The secret every process of one job shares, handed out by the launcher.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret([u8; SECRET_BYTES]);

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSecret(..)")
    }
}

/// Why a job secret's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not 64 hex digits long; the length given is in bytes, after trimming.
    /// `pslab secret` prints a good one.
    #[error("the job secret must be 64 hex digits (32 bytes); got {0} characters. Generate one with `pslab secret`")]
    Length(usize),
    /// A byte that is not a hex digit, at this 0-based position after trimming.
    #[error("the job secret has a non-hex character at position {0}")]
    NotHex(usize),
}

impl JobSecret {
    /// The secret with these bytes.
    pub fn from_bytes(b: [u8; SECRET_BYTES]) -> Self {
        Self(b)
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, SecretError> {
        let s = s.trim();
        if s.len() != SECRET_BYTES * 2 {
            return Err(SecretError::Length(s.len()));
        }
        let mut out = [0u8; SECRET_BYTES];
        for (i, c) in s.as_bytes().chunks(2).enumerate() {
            let d = |j: usize| (c[j] as char).to_digit(16).ok_or(SecretError::NotHex(2 * i + j));
            out[i] = (d(0)? * 16 + d(1)?) as u8;
        }
        Ok(Self(out))
    }

    /// The secret as 64 lower-case hex digits (what [`JobSecret::from_hex`] reads).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The MAC state over what a client proves: both nonces and its identity.
    fn client_state(&self, ns: &[u8; NONCE_BYTES], nc: &[u8; NONCE_BYTES], role: u8, node: u32) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"pslab/client/1");
        m.update(ns);
        m.update(nc);
        m.update(&[role]);
        m.update(&node.to_le_bytes());
        m
    }

    /// The MAC state over what a server proves: both nonces, the other way round.
    fn server_state(&self, ns: &[u8; NONCE_BYTES], nc: &[u8; NONCE_BYTES]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"pslab/server/1");
        m.update(nc);
        m.update(ns);
        m
    }

    /// The client's proof, over both nonces and the identity it claims.
    pub fn client_mac(&self, ns: &[u8; NONCE_BYTES], nc: &[u8; NONCE_BYTES], role: u8, node: u32) -> [u8; MAC_BYTES] {
        self.client_state(ns, nc, role, node).finalize().into_bytes().into()
    }

    /// The server's proof.
    pub fn server_mac(&self, ns: &[u8; NONCE_BYTES], nc: &[u8; NONCE_BYTES]) -> [u8; MAC_BYTES] {
        self.server_state(ns, nc).finalize().into_bytes().into()
    }

    /// Constant-time check of a client's proof.
    pub fn verify_client(
        &self,
        ns: &[u8; NONCE_BYTES],
        nc: &[u8; NONCE_BYTES],
        role: u8,
        node: u32,
        mac: &[u8],
    ) -> bool {
        self.client_state(ns, nc, role, node).verify_slice(mac).is_ok()
    }

    /// Constant-time check of a server's proof.
    pub fn verify_server(&self, ns: &[u8; NONCE_BYTES], nc: &[u8; NONCE_BYTES], mac: &[u8]) -> bool {
        self.server_state(ns, nc).verify_slice(mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let s = JobSecret::from_bytes([0xab; 32]);
        assert_eq!(JobSecret::from_hex(&s.to_hex()).unwrap(), s);
        assert_eq!(JobSecret::from_hex("abc"), Err(SecretError::Length(3)));
        let bad = "g".repeat(64);
        assert_eq!(JobSecret::from_hex(&bad), Err(SecretError::NotHex(0)));
        assert!(!format!("{s:?}").contains("ab"), "Debug must not print the secret");
    }

    #[test]
    fn macs_bind_secret_nonces_and_identity() {
        let a = JobSecret::from_bytes([1; 32]);
        let b = JobSecret::from_bytes([2; 32]);
        let (ns, nc) = ([3u8; 32], [4u8; 32]);
        let mac = a.client_mac(&ns, &nc, 1, 7);
        assert!(a.verify_client(&ns, &nc, 1, 7, &mac));
        assert!(!b.verify_client(&ns, &nc, 1, 7, &mac), "other job's secret");
        assert!(!a.verify_client(&nc, &ns, 1, 7, &mac), "swapped nonces (replay)");
        assert!(!a.verify_client(&ns, &nc, 2, 7, &mac), "other role");
        assert!(!a.verify_client(&ns, &nc, 1, 8, &mac), "other node");
        let smac = a.server_mac(&ns, &nc);
        assert!(a.verify_server(&ns, &nc, &smac));
        assert!(!a.verify_server(&ns, &nc, &mac), "a client MAC is not a server MAC");
    }
}
