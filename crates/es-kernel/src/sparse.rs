//! Per-sample lists of the nonzero inputs of a layer, in ascending input index.
//!
//! MNIST images are about 80% zero pixels and flushed activations are exact zeros, and a term
//! whose input is zero adds nothing (but the sign of a zero), so the kernels run over these
//! lists instead of the dense inputs.

use crate::reference::pixel_value;

/// The nonzero inputs of `samples()` samples of a dense layer input `width` wide.
///
/// Invariant (relied on by the kernels' unchecked loads): every stored index is `< width`,
/// and indices of one sample ascend.
#[derive(Clone, Debug, Default)]
pub struct SparseRows {
    width: usize,
    starts: Vec<usize>,
    index: Vec<u32>,
    value: Vec<f32>,
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
        rows.fill_from_dense(&[-0.0, 2.0, 0.0, -1.0], 2);
        assert_eq!(rows.row(0), (&[1u32][..], &[2.0f32][..]));
        assert_eq!(rows.row(1), (&[1u32][..], &[-1.0f32][..]));
        assert_eq!(rows.nonzeros(), 2);
    }
}
