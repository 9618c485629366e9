//! Per-sample lists of the nonzero inputs of a layer, in ascending input index.
//!
//! MNIST images are about 80% zero pixels and flushed activations are exact zeros, and a term
//! whose input is zero adds nothing (but the sign of a zero), so the kernels run over these
//! lists instead of the dense inputs.

use crate::reference::pixel_value;

/// Samples per block of the blocked form.
pub const BLOCK: usize = 4;

/// The nonzero inputs of `samples()` samples of a dense layer input `width` wide, in two
/// forms: per sample, and per block of [`BLOCK`] consecutive samples (the union of their
/// nonzero indices, with each sample's value, 0 where it has none). The blocked form lets a
/// kernel load each weight row once for four samples; the extra terms are `0 · w`, which
/// change an accumulator at most in the sign of a zero.
///
/// Invariant (relied on by the kernels' unchecked loads): every stored index is `< width`,
/// and indices of one sample (or block) ascend.
#[derive(Clone, Debug, Default)]
pub struct SparseRows {
    width: usize,
    starts: Vec<usize>,
    index: Vec<u32>,
    value: Vec<f32>,
    block_starts: Vec<usize>,
    block_index: Vec<u32>,
    block_value: Vec<[f32; BLOCK]>,
}

impl SparseRows {
    pub fn new() -> Self {
        SparseRows::default()
    }

    /// Rebuilds from pixels (`samples × width` bytes): input `k` is `pixel / 255`.
    pub fn fill_from_pixels(&mut self, pixels: &[u8], width: usize) {
        assert!(
            width > 0 && pixels.len().is_multiple_of(width),
            "pixels must hold whole samples"
        );
        self.clear(width);
        for sample in pixels.chunks_exact(width) {
            for (k, &p) in sample.iter().enumerate() {
                if p != 0 {
                    self.index.push(k as u32);
                    self.value.push(pixel_value(p));
                }
            }
            self.starts.push(self.index.len());
        }
        self.fill_blocks(pixels, |&p| p != 0, |&p| pixel_value(p));
    }

    /// Rebuilds from dense activations (`samples × width`), skipping ±0.
    pub fn fill_from_dense(&mut self, dense: &[f32], width: usize) {
        assert!(
            width > 0 && dense.len().is_multiple_of(width),
            "activations must hold whole samples"
        );
        self.clear(width);
        for sample in dense.chunks_exact(width) {
            self.push_sample(sample);
        }
        self.fill_blocks(dense, |&v| v != 0.0, |&v| v);
    }

    /// Builds the blocked form from the same dense input.
    fn fill_blocks<T>(
        &mut self,
        dense: &[T],
        nonzero: impl Fn(&T) -> bool,
        value: impl Fn(&T) -> f32,
    ) {
        let width = self.width;
        for group in dense.chunks(BLOCK * width) {
            let samples = group.len() / width;
            for k in 0..width {
                if (0..samples).any(|s| nonzero(&group[s * width + k])) {
                    self.block_index.push(k as u32);
                    self.block_value.push(std::array::from_fn(|s| {
                        if s < samples {
                            value(&group[s * width + k])
                        } else {
                            0.0
                        }
                    }));
                }
            }
            self.block_starts.push(self.block_index.len());
        }
    }

    /// Multiply-adds the blocked form does: `BLOCK` per union index of every block.
    pub fn block_terms(&self) -> usize {
        self.block_index.len() * BLOCK
    }

    /// Blocks of [`BLOCK`] samples (the last may hold fewer).
    pub fn blocks(&self) -> usize {
        self.block_starts.len().saturating_sub(1)
    }

    /// Union indices and per-sample values of block `b` (samples `BLOCK·b ..`).
    pub fn block(&self, b: usize) -> (&[u32], &[[f32; BLOCK]]) {
        let range = self.block_starts[b]..self.block_starts[b + 1];
        (&self.block_index[range.clone()], &self.block_value[range])
    }

    fn clear(&mut self, width: usize) {
        assert!(
            width <= u32::MAX as usize,
            "layer width {width} exceeds u32 indices"
        );
        self.width = width;
        self.starts.clear();
        self.starts.push(0);
        self.index.clear();
        self.value.clear();
        self.block_starts.clear();
        self.block_starts.push(0);
        self.block_index.clear();
        self.block_value.clear();
    }

    fn push_sample(&mut self, dense: &[f32]) {
        for (k, &v) in dense.iter().enumerate() {
            if v != 0.0 {
                self.index.push(k as u32);
                self.value.push(v);
            }
        }
        self.starts.push(self.index.len());
    }

    /// Dense width the indices refer to.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn samples(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// Total stored terms over all samples.
    pub fn nonzeros(&self) -> usize {
        self.index.len()
    }

    /// Indices and values of sample `s`.
    pub fn row(&self, s: usize) -> (&[u32], &[f32]) {
        let range = self.starts[s]..self.starts[s + 1];
        (&self.index[range.clone()], &self.value[range])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_hold_nonzeros_in_order() {
        let mut rows = SparseRows::new();
        rows.fill_from_pixels(&[0, 255, 0, 51, 0, 0, 0, 0], 4);
        assert_eq!(rows.samples(), 2);
        assert_eq!(rows.row(0), (&[1u32, 3][..], &[1.0f32, 0.2][..]));
        assert_eq!(rows.row(1).0.len(), 0);
        assert_eq!(rows.blocks(), 1);
        assert_eq!(
            rows.block(0),
            (
                &[1u32, 3][..],
                &[[1.0f32, 0.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]][..]
            )
        );
        rows.fill_from_dense(&[-0.0, 2.0, 0.0, -1.0], 2);
        assert_eq!(
            rows.block(0),
            (&[1u32][..], &[[2.0f32, -1.0, 0.0, 0.0]][..])
        );
        assert_eq!(rows.row(0), (&[1u32][..], &[2.0f32][..]));
        assert_eq!(rows.row(1), (&[1u32][..], &[-1.0f32][..]));
        assert_eq!(rows.nonzeros(), 2);
    }
}
