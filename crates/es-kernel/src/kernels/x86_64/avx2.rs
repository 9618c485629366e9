//! AVX2 accumulate kernel: 8 outputs per vector, masked loads and stores for the tail.

use std::arch::x86_64::*;

use super::{dense_tiles, dispatch_tile, offset};
use crate::kernels::{
    BlockTerms, COPY_BLOCK, SparseBlock, Weights, WindowCopies, adds_on_fma_pipes,
    prefetch_copies_tile, rest_after,
};
use crate::sparse::{BLOCK, SparseRows};

const LANES: usize = 8;
/// Accumulator vectors per pass: 8 of the 16 ymm registers, the rest for the broadcast input
/// and the loads.
const TILE: usize = 8;

/// The lanes of a row's last vector that lie within its `n_out` outputs, as the masked loads
/// and stores take them (used only where that vector is partial).
#[target_feature(enable = "avx2")]
fn tail_mask(n_out: usize) -> __m256i {
    let tail = n_out % LANES;
    let lanes: [i32; LANES] = std::array::from_fn(|i| if i < tail { -1 } else { 0 });
    // SAFETY: reads 32 bytes from a live [i32; 8].
    unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
}

/// # Safety
/// The CPU must support AVX2; `weights` must be `rows.width() × n_out` and `out`
/// `rows.samples() × n_out` (the caller asserts both).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn accumulate(
    rows: &SparseRows,
    weights: Weights<'_>,
    out: &mut [f32],
    start: *const f32,
) {
    let (n_out, stride) = (weights.n_out(), weights.stride());
    let vectors = n_out.div_ceil(LANES);
    let tail = n_out % LANES;
    let tail_mask = tail_mask(n_out);
    let mut v0 = 0;
    while v0 < vectors {
        let nv = (vectors - v0).min(TILE);
        let masked = tail != 0 && v0 + nv == vectors;
        for s in 0..rows.samples() {
            let (index, value) = rows.row(s);
            // SAFETY: as in the AVX-512 kernel: offsets stay within `out` and `weights`.
            unsafe {
                let at = s * n_out + v0 * LANES;
                let dst = out.as_mut_ptr().add(at);
                let init = offset(start, at);
                let src = weights.as_ptr().add(v0 * LANES);
                dispatch_tile!(
                    nv,
                    masked,
                    tile(index, value, src, stride, dst, tail_mask, init)
                );
            }
        }
        v0 += nv;
    }
}

/// # Safety
/// AVX2; as for the AVX-512 tile, with 8-lane vectors.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn tile<const NV: usize, const MASKED: bool>(
    index: &[u32],
    value: &[f32],
    w: *const f32,
    stride: usize,
    out: *mut f32,
    tail_mask: __m256i,
    init: *const f32,
) {
    let mut acc = [_mm256_setzero_ps(); NV];
    if !init.is_null() {
        for (v, acc) in acc.iter_mut().enumerate() {
            // SAFETY: room for NV vectors of `out`, the last masked to the row end.
            *acc = unsafe { load(init.add(v * LANES), MASKED && v + 1 == NV, tail_mask) };
        }
    }
    for (&k, &x) in index.iter().zip(value) {
        let x = _mm256_set1_ps(x);
        // SAFETY: k < width (SparseRows invariant).
        let row = unsafe { w.add(k as usize * stride) };
        for (v, acc) in acc.iter_mut().enumerate() {
            // SAFETY: full vectors lie within the row; the last one is masked to the row end
            // when MASKED, and masked-off lanes are not read.
            let wv = unsafe {
                if MASKED && v + 1 == NV {
                    _mm256_maskload_ps(row.add(v * LANES), tail_mask)
                } else {
                    _mm256_loadu_ps(row.add(v * LANES))
                }
            };
            // Separate multiply and add: the contract forbids FMA.
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, wv));
        }
    }
    for (v, acc) in acc.iter().enumerate() {
        // SAFETY: room for NV vectors, the last masked to the row end.
        unsafe {
            if MASKED && v + 1 == NV {
                _mm256_maskstore_ps(out.add(v * LANES), tail_mask, *acc);
            } else {
                _mm256_storeu_ps(out.add(v * LANES), *acc);
            }
        }
    }
}

/// Accumulator vectors per sample in the blocked kernel: 4 samples × 2 vectors = 8
/// accumulators, plus 2 weight vectors and a broadcast, within the 16 ymm registers.
const BLOCK_TILE: usize = 2;

/// The blocked kernel (see the AVX-512 one): each weight row loaded once per block of
/// [`BLOCK`] samples.
///
/// # Safety
/// As for [`accumulate`].
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn accumulate_blocked(
    rows: &SparseRows,
    weights: Weights<'_>,
    out: &mut [f32],
    start: *const f32,
) {
    let (n_out, stride) = (weights.n_out(), weights.stride());
    let vectors = n_out.div_ceil(LANES);
    let tail = n_out % LANES;
    let tail_mask = tail_mask(n_out);
    let samples = rows.samples();
    let mut v0 = 0;
    while v0 < vectors {
        let nv = (vectors - v0).min(BLOCK_TILE);
        let masked = tail != 0 && v0 + nv == vectors;
        for b in 0..rows.blocks() {
            let (index, value) = rows.block(b);
            let first = b * BLOCK;
            let count = (samples - first).min(BLOCK);
            // SAFETY: as in the AVX-512 blocked kernel.
            unsafe {
                let at = first * n_out + v0 * LANES;
                let dst = out.as_mut_ptr().add(at);
                let init = offset(start, at);
                let src = weights.as_ptr().add(v0 * LANES);
                dispatch_tile!(
                    nv,
                    masked,
                    block_tile(
                        SparseBlock { index, value },
                        src,
                        stride,
                        n_out,
                        dst,
                        count,
                        tail_mask,
                        init
                    )
                );
            }
        }
        v0 += nv;
    }
}

/// [`crate::kernels::Kernel::accumulate_dense`]: the blocked tiles over dense rows, every
/// input a term.
///
/// # Safety
/// The CPU must support AVX2; `dense` must be `samples × width`, `weights` `width × n_out` and
/// `out` `samples × n_out` (the caller asserts all three).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn accumulate_dense(
    dense: &[f32],
    width: usize,
    weights: Weights<'_>,
    out: &mut [f32],
) {
    let (n_out, stride) = (weights.n_out(), weights.stride());
    let tail_mask = tail_mask(n_out);
    dense_tiles(dense, width, n_out, LANES, BLOCK_TILE, |t| {
        // SAFETY: rows first..first + count exist in `out` and every row pointer holds
        // `width` values; the tile stays within each output row (the last vector masked to
        // `n_out`) and weight rows `k < width`.
        unsafe {
            let dst = out.as_mut_ptr().add(t.first * n_out + t.v0 * LANES);
            let src = weights.as_ptr().add(t.v0 * LANES);
            let (block, count) = (t.block, t.count);
            dispatch_tile!(
                t.nv,
                t.masked,
                block_tile(
                    block,
                    src,
                    stride,
                    n_out,
                    dst,
                    count,
                    tail_mask,
                    std::ptr::null()
                )
            );
        }
    });
}

/// # Safety
/// AVX2; as for the AVX-512 block tile, with 8-lane vectors.
#[target_feature(enable = "avx2")]
#[inline]
// The tile's operands, passed in registers: a struct would only be unpacked again.
#[allow(clippy::too_many_arguments)]
unsafe fn block_tile<const NV: usize, const MASKED: bool>(
    terms: impl BlockTerms,
    w: *const f32,
    stride: usize,
    n_out: usize,
    out: *mut f32,
    count: usize,
    tail_mask: __m256i,
    init: *const f32,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; BLOCK];
    if !init.is_null() {
        for (s, acc) in acc.iter_mut().enumerate().take(count) {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row s < count of the block, NV vectors, the last masked.
                *acc = unsafe {
                    load(
                        init.add(s * n_out + v * LANES),
                        MASKED && v + 1 == NV,
                        tail_mask,
                    )
                };
            }
        }
    }
    let mut wv = [_mm256_setzero_ps(); NV];
    for t in 0..terms.len() {
        // SAFETY: t < len.
        let (k, x) = unsafe { terms.term(t) };
        // SAFETY: k < width (SparseRows invariant, or a dense row's index).
        let row = unsafe { w.add(k * stride) };
        for (v, wv) in wv.iter_mut().enumerate() {
            // SAFETY: full vectors lie within the row; the last one is masked to the row end
            // when MASKED, and masked-off lanes are not read.
            *wv = unsafe {
                if MASKED && v + 1 == NV {
                    _mm256_maskload_ps(row.add(v * LANES), tail_mask)
                } else {
                    _mm256_loadu_ps(row.add(v * LANES))
                }
            };
        }
        for (acc, &x) in acc.iter_mut().zip(&x) {
            let x = _mm256_set1_ps(x);
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                // Separate multiply and add: the contract forbids FMA.
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, wv));
            }
        }
    }
    for (s, acc) in acc.iter().enumerate().take(count) {
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: row s < count, NV vectors, the last masked to the row end.
            unsafe {
                if MASKED && v + 1 == NV {
                    _mm256_maskstore_ps(out.add(s * n_out + v * LANES), tail_mask, *acc);
                } else {
                    _mm256_storeu_ps(out.add(s * n_out + v * LANES), *acc);
                }
            }
        }
    }
}

/// Eight floats at `p`, or only the lanes of `tail_mask` (the others 0) when `masked`.
///
/// # Safety
/// AVX2; the lanes read must lie within one allocation.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load(p: *const f32, masked: bool, tail_mask: __m256i) -> __m256 {
    // SAFETY: the caller guarantees the lanes read are in bounds; masked-off lanes are not
    // read.
    unsafe {
        if masked {
            _mm256_maskload_ps(p, tail_mask)
        } else {
            _mm256_loadu_ps(p)
        }
    }
}

/// Accumulators of a window-copies tile (`C` copies × `8 / C` vectors): half the 16 ymm
/// registers, leaving the rest for the weight vectors, the products and the broadcast.
const COPY_ACCUMULATORS: usize = 8;

/// The AVX2 [`crate::kernels::Kernel::accumulate_window_copies`] (see the AVX-512 one), in
/// blocks of [`COPY_BLOCK`] copies.
///
/// # Safety
/// The CPU must support AVX2 and FMA; the caller checked the shapes.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn accumulate_window_copies(
    copies: &WindowCopies<'_>,
    weights: Weights<'_>,
    out: &mut [f32],
) {
    let (n_out, stride) = (weights.n_out(), weights.stride());
    let vectors = n_out.div_ceil(LANES);
    let tail = n_out % LANES;
    let tail_mask = tail_mask(n_out);
    let samples = copies.rest.samples();
    let zeros = vec![0.0f32; copies.width];
    let (first_copy, end_copy) = (copies.copies.start, copies.copies.end);
    for first in (first_copy..end_copy).step_by(COPY_BLOCK) {
        let count = (end_copy - first).min(COPY_BLOCK);
        let block = if count > 2 { COPY_BLOCK } else { 2 };
        let tile_vectors = COPY_ACCUMULATORS / block;
        let mut v0 = 0;
        while v0 < vectors {
            let nv = (vectors - v0).min(tile_vectors);
            let masked = tail != 0 && v0 + nv == vectors;
            let stripe = v0 * LANES..((v0 + nv) * LANES).min(n_out);
            for s in 0..samples {
                prefetch_copies_tile(copies, out, s, first..first + count, stripe.clone());
                let (index, value) = rest_after(copies, s);
                let row = s * copies.columns + first * copies.width;
                let windows: [*const f32; COPY_BLOCK] = std::array::from_fn(|i| {
                    if i < count {
                        copies.window[row + i * copies.width..].as_ptr()
                    } else {
                        zeros.as_ptr()
                    }
                });
                // SAFETY: as in the AVX-512 kernel.
                unsafe {
                    let at = s * n_out + v0 * LANES;
                    let tile = CopiesTile {
                        windows,
                        width: copies.width,
                        from: copies.from,
                        w: weights.as_ptr().add(v0 * LANES),
                        row_stride: stride,
                        init: copies.start.as_ptr().add(at),
                        out: out
                            .as_mut_ptr()
                            .add((first - first_copy) * samples * n_out + at),
                        copy_stride: samples * n_out,
                        count,
                        tail_mask,
                    };
                    if block == COPY_BLOCK {
                        dispatch_tile!(nv, masked, copies_tile_of_4(&tile, index, value));
                    } else {
                        dispatch_tile!(nv, masked, copies_tile_of_2(&tile, index, value));
                    }
                }
            }
            v0 += nv;
        }
    }
}

/// One sample's tile of a block of window copies (see the AVX-512 `CopiesTile`).
struct CopiesTile {
    windows: [*const f32; COPY_BLOCK],
    width: usize,
    from: usize,
    w: *const f32,
    /// Weight row `k` starts at `k · row_stride` of `w`'s matrix.
    row_stride: usize,
    init: *const f32,
    out: *mut f32,
    copy_stride: usize,
    count: usize,
    tail_mask: __m256i,
}

/// # Safety
/// As for [`copies_tile`].
#[target_feature(enable = "avx2,fma")]
unsafe fn copies_tile_of_4<const NV: usize, const MASKED: bool>(
    tile: &CopiesTile,
    index: &[u32],
    value: &[f32],
) {
    // SAFETY: forwarded.
    unsafe { copies_tile::<NV, MASKED, 4>(tile, index, value) }
}

/// # Safety
/// As for [`copies_tile`].
#[target_feature(enable = "avx2,fma")]
unsafe fn copies_tile_of_2<const NV: usize, const MASKED: bool>(
    tile: &CopiesTile,
    index: &[u32],
    value: &[f32],
) {
    // SAFETY: forwarded.
    unsafe { copies_tile::<NV, MASKED, 2>(tile, index, value) }
}

/// # Safety
/// AVX2; as for the AVX-512 `copies_tile`, with 8-lane vectors.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn copies_tile<const NV: usize, const MASKED: bool, const C: usize>(
    tile: &CopiesTile,
    index: &[u32],
    value: &[f32],
) {
    let masked = |v: usize| MASKED && v + 1 == NV;
    let mut start = [_mm256_setzero_ps(); NV];
    for (v, start) in start.iter_mut().enumerate() {
        // SAFETY: NV vectors of `init`, the last masked to the row end.
        *start = unsafe { load(tile.init.add(v * LANES), masked(v), tile.tail_mask) };
    }
    let mut acc = [start; C];
    let mut wv = [_mm256_setzero_ps(); NV];
    for k in 0..tile.width {
        // SAFETY: from + k < width of the weights (checked by the caller).
        let row = unsafe { tile.w.add((tile.from + k) * tile.row_stride) };
        for (v, wv) in wv.iter_mut().enumerate() {
            // SAFETY: see above; masked-off lanes are not read.
            *wv = unsafe { load(row.add(v * LANES), masked(v), tile.tail_mask) };
        }
        for (acc, &window) in acc.iter_mut().zip(&tile.windows) {
            // SAFETY: each window holds `width` values.
            let x = _mm256_set1_ps(unsafe { *window.add(k) });
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                // Separate multiply and add: the contract forbids FMA.
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, wv));
            }
        }
    }
    // Opaque to the optimiser, which would otherwise turn `p · 1 + acc` back into an add.
    let one = std::hint::black_box(_mm256_set1_ps(1.0));
    let on_fma_pipes = adds_on_fma_pipes(C, NV);
    for (&k, &x) in index.iter().zip(value) {
        let x = _mm256_set1_ps(x);
        // SAFETY: k < width (SparseRows invariant).
        let row = unsafe { tile.w.add(k as usize * tile.row_stride) };
        for v in 0..NV {
            // SAFETY: see above; masked-off lanes are not read.
            let wv = unsafe { load(row.add(v * LANES), masked(v), tile.tail_mask) };
            // One product for every copy: the same operands give the same bits.
            let product = _mm256_mul_ps(x, wv);
            for (i, acc) in acc.iter_mut().enumerate() {
                // The same sum either way (`adds_on_fma_pipes`); C and NV are constants, so
                // the choice unrolls away.
                acc[v] = if i * NV + v < on_fma_pipes {
                    _mm256_fmadd_ps(product, one, acc[v])
                } else {
                    _mm256_add_ps(acc[v], product)
                };
            }
        }
    }
    for (i, acc) in acc.iter().enumerate().take(tile.count) {
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: copy i < count has NV vectors of room, the last masked to the row end.
            unsafe {
                let dst = tile.out.add(i * tile.copy_stride + v * LANES);
                if masked(v) {
                    _mm256_maskstore_ps(dst, tile.tail_mask, *acc);
                } else {
                    _mm256_storeu_ps(dst, *acc);
                }
            }
        }
    }
}
