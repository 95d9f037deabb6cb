//! AVX-512 kernels: 16 `f32` lanes per 512-bit register (AVX-512F), with
//! gather/scatter and conflict detection (AVX-512CD) for one-float rows.
//!
//! Dense loops are unrolled four registers deep, then one register at a time;
//! the last `< 16` floats use one masked load/store instead of a scalar tail
//! (masked-off lanes are never accessed, so nothing past the end is touched).
//! Each lane does exactly the scalar reference's operations (`+`, or `*` then
//! `+` for `axpy`; no FMA), so results are bit-identical to `scalar.rs`.
//!
//! `scatter_add` with `dim == 1` handles 16 keys per step: gather the 16
//! slots, add, scatter back. That is only equal to the sequential loop when the
//! 16 keys are pairwise distinct, which `_mm512_conflict_epi32` checks; a group
//! with a repeated key is done one key at a time, in order. Wider rows use the
//! dense row add (masked for `dim < 16`).
//!
//! The `pub(super)` wrappers are safe fns around `#[target_feature]` code. They
//! are sound only on CPUs with AVX-512F and AVX-512CD, and they are reachable
//! only through the private `AVX512` table in `mod.rs`, which
//! `Kernels::for_isa` hands out only after `is_x86_feature_detected!` reported
//! both features.

use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_conflict_epi32, _mm512_i32gather_ps, _mm512_i32scatter_ps,
    _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps,
    _mm512_storeu_ps, _mm512_storeu_si512, _mm512_test_epi32_mask,
};

use super::{check_dense, check_scatter};

/// `f32` lanes in one AVX-512 register.
const LANES: usize = 16;

/// Mask selecting the low `rem` lanes, for `rem` in `0..16`.
#[inline]
fn tail_mask(rem: usize) -> __mmask16 {
    debug_assert!(rem < LANES);
    ((1u32 << rem) - 1) as __mmask16
}

/// Adds `n` floats from `src` into `dst`.
///
/// # Safety
///
/// 1. The CPU supports AVX-512F.
/// 2. `dst` is valid for reads and writes of `n` floats, and `src` is valid
///    for reads of `n` floats (no alignment needed).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn add_raw(dst: *mut f32, src: *const f32, n: usize) {
    let mut i = 0;
    while i + 4 * LANES <= n {
        // SAFETY:
        // 1. AVX-512F is available (precondition 1), as this fn's target feature says.
        // 2. `i + 64 <= n`, so the four 16-float accesses on each pointer stay
        //    inside the `n` valid floats (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r0 = _mm512_add_ps(_mm512_loadu_ps(d), _mm512_loadu_ps(s));
            let r1 = _mm512_add_ps(_mm512_loadu_ps(d.add(16)), _mm512_loadu_ps(s.add(16)));
            let r2 = _mm512_add_ps(_mm512_loadu_ps(d.add(32)), _mm512_loadu_ps(s.add(32)));
            let r3 = _mm512_add_ps(_mm512_loadu_ps(d.add(48)), _mm512_loadu_ps(s.add(48)));
            _mm512_storeu_ps(d, r0);
            _mm512_storeu_ps(d.add(16), r1);
            _mm512_storeu_ps(d.add(32), r2);
            _mm512_storeu_ps(d.add(48), r3);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. `i + 16 <= n`: the 16 floats read and written are in range (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), _mm512_loadu_ps(s)));
        }
        i += LANES;
    }
    if i < n {
        let k = tail_mask(n - i);
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. Only the low `n - i` lanes are enabled in `k`, and those floats are
        //    in range (precondition 2); masked-off lanes are neither read nor
        //    written (the hardware suppresses their faults), so the rest of the
        //    register may extend past the end of either buffer.
        // 3. Masked `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r = _mm512_add_ps(_mm512_maskz_loadu_ps(k, d), _mm512_maskz_loadu_ps(k, s));
            _mm512_mask_storeu_ps(d, k, r);
        }
    }
}

/// `dst[i] += a * src[i]` over `n` floats, multiply then add (no FMA).
///
/// # Safety
///
/// 1. The CPU supports AVX-512F.
/// 2. `dst` is valid for reads and writes of `n` floats, and `src` is valid
///    for reads of `n` floats (no alignment needed).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_raw(dst: *mut f32, a: f32, src: *const f32, n: usize) {
    let va = _mm512_set1_ps(a);
    // Same operation order as the scalar `*d += a * s`: d + (a * s).
    let step = |d: __m512, s: __m512| _mm512_add_ps(d, _mm512_mul_ps(va, s));
    let mut i = 0;
    while i + 4 * LANES <= n {
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. `i + 64 <= n`: all four 16-float accesses on each pointer are in
        //    range (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r0 = step(_mm512_loadu_ps(d), _mm512_loadu_ps(s));
            let r1 = step(_mm512_loadu_ps(d.add(16)), _mm512_loadu_ps(s.add(16)));
            let r2 = step(_mm512_loadu_ps(d.add(32)), _mm512_loadu_ps(s.add(32)));
            let r3 = step(_mm512_loadu_ps(d.add(48)), _mm512_loadu_ps(s.add(48)));
            _mm512_storeu_ps(d, r0);
            _mm512_storeu_ps(d.add(16), r1);
            _mm512_storeu_ps(d.add(32), r2);
            _mm512_storeu_ps(d.add(48), r3);
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. `i + 16 <= n`: the 16 floats read and written are in range (precondition 2).
        // 3. `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            _mm512_storeu_ps(d, step(_mm512_loadu_ps(d), _mm512_loadu_ps(s)));
        }
        i += LANES;
    }
    if i < n {
        let k = tail_mask(n - i);
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. Only the low `n - i` lanes are enabled in `k`, and those floats are
        //    in range (precondition 2); masked-off lanes are not accessed.
        // 3. Masked `loadu`/`storeu` accept any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r = step(_mm512_maskz_loadu_ps(k, d), _mm512_maskz_loadu_ps(k, s));
            _mm512_mask_storeu_ps(d, k, r);
        }
    }
}

/// Row-wise scatter add with `dim`-float rows (any `dim >= 1`).
///
/// # Safety
///
/// 1. The CPU supports AVX-512F.
/// 2. `check_scatter(dst.len(), idx, vals.len(), dim)` returned without
///    panicking: `dim >= 1`, `vals.len() == idx.len() * dim`, and
///    `(k + 1) * dim <= dst.len()` for every key `k` in `idx`.
#[target_feature(enable = "avx512f")]
unsafe fn scatter_rows(dst: &mut [f32], idx: &[u32], vals: &[f32], dim: usize) {
    // All writes go through this one pointer; `dst` is not used again.
    let base = dst.as_mut_ptr();
    for (i, &k) in idx.iter().enumerate() {
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. `(k + 1) * dim <= dst.len()` (precondition 2), so the row at
        //    `k * dim` has `dim` valid floats in `dst`.
        // 3. `i < idx.len()` and `vals.len() == idx.len() * dim`, so the row at
        //    `i * dim` has `dim` valid floats in `vals`.
        unsafe { add_raw(base.add(k as usize * dim), vals.as_ptr().add(i * dim), dim) };
    }
}

/// `dst[k] += v` for one-float rows, 16 keys per gather/scatter step.
///
/// # Safety
///
/// 1. The CPU supports AVX-512F and AVX-512CD.
/// 2. `vals.len() == idx.len()` and every key `k` in `idx` is `< dst.len()`.
/// 3. Every key is `<= i32::MAX`, so reinterpreting it as the `i32` offset
///    the gather/scatter instructions take keeps it non-negative.
#[target_feature(enable = "avx512f,avx512cd")]
unsafe fn scatter_dim1(dst: &mut [f32], idx: &[u32], vals: &[f32]) {
    // All accesses go through this one pointer; `dst` is not used again.
    let base = dst.as_mut_ptr();
    let n = idx.len();
    let mut i = 0;
    while i + LANES <= n {
        // SAFETY:
        // 1. AVX-512F is available (precondition 1).
        // 2. `i + 16 <= n == vals.len()` (precondition 2): 16 keys and 16
        //    values are in range; `loadu` accepts any alignment, and `u32`
        //    and `i32` have the same layout.
        let (keys, v) =
            unsafe { (_mm512_loadu_si512(idx.as_ptr().add(i).cast()), _mm512_loadu_ps(vals.as_ptr().add(i))) };
        // Lane j of `conflicts` has a bit set for each earlier lane with the same key.
        let conflicts = _mm512_conflict_epi32(keys);
        if _mm512_test_epi32_mask(conflicts, conflicts) == 0 {
            // SAFETY:
            // 1. AVX-512F is available (precondition 1).
            // 2. Each key is in `0..dst.len()` as an `i32` (preconditions 2
            //    and 3); with scale 4 the gather reads and the scatter writes
            //    exactly `base[key]`, a valid float of `dst`.
            // 3. The 16 keys are pairwise distinct (no conflict bits), so each
            //    slot is read once and written once: the same result, bit for
            //    bit, as adding the 16 values one after another.
            unsafe {
                let old = _mm512_i32gather_ps::<4>(keys, base);
                _mm512_i32scatter_ps::<4>(base, keys, _mm512_add_ps(old, v));
            }
        } else {
            for j in i..i + LANES {
                // SAFETY:
                // 1. `idx[j] < dst.len()` (precondition 2).
                unsafe { *base.add(idx[j] as usize) += vals[j] };
            }
        }
        i += LANES;
    }
    for j in i..n {
        // SAFETY:
        // 1. `idx[j] < dst.len()` (precondition 2).
        unsafe { *base.add(idx[j] as usize) += vals[j] };
    }
}

/// `dst[i] += src[i]`; panics if the lengths differ.
pub(super) fn add(dst: &mut [f32], src: &[f32]) {
    check_dense(dst.len(), src.len());
    debug_assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY:
    // 1. This wrapper is only reachable through the AVX-512 table, which
    //    `Kernels::for_isa` returns only when AVX-512F (and CD) were detected.
    // 2. The lengths are equal (asserted above), so both slices hold `dst.len()` floats.
    unsafe { add_raw(dst.as_mut_ptr(), src.as_ptr(), dst.len()) }
}

/// `dst[i] += a * src[i]`; panics if the lengths differ.
pub(super) fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    check_dense(dst.len(), src.len());
    debug_assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY:
    // 1. Only reachable through the AVX-512 table, handed out after detection.
    // 2. The lengths are equal (asserted above), so both slices hold `dst.len()` floats.
    unsafe { axpy_raw(dst.as_mut_ptr(), a, src.as_ptr(), dst.len()) }
}

/// Sparse row add; see `Kernels::scatter_add`.
pub(super) fn scatter_add(dst: &mut [f32], idx: &[u32], vals: &[f32], dim: usize) {
    let Some(max) = check_scatter(dst.len(), idx, vals.len(), dim) else {
        return; // no keys
    };
    debug_assert!(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512cd"));
    if dim == 1 && max as usize * dim <= i32::MAX as usize {
        // SAFETY:
        // 1. Only reachable through the AVX-512 table, which is handed out
        //    only after both AVX-512F and AVX-512CD were detected.
        // 2. `check_scatter` asserted `vals.len() == idx.len() * 1` and
        //    `max + 1 <= dst.len()`, so every key is `< dst.len()`.
        // 3. `max * dim <= i32::MAX` was checked just above, so every key
        //    fits a non-negative `i32` gather offset.
        unsafe { scatter_dim1(dst, idx, vals) }
    } else {
        // SAFETY:
        // 1. Only reachable through the AVX-512 table, handed out after detection.
        // 2. `check_scatter` returned above with these very arguments.
        unsafe { scatter_rows(dst, idx, vals, dim) }
    }
}

/// Copies `n` bytes from `src` to `dst`, 256 bytes per step, then 64, then a
/// plain copy of the last `< 64`.
///
/// # Safety
///
/// 1. The CPU supports AVX-512F.
/// 2. `dst` is valid for writes and `src` for reads of `n` bytes, and the two
///    do not overlap (no alignment needed).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn copy_raw(dst: *mut u8, src: *const u8, n: usize) {
    const W: usize = 64;
    let mut i = 0;
    while i + 4 * W <= n {
        // SAFETY: AVX-512F is available (precondition 1); `i + 256 <= n` keeps
        // the four 64-byte loads and stores inside the `n` valid bytes of each
        // (precondition 2); `loadu`/`storeu` take any alignment.
        unsafe {
            let (d, s) = (dst.add(i), src.add(i));
            let r0 = _mm512_loadu_si512(s as *const _);
            let r1 = _mm512_loadu_si512(s.add(W) as *const _);
            let r2 = _mm512_loadu_si512(s.add(2 * W) as *const _);
            let r3 = _mm512_loadu_si512(s.add(3 * W) as *const _);
            _mm512_storeu_si512(d as *mut _, r0);
            _mm512_storeu_si512(d.add(W) as *mut _, r1);
            _mm512_storeu_si512(d.add(2 * W) as *mut _, r2);
            _mm512_storeu_si512(d.add(3 * W) as *mut _, r3);
        }
        i += 4 * W;
    }
    while i + W <= n {
        // SAFETY: as above, for one 64-byte load and store.
        unsafe { _mm512_storeu_si512(dst.add(i) as *mut _, _mm512_loadu_si512(src.add(i) as *const _)) };
        i += W;
    }
    // SAFETY: the last `n - i < 64` bytes of both ranges (precondition 2).
    unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), n - i) };
}

/// `dst.copy_from_slice(src)` in 512-bit registers; panics if the lengths differ.
pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy: length mismatch");
    debug_assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY:
    // 1. Reachable only through the AVX-512 table, handed out only when
    //    AVX-512F (and CD) were detected (module docs).
    // 2. Equal lengths (asserted); a `&mut` and a `&` slice never overlap.
    unsafe { copy_raw(dst.as_mut_ptr(), src.as_ptr(), dst.len()) }
}
