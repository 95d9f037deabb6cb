//! What the table filters' codecs cost and save, per push frame.
//!
//! The frame: a sparse push of 8,192 keys (ascending, spread like a feature
//! block) with two f32 values each (a gradient and a curvature, as the lr app
//! pushes), 128 KiB of payload. For each codec configuration the bench encodes
//! the frame on the worker side and decodes it on the shard side
//! (`ps_core::filter::{Encoder, Decoder}`); the baseline of the same run is a
//! memcpy of the plain frame. Before timing it prints the bytes on the wire of
//! the first and of a repeated send (key caching sends a repeated key list as
//! its hash) against the plain frame.
//!
//! Run with `cargo bench --bench filters` (add `-- --quick` for a fast pass).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ps_core::filter::{Decoder, Encoder, FilterSpec};
use ps_core::keys::TableId;
use ps_core::rng::SplitMix64;
use ps_core::transport::PeerId;
use ps_core::wire::{DataHeader, Kind};

const KEYS: usize = 8192;
const DIM: usize = 2;

fn plain_frame() -> Vec<u8> {
    let mut r = SplitMix64::new(11);
    let mut keys: Vec<u64> = (0..KEYS as u64).map(|i| 1 + i * 16 + r.below(16)).collect();
    keys.dedup();
    let vals: Vec<f32> =
        (0..KEYS * DIM).map(|i| if i % 2 == 0 { r.normal() as f32 } else { r.next_f64() as f32 * 40.0 }).collect();
    let h =
        DataHeader { kind: Kind::Push, dense: false, table: 0, sub: 0, ts: 1, a: KEYS as u64, b: (KEYS * DIM) as u64 };
    let len = h.frame_len().expect("small");
    let mut f = h.encode(len).to_vec();
    f.extend(keys.iter().flat_map(|k| k.to_le_bytes()));
    f.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
    f.resize(len, 0);
    f
}

fn configs() -> Vec<(&'static str, Vec<FilterSpec>)> {
    vec![
        ("key_cache", vec![FilterSpec::KeyCache]),
        ("lz4", vec![FilterSpec::Lz4]),
        ("quantize16", vec![FilterSpec::Quantize { bits: 16 }]),
        ("quantize8", vec![FilterSpec::Quantize { bits: 8 }]),
        ("key_cache+quantize8+lz4", vec![FilterSpec::KeyCache, FilterSpec::Quantize { bits: 8 }, FilterSpec::Lz4]),
    ]
}

fn bench(c: &mut Criterion) {
    let plain = plain_frame();
    let peer = PeerId { index: 1, generation: 0 };
    println!("filters: a push of {KEYS} keys x {DIM} f32 is {} bytes plain", plain.len());
    for (name, specs) in configs() {
        let mut enc = Encoder::default();
        let first = enc.encode(peer, TableId(0), &specs, &plain, DIM, true).expect("encodes").len();
        let again = enc.encode(peer, TableId(0), &specs, &plain, DIM, true).expect("encodes").len();
        println!(
            "filters: {name:<26} first send {first:>7} B ({:.2} of plain), repeated {again:>7} B ({:.2})",
            first as f64 / plain.len() as f64,
            again as f64 / plain.len() as f64
        );
    }
    let mut g = c.benchmark_group("filters");
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function("memcpy (baseline)", |b| {
        let mut dst = vec![0u8; plain.len()];
        b.iter(|| dst.copy_from_slice(black_box(&plain)))
    });
    for (name, specs) in configs() {
        g.bench_function(format!("{name} encode+decode"), |b| {
            let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
            b.iter(|| {
                let coded = enc.encode(peer, TableId(0), &specs, black_box(&plain), DIM, true).expect("encodes");
                black_box(dec.decode(peer, &coded, 1 << 26).expect("decodes"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
