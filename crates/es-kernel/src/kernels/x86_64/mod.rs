//! x86-64 kernels, one module per instruction set. Callers check CPU support first.

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

/// One tile of [`dense_tiles`]: a block of samples and the vectors of outputs it covers.
pub(super) struct DenseTile {
    pub block: crate::kernels::DenseBlock,
    /// The block's first sample and how many of its [`crate::sparse::BLOCK`] are real.
    pub first: usize,
    pub count: usize,
    /// The tile's first output vector, its vector count, and whether its last is masked.
    pub v0: usize,
    pub nv: usize,
    pub masked: bool,
}

/// The tiles of `Kernel::accumulate_dense` in the order the SIMD kernels run them: for each
/// stripe of up to `tile_vectors` output vectors of `lanes` lanes, every block of samples
/// (padding samples read a row of zeros). Shared by the AVX2 and AVX-512 kernels, whose
/// `tile` dispatches to their own block tile.
#[inline(always)]
pub(super) fn dense_tiles(
    dense: &[f32],
    width: usize,
    n_out: usize,
    lanes: usize,
    tile_vectors: usize,
    mut tile: impl FnMut(DenseTile),
) {
    use crate::sparse::BLOCK;
    let vectors = n_out.div_ceil(lanes);
    let tail = n_out % lanes;
    let samples = dense.len() / width;
    let zeros = vec![0.0f32; width];
    let mut v0 = 0;
    while v0 < vectors {
        let nv = (vectors - v0).min(tile_vectors);
        let masked = tail != 0 && v0 + nv == vectors;
        for first in (0..samples).step_by(BLOCK) {
            let count = (samples - first).min(BLOCK);
            let rows = std::array::from_fn(|i| {
                if i < count {
                    dense[(first + i) * width..].as_ptr()
                } else {
                    zeros.as_ptr()
                }
            });
            tile(DenseTile {
                block: crate::kernels::DenseBlock { rows, width },
                first,
                count,
                v0,
                nv,
                masked,
            });
        }
        v0 += nv;
    }
}
