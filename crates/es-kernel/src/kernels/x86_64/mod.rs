//! x86-64 kernels, one module per instruction set. Callers check CPU support first.

use crate::kernels::{COPY_BLOCK, WindowCopies, rest_after};

pub(super) mod avx2;
pub(super) mod avx512;

/// Dispatches a runtime tile width to a const-generic tile function, so each width gets its
/// accumulators in registers.
macro_rules! dispatch_tile {
    ($nv:expr, $masked:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match ($nv, $masked) {
            (1, false) => $f::<1, false>($($arg),*),
            (2, false) => $f::<2, false>($($arg),*),
            (3, false) => $f::<3, false>($($arg),*),
            (4, false) => $f::<4, false>($($arg),*),
            (5, false) => $f::<5, false>($($arg),*),
            (6, false) => $f::<6, false>($($arg),*),
            (7, false) => $f::<7, false>($($arg),*),
            (8, false) => $f::<8, false>($($arg),*),
            (1, true) => $f::<1, true>($($arg),*),
            (2, true) => $f::<2, true>($($arg),*),
            (3, true) => $f::<3, true>($($arg),*),
            (4, true) => $f::<4, true>($($arg),*),
            (5, true) => $f::<5, true>($($arg),*),
            (6, true) => $f::<6, true>($($arg),*),
            (7, true) => $f::<7, true>($($arg),*),
            (8, true) => $f::<8, true>($($arg),*),
            (nv, _) => unreachable!("tile of {nv} vectors"),
        }
    };
}
pub(super) use dispatch_tile;

/// Where a tile's sums start: `start` (a `samples × n_out` matrix the sums start from, or
/// null for sums from +0) moved to the tile's first output `at`; null stays null.
#[inline(always)]
pub(super) fn offset(start: *const f32, at: usize) -> *const f32 {
    if start.is_null() {
        start
    } else {
        start.wrapping_add(at)
    }
}

/// One sample's tile of a block of window copies: where its operands are. `M` is the
/// instruction set's tail mask.
pub(super) struct CopiesTile<M> {
    /// Each copy's window (`width` values); copies past `count` read zeros.
    pub windows: [*const f32; COPY_BLOCK],
    pub width: usize,
    pub from: usize,
    /// The tile's first column of weight row 0.
    pub w: *const f32,
    pub n_out: usize,
    /// θ's sums the copies start from, at the tile's first output.
    pub init: *const f32,
    /// The block's first copy's output at the tile's first output; copy `i` is
    /// `i · copy_stride` further.
    pub out: *mut f32,
    pub copy_stride: usize,
    /// Copies stored (the rest of the block is padding).
    pub count: usize,
    pub tail_mask: M,
}

/// The shape of one tile: `nv` vectors (the last masked to the row end when `masked`) for a
/// block of `block` copies (4, or 2 for a block of at most two).
#[derive(Clone, Copy)]
pub(super) struct TileShape {
    pub nv: usize,
    pub masked: bool,
    pub block: usize,
}

/// The loops of `Kernel::accumulate_window_copies` shared by the SIMD kernels: blocks of up
/// to [`COPY_BLOCK`] copies, tiles of `accumulators / block` vectors of `lanes` outputs, one
/// sample at a time; `tile` runs one tile on the sample's terms after the window.
///
/// # Safety
/// `tile` must be sound for every tile handed to it: the pointers of a [`CopiesTile`] are
/// valid for its `nv` vectors (the last masked) given the shapes
/// `Kernel::accumulate_window_copies` checked, and each window for `width` values.
#[inline]
// The shared loop's operands are the kernel's; a struct would only be unpacked again.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn window_copies_tiles<M: Copy>(
    copies: &WindowCopies<'_>,
    weights: &[f32],
    n_out: usize,
    out: &mut [f32],
    lanes: usize,
    accumulators: usize,
    tail_mask: M,
    mut tile: impl FnMut(&CopiesTile<M>, &[u32], &[f32], TileShape),
) {
    let vectors = n_out.div_ceil(lanes);
    let tail = n_out % lanes;
    let samples = copies.rest.samples();
    let end = copies.from + copies.width;
    // The window of a copy past the block's count: zeros, read but never stored.
    let zeros = vec![0.0f32; copies.width];
    let (first_copy, end_copy) = (copies.copies.start, copies.copies.end);
    for first in (first_copy..end_copy).step_by(COPY_BLOCK) {
        let count = (end_copy - first).min(COPY_BLOCK);
        // A block of two copies (one perturbation's pair) gets twice the vectors per tile.
        let block = if count > 2 { COPY_BLOCK } else { 2 };
        let tile_vectors = accumulators / block;
        let mut v0 = 0;
        while v0 < vectors {
            let nv = (vectors - v0).min(tile_vectors);
            let masked = tail != 0 && v0 + nv == vectors;
            for s in 0..samples {
                let (index, value) = rest_after(copies.rest, s, end);
                let row = s * copies.columns + first * copies.width;
                let windows = std::array::from_fn(|i| {
                    if i < count {
                        copies.window[row + i * copies.width..].as_ptr()
                    } else {
                        zeros.as_ptr()
                    }
                });
                let at = s * n_out + v0 * lanes;
                // SAFETY: `at` is within `start` and within each copy's output (s < samples,
                // v0 < vectors) and `v0 · lanes` within a weight row, by the shapes checked.
                let tile_at = unsafe {
                    CopiesTile {
                        windows,
                        width: copies.width,
                        from: copies.from,
                        w: weights.as_ptr().add(v0 * lanes),
                        n_out,
                        init: copies.start.as_ptr().add(at),
                        out: out
                            .as_mut_ptr()
                            .add((first - first_copy) * samples * n_out + at),
                        copy_stride: samples * n_out,
                        count,
                        tail_mask,
                    }
                };
                tile(&tile_at, index, value, TileShape { nv, masked, block });
            }
            v0 += nv;
        }
    }
}
