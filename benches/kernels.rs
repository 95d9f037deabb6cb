//! Merge-kernel throughput, per instruction set.
//!
//! * `dense_add`: `dst += src` at 16 KiB (L1), 1 MiB (L2/L3) and 256 MiB (DRAM)
//!   per operand, next to a `copy` of the same size as the memory-bandwidth
//!   baseline of the same run. Throughput is bytes of one operand.
//! * `bulk_copy`: the datapath's copy kernel (`Kernels::copy`, through which
//!   `copy_bytes` sends values into send buffers and READ images into
//!   responses) per instruction set, next to `copy_from_slice` (glibc's
//!   `memcpy`) at 4 KiB, 64 KiB, 256 KiB (a chunk) and 4 MiB.
//! * `axpy`: `dst += a * src` at the two cache-resident sizes.
//! * `scatter_add`: keyed row adds into a 4M-float (16 MiB) table; throughput
//!   is keys per second. `dim1` uses 1M random keys, `dim1_sorted` the same
//!   keys sorted, `dim8`/`dim32` 64K random keys.
//!
//! Run with `cargo bench --bench kernels` (add `-- --quick` for a fast pass).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use ps_core::kernels::{Isa, Kernels};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Bytes per operand, and the label used in benchmark ids.
const DENSE_SIZES: [(usize, &str); 3] = [(16 * KIB, "16KiB"), (MIB, "1MiB"), (256 * MIB, "256MiB")];
/// Sizes at or above this are "from DRAM": few, flat samples.
const BIG: usize = 64 * MIB;

/// Small deterministic generator (SplitMix64), so the bench needs no `rand`.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float in [-1, 1): normal numbers only, so no denormal slow paths.
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }
}

fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.next_f32()).collect()
}

fn configure_for_size(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, bytes: usize) {
    if bytes >= BIG {
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
    } else {
        group
            .sample_size(50)
            .sampling_mode(SamplingMode::Auto)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    }
}

fn dense_add(c: &mut Criterion) {
    let mut group = c.benchmark_group("dense_add");
    for (bytes, label) in DENSE_SIZES {
        let n = bytes / size_of::<f32>();
        let src = floats(n, 1);
        let mut dst = floats(n, 2);
        configure_for_size(&mut group, bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("copy/{label}"), |b| {
            b.iter(|| black_box(&mut dst[..]).copy_from_slice(black_box(&src)))
        });
        for k in Kernels::available() {
            group.bench_function(format!("add/{}/{label}", k.isa), |b| {
                b.iter(|| (k.add)(black_box(&mut dst), black_box(&src)))
            });
        }
    }
    group.finish();
}

fn bulk_copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("bulk_copy");
    for (bytes, label) in [(4 * KIB, "4KiB"), (64 * KIB, "64KiB"), (256 * KIB, "256KiB"), (4 * MIB, "4MiB")] {
        let src: Vec<u8> = (0..bytes).map(|i| (i * 31 + 7) as u8).collect();
        let mut dst = vec![0u8; bytes];
        configure_for_size(&mut group, bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("memcpy/{label}"), |b| {
            b.iter(|| black_box(&mut dst[..]).copy_from_slice(black_box(&src)))
        });
        for k in Kernels::available() {
            group.bench_function(format!("{}/{label}", k.isa), |b| {
                b.iter(|| (k.copy)(black_box(&mut dst), black_box(&src)))
            });
        }
    }
    group.finish();
}

fn axpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("axpy");
    for (bytes, label) in DENSE_SIZES.into_iter().filter(|&(b, _)| b < BIG) {
        let n = bytes / size_of::<f32>();
        let src = floats(n, 3);
        let mut dst = floats(n, 4);
        configure_for_size(&mut group, bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        for k in Kernels::available() {
            group.bench_function(format!("{}/{label}", k.isa), |b| {
                // a < 0 keeps dst from drifting far over many iterations.
                b.iter(|| (k.axpy)(black_box(&mut dst), black_box(-1e-3), black_box(&src)))
            });
        }
    }
    group.finish();
}

fn scatter_add(c: &mut Criterion) {
    const TABLE: usize = 4 * MIB; // floats in the destination table (16 MiB)
    let mut group = c.benchmark_group("scatter_add");
    configure_for_size(&mut group, 0);
    let mut dst = floats(TABLE, 5);
    let mut rng = Rng(6);

    let random_keys = |rng: &mut Rng, nkeys: usize, dim: usize| -> Vec<u32> {
        let rows = (TABLE / dim) as u32;
        (0..nkeys).map(|_| rng.below(rows)).collect()
    };
    let dim1 = random_keys(&mut rng, MIB, 1);
    let mut dim1_sorted = dim1.clone();
    dim1_sorted.sort_unstable();
    let cases = [
        ("dim1", dim1, 1usize),
        ("dim1_sorted", dim1_sorted, 1),
        ("dim8", random_keys(&mut rng, 64 * KIB, 8), 8),
        ("dim32", random_keys(&mut rng, 64 * KIB, 32), 32),
    ];
    for (name, idx, dim) in cases {
        let vals = floats(idx.len() * dim, 7);
        group.throughput(Throughput::Elements(idx.len() as u64));
        for k in Kernels::available() {
            group.bench_function(format!("{name}/{}", k.isa), |b| {
                b.iter(|| (k.scatter_add)(black_box(&mut dst), black_box(&idx), black_box(&vals), dim))
            });
        }
    }
    group.finish();
}

/// Prints which tables this CPU offers before the numbers start.
fn report_isa(_: &mut Criterion) {
    let names: Vec<String> = Kernels::available().iter().map(|k| k.isa.to_string()).collect();
    eprintln!("kernels: available [{}], best {}", names.join(", "), Kernels::best().isa);
    debug_assert!(Kernels::for_isa(Isa::Scalar).is_some());
}

criterion_group!(benches, report_isa, dense_add, bulk_copy, axpy, scatter_add);
criterion_main!(benches);
