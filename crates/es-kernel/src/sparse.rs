//! Lists of the nonzero inputs of a layer, per sample and per block of samples, in ascending
//! input index.
//!
//! MNIST images are about 80% zero pixels and flushed activations are exact zeros, and a term
//! whose input is zero adds nothing (but the sign of a zero), so the kernels run over these
//! lists instead of the dense inputs.

use crate::reference::pixel_value;

/// Samples per block of the blocked form.
pub const BLOCK: usize = 4;

/// Which of the two forms a [`SparseRows`] holds. A kernel reads one form per call
/// ([`crate::kernels::Kernel::form`]), so a layer's inputs need only that one; a [`Prefix`]
/// (kept for any later pass) and a batch's pixels (built once per batch) hold both.
///
/// [`Prefix`]: crate::forward::Prefix
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forms {
    PerSample,
    Blocked,
    Both,
}

impl Forms {
    /// Whether these forms include `form`'s.
    pub fn holds(self, form: crate::kernels::Form) -> bool {
        match form {
            crate::kernels::Form::PerSample => self.per_sample(),
            crate::kernels::Form::Blocked => self.blocked(),
        }
    }

    fn per_sample(self) -> bool {
        matches!(self, Forms::PerSample | Forms::Both)
    }

    fn blocked(self) -> bool {
        matches!(self, Forms::Blocked | Forms::Both)
    }
}

/// The nonzero inputs of `samples()` samples of a dense layer input `width` wide, in up to two
/// forms: per sample, and per block of [`BLOCK`] consecutive samples (the union of their
/// nonzero indices, with each sample's value, 0 where it has none). The blocked form lets a
/// kernel load each weight row once for four samples; the extra terms are `0 · w`, which
/// change an accumulator at most in the sign of a zero.
///
/// Invariant (relied on by the kernels' unchecked loads): every stored index is `< width`,
/// and indices of one sample (or block) ascend.
#[derive(Clone, Debug)]
pub struct SparseRows {
    width: usize,
    samples: usize,
    forms: Forms,
    /// Nonzero inputs over all samples (counted whichever forms are held).
    nonzeros: usize,
    /// Per-sample form: sample `s` is `index[starts[s]..starts[s + 1]]` (and `value`'s).
    /// `index` and `value` are longer than that: the fill writes every input and keeps the
    /// nonzero ones, so they hold room for a whole dense input and are never shrunk.
    starts: Vec<usize>,
    index: Vec<u32>,
    value: Vec<f32>,
    /// Blocked form, with the same layout and the same spare room.
    block_starts: Vec<usize>,
    block_index: Vec<u32>,
    block_value: Vec<[f32; BLOCK]>,
}

impl Default for SparseRows {
    fn default() -> Self {
        SparseRows {
            width: 0,
            samples: 0,
            forms: Forms::Both,
            nonzeros: 0,
            starts: vec![0],
            index: Vec::new(),
            value: Vec::new(),
            block_starts: vec![0],
            block_index: Vec::new(),
            block_value: Vec::new(),
        }
    }
}

impl SparseRows {
    pub fn new() -> Self {
        SparseRows::default()
    }

    /// Rebuilds both forms from pixels (`samples × width` bytes): input `k` is `pixel / 255`.
    pub fn fill_from_pixels(&mut self, pixels: &[u8], width: usize) {
        assert!(
            width > 0 && pixels.len().is_multiple_of(width),
            "pixels must hold whole samples"
        );
        // `pixel / 255` is zero exactly when the pixel is.
        self.fill(pixels, width, Forms::Both, |&p| pixel_value(p));
    }

    /// Rebuilds both forms from dense activations (`samples × width`), skipping ±0.
    pub fn fill_from_dense(&mut self, dense: &[f32], width: usize) {
        self.fill_from_dense_in(dense, width, Forms::Both);
    }

    /// Rebuilds `forms` from dense activations (`samples × width`), skipping ±0.
    pub fn fill_from_dense_in(&mut self, dense: &[f32], width: usize, forms: Forms) {
        assert!(
            width > 0 && dense.len().is_multiple_of(width),
            "activations must hold whole samples"
        );
        self.fill(dense, width, forms, |&v| v);
    }

    /// Builds `forms` from `dense` (`value` of each input; zero inputs are skipped).
    ///
    /// Without branches on the data: every input is written at the next free place and the
    /// place advances only past a nonzero one. Hidden activations are often near half zeros
    /// in no pattern, so a branch per input mispredicts often; the writes go to room the
    /// lists keep for a whole dense input (allocated once, at the largest input).
    fn fill<T>(&mut self, dense: &[T], width: usize, forms: Forms, value: impl Fn(&T) -> f32) {
        assert!(
            width <= u32::MAX as usize,
            "layer width {width} exceeds u32 indices"
        );
        self.start_fill(width, dense.len() / width, forms);
        let mut nonzeros = 0;
        if forms.per_sample() {
            let mut n = 0;
            for sample in dense.chunks_exact(width) {
                n += keep_nonzeros(
                    sample.iter().map(&value),
                    &mut self.index[n..n + width],
                    &mut self.value[n..n + width],
                );
                self.starts.push(n);
            }
            nonzeros = n;
        }
        if forms.blocked() {
            let mut n = 0;
            let mut counted = 0;
            for group in dense.chunks(BLOCK * width) {
                let (entries, count) = keep_block_nonzeros(
                    group,
                    width,
                    &value,
                    &mut self.block_index[n..n + width],
                    &mut self.block_value[n..n + width],
                );
                n += entries;
                counted += count;
                self.block_starts.push(n);
            }
            nonzeros = counted;
        }
        self.nonzeros = nonzeros;
    }

    /// Empties the lists for `samples` samples of `width` inputs in `forms`, with room in each
    /// form held for a whole dense input (the fills write every input and keep the nonzero).
    fn start_fill(&mut self, width: usize, samples: usize, forms: Forms) {
        self.width = width;
        self.samples = samples;
        self.forms = forms;
        self.starts.truncate(1);
        self.block_starts.truncate(1);
        if forms.per_sample() {
            grow(&mut self.index, samples * width, 0);
            grow(&mut self.value, samples * width, 0.0);
        }
        if forms.blocked() {
            let blocks = samples.div_ceil(BLOCK);
            grow(&mut self.block_index, blocks * width, 0);
            grow(&mut self.block_value, blocks * width, [0.0; BLOCK]);
        }
    }

    /// The plain definition of [`SparseRows::fill_from_dense`]: both forms, a branch per
    /// input. The branch-free fill is tested against it, and es-bench times a forward pass
    /// that builds its layers' inputs this way (how it was done before) beside the fast one.
    pub fn fill_from_dense_simple(&mut self, dense: &[f32], width: usize) {
        assert!(
            width > 0 && dense.len().is_multiple_of(width),
            "activations must hold whole samples"
        );
        assert!(
            width <= u32::MAX as usize,
            "layer width {width} exceeds u32 indices"
        );
        self.width = width;
        self.samples = dense.len() / width;
        self.forms = Forms::Both;
        self.starts.truncate(1);
        self.block_starts.truncate(1);
        self.index.clear();
        self.value.clear();
        for sample in dense.chunks_exact(width) {
            for (k, &v) in sample.iter().enumerate() {
                if v != 0.0 {
                    self.index.push(k as u32);
                    self.value.push(v);
                }
            }
            self.starts.push(self.index.len());
        }
        self.nonzeros = self.index.len();
        self.block_index.clear();
        self.block_value.clear();
        for group in dense.chunks(BLOCK * width) {
            let samples = group.len() / width;
            for k in 0..width {
                if (0..samples).any(|s| group[s * width + k] != 0.0) {
                    self.block_index.push(k as u32);
                    self.block_value.push(std::array::from_fn(|s| {
                        if s < samples {
                            group[s * width + k]
                        } else {
                            0.0
                        }
                    }));
                }
            }
            self.block_starts.push(self.block_index.len());
        }
    }

    /// The forms held.
    pub fn forms(&self) -> Forms {
        self.forms
    }

    /// Multiply-adds the blocked form does: `BLOCK` per union index of every block.
    pub fn block_terms(&self) -> usize {
        self.block_starts.last().copied().unwrap_or(0) * BLOCK
    }

    /// Blocks of [`BLOCK`] samples (the last may hold fewer).
    pub fn blocks(&self) -> usize {
        self.block_starts.len() - 1
    }

    /// Union indices and per-sample values of block `b` (samples `BLOCK·b ..`).
    ///
    /// # Panics
    /// If the blocked form is not held, or `b` is out of range.
    pub fn block(&self, b: usize) -> (&[u32], &[[f32; BLOCK]]) {
        assert!(self.forms.blocked(), "blocked form not built");
        let range = self.block_starts[b]..self.block_starts[b + 1];
        (&self.block_index[range.clone()], &self.block_value[range])
    }

    /// Dense width the indices refer to.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Total nonzero inputs over all samples.
    pub fn nonzeros(&self) -> usize {
        self.nonzeros
    }

    /// Indices and values of sample `s`.
    ///
    /// # Panics
    /// If the per-sample form is not held, or `s` is out of range.
    pub fn row(&self, s: usize) -> (&[u32], &[f32]) {
        assert!(self.forms.per_sample(), "per-sample form not built");
        let range = self.starts[s]..self.starts[s + 1];
        (&self.index[range.clone()], &self.value[range])
    }

    /// For each sample, the position in its row (see [`SparseRows::row`]) of its first
    /// nonzero input at or after input `input` (the row's length if none), into `out`.
    /// Kernels that resume sums after a window of inputs take each sample's tail of terms
    /// from here: one binary search per sample for a whole group of copies, instead of one
    /// per copy block and output tile.
    ///
    /// # Panics
    /// If the rows lack the per-sample form.
    pub fn positions_at(&self, input: usize, out: &mut Vec<u32>) {
        out.clear();
        out.extend((0..self.samples()).map(|s| {
            let (index, _) = self.row(s);
            index.partition_point(|&k| (k as usize) < input) as u32
        }));
    }
}

/// Writes every input of one sample at the next free place of `index` and `values` (room for
/// all of them) and advances only past a nonzero one; returns how many it kept.
#[inline]
fn keep_nonzeros(
    inputs: impl Iterator<Item = f32>,
    index: &mut [u32],
    values: &mut [f32],
) -> usize {
    let mut m = 0;
    for (k, v) in inputs.enumerate() {
        index[m] = k as u32;
        values[m] = v;
        m += usize::from(v != 0.0);
    }
    m
}

/// The same for one block (`group`: up to [`BLOCK`] samples of `width` inputs): keeps the
/// inputs nonzero in any of its samples, padding samples 0. Returns the entries kept and the
/// nonzero values among them.
#[inline]
fn keep_block_nonzeros<T>(
    group: &[T],
    width: usize,
    value: impl Fn(&T) -> f32,
    index: &mut [u32],
    values: &mut [[f32; BLOCK]],
) -> (usize, usize) {
    let samples = group.len() / width;
    let mut m = 0;
    let mut counted = 0;
    for k in 0..width {
        let x: [f32; BLOCK] = std::array::from_fn(|s| {
            if s < samples {
                value(&group[s * width + k])
            } else {
                0.0
            }
        });
        let count: usize = x.iter().map(|&v| usize::from(v != 0.0)).sum();
        index[m] = k as u32;
        values[m] = x;
        m += usize::from(count != 0);
        counted += count;
    }
    (m, counted)
}

/// Lengthens `v` to at least `len` (filling with `fill`); never shortens it.
fn grow<T: Clone>(v: &mut Vec<T>, len: usize, fill: T) {
    if v.len() < len {
        v.resize(len, fill);
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

    /// Indices and value bits of each sample or block.
    type Lists = Vec<(Vec<u32>, Vec<u32>)>;

    /// The forms a fill holds, as plain vectors (per sample, blocked; empty if not held).
    fn contents(rows: &SparseRows) -> (Lists, Lists) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let per_sample = if rows.forms().holds(crate::kernels::Form::PerSample) {
            (0..rows.samples())
                .map(|s| (rows.row(s).0.to_vec(), bits(rows.row(s).1)))
                .collect()
        } else {
            Vec::new()
        };
        let blocked = if rows.forms().holds(crate::kernels::Form::Blocked) {
            (0..rows.blocks())
                .map(|b| {
                    let (index, value) = rows.block(b);
                    (index.to_vec(), bits(value.as_flattened()))
                })
                .collect()
        } else {
            Vec::new()
        };
        (per_sample, blocked)
    }

    #[test]
    fn the_branch_free_fill_matches_the_simple_one_in_every_form() {
        let mut rng = crate::kernels::tests::TestRng::new(7);
        // One buffer refilled with shrinking and growing inputs: the spare room of a larger
        // fill must not leak into a smaller one.
        let mut fast = SparseRows::new();
        for (samples, width) in [(9, 13), (1, 1), (4, 512), (3, 7), (17, 31), (0, 5), (6, 2)] {
            let density = rng.uniform();
            let dense: Vec<f32> = (0..samples * width)
                .map(|_| match rng.uniform() {
                    u if u < density => rng.normal(),
                    u if u < (1.0 + density) / 2.0 => 0.0,
                    _ => -0.0,
                })
                .collect();
            let mut simple = SparseRows::new();
            simple.fill_from_dense_simple(&dense, width);
            let (want_rows, want_blocks) = contents(&simple);
            for forms in [Forms::Both, Forms::PerSample, Forms::Blocked] {
                fast.fill_from_dense_in(&dense, width, forms);
                let what = format!("{forms:?} samples={samples} width={width}");
                assert_eq!(fast.samples(), samples, "{what}");
                assert_eq!(fast.nonzeros(), simple.nonzeros(), "{what}");
                let (rows, blocks) = contents(&fast);
                if forms != Forms::Blocked {
                    assert_eq!(rows, want_rows, "{what}");
                }
                if forms != Forms::PerSample {
                    assert_eq!(fast.blocks(), simple.blocks(), "{what}");
                    assert_eq!(fast.block_terms(), simple.block_terms(), "{what}");
                    assert_eq!(blocks, want_blocks, "{what}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "per-sample form not built")]
    fn a_form_not_built_is_not_read() {
        let mut rows = SparseRows::new();
        rows.fill_from_dense_in(&[1.0, 0.0, 2.0, 3.0], 2, Forms::Blocked);
        let _ = rows.row(0);
    }
}
