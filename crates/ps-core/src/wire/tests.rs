//! The wire format's unit tests: round trips of every frame shape, headers
//! that lie about lengths, and property tests that `decode` never panics.

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

#[test]
fn peeks_read_what_write_and_decode_see() {
    let h = DataHeader { kind: Kind::PushPull, dense: true, table: 3, sub: 9, ts: 99, a: 12, b: 2 };
    let mut f = data(h, &[], &[1.0, 2.0]);
    assert_eq!(peek_kind(&f), Some(Kind::PushPull));
    assert_eq!(peek_header(&f), Some(h));
    assert!(!is_coded(&f));
    set_kind(&mut f, Kind::Push);
    match decode(&f, 1 << 20).unwrap() {
        Frame::Data { h: h2, .. } => assert_eq!(h2, DataHeader { kind: Kind::Push, ..h }),
        other => panic!("{other:?}"),
    }
    mark_coded(&mut f);
    assert!(is_coded(&f));
    assert_eq!(peek_flags(&f), Some(FLAG_DENSE | FLAG_CODED));
    assert_eq!(peek_header(&f), Some(DataHeader { kind: Kind::Push, ..h }), "a coded frame's header");
    // too short, or an unknown kind: nothing
    assert_eq!(peek_kind(&f[..5]), None);
    assert_eq!(peek_header(&f[..39]), None);
    f[5] = 99;
    assert_eq!(peek_kind(&f), None);
}
