//! A simple click-log format: one impression per line, the label (0/1 or
//! ±1, mapped to ±1) then categorical fields, separated by tabs (Criteo's
//! layout). Field j with text t becomes the binary feature
//! `1 + hash(j, t) mod key_space` (keys from 1, as in LIBSVM); empty fields are
//! missing values and add no feature.

use std::path::Path;

use ps_core::rng::mix64;

use super::{lines, read_part, Rows};
use crate::error::{BadLine, DataError};

/// Reads part `rank` of `parts` of a click log, hashing into `key_space` keys.
pub fn read(path: &Path, key_space: u64, rank: usize, parts: usize, threads: usize) -> Result<Rows, DataError> {
    if key_space == 0 {
        return Err(DataError::NoKeySpace);
    }
    read_part(path, rank, parts, threads, |text, first| parse(text, first, key_space))
}

/// The key of field `field` holding `text`.
pub fn key_of(field: usize, text: &[u8], key_space: u64) -> u64 {
    // FNV-1a over the bytes, then mixed with the field number
    let h = text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    1 + mix64(h ^ mix64(field as u64 + 1)) % key_space
}

pub(crate) fn parse(text: &[u8], first: usize, key_space: u64) -> Result<Rows, BadLine> {
    let mut rows = Rows::new();
    for (no, line) in lines(text, first) {
        let mut fields = line.split(|&b| b == b'\t');
        let label = fields.next().unwrap_or_default();
        let label = match label {
            b"1" | b"+1" => 1.0,
            b"0" | b"-1" => -1.0,
            other => {
                let label = String::from_utf8_lossy(other);
                return Err(BadLine::new(no, format!("label {label:?} is not 0, 1 or ±1")));
            }
        };
        for (j, f) in fields.enumerate() {
            if !f.is_empty() {
                rows.keys.push(key_of(j, f, key_space));
                rows.vals.push(1.0);
            }
        }
        rows.labels.push(label);
        rows.start.push(rows.keys.len());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_fields_and_skips_missing_ones() {
        let rows = parse(b"1\ta\t\tb\n0\ta\tx\tb\n", 1, 1 << 20).unwrap();
        assert_eq!(rows.labels, vec![1.0, -1.0]);
        assert_eq!(rows.start, vec![0, 2, 5]);
        // the same text in the same field is the same key; in another field, another
        assert_eq!(rows.keys[0], rows.keys[2]);
        assert_eq!(rows.keys[1], rows.keys[4]);
        assert_ne!(key_of(0, b"a", 1 << 20), key_of(1, b"a", 1 << 20));
        assert!(rows.keys.iter().all(|&k| (1..=1 << 20).contains(&k)));
        assert!(parse(b"2\ta\n", 7, 10).unwrap_err().to_string().starts_with("line 7"));
    }
}
