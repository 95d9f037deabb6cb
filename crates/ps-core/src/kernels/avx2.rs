//! AVX2 kernels: 8 `f32` lanes per 256-bit register.
//!
//! Unaligned loads and stores (`loadu`/`storeu`) throughout, so slices of any
//! alignment work. Dense loops are unrolled four registers deep, then one
//! register at a time, then a scalar tail. Each lane does exactly the scalar
//! reference's operations (`+`, or `*` then `+` for `axpy`; no FMA), so the
//! results are bit-identical to `scalar.rs`.
//!
//! The `pub(super)` wrappers are safe fns around `#[target_feature]` code. They
//! are sound only on CPUs with AVX2, and they are reachable only through the
//! private `AVX2` table in `mod.rs`, which `Kernels::for_isa` hands out only
//! after `is_x86_feature_detected!("avx2")` returned true.

use std::arch::x86_64::{
    __m256, __m256i, _mm256_add_ps, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_mul_ps, _mm256_set1_ps,
    _mm256_storeu_ps, _mm256_storeu_si256,
};

use super::{check_dense, check_scatter, scalar};

/// `f32` lanes in one AVX2 register.
const LANES: usize = 8;

/// Adds `n` floats from `src` into `dst`.
///
/// # Safety
///
/// 1. The CPU supports AVX2.
/// 2. `dst` is valid for reads and writes of `n` floats, and `src` is valid
///    for reads of `n` floats (no alignment needed).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn add_raw(dst: *mut f32, src: *const f32, n: usize) {
    let mut i = 0;
    while i + 4 * LANES <= n {
        // SAFETY:
        // 1. AVX2 is available (precondition 1), as this fn's target feature says.
        // 2. `i + 32 <= n`, so the four 8-float loads from `src` and the loads
        //    and stores at `dst` stay inside the `n` valid floats (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r0 = _mm256_add_ps(_mm256_loadu_ps(d), _mm256_loadu_ps(s));
            let r1 = _mm256_add_ps(_mm256_loadu_ps(d.add(8)), _mm256_loadu_ps(s.add(8)));
            let r2 = _mm256_add_ps(_mm256_loadu_ps(d.add(16)), _mm256_loadu_ps(s.add(16)));
            let r3 = _mm256_add_ps(_mm256_loadu_ps(d.add(24)), _mm256_loadu_ps(s.add(24)));
            _mm256_storeu_ps(d, r0);
            _mm256_storeu_ps(d.add(8), r1);
            _mm256_storeu_ps(d.add(16), r2);
            _mm256_storeu_ps(d.add(24), r3);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        // SAFETY:
        // 1. AVX2 is available (precondition 1).
        // 2. `i + 8 <= n`: the 8 floats read and written are in range (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_loadu_ps(s)));
        }
        i += LANES;
    }
    while i < n {
        // SAFETY:
        // 1. `i < n`: one float in range of both pointers (precondition 2).
        unsafe { *dst.add(i) += *src.add(i) };
        i += 1;
    }
}

/// `dst[i] += a * src[i]` over `n` floats, multiply then add (no FMA).
///
/// # Safety
///
/// 1. The CPU supports AVX2.
/// 2. `dst` is valid for reads and writes of `n` floats, and `src` is valid
///    for reads of `n` floats (no alignment needed).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn axpy_raw(dst: *mut f32, a: f32, src: *const f32, n: usize) {
    let va = _mm256_set1_ps(a);
    // Same operation order as the scalar `*d += a * s`: d + (a * s).
    let step = |d: __m256, s: __m256| _mm256_add_ps(d, _mm256_mul_ps(va, s));
    let mut i = 0;
    while i + 4 * LANES <= n {
        // SAFETY:
        // 1. AVX2 is available (precondition 1).
        // 2. `i + 32 <= n`: all four 8-float accesses on each pointer are in
        //    range (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r0 = step(_mm256_loadu_ps(d), _mm256_loadu_ps(s));
            let r1 = step(_mm256_loadu_ps(d.add(8)), _mm256_loadu_ps(s.add(8)));
            let r2 = step(_mm256_loadu_ps(d.add(16)), _mm256_loadu_ps(s.add(16)));
            let r3 = step(_mm256_loadu_ps(d.add(24)), _mm256_loadu_ps(s.add(24)));
            _mm256_storeu_ps(d, r0);
            _mm256_storeu_ps(d.add(8), r1);
            _mm256_storeu_ps(d.add(16), r2);
            _mm256_storeu_ps(d.add(24), r3);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        // SAFETY:
        // 1. AVX2 is available (precondition 1).
        // 2. `i + 8 <= n`: the 8 floats read and written are in range (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            _mm256_storeu_ps(d, step(_mm256_loadu_ps(d), _mm256_loadu_ps(s)));
        }
        i += LANES;
    }
    while i < n {
        // SAFETY:
        // 1. `i < n`: one float in range of both pointers (precondition 2).
        unsafe { *dst.add(i) += a * *src.add(i) };
        i += 1;
    }
}

/// Row-wise scatter add with `dim`-float rows.
///
/// # Safety
///
/// 1. The CPU supports AVX2.
/// 2. `check_scatter(dst.len(), idx, vals.len(), dim)` returned without
///    panicking: `dim >= 1`, `vals.len() == idx.len() * dim`, and
///    `(k + 1) * dim <= dst.len()` for every key `k` in `idx`.
#[target_feature(enable = "avx2")]
unsafe fn scatter_rows(dst: &mut [f32], idx: &[u32], vals: &[f32], dim: usize) {
    // All writes go through this one pointer; `dst` is not used again.
    let base = dst.as_mut_ptr();
    for (i, &k) in idx.iter().enumerate() {
        // SAFETY:
        // 1. AVX2 is available (precondition 1).
        // 2. `(k + 1) * dim <= dst.len()` (precondition 2), so the row at
        //    `k * dim` has `dim` valid floats in `dst`.
        // 3. `i < idx.len()` and `vals.len() == idx.len() * dim`, so the row at
        //    `i * dim` has `dim` valid floats in `vals`.
        unsafe { add_raw(base.add(k as usize * dim), vals.as_ptr().add(i * dim), dim) };
    }
}

/// `dst[i] += src[i]`; panics if the lengths differ.
pub(super) fn add(dst: &mut [f32], src: &[f32]) {
    check_dense(dst.len(), src.len());
    debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
    // SAFETY:
    // 1. This wrapper is only reachable through the AVX2 table, which
    //    `Kernels::for_isa` returns only when AVX2 was detected (module docs).
    // 2. The lengths are equal (asserted above), so both slices hold `dst.len()` floats.
    unsafe { add_raw(dst.as_mut_ptr(), src.as_ptr(), dst.len()) }
}

/// `dst[i] += a * src[i]`; panics if the lengths differ.
pub(super) fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    check_dense(dst.len(), src.len());
    debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
    // SAFETY:
    // 1. Only reachable through the AVX2 table, handed out after detection.
    // 2. The lengths are equal (asserted above), so both slices hold `dst.len()` floats.
    unsafe { axpy_raw(dst.as_mut_ptr(), a, src.as_ptr(), dst.len()) }
}

/// Sparse row add; see `Kernels::scatter_add`. Rows narrower than one
/// register go through the scalar loop (AVX2 has no scatter instruction).
pub(super) fn scatter_add(dst: &mut [f32], idx: &[u32], vals: &[f32], dim: usize) {
    check_scatter(dst.len(), idx, vals.len(), dim);
    if dim < LANES {
        scalar::scatter_rows(dst, idx, vals, dim);
        return;
    }
    debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
    // SAFETY:
    // 1. Only reachable through the AVX2 table, handed out after detection.
    // 2. `check_scatter` returned just above with these very arguments.
    unsafe { scatter_rows(dst, idx, vals, dim) }
}

/// Copies `n` bytes from `src` to `dst`, 128 bytes per step, then 32, then a
/// plain copy of the last `< 32`.
///
/// # Safety
///
/// 1. The CPU supports AVX2.
/// 2. `dst` is valid for writes and `src` for reads of `n` bytes, and the two
///    do not overlap (no alignment needed).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn copy_raw(dst: *mut u8, src: *const u8, n: usize) {
    const W: usize = 32;
    let mut i = 0;
    while i + 4 * W <= n {
        // SAFETY: AVX2 is available (precondition 1); `i + 128 <= n` keeps the
        // four 32-byte loads and stores inside the `n` valid bytes of each
        // (precondition 2); `loadu`/`storeu` take any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r0 = _mm256_loadu_si256(s as *const __m256i);
            let r1 = _mm256_loadu_si256(s.add(W) as *const __m256i);
            let r2 = _mm256_loadu_si256(s.add(2 * W) as *const __m256i);
            let r3 = _mm256_loadu_si256(s.add(3 * W) as *const __m256i);
            _mm256_storeu_si256(d as *mut __m256i, r0);
            _mm256_storeu_si256(d.add(W) as *mut __m256i, r1);
            _mm256_storeu_si256(d.add(2 * W) as *mut __m256i, r2);
            _mm256_storeu_si256(d.add(3 * W) as *mut __m256i, r3);
        }
        i += 4 * W;
    }
    while i + W <= n {
        // SAFETY: as above, for one 32-byte load and store.
        unsafe { _mm256_storeu_si256(dst.add(i) as *mut __m256i, _mm256_loadu_si256(src.add(i) as *const __m256i)) };
        i += W;
    }
    // SAFETY: the last `n - i < 32` bytes of both ranges (precondition 2).
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), n - i) };
}

/// `dst.copy_from_slice(src)` in 256-bit registers; panics if the lengths differ.
pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy: length mismatch");
    debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
    // SAFETY:
    // 1. Reachable only through the AVX2 table, handed out only when AVX2 was
    //    detected (module docs).
    // 2. Equal lengths (asserted); a `&mut` and a `&` slice never overlap.
    unsafe { copy_raw(dst.as_mut_ptr(), src.as_ptr(), dst.len()) }
}
