//! The reference kernels: plain, safe, element-at-a-time loops.
//!
//! Every other table is tested bit-for-bit against these. Each output element
//! is one `+` (or one `*` then one `+` for `axpy`), so the result does not
//! depend on whether the compiler happens to vectorise these loops.

use super::{check_dense, check_scatter};

/// `dst[i] += src[i]`.
pub(super) fn add(dst: &mut [f32], src: &[f32]) {
    check_dense(dst.len(), src.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `dst[i] += a * src[i]`, as a rounded multiply followed by a rounded add.
pub(super) fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    check_dense(dst.len(), src.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

/// Sparse row add; see [`super::Kernels::scatter_add`].
pub(super) fn scatter_add(dst: &mut [f32], idx: &[u32], vals: &[f32], dim: usize) {
    check_scatter(dst.len(), idx, vals.len(), dim);
    scatter_rows(dst, idx, vals, dim);
}

/// The loop of [`scatter_add`] without the up-front checks (slicing is still
/// bounds-checked, so this is safe for any input; it just panics later). Rows
/// are applied in key order, so duplicates accumulate in that order.
pub(super) fn scatter_rows(dst: &mut [f32], idx: &[u32], vals: &[f32], dim: usize) {
    for (&k, row) in idx.iter().zip(vals.chunks_exact(dim)) {
        let start = k as usize * dim;
        for (d, &v) in dst[start..start + dim].iter_mut().zip(row) {
            *d += v;
        }
    }
}

/// `dst.copy_from_slice(src)`: the C library's `memcpy`.
pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy: length mismatch");
    dst.copy_from_slice(src);
}
