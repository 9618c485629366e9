//! AVX-512F accumulate kernel: 16 outputs per vector, masked loads and stores for the tail.

use std::arch::x86_64::*;

use super::{dense_tiles, dispatch_tile, offset};
use crate::kernels::{
    BlockTerms, SparseBlock, Weights, WindowCopies, adds_on_fma_pipes, prefetch_copies_tile,
    rest_after,
};
use crate::sparse::{BLOCK, SparseRows};

const LANES: usize = 16;
/// Accumulator vectors per pass over a sample's terms: 8 (128 outputs) leave registers for
/// the broadcast input and the loads, and keep the weight slice of a tile (fan_in × 512
/// bytes) in L2 while every sample of the batch streams through it.
const TILE: usize = 8;

/// The lanes of a row's last vector that lie within its `n_out` outputs (all 16 when the
/// row fills whole vectors).
fn tail_mask(n_out: usize) -> __mmask16 {
    match n_out % LANES {
        0 => !0,
        tail => (1u16 << tail) - 1,
    }
}

/// # Safety
/// The CPU must support AVX-512F; `weights` must be `rows.width() × n_out` and `out`
/// `rows.samples() × n_out` (the caller asserts both).
#[target_feature(enable = "avx512f")]
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
            // SAFETY: `s * n_out + v0 * LANES` is within `out` (s < samples, v0 < vectors), and
            // the tile's stores stay within the sample's row (the last vector is masked to
            // `n_out`); weight offsets likewise stay within row `k < width` of `weights`.
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

/// One sample, `NV` vectors of outputs; the last one masked when `MASKED`.
///
/// # Safety
/// AVX-512F; `w` points at column `v0·16` of row 0 of a `width × n_out` matrix, every index
/// is `< width`, and `out` has room for `NV` vectors (the last masked by `tail_mask`).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const NV: usize, const MASKED: bool>(
    index: &[u32],
    value: &[f32],
    w: *const f32,
    stride: usize,
    out: *mut f32,
    tail_mask: __mmask16,
    init: *const f32,
) {
    let mask = |v: usize| if MASKED && v + 1 == NV { tail_mask } else { !0 };
    let mut acc = [_mm512_setzero_ps(); NV];
    if !init.is_null() {
        for (v, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the caller guarantees NV vectors of `out`, the last masked to the row end.
            *acc = unsafe { _mm512_maskz_loadu_ps(mask(v), init.add(v * LANES)) };
        }
    }
    for (&k, &x) in index.iter().zip(value) {
        let x = _mm512_set1_ps(x);
        // SAFETY: k < width (SparseRows invariant), so the row and its NV vectors (masked
        // past n_out) lie within `weights`.
        let row = unsafe { w.add(k as usize * stride) };
        for (v, acc) in acc.iter_mut().enumerate() {
            // SAFETY: see above; masked-off lanes are not read.
            let wv = unsafe { _mm512_maskz_loadu_ps(mask(v), row.add(v * LANES)) };
            // Separate multiply and add: the contract forbids FMA.
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, wv));
        }
    }
    for (v, acc) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees room for NV vectors, the last masked to the row end.
        unsafe { _mm512_mask_storeu_ps(out.add(v * LANES), mask(v), *acc) };
    }
}

/// Accumulator vectors per sample in the blocked kernel: 4 samples × 4 vectors = 16
/// accumulators, plus 4 weight vectors and a broadcast, within the 32 zmm registers.
const BLOCK_TILE: usize = 4;

/// The blocked kernel: each weight row is loaded once for the [`BLOCK`] samples of a block
/// (over the union of their nonzero indices), which trades extra `0 · w` terms for a quarter
/// of the loads. Same contract as [`accumulate`].
///
/// # Safety
/// As for [`accumulate`].
#[target_feature(enable = "avx512f")]
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
            // SAFETY: rows first.. first + count exist in `out`, and the tile stays within
            // each row (the last vector masked to `n_out`); weight offsets stay within row
            // `k < width` of `weights`.
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
/// The CPU must support AVX-512F; `dense` must be `samples × width`, `weights` `width × n_out` and
/// `out` `samples × n_out` (the caller asserts all three).
#[target_feature(enable = "avx512f")]
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

/// One block of samples, `NV` vectors of outputs; rows `count..BLOCK` are padding (their
/// values are 0) and are not stored.
///
/// # Safety
/// AVX-512F; as for [`tile`], with `out` pointing at the block's first row and `count` rows
/// of room.
#[target_feature(enable = "avx512f")]
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
    tail_mask: __mmask16,
    init: *const f32,
) {
    let mask = |v: usize| if MASKED && v + 1 == NV { tail_mask } else { !0 };
    let mut acc = [[_mm512_setzero_ps(); NV]; BLOCK];
    if !init.is_null() {
        for (s, acc) in acc.iter_mut().enumerate().take(count) {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row s < count of the block, NV vectors, the last masked.
                *acc = unsafe { _mm512_maskz_loadu_ps(mask(v), init.add(s * n_out + v * LANES)) };
            }
        }
    }
    let mut wv = [_mm512_setzero_ps(); NV];
    for t in 0..terms.len() {
        // SAFETY: t < len.
        let (k, x) = unsafe { terms.term(t) };
        // SAFETY: k < width (SparseRows invariant, or a dense row's index), so the row's NV
        // vectors (masked past n_out) lie within `weights`.
        let row = unsafe { w.add(k * stride) };
        for (v, wv) in wv.iter_mut().enumerate() {
            // SAFETY: see above; masked-off lanes are not read.
            *wv = unsafe { _mm512_maskz_loadu_ps(mask(v), row.add(v * LANES)) };
        }
        for (acc, &x) in acc.iter_mut().zip(&x) {
            let x = _mm512_set1_ps(x);
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                // Separate multiply and add: the contract forbids FMA.
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, wv));
            }
        }
    }
    for (s, acc) in acc.iter().enumerate().take(count) {
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: row s < count of the block, NV vectors, the last masked to the row end.
            unsafe { _mm512_mask_storeu_ps(out.add(s * n_out + v * LANES), mask(v), *acc) };
        }
    }
}

/// Accumulators of a window-copies tile (`C` copies × `16 / C` vectors): half the 32 zmm
/// registers, leaving the rest for the weight vectors, the products and the broadcast.
const COPY_ACCUMULATORS: usize = 16;

/// The most copies one tile carries ([`COPY_ACCUMULATORS`] copies of one vector each).
pub(crate) const MAX_COPY_BLOCK: usize = COPY_ACCUMULATORS;

/// How many copies a tile carries when `count` are left and the outputs fill `vectors`
/// vectors: the power of two from 2 to [`MAX_COPY_BLOCK`] that holds them, but no more
/// than `max_block`.
///
/// Why more than four: every copy's sums take one add per shared term whatever the block,
/// but the weight loads and the products are shared by the block, and a sum whose outputs
/// fit one vector (the 10 logits) is one chain of adds per copy, waiting on its own
/// latency unless many copies run side by side.
fn copy_block(count: usize, max_block: usize) -> usize {
    count.next_power_of_two().clamp(2, max_block.max(2))
}

/// [`crate::kernels::Kernel::accumulate_window_copies`]: blocks of up to
/// [`crate::kernels::Kernel::copies_per_pass`] copies, each tile one sample's `NV` vectors
/// of outputs for every copy of the block.
///
/// # Safety
/// The CPU must support AVX-512F; the caller checked the shapes
/// (`Kernel::accumulate_window_copies`).
#[target_feature(enable = "avx512f")]
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
    let max_block = copies_per_pass(n_out);
    // The window of a copy past the block's count: zeros, read but never stored.
    let zeros = vec![0.0f32; copies.width];
    let (first_copy, end_copy) = (copies.copies.start, copies.copies.end);
    for first in (first_copy..end_copy).step_by(max_block) {
        let count = (end_copy - first).min(max_block);
        let block = copy_block(count, max_block);
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
                let windows: [*const f32; MAX_COPY_BLOCK] = std::array::from_fn(|i| {
                    if i < count {
                        copies.window[row + i * copies.width..].as_ptr()
                    } else {
                        zeros.as_ptr()
                    }
                });
                // SAFETY: each window pointer has `width` values (a copy's columns of the
                // sample's row, or `zeros`); `start` and every copy's output have a row of
                // `n_out` at `s`, of which the tile covers NV vectors from v0 (the last
                // masked to the row end); weight rows `from..` lie within `weights`; NV ·
                // block never exceeds COPY_ACCUMULATORS.
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
                    match (block, nv, masked) {
                        (16, 1, false) => copies_tile::<1, false, 16>(&tile, index, value),
                        (16, 1, true) => copies_tile::<1, true, 16>(&tile, index, value),
                        (8, 1, false) => copies_tile::<1, false, 8>(&tile, index, value),
                        (8, 1, true) => copies_tile::<1, true, 8>(&tile, index, value),
                        (8, 2, false) => copies_tile::<2, false, 8>(&tile, index, value),
                        (8, 2, true) => copies_tile::<2, true, 8>(&tile, index, value),
                        (4, ..) => {
                            dispatch_tile!(nv, masked, copies_tile_of_4(&tile, index, value))
                        }
                        (2, ..) => {
                            dispatch_tile!(nv, masked, copies_tile_of_2(&tile, index, value))
                        }
                        _ => unreachable!("tile of {block} copies × {nv} vectors"),
                    }
                }
            }
            v0 += nv;
        }
    }
}

/// Copies per call that [`accumulate_window_copies`] carries through one tile for outputs
/// `n_out` wide: 16 when they fit one vector, else 8 (two vectors each). Sixteen copies
/// of one vector keep sixteen independent chains of adds; eight of two halve the weight
/// loads per add against four of four.
pub(crate) fn copies_per_pass(n_out: usize) -> usize {
    if n_out <= LANES { 16 } else { 8 }
}

/// One sample's tile of a block of window copies: where its operands are.
struct CopiesTile {
    /// Each copy's window (`width` values).
    windows: [*const f32; MAX_COPY_BLOCK],
    width: usize,
    from: usize,
    /// Column `v0·16` of weight row 0; row `k` starts `k · row_stride` further.
    w: *const f32,
    row_stride: usize,
    /// θ's sums the copies start from, at the tile's first output.
    init: *const f32,
    /// The first copy's output at the tile's first output; copy `i` is `i · copy_stride`
    /// further.
    out: *mut f32,
    copy_stride: usize,
    /// Copies stored (the rest of the block is padding).
    count: usize,
    tail_mask: __mmask16,
}

/// # Safety
/// As for [`copies_tile`].
#[target_feature(enable = "avx512f")]
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
#[target_feature(enable = "avx512f")]
unsafe fn copies_tile_of_2<const NV: usize, const MASKED: bool>(
    tile: &CopiesTile,
    index: &[u32],
    value: &[f32],
) {
    // SAFETY: forwarded.
    unsafe { copies_tile::<NV, MASKED, 2>(tile, index, value) }
}

/// `C` copies of one sample, `NV` vectors of outputs: θ's sums, each copy's window terms,
/// then the shared terms `index`/`value` (one product each, added to every copy).
///
/// # Safety
/// AVX-512F; the pointers of `tile` as documented there, valid for NV vectors (the last
/// masked when MASKED), every index `< width` of the weights, and `tile.count <= C`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn copies_tile<const NV: usize, const MASKED: bool, const C: usize>(
    tile: &CopiesTile,
    index: &[u32],
    value: &[f32],
) {
    let mask = |v: usize| {
        if MASKED && v + 1 == NV {
            tile.tail_mask
        } else {
            !0
        }
    };
    let mut start = [_mm512_setzero_ps(); NV];
    for (v, start) in start.iter_mut().enumerate() {
        // SAFETY: NV vectors of `init`, the last masked to the row end.
        *start = unsafe { _mm512_maskz_loadu_ps(mask(v), tile.init.add(v * LANES)) };
    }
    let mut acc = [start; C];
    let mut wv = [_mm512_setzero_ps(); NV];
    for k in 0..tile.width {
        // SAFETY: from + k < width of the weights (checked by the caller).
        let row = unsafe { tile.w.add((tile.from + k) * tile.row_stride) };
        for (v, wv) in wv.iter_mut().enumerate() {
            // SAFETY: see above; masked-off lanes are not read.
            *wv = unsafe { _mm512_maskz_loadu_ps(mask(v), row.add(v * LANES)) };
        }
        for (acc, &window) in acc.iter_mut().zip(&tile.windows) {
            // SAFETY: each window holds `width` values.
            let x = _mm512_set1_ps(unsafe { *window.add(k) });
            for (acc, &wv) in acc.iter_mut().zip(&wv) {
                // Separate multiply and add: the contract forbids FMA.
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, wv));
            }
        }
    }
    // Opaque to the optimiser, which would otherwise turn `p · 1 + acc` back into an add.
    let one = std::hint::black_box(_mm512_set1_ps(1.0));
    let on_fma_pipes = adds_on_fma_pipes(C, NV);
    for (&k, &x) in index.iter().zip(value) {
        let x = _mm512_set1_ps(x);
        // SAFETY: k < width (SparseRows invariant).
        let row = unsafe { tile.w.add(k as usize * tile.row_stride) };
        for v in 0..NV {
            // SAFETY: see above; masked-off lanes are not read.
            let wv = unsafe { _mm512_maskz_loadu_ps(mask(v), row.add(v * LANES)) };
            // One product for every copy: the same operands give the same bits.
            let product = _mm512_mul_ps(x, wv);
            for (i, acc) in acc.iter_mut().enumerate() {
                // The same sum either way (`exact_add_on_fma_pipes`); C and NV are
                // constants, so the choice unrolls away.
                acc[v] = if i * NV + v < on_fma_pipes {
                    // `product · 1 + acc`: exact product, one rounding of the sum.
                    _mm512_fmadd_ps(product, one, acc[v])
                } else {
                    _mm512_add_ps(acc[v], product)
                };
            }
        }
    }
    for (i, acc) in acc.iter().enumerate().take(tile.count) {
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: copy i < count has NV vectors of room, the last masked to the row end.
            unsafe {
                _mm512_mask_storeu_ps(
                    tile.out.add(i * tile.copy_stride + v * LANES),
                    mask(v),
                    *acc,
                )
            };
        }
    }
}
