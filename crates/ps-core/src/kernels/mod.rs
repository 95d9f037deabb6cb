#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
//! Merge kernels: the inner loops that fold pushed updates into parameter slabs.
//!
//! A server shard owns contiguous `f32` slabs. Workers push updates, and the
//! shard merges each one into its slab with one of three kernels:
//!
//! * [`Kernels::add`]: dense add, `dst[i] += src[i]` (a whole gradient or delta);
//! * [`Kernels::axpy`]: SGD-style `dst[i] += a * src[i]` (e.g. `a = -learning_rate`);
//! * [`Kernels::scatter_add`]: sparse add of `dim`-wide rows at the slots named by
//!   a list of `u32` keys, duplicates accumulating (embedding-table pushes).
//!
//! Each [`Kernels`] table holds plain `fn` pointers for one instruction set
//! ([`Isa`]); the server picks one table once ([`Kernels::best`]) and calls
//! through it. The scalar table is the reference. The AVX2 and AVX-512 tables
//! must give **bit-for-bit** the same results: every output element is produced
//! by the same sequence of single IEEE-754 operations in the same order (for
//! `axpy`: a separate multiply then add, never a fused multiply-add, in every
//! table), so vectorising across elements changes nothing but speed. Duplicated
//! keys in `scatter_add` are applied in key-list order by every table. The only
//! permitted difference is which NaN payload comes out when an input is NaN.
//!
//! The SIMD modules are compiled on `x86_64` only, and their tables are handed
//! out only after runtime feature detection said the CPU supports them.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

/// Which instruction set a kernel table uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust loops; always available; the reference.
    Scalar,
    /// 256-bit AVX2 (8 `f32` lanes).
    Avx2,
    /// 512-bit AVX-512 F + CD (16 `f32` lanes, gather/scatter, conflict detection).
    Avx512,
}

impl Isa {
    fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            other => Err(format!("unknown ISA {other:?} (expected \"scalar\", \"avx2\" or \"avx512\")")),
        }
    }
}

/// One table of merge kernels, all for one ISA. Plain fn pointers, chosen once.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    /// The instruction set every fn in this table uses.
    pub isa: Isa,
    /// `dst[i] += src[i]`. Panics (assert) if lengths differ — callers check first.
    pub add: fn(&mut [f32], &[f32]),
    /// `dst[i] += a * src[i]`. Same length contract.
    pub axpy: fn(&mut [f32], f32, &[f32]),
    /// For each i in `0..idx.len()`: `dst[idx[i]*dim .. idx[i]*dim+dim] += vals[i*dim .. i*dim+dim]`.
    /// Duplicated indices must accumulate correctly (every update counted).
    /// Preconditions checked with assert! before any unsafe: vals.len() == idx.len()*dim, dim >= 1,
    /// every `(idx[i] as usize + 1) * dim <= dst.len()` (check the max index once, not per element).
    pub scatter_add: fn(&mut [f32], &[u32], &[f32], usize),
    /// `dst.copy_from_slice(src)`, for the bulk copies of the datapath (values
    /// into a send buffer, READ images into a response): see [`copy_bytes`].
    /// Panics if the lengths differ.
    pub copy: fn(&mut [u8], &[u8]),
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    add: scalar::add,
    axpy: scalar::axpy,
    scatter_add: scalar::scatter_add,
    copy: scalar::copy,
};

// These two tables hold safe wrappers around `#[target_feature]` code. They
// are private and are only ever returned by `for_isa` after `support()` has
// confirmed the features at run time; that is the soundness argument for
// every wrapper in `avx2.rs` and `avx512.rs`.
#[cfg(target_arch = "x86_64")]
static AVX2: Kernels =
    Kernels { isa: Isa::Avx2, add: avx2::add, axpy: avx2::axpy, scatter_add: avx2::scatter_add, copy: avx2::copy };

#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = Kernels {
    isa: Isa::Avx512,
    add: avx512::add,
    axpy: avx512::axpy,
    scatter_add: avx512::scatter_add,
    copy: avx512::copy,
};

/// What the running CPU supports, detected once.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
struct Support {
    avx2: bool,
    avx512: bool,
}

#[cfg(target_arch = "x86_64")]
fn support() -> Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    *SUPPORT.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Support {
    Support {
        avx2: std::arch::is_x86_feature_detected!("avx2"),
        avx512: std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512cd"),
    }
}

impl Kernels {
    /// The best table this CPU supports (detection runs once and is cached).
    pub fn best() -> &'static Kernels {
        // chosen once: `copy_bytes` asks for every bulk copy of the datapath
        static BEST: OnceLock<&'static Kernels> = OnceLock::new();
        BEST.get_or_init(|| [Isa::Avx512, Isa::Avx2].into_iter().find_map(Kernels::for_isa).unwrap_or(&SCALAR))
    }

    /// The table for `isa` if this CPU supports it (`Scalar` always), else `None`.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        match isa {
            Isa::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => support().avx2.then_some(&AVX2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => support().avx512.then_some(&AVX512),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => None,
        }
    }

    /// Every table this CPU supports, scalar first.
    pub fn available() -> Vec<&'static Kernels> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter_map(Kernels::for_isa).collect()
    }
}

/// Copies of fewer bytes than this go to `copy_from_slice` (glibc's `memcpy`,
/// which is faster there: 89 against 76 GiB/s at 4 KiB on this host).
pub const COPY_KERNEL_MIN: usize = 8 * 1024;
/// ... and so do copies of more than this (`memcpy` switches to
/// non-temporal stores for large copies: 44 against 39 GiB/s at 4 MiB).
pub const COPY_KERNEL_MAX: usize = 1024 * 1024;

/// `dst.copy_from_slice(src)` for the datapath's bulk copies (values into a
/// send buffer, READ images into a response): from [`COPY_KERNEL_MIN`] to
/// [`COPY_KERNEL_MAX`] bytes through the best table's vector loop, otherwise by
/// `memcpy`. In that range glibc's `memcpy` moves bytes with `rep movsb`: on
/// hardware that is as fast as the vector loop (53 GiB/s both at 64 KiB, 40
/// against 51 at 256 KiB; `cargo bench --bench kernels -- bulk_copy`), but the
/// soft-RoCE VM's emulator (qemu TCG) runs it a byte at a time, where it cost a
/// 64 KiB push a tenth of the worker's time (docs/benchmarks.md). Panics if the
/// lengths differ.
#[inline]
pub fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    if (COPY_KERNEL_MIN..=COPY_KERNEL_MAX).contains(&src.len()) {
        (Kernels::best().copy)(dst, src);
    } else {
        dst.copy_from_slice(src);
    }
}

/// Asserts the length contract of `add` / `axpy`.
#[inline]
fn check_dense(dst_len: usize, src_len: usize) {
    assert_eq!(dst_len, src_len, "kernel length mismatch: dst has {dst_len} elements, src has {src_len}");
}

/// Asserts every precondition of `scatter_add` and returns the largest index
/// (`None` when `idx` is empty). After this returns, every row
/// `idx[i]*dim .. idx[i]*dim + dim` lies inside `dst` and every row
/// `i*dim .. i*dim + dim` lies inside `vals`.
#[inline]
fn check_scatter(dst_len: usize, idx: &[u32], vals_len: usize, dim: usize) -> Option<u32> {
    assert!(dim >= 1, "scatter_add: dim must be at least 1");
    assert!(
        idx.len().checked_mul(dim) == Some(vals_len),
        "scatter_add: vals has {vals_len} elements, expected idx.len() ({}) * dim ({dim})",
        idx.len()
    );
    let max = idx.iter().copied().max()?;
    let end = (max as usize + 1).checked_mul(dim);
    assert!(
        end.is_some_and(|end| end <= dst_len),
        "scatter_add: index {max} with dim {dim} is out of bounds for dst of {dst_len} elements"
    );
    Some(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// Bit-exact equality, except that any NaN equals any NaN (which NaN
    /// payload an add returns depends on operand order, not on the ISA).
    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn assert_same(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                same(g, w),
                "{what}: element {i}: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
                g.to_bits(),
                w.to_bits()
            );
        }
    }

    fn simd_tables() -> Vec<&'static Kernels> {
        Kernels::available().into_iter().filter(|k| k.isa != Isa::Scalar).collect()
    }

    /// Floats with plenty of specials: NaN, infinities, zeros, subnormals.
    fn f32s() -> impl Strategy<Value = f32> {
        prop_oneof![
            6 => -1.0e3f32..1.0e3f32,
            2 => any::<f32>(),
            1 => prop::sample::select(vec![
                0.0f32,
                -0.0,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE / 4.0,
                f32::MAX,
                f32::MIN,
                1.0,
                f32::EPSILON,
            ]),
        ]
    }

    /// A slice of `len` floats placed `off` elements into a buffer, with
    /// `GUARD` canary floats after it, so its start is misaligned relative to
    /// 32/64 bytes and writes past its end can be detected.
    const GUARD: usize = 17;
    const CANARY: f32 = -1234.5;

    struct Placed {
        buf: Vec<f32>,
        off: usize,
        len: usize,
    }

    impl Placed {
        fn new(data: &[f32], off: usize) -> Self {
            let mut buf = vec![CANARY; off + data.len() + GUARD];
            buf[off..off + data.len()].copy_from_slice(data);
            Placed { buf, off, len: data.len() }
        }
        fn get(&self) -> &[f32] {
            &self.buf[self.off..self.off + self.len]
        }
        fn get_mut(&mut self) -> &mut [f32] {
            &mut self.buf[self.off..self.off + self.len]
        }
        fn assert_guards_intact(&self, what: &str) {
            let (head, rest) = self.buf.split_at(self.off);
            let tail = &rest[self.len..];
            assert!(head.iter().chain(tail).all(|&x| x == CANARY), "{what}: wrote outside the slice");
        }
    }

    // ---- Isa / table selection -------------------------------------------

    #[test]
    fn isa_names_round_trip() {
        for (isa, name) in [(Isa::Scalar, "scalar"), (Isa::Avx2, "avx2"), (Isa::Avx512, "avx512")] {
            assert_eq!(isa.to_string(), name);
            assert_eq!(name.parse::<Isa>(), Ok(isa));
        }
        for bad in ["", "AVX2", "sse", "avx", "avx-512", " scalar"] {
            assert!(bad.parse::<Isa>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn table_selection_matches_cpu() {
        let avail = Kernels::available();
        assert_eq!(avail[0].isa, Isa::Scalar);
        assert_eq!(Kernels::for_isa(Isa::Scalar).unwrap().isa, Isa::Scalar);
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            if let Some(k) = Kernels::for_isa(isa) {
                assert_eq!(k.isa, isa);
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            let avx512 =
                std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512cd");
            assert_eq!(Kernels::for_isa(Isa::Avx2).is_some(), avx2);
            assert_eq!(Kernels::for_isa(Isa::Avx512).is_some(), avx512);
            assert_eq!(avail.len(), 1 + avx2 as usize + avx512 as usize);
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(avail.len(), 1);
        let best = Kernels::best();
        assert_eq!(best.isa, avail.last().unwrap().isa);
        assert!(std::ptr::eq(best, Kernels::best()), "best() not cached");
    }

    // ---- Hand-checked examples, every table -------------------------------

    #[test]
    fn copy_is_exact_at_every_length_and_offset_and_touches_nothing_else() {
        let src: Vec<u8> = (0..1200u32).map(|i| (i * 7 + 3) as u8).collect();
        for k in Kernels::available() {
            for n in (0..300).chain([511, 512, 513, 1024, 1100]) {
                for (so, d_o) in [(0, 0), (1, 3), (5, 0), (0, 7), (33, 17)] {
                    let mut dst = vec![0xAAu8; n + d_o + 40];
                    (k.copy)(&mut dst[d_o..d_o + n], &src[so..so + n]);
                    assert_eq!(&dst[d_o..d_o + n], &src[so..so + n], "{} n={n} offsets {so}/{d_o}", k.isa);
                    assert!(dst[..d_o].iter().chain(&dst[d_o + n..]).all(|&b| b == 0xAA), "{} wrote outside", k.isa);
                }
            }
        }
        let long: Vec<u8> = src.iter().cycle().take(20_000).copied().collect();
        for n in [5000, COPY_KERNEL_MIN, 19_999] {
            let mut dst = vec![0u8; n];
            super::copy_bytes(&mut dst, &long[1..n + 1]);
            assert_eq!(dst, long[1..n + 1]);
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn best_copy_length_mismatch_panics() {
        (Kernels::best().copy)(&mut [0; 300], &[0; 301]);
    }

    #[test]
    fn add_small_example() {
        for k in Kernels::available() {
            let mut dst: Vec<f32> = (0..37).map(|i| i as f32).collect();
            let src: Vec<f32> = (0..37).map(|i| 100.0 * i as f32).collect();
            (k.add)(&mut dst, &src);
            let want: Vec<f32> = (0..37).map(|i| 101.0 * i as f32).collect();
            assert_eq!(dst, want, "{}", k.isa);
            let mut empty: [f32; 0] = [];
            (k.add)(&mut empty, &[]);
        }
    }

    #[test]
    fn axpy_small_example() {
        for k in Kernels::available() {
            let mut dst = vec![1.0f32; 75];
            let src: Vec<f32> = (0..75).map(|i| i as f32).collect();
            (k.axpy)(&mut dst, -0.5, &src);
            let want: Vec<f32> = (0..75).map(|i| 1.0 - 0.5 * i as f32).collect();
            assert_eq!(dst, want, "{}", k.isa);
        }
    }

    /// `d + a*s` with `a*s` rounded first gives exactly 0 here; a fused
    /// multiply-add would give `EPSILON^2`. Every table must round first.
    #[test]
    fn axpy_does_not_fuse() {
        let e = f32::EPSILON;
        let a = 1.0 + e;
        for k in Kernels::available() {
            for n in [1, 7, 8, 15, 16, 33, 64, 100] {
                let src = vec![1.0 + e; n];
                let mut dst = vec![-(1.0 + 2.0 * e); n];
                (k.axpy)(&mut dst, a, &src);
                assert!(dst.iter().all(|&x| x.to_bits() == 0), "{} n={n}: {:?}", k.isa, &dst[..n.min(4)]);
            }
        }
    }

    #[test]
    fn scatter_add_small_example_with_duplicates() {
        for k in Kernels::available() {
            // dim 2: key 2 twice, key 1 never.
            let mut dst = vec![0.0f32; 6];
            (k.scatter_add)(&mut dst, &[2, 0, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2);
            assert_eq!(dst, [3.0, 4.0, 0.0, 0.0, 6.0, 8.0], "{}", k.isa);

            // dim 8 and 16 (one SIMD register per row), repeated keys.
            for dim in [8usize, 16, 20] {
                let mut dst = vec![1.0f32; 3 * dim];
                let idx = [1u32, 1, 2, 1];
                let vals: Vec<f32> = (0..4 * dim).map(|i| (i / dim + 1) as f32).collect();
                (k.scatter_add)(&mut dst, &idx, &vals, dim);
                let mut want = vec![1.0f32; dim];
                want.extend(vec![1.0 + 1.0 + 2.0 + 4.0; dim]);
                want.extend(vec![1.0 + 3.0; dim]);
                assert_eq!(dst, want, "{} dim={dim}", k.isa);
            }
        }
    }

    #[test]
    fn scatter_add_dim1_groups_with_and_without_conflicts() {
        for k in Kernels::available() {
            // 16 distinct keys (gather/scatter path), then 16 keys with a
            // repeat (conflict path), then a tail of 5.
            let mut idx: Vec<u32> = (0..16).map(|i| 15 - i).collect();
            idx.extend([3u32, 7, 3, 9, 9, 9, 0, 1, 2, 4, 5, 6, 8, 10, 11, 3]);
            idx.extend([3u32, 3, 3, 3, 3]);
            let vals = vec![1.0f32; idx.len()];
            let mut dst = vec![0.5f32; 17];
            (k.scatter_add)(&mut dst, &idx, &vals, 1);
            let mut want = vec![0.5f32; 17];
            for &i in &idx {
                want[i as usize] += 1.0;
            }
            assert_eq!(dst, want, "{}", k.isa);
            assert_eq!(dst[3], 0.5 + 1.0 + 3.0 + 5.0, "{}", k.isa);
            assert_eq!(dst[16], 0.5, "{}", k.isa);
        }
    }

    #[test]
    fn scatter_add_empty_keys_is_a_no_op() {
        for k in Kernels::available() {
            let mut dst = vec![2.0f32; 4];
            (k.scatter_add)(&mut dst, &[], &[], 3);
            let mut empty: [f32; 0] = [];
            (k.scatter_add)(&mut empty, &[], &[], 1);
            assert_eq!(dst, [2.0; 4], "{}", k.isa);
        }
    }

    // ---- Precondition violations panic, before writing anything -----------

    /// Runs `f` against every table and asserts that each one panics without
    /// having modified `dst`.
    fn assert_every_table_panics(
        what: &str,
        dst_len: usize,
        f: impl Fn(&Kernels, &mut [f32]) + std::panic::RefUnwindSafe,
    ) {
        for k in Kernels::available() {
            let mut dst = vec![7.0f32; dst_len];
            let r = catch_unwind(AssertUnwindSafe(|| f(k, &mut dst)));
            assert!(r.is_err(), "{what}: {} did not panic", k.isa);
            assert!(dst.iter().all(|&x| x == 7.0), "{what}: {} wrote", k.isa);
        }
    }

    #[test]
    fn dense_length_mismatch_panics_for_every_table() {
        let src = vec![1.0f32; 40];
        assert_every_table_panics("add short dst", 39, |k, d| (k.add)(d, &src));
        assert_every_table_panics("add long dst", 41, |k, d| (k.add)(d, &src));
        assert_every_table_panics("axpy short dst", 39, |k, d| (k.axpy)(d, 2.0, &src));
        assert_every_table_panics("axpy long dst", 100, |k, d| (k.axpy)(d, 2.0, &src));
    }

    #[test]
    fn scatter_violations_panic_for_every_table() {
        let v = vec![1.0f32; 64];
        assert_every_table_panics("dim 0", 64, |k, d| (k.scatter_add)(d, &[0], &[], 0));
        assert_every_table_panics("vals short", 64, |k, d| (k.scatter_add)(d, &[0, 1], &v[..3], 2));
        assert_every_table_panics("vals long", 64, |k, d| (k.scatter_add)(d, &[0, 1], &v[..5], 2));
        assert_every_table_panics("vals for no keys", 64, |k, d| (k.scatter_add)(d, &[], &v[..1], 1));
        // Key 3 with dim 16 needs 64 floats; give 63 (the last row is short).
        assert_every_table_panics("partial last row", 63, |k, d| (k.scatter_add)(d, &[0, 3, 1], &v[..48], 16));
        // Out-of-range key in a 16-key group (the AVX-512 gather path) ...
        let mut keys: Vec<u32> = (0..16).collect();
        keys[9] = 64;
        assert_every_table_panics("dim 1 gather group", 64, |k, d| (k.scatter_add)(d, &keys, &v[..16], 1));
        // ... and in the tail, behind in-range keys.
        assert_every_table_panics("dim 1 tail", 10, |k, d| (k.scatter_add)(d, &[0, 1, 2, 10], &v[..4], 1));
        assert_every_table_panics("huge key", 64, |k, d| (k.scatter_add)(d, &[u32::MAX], &v[..1], 1));
        assert_every_table_panics("dim overflow", 64, |k, d| (k.scatter_add)(d, &[0], &[], usize::MAX));
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn best_add_length_mismatch_panics() {
        (Kernels::best().add)(&mut [0.0; 17], &[0.0; 16]);
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn best_axpy_length_mismatch_panics() {
        (Kernels::best().axpy)(&mut [0.0; 16], 1.0, &[0.0; 17]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn best_scatter_out_of_bounds_panics() {
        (Kernels::best().scatter_add)(&mut [0.0; 31], &[1, 2, 3], &[0.0; 24], 8);
    }

    #[test]
    #[should_panic(expected = "dim must be at least 1")]
    fn best_scatter_dim_zero_panics() {
        (Kernels::best().scatter_add)(&mut [0.0; 32], &[], &[], 0);
    }

    #[test]
    #[should_panic(expected = "expected idx.len()")]
    fn best_scatter_vals_length_panics() {
        (Kernels::best().scatter_add)(&mut [0.0; 32], &[0, 1], &[0.0; 3], 1);
    }

    // ---- Properties: every SIMD table equals scalar, bit for bit -----------

    fn dense_case(max_len: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>, usize, usize, f32)> {
        (0..max_len, 0usize..16, 0usize..16).prop_flat_map(|(len, od, os)| {
            (prop::collection::vec(f32s(), len), prop::collection::vec(f32s(), len), Just(od), Just(os), f32s())
        })
    }

    fn check_dense_case(dst: &[f32], src: &[f32], od: usize, os: usize, a: f32) {
        let src_p = Placed::new(src, os);
        let mut want_add = dst.to_vec();
        let mut want_axpy = dst.to_vec();
        (Kernels::for_isa(Isa::Scalar).unwrap().add)(&mut want_add, src);
        (Kernels::for_isa(Isa::Scalar).unwrap().axpy)(&mut want_axpy, a, src);
        // The scalar reference against the definition.
        for i in 0..dst.len() {
            assert!(same(want_add[i], dst[i] + src[i]));
            assert!(same(want_axpy[i], dst[i] + a * src[i]));
        }
        for k in simd_tables() {
            let mut d = Placed::new(dst, od);
            (k.add)(d.get_mut(), src_p.get());
            assert_same(d.get(), &want_add, &format!("add {}", k.isa));
            d.assert_guards_intact(&format!("add {}", k.isa));

            let mut d = Placed::new(dst, od);
            (k.axpy)(d.get_mut(), a, src_p.get());
            assert_same(d.get(), &want_axpy, &format!("axpy {}", k.isa));
            d.assert_guards_intact(&format!("axpy {}", k.isa));
        }
        src_p.assert_guards_intact("src");
    }

    fn scatter_case(
        max_keys: usize,
        max_dim: usize,
    ) -> impl Strategy<Value = (Vec<f32>, Vec<u32>, Vec<f32>, usize, usize, usize)> {
        (1..max_dim, 1usize..600, 0..max_keys, 0usize..16, 0usize..16, any::<bool>()).prop_flat_map(
            |(dim, rows, nkeys, od, ov, crowded)| {
                // `crowded`: few slots, so duplicates (and AVX-512 conflicts)
                // are common; otherwise many slots, mostly distinct keys.
                let rows = if crowded { rows % 24 + 1 } else { rows };
                (
                    // The last row may be partial: dst.len() need not be a
                    // multiple of dim (keys only use the complete rows).
                    prop::collection::vec(f32s(), rows * dim..rows * dim + dim),
                    prop::collection::vec(0..rows as u32, nkeys),
                    prop::collection::vec(f32s(), nkeys * dim),
                    Just(dim),
                    Just(od),
                    Just(ov),
                )
            },
        )
    }

    fn check_scatter_case(dst: &[f32], idx: &[u32], vals: &[f32], dim: usize, od: usize, ov: usize) {
        let vals_p = Placed::new(vals, ov);
        let mut want = dst.to_vec();
        (Kernels::for_isa(Isa::Scalar).unwrap().scatter_add)(&mut want, idx, vals, dim);
        // The scalar reference against the definition.
        let mut naive = dst.to_vec();
        for (i, &k) in idx.iter().enumerate() {
            for j in 0..dim {
                naive[k as usize * dim + j] += vals[i * dim + j];
            }
        }
        assert_same(&want, &naive, "scalar scatter_add vs definition");
        for k in simd_tables() {
            let mut d = Placed::new(dst, od);
            (k.scatter_add)(d.get_mut(), idx, vals_p.get(), dim);
            let what = format!("scatter_add {} dim={dim}", k.isa);
            assert_same(d.get(), &want, &what);
            d.assert_guards_intact(&what);
        }
    }

    proptest! {
        #[test]
        fn dense_matches_scalar((dst, src, od, os, a) in dense_case(300)) {
            check_dense_case(&dst, &src, od, os, a);
        }

        #[test]
        fn scatter_add_matches_scalar((dst, idx, vals, dim, od, ov) in scatter_case(300, 40)) {
            check_scatter_case(&dst, &idx, &vals, dim, od, ov);
        }

        /// One-float rows only: exercises the AVX-512 gather/scatter groups.
        #[test]
        fn scatter_add_dim1_matches_scalar((dst, idx, vals, _, od, ov) in scatter_case(300, 2)) {
            check_scatter_case(&dst, &idx, &vals, 1, od, ov);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn dense_matches_scalar_long((dst, src, od, os, a) in dense_case(5000)) {
            check_dense_case(&dst, &src, od, os, a);
        }

        #[test]
        fn scatter_add_matches_scalar_many_keys(
            (dst, idx, vals, dim, od, ov) in scatter_case(5000, 40)
        ) {
            check_scatter_case(&dst, &idx, &vals, dim, od, ov);
        }
    }
}
