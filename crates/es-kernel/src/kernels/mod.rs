//! The sparse accumulate kernel `out[s, j] = Σ_t value[t] · W[index[t], j]` in every
//! instruction set, with runtime dispatch.
//!
//! Contract shared by all kernels (and checked against [`crate::reference`] bit for bit):
//! each output sums its terms in list order (ascending input index), starting from +0, with
//! each product and each sum rounded separately (no FMA fusing a product into a sum; the
//! one FMA in use adds an already rounded product times exactly 1, see
//! [`adds_on_fma_pipes`]). Kernels vectorise across output neurons only, never across
//! terms, so every SIMD width gives identical bits. Flushing comes from the float
//! environment the caller set (see [`crate::float_env`]).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::sparse::{BLOCK, Forms, SparseRows};

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// Asks the CPU to start loading the cache lines of `values[range]` into its caches, so a
/// loop that reaches them later does not wait on memory. A hint only: it reads nothing the
/// program sees, changes no result and never faults, even for indices past the slice's end
/// (the addresses are computed with wrapping arithmetic and never dereferenced). Used where
/// loops walk a table far larger than the caches with a stride the hardware prefetcher does
/// not follow (a neuron group's noise: one short run per weight row, a row apart; the
/// window-copies tiles' per-sample operands).
#[inline(always)]
pub fn prefetch<T>(values: &[T], range: std::ops::Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if range.start < range.end {
        let base = values.as_ptr();
        let first = base.wrapping_add(range.start);
        let last = base.wrapping_add(range.end - 1);
        // One hint per 64-byte line from the line holding the first value to the last's.
        let mut line = first.wrapping_byte_sub(first as usize % 64);
        while line <= last {
            // SAFETY: `_mm_prefetch` is a hint that never faults and reads nothing the program
            // sees; SSE is part of the x86-64 baseline.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.cast())
            };
            line = line.wrapping_byte_add(64);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, range);
}

/// A weight matrix as the kernels read it: one row per input of `n_out` weights (one per
/// output), row `k` starting at `k · stride` of `values`. θ's layers are packed (`stride ==
/// n_out`); [`PaddedWeights`] holds a copy whose stride the caches like.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    values: &'a [f32],
    rows: usize,
    n_out: usize,
    stride: usize,
}

impl<'a> Weights<'a> {
    /// Rows of `n_out` weights one after another, as θ's layout stores a layer.
    ///
    /// # Panics
    /// If `n_out` is 0 or `values` does not hold whole rows.
    pub fn packed(values: &'a [f32], n_out: usize) -> Weights<'a> {
        assert!(n_out > 0, "weight rows of no outputs");
        assert!(
            values.len().is_multiple_of(n_out),
            "{} weights are not whole rows of {n_out}",
            values.len()
        );
        Weights {
            values,
            rows: values.len() / n_out,
            n_out,
            stride: n_out,
        }
    }

    /// `rows` rows of `n_out` weights, row `k` at `k · stride` of `values`.
    ///
    /// # Panics
    /// If `n_out` is 0, `stride < n_out`, or `values` ends before the last row does.
    pub fn strided(values: &'a [f32], rows: usize, n_out: usize, stride: usize) -> Weights<'a> {
        assert!(n_out > 0, "weight rows of no outputs");
        assert!(
            stride >= n_out,
            "row stride {stride} below the row's {n_out} weights"
        );
        let needed = rows.checked_sub(1).map_or(0, |last| last * stride + n_out);
        assert!(
            values.len() >= needed,
            "{rows} rows of {n_out} at stride {stride} need {needed} values, got {}",
            values.len()
        );
        Weights {
            values,
            rows,
            n_out,
            stride,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `k`: input `k`'s weight to each output.
    #[inline(always)]
    pub fn row(&self, k: usize) -> &'a [f32] {
        &self.values[k * self.stride..k * self.stride + self.n_out]
    }

    /// Rows `range` as a matrix of their own.
    pub fn rows_in(&self, range: Range<usize>) -> Weights<'a> {
        assert!(
            range.start <= range.end && range.end <= self.rows,
            "rows {range:?} of {}",
            self.rows
        );
        let values = match range.is_empty() {
            true => &self.values[..0],
            false => &self.values[range.start * self.stride..],
        };
        Weights::strided(values, range.len(), self.n_out, self.stride)
    }

    /// Where row 0 starts; every row's `n_out` weights lie within the slice.
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.values.as_ptr()
    }
}

/// The row stride (in f32) at which [`PaddedWeights`] stores rows of `n_out` weights: a whole
/// number of 64-byte cache lines, and an odd one.
///
/// Why: the kernels walk a narrow stripe of columns down every row. With rows a power-of-two
/// multiple of 64 bytes apart (512 outputs: 2 KiB) the stripe's lines all map to a few cache
/// sets — 2 of an L1's 64, 32 of a 512 KiB L2's 1,024 — and evict each other long before the
/// caches are full, so every pass over a block of samples reloads the stripe from L3. An odd
/// number of lines per row spreads consecutive rows over every set. On an AMD EPYC (Zen 2,
/// AVX2), the blocked kernel over 100 samples of 784 MNIST-like inputs, packed against padded
/// rows: 512 outputs 18.8 → 28.9 GMAC/s, 256 (a run of a neuron group's copies side by side)
/// 24.5 → 30.2, 1,024 15.1 → 28.5 (es-bench's `a/b` rows time whole forward passes both ways).
/// Rows under 4 lines are left packed: they stay in L1 anyway.
pub fn padded_stride(n_out: usize) -> usize {
    const LINE: usize = 64 / std::mem::size_of::<f32>();
    if n_out < 4 * LINE {
        return n_out;
    }
    let lines = n_out.div_ceil(LINE);
    (lines | 1) * LINE
}

/// A copy of a weight matrix with its rows [`padded_stride`] apart and row 0 on a cache line,
/// so that each 64-byte row segment is one line. Reused: refilling keeps the allocation.
#[derive(Debug, Default)]
pub struct PaddedWeights {
    /// Row 0 starts at `offset` (which puts it on a 64-byte line). The padding after each
    /// row's `n_out` weights holds whatever was there: the kernels never read it (their last
    /// vector of a row is masked to `n_out`; the tests' skewed layout has NaN there to check).
    values: Vec<f32>,
    offset: usize,
    rows: usize,
    n_out: usize,
    stride: usize,
}

impl Clone for PaddedWeights {
    /// A copy whose row 0 is on a line of its own allocation (a plain copy of `values`
    /// would keep the offset that aligned the original's).
    fn clone(&self) -> PaddedWeights {
        let mut copy = PaddedWeights::new();
        if self.n_out > 0 {
            let weights = self.weights();
            copy.fill_rows(self.rows, self.n_out, |k| weights.row(k));
        }
        copy
    }
}

impl PaddedWeights {
    pub fn new() -> PaddedWeights {
        PaddedWeights::default()
    }

    /// Copies `packed` (rows of `n_out` one after another) in.
    ///
    /// # Panics
    /// As [`Weights::packed`].
    pub fn fill(&mut self, packed: &[f32], n_out: usize) {
        let source = Weights::packed(packed, n_out);
        self.fill_rows(source.rows, n_out, |k| source.row(k));
    }

    /// Fills `rows` rows of `n_out` weights, row `k` from `row(k)`.
    pub fn fill_rows<'r>(&mut self, rows: usize, n_out: usize, row: impl Fn(usize) -> &'r [f32]) {
        self.reset(rows, n_out);
        for k in 0..rows {
            self.row_mut(k).copy_from_slice(row(k));
        }
    }

    /// Shapes the matrix as `rows` rows of `n_out` for a caller to write every row
    /// ([`PaddedWeights::row_mut`]). Until written, a row holds what an earlier shape left
    /// there (zeros in new room): nothing is cleared, since the trainer rewrites every row of
    /// a group's copies for each run of pairs and a clear would cost as much as the writes.
    ///
    /// # Panics
    /// If `n_out` is 0.
    pub fn reset(&mut self, rows: usize, n_out: usize) {
        assert!(n_out > 0, "weight rows of no outputs");
        let stride = padded_stride(n_out);
        // Room for the rows plus up to a line of slack to align row 0.
        let len = rows * stride + 16;
        if self.values.len() != len {
            self.values.resize(len, 0.0);
        }
        let misalignment = self.values.as_ptr() as usize % 64;
        self.offset = (64 - misalignment) % 64 / std::mem::size_of::<f32>();
        (self.rows, self.n_out, self.stride) = (rows, n_out, stride);
    }

    /// Row `k`'s `n_out` weights, to write.
    pub fn row_mut(&mut self, k: usize) -> &mut [f32] {
        assert!(k < self.rows, "row {k} of {}", self.rows);
        let at = self.offset + k * self.stride;
        &mut self.values[at..at + self.n_out]
    }

    /// The matrix as the kernels read it.
    pub fn weights(&self) -> Weights<'_> {
        Weights::strided(
            &self.values[self.offset..],
            self.rows,
            self.n_out,
            self.stride,
        )
    }
}

/// Environment variable that forces one kernel (`portable`, `avx2`, `avx512`).
pub const KERNEL_ENV: &str = "UNDERFLOW_KERNEL";

/// An implementation of the accumulate kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Plain Rust over output rows; the compiler vectorises it for the baseline target.
    Portable,
    /// x86-64 AVX2 (with FMA), 8 lanes.
    Avx2,
    /// x86-64 AVX-512F, 16 lanes with masked tails.
    Avx512,
}

/// A kernel that was asked for but cannot run here.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error("unknown kernel {0:?}: expected one of portable, avx2, avx512")]
    Unknown(String),
    #[error("kernel {0} is not supported by this CPU (supported: {1})")]
    Unsupported(Kernel, String),
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            // FMA for the window-copies tile's adds (`adds_on_fma_pipes`); every AVX2 CPU of
            // Intel's and AMD's has it.
            Kernel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// All kernels this CPU supports, slowest first.
    pub fn supported() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// The fastest supported kernel, or the one named by `UNDERFLOW_KERNEL`.
    pub fn detect() -> Result<Kernel, KernelError> {
        match std::env::var(KERNEL_ENV) {
            Ok(name) if !name.is_empty() => name.parse(),
            _ => Ok(*Kernel::supported()
                .last()
                .expect("portable is always supported")),
        }
    }

    /// Accumulates every sample of `rows` through `weights` (`rows.width() × n_out`,
    /// row-major) into `out` (`rows.samples() × n_out`), overwriting it.
    ///
    /// The SIMD kernels pick per call between the per-sample form (each sample's own nonzero
    /// inputs: least work, but every weight row loaded once per sample) and the blocked form
    /// (each weight row loaded once for four samples, over the union of their nonzero
    /// inputs). The blocked form is used whenever there is a whole block of samples: on an
    /// Intel AVX-512 machine (default network, B = 100 ftz, trained parameters, the forms
    /// alternated in one process) blocked everywhere gave 54.4k samples/s, the earlier rule
    /// (blocked while it does at most twice the multiply-adds, which sent MNIST's sparse
    /// layer 1 to the per-sample form) 45.0k, and per-sample everywhere 36.0k: the per-sample
    /// form loses more to its weight loads than the union's `0 · w` terms cost. With fewer
    /// samples than a block the padding rows would multiply the work for nothing. Both forms
    /// give the same bits.
    ///
    /// # Panics
    /// If the shapes disagree, `rows` does not hold the form [`Kernel::form`] names for its
    /// sample count, or the kernel is not supported by this CPU.
    pub fn accumulate(self, rows: &SparseRows, weights: Weights<'_>, out: &mut [f32]) {
        self.accumulate_in(self.form(rows.samples()), rows, weights, out, Start::Zero);
    }

    /// Like [`Kernel::accumulate`], but each output starts from the value `out` holds instead
    /// of +0: the terms of `rows` are added to it in list order. Running sums taken over
    /// inputs `0..a` and continued here over inputs `a..` (the rows of `weights` from `a`)
    /// give the bits of one pass over all inputs, since each output's sum is the same
    /// sequence of roundings (up to the sign of a zero, as with skipped terms).
    ///
    /// # Panics
    /// As for [`Kernel::accumulate`].
    pub fn accumulate_onto(self, rows: &SparseRows, weights: Weights<'_>, out: &mut [f32]) {
        let form = self.form(rows.samples());
        self.accumulate_in(form, rows, weights, out, Start::Out);
    }

    /// [`Kernel::accumulate_onto`] with the sums starting from `start` instead of from
    /// `out`'s entries: `out = start + Σ …`, each output's terms in the same order. Spares a
    /// caller that resumes someone else's running sums the copy of them into `out`.
    pub fn accumulate_from(
        self,
        rows: &SparseRows,
        weights: Weights<'_>,
        start: &[f32],
        out: &mut [f32],
    ) {
        assert_eq!(start.len(), out.len(), "start shape");
        let form = self.form(rows.samples());
        self.accumulate_in(form, rows, weights, out, Start::From(start));
    }

    /// [`Kernel::accumulate`] over dense inputs (`samples × width`, row-major) with no
    /// [`SparseRows`] to build: every term is added, zeros included, which the contract
    /// allows (a zero term changes a sum at most in the sign of a zero, for finite weights).
    /// For inputs that are nearly all nonzero (the last hidden layer's outputs) this
    /// spares building the rows, whose work is then the size of the kernel's own.
    ///
    /// # Panics
    /// If the shapes disagree or the kernel is not supported by this CPU.
    pub fn accumulate_dense(
        self,
        dense: &[f32],
        width: usize,
        weights: Weights<'_>,
        out: &mut [f32],
    ) {
        assert!(width > 0, "dense inputs of width 0");
        assert_eq!(dense.len() % width, 0, "dense inputs shape");
        let samples = dense.len() / width;
        assert_eq!(weights.rows(), width, "weight rows");
        assert_eq!(out.len(), samples * weights.n_out(), "output shape");
        match self {
            Kernel::Portable => portable::accumulate_dense(dense, width, weights, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                assert!(
                    self.is_supported(),
                    "avx2 kernel on a CPU without avx2 and fma"
                );
                // SAFETY: AVX2 is supported and the shapes were checked above.
                unsafe { x86_64::avx2::accumulate_dense(dense, width, weights, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                assert!(
                    self.is_supported(),
                    "avx512 kernel on a CPU without avx512f"
                );
                // SAFETY: AVX-512F is supported and the shapes were checked above.
                unsafe { x86_64::avx512::accumulate_dense(dense, width, weights, out) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => panic!("kernel {self} is not supported on this architecture"),
        }
    }

    /// The form of [`SparseRows`] this kernel reads for `samples` samples: the portable
    /// kernel has only the per-sample form; the SIMD ones read the blocked form whenever
    /// there is a whole block (see [`Kernel::accumulate`]).
    pub fn form(self, samples: usize) -> Form {
        match self {
            Kernel::Avx2 | Kernel::Avx512 if samples >= BLOCK => Form::Blocked,
            _ => Form::PerSample,
        }
    }

    /// [`Kernel::accumulate`] (or, by `start`, [`Kernel::accumulate_onto`] or
    /// [`Kernel::accumulate_from`]) in a chosen form (the portable kernel has only the per-sample one, and reads that whatever `form`
    /// says).
    pub(crate) fn accumulate_in(
        self,
        form: Form,
        rows: &SparseRows,
        weights: Weights<'_>,
        out: &mut [f32],
        start: Start<'_>,
    ) {
        assert_eq!(weights.rows(), rows.width(), "weight rows");
        assert_eq!(out.len(), rows.samples() * weights.n_out(), "output shape");
        let read = if self == Kernel::Portable {
            Form::PerSample
        } else {
            form
        };
        assert!(
            rows.forms().holds(read),
            "{self} kernel reads the {read:?} form, the rows hold {:?}",
            rows.forms()
        );
        // The SIMD kernels take the start as a pointer to a matrix shaped like `out` (null:
        // from +0); `Start::Out` points at `out` itself, read before each tile is stored.
        #[cfg(target_arch = "x86_64")]
        let start_ptr = match start {
            Start::Zero => std::ptr::null(),
            Start::Out => out.as_ptr(),
            Start::From(start) => start.as_ptr(),
        };
        match (self, form) {
            (Kernel::Portable, _) => portable::accumulate(rows, weights, out, start),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, form) => {
                assert!(
                    self.is_supported(),
                    "avx2 kernel on a CPU without avx2 and fma"
                );
                // SAFETY: the CPU supports AVX2 (checked above) and the shapes were checked,
                // which with the `SparseRows` index invariant keeps every load in bounds.
                unsafe {
                    match form {
                        Form::PerSample => x86_64::avx2::accumulate(rows, weights, out, start_ptr),
                        Form::Blocked => {
                            x86_64::avx2::accumulate_blocked(rows, weights, out, start_ptr)
                        }
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512, form) => {
                assert!(
                    self.is_supported(),
                    "avx512 kernel on a CPU without avx512f"
                );
                // SAFETY: as for AVX2, with AVX-512F checked.
                unsafe {
                    match form {
                        Form::PerSample => {
                            x86_64::avx512::accumulate(rows, weights, out, start_ptr)
                        }
                        Form::Blocked => {
                            x86_64::avx512::accumulate_blocked(rows, weights, out, start_ptr)
                        }
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => panic!("kernel {self} is not supported on this architecture"),
        }
    }
}

/// Copies of one layer's input that differ only in a window of consecutive inputs: copy `c`'s
/// inputs `from..from + width` are its own (`window`), every other input is θ's (`rest`), and
/// its sums over the inputs before the window are θ's too (`start`). These are the perturbed
/// copies of a neuron group as the next layer sees them.
#[derive(Clone, Debug)]
pub struct WindowCopies<'a> {
    /// Per sample a row of `columns` values; copy `c`'s window is `c·width..(c + 1)·width`
    /// of it.
    pub window: &'a [f32],
    pub columns: usize,
    pub width: usize,
    /// The copies to sum, by index in the rows.
    pub copies: Range<usize>,
    /// The layer input the window starts at.
    pub from: usize,
    /// θ's nonzero inputs of the layer, holding the per-sample form; only those from
    /// `from + width` on are read.
    pub rest: &'a SparseRows,
    /// Per sample, where in its row of `rest` the inputs from `from + width` on begin:
    /// `rest.positions_at(from + width, …)`.
    pub rest_at: &'a [u32],
    /// θ's sums over inputs `0..from`, `rest.samples() × n_out`.
    pub start: &'a [f32],
}

/// Copies the AVX2 kernel carries through one pass over the shared terms (the AVX-512
/// kernel carries up to 16: [`Kernel::copies_per_pass`]): each product of a shared input is
/// computed once and added to every copy's sums.
pub const COPY_BLOCK: usize = 4;

/// How many of the `copies · vectors` adds of one shared product a SIMD window-copies tile
/// issues as `product · 1 + acc` (a fused multiply-add) instead of `acc + product`.
///
/// Why: that tile does one multiply and `copies` adds per vector and term, and AMD's cores
/// (Zen 2 to 5, most of this project's machines) run vector adds on two pipes and
/// multiplies and FMAs on two others, so the adds alone set its pace while the multiply
/// pipes idle. Moving `(copies − 1) · vectors / 2` of the adds over balances the two pairs
/// of pipes: 4 copies × 4 vectors go from 16 cycles per term to 10 (a standalone loop of
/// exactly that mix on an AMD EPYC with AVX-512: 5.1 → 3.6 ns per term). On Intel's cores,
/// where every pipe that adds also multiplies and fuses, it changes nothing.
///
/// Why it is exact: `product · 1` is `product` for every f32 (zeros with their sign,
/// denormals, infinities), so the FMA rounds the same exact sum once, as the add does, and
/// DAZ/FTZ act on the same operands and result. This is not the fusing the arithmetic
/// contract forbids (a product and a sum rounded together): each product was rounded on its
/// own first. The two can differ only in which NaN comes out when both operands are NaN, and
/// any NaN makes a sample's loss infinite all the same. `exact_add_on_fma_pipes` in the tests
/// checks the bits on edge values under both float environments.
pub(crate) const fn adds_on_fma_pipes(copies: usize, vectors: usize) -> usize {
    copies.saturating_sub(1) * vectors / 2
}

impl Kernel {
    /// How many copies [`Kernel::accumulate_window_copies`] best gets per call for outputs
    /// `n_out` wide: what its SIMD form carries through one pass over the shared terms (a
    /// caller that passes fewer wastes part of each pass on padding; more are split).
    pub fn copies_per_pass(self, n_out: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86_64::avx512::copies_per_pass(n_out),
            _ => COPY_BLOCK,
        }
    }

    /// The sums of each copy of `copies.copies` over all inputs, into `out` (copy after copy, each
    /// `rest.samples() × n_out`): for copy `c`, sample `s`, output `j`, `start[s, j]`, then
    /// the window's terms `window_c[s, k] · W[from + k, j]` for every `k` (zeros included:
    /// they change a sum at most in the sign of a zero), then θ's nonzero terms from
    /// `from + width` on, in ascending input order. Each copy's bits are those of
    /// [`Kernel::accumulate_from`] over its own spliced inputs.
    ///
    /// The terms after the window are the same for every copy, so the SIMD kernels compute
    /// each product once per block of copies ([`Kernel::copies_per_pass`]) and add it to
    /// each: one multiply and `C` adds where the copies alone would take `C` of each, and no
    /// spliced input rows to build. (The portable kernel runs the copies one by one.)
    ///
    /// # Panics
    /// If the shapes disagree, `rest` lacks the per-sample form, or the kernel is not
    /// supported by this CPU.
    pub fn accumulate_window_copies(
        self,
        copies: &WindowCopies<'_>,
        weights: Weights<'_>,
        out: &mut [f32],
    ) {
        let samples = copies.rest.samples();
        let n_out = weights.n_out();
        assert_eq!(weights.rows(), copies.rest.width(), "weight rows");
        assert_eq!(
            copies.window.len(),
            samples * copies.columns,
            "window shape"
        );
        assert!(
            copies.copies.end * copies.width <= copies.columns,
            "copies {:?} of {} columns in rows of {}",
            copies.copies,
            copies.width,
            copies.columns
        );
        assert!(
            copies.from + copies.width <= copies.rest.width(),
            "window {}..{} of {} inputs",
            copies.from,
            copies.from + copies.width,
            copies.rest.width()
        );
        assert_eq!(copies.start.len(), samples * n_out, "start shape");
        assert_eq!(
            out.len(),
            copies.copies.len() * samples * n_out,
            "output shape"
        );
        assert!(
            copies.rest.forms().holds(Form::PerSample),
            "window copies read the per-sample form, the rows hold {:?}",
            copies.rest.forms()
        );
        assert_eq!(copies.rest_at.len(), samples, "rest positions shape");
        let end = copies.from + copies.width;
        for (s, &at) in copies.rest_at.iter().enumerate() {
            // The partition point, checked at its two neighbours: O(1) per sample.
            let (index, _) = copies.rest.row(s);
            let at = at as usize;
            assert!(
                at <= index.len()
                    && (at == 0 || (index[at - 1] as usize) < end)
                    && (at == index.len() || (index[at] as usize) >= end),
                "rest position {at} of sample {s}: expected where its inputs from {end} begin"
            );
        }
        match self {
            Kernel::Portable => portable::accumulate_window_copies(copies, weights, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                assert!(
                    self.is_supported(),
                    "avx2 kernel on a CPU without avx2 and fma"
                );
                // SAFETY: AVX2 and FMA are supported and the shapes were checked above.
                unsafe { x86_64::avx2::accumulate_window_copies(copies, weights, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                assert!(
                    self.is_supported(),
                    "avx512 kernel on a CPU without avx512f"
                );
                // SAFETY: AVX-512F is supported and the shapes were checked above.
                unsafe { x86_64::avx512::accumulate_window_copies(copies, weights, out) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => panic!("kernel {self} is not supported on this architecture"),
        }
    }
}

/// The terms a blocked SIMD tile adds for one block of [`BLOCK`] samples: per term, the
/// input index and the block's values of that input (padding samples 0).
pub(crate) trait BlockTerms: Copy {
    fn len(&self) -> usize;
    /// Term `t`.
    ///
    /// # Safety
    /// `t < self.len()`.
    unsafe fn term(&self, t: usize) -> (usize, [f32; BLOCK]);
}

/// A block of [`SparseRows`] in the blocked form: the union of its samples' nonzero inputs.
#[derive(Clone, Copy)]
pub(crate) struct SparseBlock<'a> {
    pub index: &'a [u32],
    pub value: &'a [[f32; BLOCK]],
}

impl BlockTerms for SparseBlock<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.index.len()
    }

    #[inline(always)]
    unsafe fn term(&self, t: usize) -> (usize, [f32; BLOCK]) {
        // SAFETY: t < len, and `value` is as long as `index` (SparseRows invariant).
        unsafe {
            (
                *self.index.get_unchecked(t) as usize,
                *self.value.get_unchecked(t),
            )
        }
    }
}

/// A block of dense rows: every input, zeros included, read where the rows are (no
/// [`SparseRows`] built).
#[derive(Clone, Copy)]
pub(crate) struct DenseBlock {
    /// Each sample's row of `width` values (a row of zeros for padding samples).
    pub rows: [*const f32; BLOCK],
    pub width: usize,
}

impl BlockTerms for DenseBlock {
    #[inline(always)]
    fn len(&self) -> usize {
        self.width
    }

    #[inline(always)]
    unsafe fn term(&self, t: usize) -> (usize, [f32; BLOCK]) {
        // SAFETY: t < width, and every row pointer holds `width` values.
        (t, std::array::from_fn(|i| unsafe { *self.rows[i].add(t) }))
    }
}

/// The per-sample terms of θ's inputs after the copies' window: the tail of sample `s`'s
/// nonzero list from its position in `rest_at`.
#[inline]
pub(crate) fn rest_after<'a>(copies: &WindowCopies<'a>, s: usize) -> (&'a [u32], &'a [f32]) {
    let (index, value) = copies.rest.row(s);
    let at = copies.rest_at[s] as usize;
    (&index[at..], &value[at..])
}

/// How many samples ahead the SIMD window-copies kernels ask for a tile's operands.
///
/// Why: a tile walks the samples of one block of copies and one stripe of outputs, so each
/// sample's operands (θ's sums at the window, the copies' windows, the head of its sparse
/// row) lie a whole row apart, in arrays of megabytes at the recipe's batches: the hardware
/// prefetcher does not follow that stride, and on a Zen 3 (512 KiB of L2) perf put a
/// fifth of the kernel's samples on the stall after the tile's first load. Two samples
/// ahead is several hundred cycles of a tile's work, more than a miss to memory takes.
const COPIES_PREFETCH_AHEAD: usize = 2;

/// Called as the window-copies tile of sample `current` begins: asks for the operands the
/// tile of the sample [`COPIES_PREFETCH_AHEAD`] later reads first (a hint: see
/// [`prefetch`]) and the lines of `out` it writes; nothing past the last sample. `block` is
/// the tile's copies, `outputs` its stripe of each output row.
#[inline(always)]
pub(crate) fn prefetch_copies_tile(
    copies: &WindowCopies<'_>,
    out: &[f32],
    current: usize,
    block: Range<usize>,
    outputs: Range<usize>,
) {
    let s = current + COPIES_PREFETCH_AHEAD;
    let samples = copies.rest.samples();
    if s >= samples {
        return;
    }
    // `start` is shaped like one copy's outputs: samples × n_out.
    let copy_len = copies.start.len();
    let at = s * (copy_len / samples);
    prefetch(copies.start, at + outputs.start..at + outputs.end);
    for c in block {
        let window = s * copies.columns + c * copies.width;
        prefetch(copies.window, window..window + copies.width);
        // The outputs too: a store to a line not in the cache reads it first all the same.
        let o = (c - copies.copies.start) * copy_len + at;
        prefetch(out, o + outputs.start..o + outputs.end);
    }
    // The head of the sample's shared terms; the hardware follows the rest in order.
    let (index, value) = rest_after(copies, s);
    let head = index.len().min(32);
    prefetch(index, 0..head);
    prefetch(value, 0..head);
}

/// Where a kernel's sums start.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start<'a> {
    /// From +0.
    Zero,
    /// From the output's own entries ([`Kernel::accumulate_onto`]).
    Out,
    /// From a matrix shaped like the output ([`Kernel::accumulate_from`]).
    From(&'a [f32]),
}

/// The two loop forms of the SIMD kernels (see [`Kernel::accumulate`]), each reading the
/// form of [`SparseRows`] of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    PerSample,
    Blocked,
}

impl From<Form> for Forms {
    fn from(form: Form) -> Forms {
        match form {
            Form::PerSample => Forms::PerSample,
            Form::Blocked => Forms::Blocked,
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kernel {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kernel = Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| KernelError::Unknown(s.to_string()))?;
        if !kernel.is_supported() {
            let names: Vec<_> = Kernel::supported().iter().map(|k| k.name()).collect();
            return Err(KernelError::Unsupported(kernel, names.join(", ")));
        }
        Ok(kernel)
    }
}

#[cfg(test)]
pub(crate) mod tests;
