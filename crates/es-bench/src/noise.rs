//! The cost of noise: building the shared table, regenerating a stream perturbation, and
//! materialising the mirrored pair θ ± σε that every evaluation starts with.

use std::hint::black_box;

use es_core::noise::{NoiseKey, NoiseSource, NoiseTable, table_offset};
use es_core::seeds::INDEX_LIMIT;
use es_core::train::EsConfig;
use es_kernel::{NetConfig, ParamLayout};

use crate::timing::{Budget, Stats, measure, time_once};

/// Generates the table `rounds` times (each on the whole rayon pool) and keeps the last one
/// for the later benchmarks. Returns the per-generation timing and the table.
pub fn bench_table(noise_seed: u64, len: usize, rounds: usize) -> (Stats, NoiseTable) {
    let mut times = Vec::with_capacity(rounds.max(1));
    let mut kept = None;
    for _ in 0..rounds.max(1) {
        let (secs, table) = time_once(|| NoiseTable::generate(noise_seed, len));
        times.push(secs);
        // The previous table is freed here, outside the timed call.
        kept = Some(table);
    }
    let table = kept.expect("at least one round ran");
    (Stats::from_rounds(times, 1), table)
}

/// Times one stream perturbation of `dim` values (one thread: a stream cannot be split),
/// cycling through perturbation indices so that every call runs a fresh ChaCha key setup.
pub fn bench_stream(dim: usize, budget: Budget) -> anyhow::Result<Stats> {
    let mut scratch = vec![0.0f32; dim];
    let key = |i: u32| NoiseKey {
        run_seed: 1,
        generation: 0,
        index: i % INDEX_LIMIT,
    };
    // Surface any error once, before the timed closure, which cannot return one.
    NoiseSource::Stream.perturbation(key(0), dim, &mut scratch)?;
    let mut i = 0u32;
    Ok(measure(budget, || {
        i = i.wrapping_add(1);
        let eps = NoiseSource::Stream
            .perturbation(key(i), dim, &mut scratch)
            .expect("the same request succeeded before the timing");
        black_box(eps);
    }))
}

/// Windows of the table the perturbation benchmark cycles through: enough distinct ones
/// (64 × 2.7 MB) that ε comes from memory, not from the caches, as in a real generation.
const WINDOWS: u32 = 64;

/// Times `plus = θ + σ_l·ε`, `minus = θ − σ_l·ε` over the whole parameter vector on one
/// thread, with ε a table window and σ per layer, as the evaluator does before its two
/// forward passes.
pub fn bench_perturb(
    net: &NetConfig,
    theta: &[f32],
    table: &NoiseTable,
    budget: Budget,
) -> anyhow::Result<Stats> {
    let layout = ParamLayout::new(net);
    let dim = layout.len();
    anyhow::ensure!(
        theta.len() == dim,
        "perturbation benchmark: θ has {} values, expected {dim}",
        theta.len()
    );
    let sigmas = EsConfig::default().layer_sigmas(net, 0);
    let offsets = (0..WINDOWS)
        .map(|index| {
            let key = NoiseKey {
                run_seed: 1,
                generation: 0,
                index,
            };
            table_offset(key, table.len(), dim)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ranges: Vec<_> = layout
        .layers()
        .iter()
        .map(|l| l.weights.start..l.bias.end)
        .collect();
    let mut plus = vec![0.0f32; dim];
    let mut minus = vec![0.0f32; dim];
    let mut i = 0usize;
    Ok(measure(budget, || {
        let eps = table.slice(offsets[i % offsets.len()], dim);
        i += 1;
        for (range, &sigma) in ranges.iter().zip(&sigmas) {
            perturb(
                &theta[range.clone()],
                &eps[range.clone()],
                sigma,
                &mut plus[range.clone()],
                &mut minus[range.clone()],
            );
        }
        black_box((&plus, &minus));
    }))
}

/// The same loop as the evaluator's (`es_core::train`, private there): the product rounded,
/// then the sum, no FMA. Not inlined, so the benchmark times this loop as compiled on its own.
#[inline(never)]
fn perturb(theta: &[f32], eps: &[f32], sigma: f32, plus: &mut [f32], minus: &mut [f32]) {
    for (((&t, &e), p), m) in theta.iter().zip(eps).zip(plus).zip(minus) {
        let step = sigma * e;
        *p = t + step;
        *m = t - step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturb_is_mirrored() {
        let (mut p, mut m) = ([0.0f32; 3], [0.0f32; 3]);
        perturb(&[1.0, 2.0, 3.0], &[1.0, -2.0, 0.0], 0.5, &mut p, &mut m);
        assert_eq!(p, [1.5, 1.0, 3.0]);
        assert_eq!(m, [0.5, 3.0, 3.0]);
    }
}
