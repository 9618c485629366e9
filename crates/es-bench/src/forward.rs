//! Forward-pass throughput on one thread: our sparse kernels (`es_kernel::Forward`) and, as
//! the roofline reference, the dense f32 GEMM of `matrixmultiply` on the same shapes.

use std::hint::black_box;

use anyhow::Context;
use es_kernel::reference::pixel_value;
use es_kernel::{Batch, Evaluation, Forward, Kernel, NetConfig, ParamLayout};

use crate::timing::{Budget, Stats, measure};

/// What one timed configuration of our forward pass gave.
#[derive(Clone, Debug)]
pub struct Ours {
    pub stats: Stats,
    pub samples_per_sec: f64,
    /// Fraction of nonzero inputs each layer saw (layer 1: pixels), from the last call.
    pub density: Vec<f64>,
    /// Accuracy of the logits on the batch: tells init parameters (about 10%) from trained
    /// ones, so a wrong `--trained` file shows up in the table.
    pub accuracy: f64,
    /// Multiplies and adds of the terms actually computed (nonzero inputs only), per second.
    pub useful_gflops: f64,
}

/// Times `Forward::logits` of `params` on `batch` with `kernel`, in `config`'s arithmetic.
pub fn bench_ours(
    kernel: Kernel,
    config: &NetConfig,
    params: &[f32],
    batch: &Batch,
    budget: Budget,
) -> anyhow::Result<Ours> {
    let classes = config.outputs;
    let mut forward = Forward::new(config.clone(), kernel)
        .with_context(|| format!("building the {kernel} forward pass"))?;
    let stats = measure(budget, || {
        black_box(forward.logits(black_box(params), batch));
    });
    // One more call outside the timing for the numbers that explain the speed.
    let logits = forward.logits(params, batch);
    let accuracy = Evaluation::from_logits(logits, batch.labels(), classes).accuracy();
    let density = forward.density().to_vec();
    let widths = config.widths();
    let useful_per_sample: f64 = widths
        .windows(2)
        .zip(&density)
        .map(|(w, d)| 2.0 * d * (w[0] * w[1]) as f64)
        .sum();
    let samples_per_sec = batch.len() as f64 / stats.median;
    Ok(Ours {
        samples_per_sec,
        stats,
        density,
        accuracy,
        useful_gflops: samples_per_sec * useful_per_sample / 1e9,
    })
}

/// What one timed GEMM configuration gave.
#[derive(Clone, Debug)]
pub struct Gemm {
    pub stats: Stats,
    pub samples_per_sec: f64,
    /// Dense multiply-adds ×2 per second.
    pub gflops: f64,
}

/// Multiplies and adds per sample of the dense network, ×2: the flop count of a GEMM forward.
pub fn dense_flops_per_sample(config: &NetConfig) -> f64 {
    let w = config.widths();
    w.windows(2).map(|p| 2.0 * (p[0] * p[1]) as f64).sum()
}

/// Times the dense forward of `batch` through the layers of `params`: for each layer
/// `A (B × fan_in) · W (fan_in × fan_out)` by `matrixmultiply::sgemm`, then the bias add.
///
/// This is the roofline reference, not an equivalent network: it has no scale steps and uses
/// FMA where the CPU has it. matrixmultiply is built without its `threading` feature, so it
/// runs on the calling thread only, like our rows. Without the `2^-125` steps every value stays a normal float, so
/// the default float environment (no flushing) costs nothing here.
pub fn bench_gemm(
    config: &NetConfig,
    params: &[f32],
    batch: &Batch,
    budget: Budget,
) -> anyhow::Result<Gemm> {
    let layout = ParamLayout::new(config);
    anyhow::ensure!(
        params.len() == layout.len(),
        "GEMM reference: parameter vector has {} values, expected {}",
        params.len(),
        layout.len()
    );
    let samples = batch.len();
    let input: Vec<f32> = batch.pixels().iter().map(|&p| pixel_value(p)).collect();
    let widths = config.widths();
    // One output buffer per layer, allocated once, so the timed loop only computes.
    let mut acts: Vec<Vec<f32>> = widths[1..]
        .iter()
        .map(|&w| vec![0.0f32; samples * w])
        .collect();
    let layers = layout.layers();
    let stats = measure(budget, || {
        for (l, layer) in layers.iter().enumerate() {
            let (done, rest) = acts.split_at_mut(l);
            let a: &[f32] = if l == 0 { &input } else { &done[l - 1] };
            let c = &mut rest[0];
            let (k, n) = (layer.fan_in, layer.fan_out);
            let w = &params[layer.weights.clone()];
            assert_eq!(a.len(), samples * k, "layer {l} input shape");
            assert_eq!(c.len(), samples * n, "layer {l} output shape");
            assert_eq!(w.len(), k * n, "layer {l} weight shape");
            // SAFETY: `a` is samples×k, `w` is k×n and `c` is samples×n, all row-major and
            // contiguous (checked just above), so every index sgemm forms from these
            // dimensions and strides is in bounds; `c` is borrowed mutably and aliases neither
            // input.
            unsafe {
                matrixmultiply::sgemm(
                    samples,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            let bias = &params[layer.bias.clone()];
            for row in c.chunks_exact_mut(n) {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        black_box(&acts);
    });
    let samples_per_sec = samples as f64 / stats.median;
    Ok(Gemm {
        samples_per_sec,
        gflops: samples_per_sec * dense_flops_per_sample(config) / 1e9,
        stats,
    })
}

/// The first `size` training images as a batch, so every row of one size sees the same data.
pub fn first_images(images: &[u8], labels: &[u8], inputs: usize, size: usize) -> Batch {
    let mut batch = Batch::new(inputs);
    let indices: Vec<usize> = (0..size).collect();
    batch.fill(images, labels, &indices);
    batch
}

/// "L1 19% · L2 47% · L3 29%": the nonzero fraction of each layer's input.
pub fn density_text(density: &[f64]) -> String {
    let parts: Vec<String> = density
        .iter()
        .enumerate()
        .map(|(l, d)| format!("L{} {:.1}%", l + 1, d * 100.0))
        .collect();
    format!("input nonzero {}", parts.join(" · "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_the_seed_network_flop_count() {
        // 2 × (784·512 + 512·512 + 512·10)
        assert_eq!(dense_flops_per_sample(&NetConfig::default()), 1_337_344.0);
    }
}
