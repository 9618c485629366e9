//! The ES update (`es_core::train::apply_update`) and the memory-read bandwidth it is bounded
//! by: the update reads P noise windows of D floats each, so it is a streaming read.

use std::hint::black_box;

use es_core::noise::NoiseSource;
use es_core::seeds::{Purpose, rng, uniform_f64};
use es_core::strategy::PairFitness;
use es_core::train::{EsConfig, EsState, apply_update};
use es_kernel::NetConfig;

use crate::timing::{Budget, Stats, measure};

/// Times `apply_update` for `population` mirrored pairs with random fitnesses on `threads`
/// threads. Each call advances the generation, so each reads fresh noise windows.
pub fn bench_update(
    net: &NetConfig,
    population: usize,
    noise: &NoiseSource,
    threads: usize,
    budget: Budget,
) -> anyhow::Result<Stats> {
    let es = EsConfig {
        population,
        ..EsConfig::default()
    };
    let mut state = EsState::new(net, &es, 1);
    // Distinct random fitnesses: the update's cost does not depend on them, but ties would
    // make the rank weights (and so the accumulation) degenerate.
    let mut r = rng(1, Purpose::Test, 0, 0);
    let pairs: Vec<PairFitness> = (0..population)
        .map(|_| PairFitness {
            plus: -3.0 * uniform_f64(&mut r),
            minus: -3.0 * uniform_f64(&mut r),
        })
        .collect();
    // Surface any error once, before the timed closure, which cannot return one.
    apply_update(&mut state, net, &es, noise, 1, &pairs, threads)?;
    Ok(measure(budget, || {
        let stats = apply_update(&mut state, net, &es, noise, 1, &pairs, threads)
            .expect("the same update succeeded before the timing");
        black_box(stats);
    }))
}

/// Times a parallel sum over `bytes` of f32 (written first, so every page is really mapped
/// and the reads go to memory): the read bandwidth the update can at best reach.
/// Returns the timing of one full pass.
pub fn bench_read(bytes: usize, threads: usize, budget: Budget) -> Stats {
    let threads = threads.max(1);
    let mut data = vec![0.0f32; bytes / 4];
    let chunk = data.len().div_ceil(threads);
    // Written by the threads that will read it; a zeroed allocation that is never written
    // would be served from the shared zero page and read from cache.
    std::thread::scope(|scope| {
        for part in data.chunks_mut(chunk) {
            scope.spawn(move || part.fill(1.0));
        }
    });
    let data = &data;
    measure(budget, || {
        let total: f32 = std::thread::scope(|scope| {
            let handles: Vec<_> = data
                .chunks(chunk)
                .map(|part| scope.spawn(move || sum8(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("summing threads do not panic"))
                .sum()
        });
        black_box(total);
    })
}

/// Sum with 8 independent accumulators, so the adds form 8 (vectorisable) dependency chains
/// and the loop waits on memory, not on the latency of one chain. The value is meaningless
/// (f32 accumulators saturate); only the reads matter.
#[inline(never)]
fn sum8(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum8_adds_everything() {
        let xs: Vec<f32> = (1..=19).map(|i| i as f32).collect();
        assert_eq!(sum8(&xs), 190.0);
    }
}
