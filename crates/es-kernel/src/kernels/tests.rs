//! Every kernel this CPU supports against the scalar definitions, bit for bit (±0 equal).

use super::*;
use crate::config::{Arithmetic, NetConfig, ParamLayout};
use crate::float_env::with_float_env;
use crate::forward::{Batch, Forward};
use crate::reference;

/// SplitMix64: a dependency-free generator for test data.
pub(crate) struct TestRng(u64);

impl TestRng {
    pub(crate) fn new(seed: u64) -> TestRng {
        TestRng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately standard normal (sum of uniforms): test data only.
    pub(crate) fn normal(&mut self) -> f32 {
        ((0..12).map(|_| self.uniform()).sum::<f64>() - 6.0) as f32
    }

    /// MNIST-like pixels: zero with probability `zeros`, else uniform 1..=255.
    pub(crate) fn pixels(&mut self, n: usize, zeros: f64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                if self.uniform() < zeros {
                    0
                } else {
                    1 + (self.next_u64() % 255) as u8
                }
            })
            .collect()
    }
}

/// Same value, with +0 and -0 equal (kernels may skip zero terms).
pub(crate) fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0)
}

pub(crate) fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            same(g, w),
            "{what}: element {i}: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

/// The kernel contract written as plainly as possible, over dense inputs.
#[inline(never)]
fn dense_definition(inputs: &[f32], width: usize, weights: &[f32], n_out: usize) -> Vec<f32> {
    let samples = inputs.len() / width;
    let mut out = vec![0.0f32; samples * n_out];
    for s in 0..samples {
        for j in 0..n_out {
            let mut acc = 0.0f32;
            for k in 0..width {
                acc += inputs[s * width + k] * weights[k * n_out + j];
            }
            out[s * n_out + j] = acc;
        }
    }
    out
}

/// A weight matrix (rows of `n_out`) in every layout the kernels must read alike: packed,
/// rows three floats further apart than they are wide (off the vector and cache-line grid,
/// padding NaN so a read past a row's end shows), and [`PaddedWeights`].
struct Layouts {
    packed: Vec<f32>,
    skewed: Vec<f32>,
    padded: PaddedWeights,
    n_out: usize,
}

impl Layouts {
    fn new(weights: &[f32], n_out: usize) -> Layouts {
        let stride = n_out + 3;
        let mut skewed = vec![f32::NAN; weights.len() / n_out * stride];
        for (to, from) in skewed
            .chunks_exact_mut(stride)
            .zip(weights.chunks_exact(n_out))
        {
            to[..n_out].copy_from_slice(from);
        }
        let mut padded = PaddedWeights::new();
        padded.fill(weights, n_out);
        Layouts {
            packed: weights.to_vec(),
            skewed,
            padded,
            n_out,
        }
    }

    fn each(&self) -> [(&'static str, Weights<'_>); 3] {
        let rows = self.packed.len() / self.n_out;
        [
            ("packed", Weights::packed(&self.packed, self.n_out)),
            (
                "skewed",
                Weights::strided(&self.skewed, rows, self.n_out, self.n_out + 3),
            ),
            ("padded", self.padded.weights()),
        ]
    }
}

/// Runs `kernel` in both loop forms and every weight layout on NaN-filled outputs and checks
/// each against `want`.
fn assert_both_forms(
    kernel: Kernel,
    mode: Arithmetic,
    rows: &SparseRows,
    weights: &[f32],
    n_out: usize,
    want: &[f32],
) {
    let (samples, width) = (rows.samples(), rows.width());
    let layouts = Layouts::new(weights, n_out);
    for (layout, weights) in layouts.each() {
        for form in [Form::PerSample, Form::Blocked] {
            let mut out = vec![f32::NAN; samples * n_out];
            with_float_env(mode, || {
                kernel.accumulate_in(form, rows, weights, &mut out, Start::Zero)
            });
            assert_same(
                &out,
                want,
                &format!(
                    "{kernel} {form:?} {mode} {layout} samples={samples} width={width} \
                     n_out={n_out}"
                ),
            );
        }
    }
}

/// Inputs and weights whose products straddle f32::MIN_POSITIVE, so flushing matters.
fn near_underflow_case(
    rng: &mut TestRng,
    samples: usize,
    width: usize,
    n_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let density = rng.uniform();
    let inputs = (0..samples * width)
        .map(|_| {
            if rng.uniform() < density {
                rng.normal() * 2f32.powi(-124)
            } else {
                0.0
            }
        })
        .collect();
    let weights = (0..width * n_out).map(|_| rng.normal() * 0.5).collect();
    (inputs, weights)
}

#[test]
fn every_kernel_matches_the_definition_over_shapes_and_sparsity() {
    let mut rng = TestRng::new(1);
    let widths_out = [
        1, 2, 7, 8, 9, 10, 15, 16, 17, 31, 33, 63, 65, 127, 129, 130, 255, 257,
    ];
    for kernel in Kernel::supported() {
        for samples in 1..=33 {
            let n_out = widths_out[samples % widths_out.len()];
            let width = 1 + 2 * (samples % 11);
            for mode in [Arithmetic::Ftz, Arithmetic::Ieee] {
                let (inputs, weights) = near_underflow_case(&mut rng, samples, width, n_out);
                let mut rows = SparseRows::new();
                rows.fill_from_dense(&inputs, width);
                let want =
                    with_float_env(mode, || dense_definition(&inputs, width, &weights, n_out));
                // Both loop forms, whichever the dispatch would pick.
                assert_both_forms(kernel, mode, &rows, &weights, n_out, &want);
            }
        }
    }
}

#[test]
fn every_kernel_matches_the_definition_on_wide_layers() {
    // Widths of real layers (up to 784) and around powers of two, where the shape test above
    // (widths up to 21) never goes; samples with long runs of zero inputs, including at the
    // start.
    let mut rng = TestRng::new(4);
    let cases = [
        (1, 63, 17),
        (3, 64, 16),
        (5, 65, 33),
        (2, 127, 8),
        (7, 128, 9),
        (4, 129, 130),
        (9, 200, 31),
        (6, 257, 129),
        (3, 784, 10),
        (5, 300, 1),
    ];
    for kernel in Kernel::supported() {
        for (samples, width, n_out) in cases {
            for mode in [Arithmetic::Ftz, Arithmetic::Ieee] {
                let (mut inputs, weights) = near_underflow_case(&mut rng, samples, width, n_out);
                // Every other sample: no terms below 70, nor from 100 to 200.
                for s in (0..samples).step_by(2) {
                    let row = &mut inputs[s * width..(s + 1) * width];
                    row[..width.min(70)].fill(0.0);
                    row[width.min(100)..width.min(200)].fill(0.0);
                }
                let mut rows = SparseRows::new();
                rows.fill_from_dense(&inputs, width);
                let want =
                    with_float_env(mode, || dense_definition(&inputs, width, &weights, n_out));
                assert_both_forms(kernel, mode, &rows, &weights, n_out, &want);
            }
        }
    }
}

#[test]
fn sums_continued_onto_running_sums_match_one_pass() {
    // Sums over inputs 0..a, continued by `accumulate_onto` over inputs a.. (the rows of the
    // weights from a), in every form and mode: the bits of one pass over all inputs. Split
    // points include 0 (nothing before), the width (nothing after) and points inside runs of
    // zero inputs.
    let mut rng = TestRng::new(9);
    for kernel in Kernel::supported() {
        for (samples, width, n_out) in [(1, 9, 17), (4, 33, 16), (7, 64, 33), (9, 130, 129)] {
            for mode in [Arithmetic::Ftz, Arithmetic::Ieee] {
                let (mut inputs, weights) = near_underflow_case(&mut rng, samples, width, n_out);
                for s in (0..samples).step_by(3) {
                    inputs[s * width..s * width + width / 2].fill(0.0);
                }
                let want =
                    with_float_env(mode, || dense_definition(&inputs, width, &weights, n_out));
                for a in [0, 1, width / 3, width / 2, width - 1, width] {
                    let columns = |range: std::ops::Range<usize>| -> Vec<f32> {
                        inputs
                            .chunks_exact(width)
                            .flat_map(|row| row[range.clone()].to_vec())
                            .collect()
                    };
                    let (head, tail) = (columns(0..a), columns(a..width));
                    let layouts = Layouts::new(&weights, n_out);
                    for ((layout, all), form) in layouts
                        .each()
                        .into_iter()
                        .flat_map(|l| [(l, Form::PerSample), (l, Form::Blocked)])
                    {
                        let mut out = vec![f32::NAN; samples * n_out];
                        let mut rows = SparseRows::new();
                        // The tail once onto the running sums in `out`, once from a copy of
                        // them into an output of NaNs.
                        let mut from = vec![f32::NAN; samples * n_out];
                        with_float_env(mode, || {
                            // No inputs before a = 0: the running sums are +0.
                            if a == 0 {
                                out.fill(0.0);
                            } else {
                                rows.fill_from_dense(&head, a);
                                let head_weights = all.rows_in(0..a);
                                kernel.accumulate_in(
                                    form,
                                    &rows,
                                    head_weights,
                                    &mut out,
                                    Start::Zero,
                                );
                            }
                            if a < width {
                                rows.fill_from_dense(&tail, width - a);
                                let tail_weights = all.rows_in(a..width);
                                let sums = out.clone();
                                kernel.accumulate_in(
                                    form,
                                    &rows,
                                    tail_weights,
                                    &mut from,
                                    Start::From(&sums),
                                );
                                kernel.accumulate_in(
                                    form,
                                    &rows,
                                    tail_weights,
                                    &mut out,
                                    Start::Out,
                                );
                            } else {
                                from.copy_from_slice(&out);
                            }
                        });
                        assert_same(
                            &from,
                            &want,
                            &format!(
                                "{kernel} {form:?} {mode} {layout} from, split at {a} of {width}"
                            ),
                        );
                        assert_same(
                            &out,
                            &want,
                            &format!("{kernel} {form:?} {mode} {layout} split at {a} of {width}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn window_copies_match_the_definition_of_each_spliced_copy() {
    // Copies of a layer input that differ in a window of inputs (a neuron group's perturbed
    // outputs), summed from θ's running sums at the window: each copy against the contract
    // over its own spliced dense input. Copy counts cover a lone copy, a pair, blocks of four
    // with leftovers of one to three; widths of outputs cover masked and unmasked tails in
    // both vector widths; windows at the start, inside and at the very end of the inputs.
    let mut rng = TestRng::new(12);
    let cases = [
        // (samples, inputs, outputs, from, width, copies)
        (3, 40, 17, 0, 5, 1),
        (5, 64, 16, 8, 8, 2),
        (4, 64, 33, 60, 4, 3),
        (6, 130, 10, 32, 32, 4),
        (2, 97, 64, 90, 7, 5),
        (7, 512, 130, 256, 32, 8),
        (3, 50, 9, 20, 1, 9),
        // Narrow outputs with more copies than one AVX-512 block of 16 carries, and wide
        // ones with more than its block of 8: full blocks, then a padded one.
        (5, 70, 10, 30, 8, 20),
        (3, 64, 40, 16, 8, 12),
        (4, 48, 16, 0, 4, 16),
    ];
    for kernel in Kernel::supported() {
        for (samples, inputs, n_out, from, width, copies) in cases {
            for mode in [Arithmetic::Ftz, Arithmetic::Ieee] {
                let (mut theta_inputs, weights) =
                    near_underflow_case(&mut rng, samples, inputs, n_out);
                // Long zero runs in some samples, across the window's end.
                for s in (0..samples).step_by(2) {
                    let row = &mut theta_inputs[s * inputs..(s + 1) * inputs];
                    row[(from + width / 2).min(inputs)..(from + width + 10).min(inputs)].fill(0.0);
                }
                let columns = copies * width + 3;
                let (window, _) = near_underflow_case(&mut rng, samples, columns, 1);
                let spliced = |c: usize| -> Vec<f32> {
                    let mut dense = theta_inputs.clone();
                    for s in 0..samples {
                        let own = &window[s * columns + c * width..][..width];
                        dense[s * inputs + from..][..width].copy_from_slice(own);
                    }
                    dense
                };
                let head: Vec<f32> = theta_inputs
                    .chunks_exact(inputs)
                    .flat_map(|row| row[..from].to_vec())
                    .collect();
                // θ's running sums at the window (+0 when it starts at input 0).
                let start = match from {
                    0 => vec![0.0; samples * n_out],
                    _ => with_float_env(mode, || {
                        dense_definition(&head, from, &weights[..from * n_out], n_out)
                    }),
                };
                let mut rest = SparseRows::new();
                rest.fill_from_dense(&theta_inputs, inputs);
                let mut rest_at = Vec::new();
                rest.positions_at(from + width, &mut rest_at);
                let want: Vec<Vec<f32>> = (0..copies)
                    .map(|c| {
                        with_float_env(mode, || {
                            dense_definition(&spliced(c), inputs, &weights, n_out)
                        })
                    })
                    .collect();
                // All the copies, and the later half alone (a block that starts inside the
                // rows).
                let layouts = Layouts::new(&weights, n_out);
                for ((layout, all), chosen) in layouts
                    .each()
                    .into_iter()
                    .flat_map(|l| [(l, 0..copies), (l, copies / 2..copies)])
                {
                    let mut out = vec![f32::NAN; chosen.len() * samples * n_out];
                    with_float_env(mode, || {
                        kernel.accumulate_window_copies(
                            &WindowCopies {
                                window: &window,
                                columns,
                                width,
                                copies: chosen.clone(),
                                from,
                                rest: &rest,
                                rest_at: &rest_at,
                                start: &start,
                            },
                            all,
                            &mut out,
                        )
                    });
                    for (got, c) in out.chunks_exact(samples * n_out).zip(chosen.clone()) {
                        assert_same(
                            got,
                            &want[c],
                            &format!(
                                "{kernel} {mode} {layout} copy {c} of {chosen:?}, \
                                 samples={samples} inputs={inputs} n_out={n_out} \
                                 window {from}+{width}"
                            ),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dense_inputs_match_the_definition_in_every_kernel() {
    // Every input a term, zeros included: against the contract over the same dense inputs
    // (±0 equal). Sample counts cover a lone sample, a partial block and whole blocks;
    // outputs cover masked and unmasked tails in both vector widths; densities from all
    // zeros to none.
    let mut rng = TestRng::new(31);
    let cases = [
        // (samples, inputs, outputs)
        (1, 7, 3),
        (3, 40, 10),
        (4, 16, 16),
        (9, 64, 17),
        (12, 130, 40),
        (5, 512, 10),
    ];
    for kernel in Kernel::supported() {
        for (samples, width, n_out) in cases {
            for mode in [Arithmetic::Ftz, Arithmetic::Ieee] {
                let (inputs, weights) = near_underflow_case(&mut rng, samples, width, n_out);
                let want =
                    with_float_env(mode, || dense_definition(&inputs, width, &weights, n_out));
                let layouts = Layouts::new(&weights, n_out);
                for (layout, all) in layouts.each() {
                    let mut out = vec![f32::NAN; samples * n_out];
                    with_float_env(mode, || {
                        kernel.accumulate_dense(&inputs, width, all, &mut out)
                    });
                    assert_same(
                        &out,
                        &want,
                        &format!(
                            "{kernel} dense {mode} {layout} samples={samples} width={width} \
                             n_out={n_out}"
                        ),
                    );
                }
            }
        }
    }
}

#[test]
fn dense_inputs_of_the_wrong_shape_are_refused() {
    for kernel in Kernel::supported() {
        let refused = |dense: Vec<f32>, width: usize, weights: usize, n_out: usize, out: usize| {
            std::panic::catch_unwind(move || {
                kernel.accumulate_dense(
                    &dense,
                    width,
                    Weights::packed(&vec![0.0; weights], n_out),
                    &mut vec![0.0; out],
                )
            })
            .is_err()
        };
        assert!(
            refused(vec![0.0; 10], 3, 6, 2, 6),
            "{kernel}: 10 inputs in rows of 3"
        );
        assert!(
            refused(vec![0.0; 9], 3, 5, 2, 6),
            "{kernel}: weights not 3 × 2"
        );
        assert!(
            refused(vec![0.0; 9], 3, 6, 2, 5),
            "{kernel}: outputs not 3 × 2"
        );
        assert!(refused(vec![], 0, 0, 2, 0), "{kernel}: width 0");
        assert!(
            !refused(vec![0.0; 9], 3, 6, 2, 6),
            "{kernel}: the right shapes"
        );
    }
}

/// `p · 1 + acc` rounded once is `acc + p` rounded once: the identity that lets the
/// window-copies kernels issue part of their adds as fused multiply-adds
/// ([`super::adds_on_fma_pipes`]), checked on the values where floats misbehave, under
/// flush-to-zero and under gradual underflow.
#[cfg(target_arch = "x86_64")]
#[test]
fn exact_add_on_fma_pipes() {
    use std::arch::x86_64::*;
    if !Kernel::Avx512.is_supported() {
        eprintln!("skipped: this CPU lacks AVX-512F");
        return;
    }
    let tiny = f32::MIN_POSITIVE;
    let mut values = vec![
        0.0,
        -0.0,
        tiny,
        -tiny,
        tiny / 2.0,
        -tiny / 3.0,
        f32::from_bits(1),
        tiny * 1.5,
        tiny * (1.0 + f32::EPSILON),
        1.0,
        -1.0,
        f32::EPSILON,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3.0e-38,
        -2.9e-38,
        1.0e-45,
    ];
    let mut rng = TestRng::new(77);
    values.extend((0..200).map(|_| rng.normal() * 2f32.powi(-124 - (rng.next_u64() % 4) as i32)));
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn both(acc: &[f32; 16], p: &[f32; 16]) -> ([f32; 16], [f32; 16]) {
        let (mut added, mut fused) = ([0.0f32; 16], [0.0f32; 16]);
        // SAFETY: AVX-512F is supported (checked by the caller); 16 floats each.
        unsafe {
            let a = _mm512_loadu_ps(acc.as_ptr());
            let b = _mm512_loadu_ps(p.as_ptr());
            let one = std::hint::black_box(_mm512_set1_ps(1.0));
            _mm512_storeu_ps(added.as_mut_ptr(), _mm512_add_ps(a, b));
            _mm512_storeu_ps(fused.as_mut_ptr(), _mm512_fmadd_ps(b, one, a));
        }
        // The AVX2 kernel's 8-lane instructions on the same operands (AVX-512F CPUs have
        // AVX2 and FMA): both halves must give the same bits as well.
        // SAFETY: as above; 8 floats from each half.
        unsafe {
            for half in [0, 8] {
                let a = _mm256_loadu_ps(acc[half..].as_ptr());
                let b = _mm256_loadu_ps(p[half..].as_ptr());
                let one = std::hint::black_box(_mm256_set1_ps(1.0));
                let (mut a8, mut f8) = ([0.0f32; 8], [0.0f32; 8]);
                _mm256_storeu_ps(a8.as_mut_ptr(), _mm256_add_ps(a, b));
                _mm256_storeu_ps(f8.as_mut_ptr(), _mm256_fmadd_ps(b, one, a));
                for i in 0..8 {
                    assert_eq!(
                        a8[i].to_bits(),
                        added[half + i].to_bits(),
                        "8-lane add of lane {}",
                        half + i
                    );
                    if !(acc[half + i].is_nan() && p[half + i].is_nan()) {
                        assert_eq!(
                            f8[i].to_bits(),
                            fused[half + i].to_bits(),
                            "8-lane fma of lane {}",
                            half + i
                        );
                    }
                }
            }
        }
        (added, fused)
    }
    for mode in [Arithmetic::Ftz, Arithmetic::Ieee] {
        for chunk in values.chunks(16) {
            for &p in &values {
                let mut acc = [0.0f32; 16];
                acc[..chunk.len()].copy_from_slice(chunk);
                let products = [p; 16];
                // SAFETY: AVX-512F is supported (checked above).
                let (added, fused) = with_float_env(mode, || unsafe { both(&acc, &products) });
                for i in 0..chunk.len() {
                    let (a, f) = (added[i], fused[i]);
                    // Which NaN comes out may differ when both operands are NaN; that any
                    // NaN does may not.
                    let both_nan = acc[i].is_nan() && p.is_nan();
                    assert!(
                        a.to_bits() == f.to_bits() || (both_nan && a.is_nan() && f.is_nan()),
                        "{mode}: {:e} + {:e}: add {a:e} ({:#010x}), fma {f:e} ({:#010x})",
                        acc[i],
                        p,
                        a.to_bits(),
                        f.to_bits()
                    );
                }
            }
        }
    }
}

/// Rest positions that are not where each sample's inputs after the window begin would
/// silently add the wrong terms: every kernel refuses them, naming the sample.
#[test]
fn window_copies_refuse_rest_positions_off_the_window_end() {
    // One sample, inputs 0..6 all nonzero; a window of 2 at input 1, so the rest starts at
    // input 3: position 3 of the row.
    let inputs = 6;
    let mut rest = SparseRows::new();
    rest.fill_from_dense(&[1.0; 6], inputs);
    let mut rest_at = Vec::new();
    rest.positions_at(3, &mut rest_at);
    assert_eq!(rest_at, [3]);
    let weights = vec![0.5f32; inputs * 2];
    fn copies_at<'a>(rest: &'a SparseRows, rest_at: &'a [u32]) -> WindowCopies<'a> {
        WindowCopies {
            window: &[1.0, 2.0],
            columns: 2,
            width: 2,
            copies: 0..1,
            from: 1,
            rest,
            rest_at,
            start: &[0.0, 0.0],
        }
    }
    for kernel in Kernel::supported() {
        for wrong in [2u32, 4, 7] {
            let refused = std::panic::catch_unwind(|| {
                kernel.accumulate_window_copies(
                    &copies_at(&rest, &[wrong]),
                    Weights::packed(&weights, 2),
                    &mut [0.0; 2],
                )
            });
            let message = refused.expect_err("wrong rest position accepted");
            let message = message
                .downcast_ref::<String>()
                .expect("a formatted panic message");
            assert!(
                message.contains(&format!("rest position {wrong} of sample 0")),
                "{kernel}: {message}"
            );
        }
        let mut out = [0.0f32; 2];
        kernel.accumulate_window_copies(
            &copies_at(&rest, &rest_at),
            Weights::packed(&weights, 2),
            &mut out,
        );
        // 1·0.5 + 2·0.5 from the window, then inputs 3, 4, 5 at 1·0.5 each.
        assert_eq!(out, [3.0, 3.0], "{kernel}");
    }
}

#[test]
fn hardware_flush_matches_the_explicit_flush_of_the_reference() {
    // Products and sums placed right at the threshold, including products whose exact value is
    // just below MIN_POSITIVE but rounds up to it: the reference flushes after rounding.
    let min = f32::MIN_POSITIVE;
    let inputs = [min, 2.0 * min, -min, 3.0 * min];
    let below = 1.0 - f32::EPSILON / 4.0; // exact product min·below < min, rounds to min
    let weights = [
        below,
        0.5,
        0.75,
        1.0 - f32::EPSILON,
        0.999_999_9,
        -0.5,
        1.0,
        0.25,
    ];
    let config = (4, 2);
    for (kernel, form) in Kernel::supported()
        .into_iter()
        .flat_map(|k| [(k, Form::PerSample), (k, Form::Blocked)])
    {
        let mut rows = SparseRows::new();
        rows.fill_from_dense(&inputs, config.0);
        let mut out = [f32::NAN; 2];
        with_float_env(Arithmetic::Ftz, || {
            let weights = Weights::packed(&weights, config.1);
            kernel.accumulate_in(form, &rows, weights, &mut out, Start::Zero)
        });
        // Reference arithmetic, flushed explicitly.
        let mut want = [0.0f32; 2];
        for (j, w) in want.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for k in 0..4 {
                let p = reference::flushed_mul(inputs[k], weights[k * 2 + j]);
                acc = reference::flushed_add(acc, p);
            }
            *w = acc;
        }
        assert_same(&out, &want, &format!("{kernel} {form:?} at the threshold"));
    }
}

fn small_config(mode: Arithmetic) -> NetConfig {
    NetConfig {
        inputs: 29,
        hidden: vec![33, 17],
        outputs: 10,
        scale_exponents: vec![125, 124],
        // A logit temperature, so the last scaling step is not the plain inverse.
        output_exponent: 3,
        init_multipliers: vec![1.0, 8.0, 8.0],
        arithmetic: mode,
    }
}

/// He-normal parameters with the config's multipliers and small random biases.
pub(crate) fn random_params(config: &NetConfig, rng: &mut TestRng) -> Vec<f32> {
    let layout = ParamLayout::new(config);
    let mut params = vec![0.0f32; layout.len()];
    for (l, layer) in layout.layers().iter().enumerate() {
        let std = (2.0 / layer.fan_in as f32).sqrt() * config.init_multipliers[l];
        for w in &mut params[layer.weights.clone()] {
            *w = rng.normal() * std;
        }
        for b in &mut params[layer.bias.clone()] {
            *b = rng.normal();
        }
    }
    params
}

#[test]
fn forward_pass_matches_reference_in_every_mode_and_kernel() {
    let mut rng = TestRng::new(2);
    for mode in [Arithmetic::Ftz, Arithmetic::Seed, Arithmetic::Ieee] {
        let config = small_config(mode);
        for kernel in Kernel::supported() {
            let mut forward = Forward::new(config.clone(), kernel).unwrap();
            for samples in [1, 2, 5, 17, 33] {
                let params = random_params(&config, &mut rng);
                let pixels = rng.pixels(samples * config.inputs, 0.8);
                let labels: Vec<u8> = (0..samples).map(|i| (i % 10) as u8).collect();
                let batch = Batch::from_images(config.inputs, &pixels, &labels);
                let mut want = vec![f32::NAN; samples * config.outputs];
                reference::forward(&config, &params, &pixels, &mut want);
                let got = forward.logits(&params, &batch).to_vec();
                assert_same(&got, &want, &format!("{kernel} {mode} samples={samples}"));
                forward.set_fill(crate::forward::Fill::Simple);
                forward.set_explicit_flush(true);
                let simple = forward.logits(&params, &batch).to_vec();
                forward.set_fill(crate::forward::Fill::Needed);
                forward.set_explicit_flush(false);
                assert_same(
                    &simple,
                    &want,
                    &format!("{kernel} {mode} samples={samples} simple fill"),
                );
            }
        }
    }
}

#[test]
fn default_network_matches_reference_and_differs_without_flushing() {
    let config = NetConfig::default();
    let mut rng = TestRng::new(3);
    let params = random_params(&config, &mut rng);
    let samples = 3;
    let pixels = rng.pixels(samples * config.inputs, 0.81);
    let labels = [1, 2, 3];
    let batch = Batch::from_images(config.inputs, &pixels, &labels);
    let mut want = vec![f32::NAN; samples * config.outputs];
    reference::forward(&config, &params, &pixels, &mut want);
    for kernel in Kernel::supported() {
        let mut forward = Forward::new(config.clone(), kernel).unwrap();
        assert_same(
            forward.logits(&params, &batch),
            &want,
            &format!("{kernel} default net"),
        );
        let density = forward.density().to_vec();
        assert!(
            density[1] > 0.05 && density[1] < 0.95,
            "layer-2 inputs partly flushed: {density:?}"
        );
    }
    // The same parameters with the guard off: the logits differ, because in `ftz` mode many
    // layer-2 products flushed.
    let ieee = NetConfig {
        arithmetic: Arithmetic::Ieee,
        ..config.clone()
    };
    let mut unflushed = vec![f32::NAN; samples * config.outputs];
    reference::forward(&ieee, &params, &pixels, &mut unflushed);
    let differing = want
        .iter()
        .zip(&unflushed)
        .filter(|(a, b)| !same(**a, **b))
        .count();
    assert!(
        differing >= want.len() * 9 / 10,
        "{differing} of {} logits differ",
        want.len()
    );
}

#[test]
fn passes_that_read_dense_inputs_match_the_reference() {
    // Without flushing nearly every hidden output is nonzero, so after a first pass (rows
    // built) the later layers of the next passes read their inputs dense: every pass must
    // give the reference's logits, in both modes (in `ftz` mode the hidden layers stay
    // sparse and the rows are built every time).
    for mode in [Arithmetic::Ieee, Arithmetic::Ftz] {
        let config = NetConfig {
            arithmetic: mode,
            ..NetConfig::default()
        };
        let mut rng = TestRng::new(41);
        let samples = 9;
        let pixels = rng.pixels(samples * config.inputs, 0.8);
        let labels: Vec<u8> = (0..samples as u8).collect();
        let batch = Batch::from_images(config.inputs, &pixels, &labels);
        for kernel in Kernel::supported() {
            let mut forward = Forward::new(config.clone(), kernel).unwrap();
            for pass in 0..3 {
                let params = random_params(&config, &mut rng);
                let mut want = vec![f32::NAN; samples * config.outputs];
                reference::forward(&config, &params, &pixels, &mut want);
                assert_same(
                    forward.logits(&params, &batch),
                    &want,
                    &format!("{kernel} {mode} pass {pass}"),
                );
                let density = forward.density();
                if mode == Arithmetic::Ieee {
                    assert!(
                        density[1] >= 0.9 && density[2] >= 0.9,
                        "{kernel} pass {pass}: hidden outputs nearly all nonzero: {density:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn kernel_names_and_env_switch() {
    assert_eq!("portable".parse::<Kernel>(), Ok(Kernel::Portable));
    assert!(matches!(
        "sse9".parse::<Kernel>(),
        Err(KernelError::Unknown(_))
    ));
    for k in Kernel::ALL {
        match k.name().parse::<Kernel>() {
            Ok(parsed) => assert!(parsed.is_supported() && parsed == k),
            Err(e) => assert!(e.to_string().contains("not supported"), "{e}"),
        }
    }
    assert!(Kernel::supported().contains(&Kernel::detect().unwrap_or(Kernel::Portable)));
}

/// One case of the tests of passes that start from θ's prefix: θ's prefix on a random batch,
/// and another random parameter vector to take parts from.
struct PrefixCase<'a> {
    config: &'a NetConfig,
    layout: &'a ParamLayout,
    forward: &'a mut Forward,
    prefix: &'a crate::forward::Prefix,
    batch: &'a Batch,
    theta: &'a [f32],
    other: &'a [f32],
    what: String,
}

impl PrefixCase<'_> {
    /// The reference's evaluation of `params` on the case's batch.
    fn reference(&self, params: &[f32]) -> crate::loss::Evaluation {
        let mut logits = vec![f32::NAN; self.batch.len() * self.config.outputs];
        reference::forward(self.config, params, self.batch.pixels(), &mut logits);
        crate::loss::Evaluation::from_logits(&logits, self.batch.labels(), self.config.outputs)
    }
}

/// A network with three hidden layers at least four cache lines wide, so that the forward
/// pass reads padded copies of every layer but the last
/// ([`crate::kernels::padded_stride`]), among them the ones a prefix keeps for the layers
/// after a neuron group's next.
fn wide_config(mode: Arithmetic) -> NetConfig {
    NetConfig {
        inputs: 29,
        hidden: vec![70, 66, 64],
        outputs: 10,
        scale_exponents: vec![125, 124, 124],
        output_exponent: 3,
        init_multipliers: vec![1.0, 8.0, 8.0, 8.0],
        arithmetic: mode,
    }
}

/// Runs `check` on a case for every mode, every supported kernel, batches of 1, 4 and 17, and
/// a small network and a [`wide_config`] one.
fn for_each_prefix_case(seed: u64, mut check: impl FnMut(&mut PrefixCase<'_>, &mut TestRng)) {
    let mut rng = TestRng::new(seed);
    let modes = [Arithmetic::Ftz, Arithmetic::Seed, Arithmetic::Ieee];
    let configs = modes
        .into_iter()
        .flat_map(|mode| [small_config(mode), wide_config(mode)]);
    for config in configs {
        let mode = config.arithmetic;
        let layout = ParamLayout::new(&config);
        for kernel in Kernel::supported() {
            let mut forward = Forward::new(config.clone(), kernel).unwrap();
            // A prefix without running sums, and one that keeps each later layer's running
            // sums at every input past 0 (so every neuron group resumes them).
            let mut plain = crate::forward::Prefix::new();
            let mut with_sums = crate::forward::Prefix::new();
            for (l, layer) in layout.layers().iter().enumerate().skip(1) {
                with_sums.keep_running_sums(l, &(1..layer.fan_in).collect::<Vec<_>>());
            }
            for samples in [1, 4, 17] {
                let pixels = rng.pixels(samples * config.inputs, 0.8);
                let labels: Vec<u8> = (0..samples).map(|i| (i % 10) as u8).collect();
                let batch = Batch::from_images(config.inputs, &pixels, &labels);
                let theta = random_params(&config, &mut rng);
                let other = random_params(&config, &mut rng);
                for (prefix, sums) in [(&mut plain, ""), (&mut with_sums, " running sums")] {
                    forward.prefix(&theta, &batch, prefix);
                    let mut case = PrefixCase {
                        config: &config,
                        layout: &layout,
                        forward: &mut forward,
                        prefix,
                        batch: &batch,
                        theta: &theta,
                        other: &other,
                        what: format!(
                            "{kernel} {mode} hidden {:?} samples={samples}{sums}",
                            config.hidden
                        ),
                    };
                    check(&mut case, &mut rng);
                }
            }
        }
    }
}

#[test]
fn a_pass_started_from_a_prefix_matches_the_reference_in_every_mode_and_kernel() {
    use crate::forward::layer_range;
    for_each_prefix_case(4, |case, _| {
        for start in 0..case.config.layers() {
            // θ's layers before `start`, the other vector's from it on.
            let (theta, other) = (case.theta, case.other);
            let source = |l: usize| if l < start { theta } else { other };
            let mut mixed = theta.to_vec();
            for l in start..case.config.layers() {
                let range = layer_range(case.layout, l);
                mixed[range.clone()].copy_from_slice(&other[range]);
            }
            let want = case.reference(&mixed);
            let layout = case.layout;
            let got = case.forward.evaluate_from(
                &|l| &source(l)[layer_range(layout, l)],
                start,
                case.prefix,
                case.batch,
            );
            let what = format!("{} start={start}", case.what);
            assert_eq!(got, want, "{what}");
            let whole = case.forward.evaluate(&mixed, case.batch);
            assert_eq!(whole, want, "{what}: whole");
        }
    });
}

#[test]
fn a_neuron_group_evaluated_alone_matches_the_reference_in_every_mode_and_kernel() {
    use crate::forward::NeuronGroup;
    for_each_prefix_case(5, |case, rng| {
        let (theta, other) = (case.theta, case.other);
        for (l, layer) in case.layout.layers().iter().enumerate() {
            let n = layer.fan_out;
            // The first neuron, the last, a random range and all of them.
            let a = (rng.next_u64() as usize) % n;
            let b = a + 1 + (rng.next_u64() as usize) % (n - a);
            for neurons in [0..1, n - 1..n, a..b, 0..n] {
                let width = neurons.len();
                let mut weights = Vec::with_capacity(layer.fan_in * width);
                let mut changed = theta.to_vec();
                for k in 0..layer.fan_in {
                    let row = layer.weights.start + k * n;
                    let cols = row + neurons.start..row + neurons.end;
                    weights.extend_from_slice(&other[cols.clone()]);
                    changed[cols.clone()].copy_from_slice(&other[cols]);
                }
                let cols = layer.bias.start + neurons.start..layer.bias.start + neurons.end;
                changed[cols.clone()].copy_from_slice(&other[cols.clone()]);
                let group = NeuronGroup {
                    layer: l,
                    neurons: neurons.clone(),
                    weights: &weights,
                    bias: &other[cols],
                };
                let want = case.reference(&changed);
                let got = case
                    .forward
                    .evaluate_group(theta, group, case.prefix, case.batch);
                assert_eq!(got, want, "{} layer={l} {neurons:?}", case.what);
            }
        }
    });
}

#[test]
fn copies_of_a_neuron_group_evaluated_together_match_the_reference_of_each() {
    use crate::forward::GroupCopies;
    for_each_prefix_case(6, |case, rng| {
        let theta = case.theta;
        // Copy sources: the other vector, θ itself and fresh vectors; 1, 2 and 5 copies.
        let sources: Vec<Vec<f32>> = [case.other.to_vec(), theta.to_vec()]
            .into_iter()
            .chain((0..3).map(|_| random_params(case.config, rng)))
            .collect();
        for (l, layer) in case.layout.layers().iter().enumerate() {
            let n = layer.fan_out;
            let a = (rng.next_u64() as usize) % n;
            let b = a + 1 + (rng.next_u64() as usize) % (n - a);
            for neurons in [0..1, n - 1..n, a..b, 0..n] {
                for copies in [1, 2, 5] {
                    let sources = &sources[..copies];
                    let width = neurons.len();
                    let mut weights = Vec::new();
                    for k in 0..layer.fan_in {
                        let row = layer.weights.start + k * n;
                        for source in sources {
                            weights
                                .extend_from_slice(&source[row + neurons.start..row + neurons.end]);
                        }
                    }
                    let bias_cols =
                        layer.bias.start + neurons.start..layer.bias.start + neurons.end;
                    let bias: Vec<f32> = sources
                        .iter()
                        .flat_map(|source| source[bias_cols.clone()].to_vec())
                        .collect();
                    assert_eq!(weights.len(), layer.fan_in * copies * width);
                    // Packed, and padded as the trainer writes them.
                    let mut padded = PaddedWeights::new();
                    padded.fill(&weights, copies * width);
                    let packed = Weights::packed(&weights, copies * width);
                    for weights in [packed, padded.weights()] {
                        let group = GroupCopies {
                            layer: l,
                            neurons: neurons.clone(),
                            copies,
                            weights,
                            bias: &bias,
                        };
                        let mut got = Vec::new();
                        case.forward.evaluate_group_copies(
                            theta,
                            &group,
                            case.prefix,
                            case.batch,
                            &mut got,
                        );
                        assert_eq!(got.len(), copies);
                        for (c, (source, got)) in sources.iter().zip(&got).enumerate() {
                            // θ with this copy's group neurons taken from its source.
                            let mut changed = theta.to_vec();
                            for k in 0..layer.fan_in {
                                let row = layer.weights.start + k * n;
                                let cols = row + neurons.start..row + neurons.end;
                                changed[cols.clone()].copy_from_slice(&source[cols]);
                            }
                            changed[bias_cols.clone()].copy_from_slice(&source[bias_cols.clone()]);
                            let want = case.reference(&changed);
                            assert_eq!(
                                *got,
                                want,
                                "{} layer={l} {neurons:?} copy {c} of {copies}, stride {}",
                                case.what,
                                weights.stride()
                            );
                        }
                    }
                }
            }
        }
    });
}
