//! The OpenAI ES estimator: mirrored sampling, centered ranks and the gradient estimate.
//!
//! Perturbation `i` is evaluated at `θ + σε_i` and `θ − σε_i`, giving `F⁺_i` and `F⁻_i`. The
//! 2P fitnesses are replaced by their centered ranks in [−0.5, 0.5] (ties share their average
//! rank, so a generation whose fitnesses all tie moves nothing), and
//! `g = Σ_i (r⁺_i − r⁻_i) ε_i / (2P)`, summed in index order.

/// A fitness that cannot be ranked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StrategyError {
    #[error("fitness {value} of perturbation {index} ({sign}) is NaN: expected a number or -inf")]
    NanFitness {
        index: usize,
        sign: &'static str,
        value: f64,
    },
    #[error("no fitnesses to rank: expected at least one mirrored pair")]
    Empty,
}

/// The fitnesses of one mirrored pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairFitness {
    /// Fitness at `θ + σε`.
    pub plus: f64,
    /// Fitness at `θ − σε`.
    pub minus: f64,
}

/// Centered ranks of `values`: the smallest gets −0.5, the largest +0.5, equal values the
/// average of the ranks they span; a single value gets 0.
pub fn centered_ranks(values: &[f64]) -> Vec<f64> {
    // The order of `f64::total_cmp` (−inf lowest; NaN is rejected before this is called),
    // ties broken by index: each value's total-order key above its index, so an unstable
    // sort of plain integers (several times faster than a stable sort by comparator over
    // the 2P fitnesses of a generation) gives the one order there is.
    let mut keys: Vec<u128> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (u128::from(total_order_key(v)) << 64) | i as u128)
        .collect();
    keys.sort_unstable();
    let order: Vec<usize> = keys.iter().map(|&k| k as u64 as usize).collect();
    ranks_in_order(values, &order)
}

/// Centered ranks of `values` given `order`, their indices from lowest to highest: ties
/// (by `==`) share the mean of the positions they span.
fn ranks_in_order(values: &[f64], order: &[usize]) -> Vec<f64> {
    let n = values.len();
    let mut ranks = vec![0.0; n];
    if n < 2 {
        return ranks;
    }
    let scale = (n - 1) as f64;
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end tie: each gets the mean position (start + end - 1) / 2.
        let rank = (start + end - 1) as f64 / 2.0 / scale - 0.5;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// `v`'s bits mapped so that unsigned order is `f64::total_cmp`'s: negative values have every
/// bit flipped (larger magnitudes come first), the others only their sign bit.
fn total_order_key(v: f64) -> u64 {
    let bits = v.to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    }
}

/// The weight of each `ε_i` in the gradient: `r⁺_i − r⁻_i` over the ranks of all 2P
/// fitnesses, as f32 for the weighted sum.
pub fn rank_weights(pairs: &[PairFitness]) -> Result<Vec<f32>, StrategyError> {
    if pairs.is_empty() {
        return Err(StrategyError::Empty);
    }
    let mut all = Vec::with_capacity(2 * pairs.len());
    for (index, p) in pairs.iter().enumerate() {
        for (sign, value) in [("plus", p.plus), ("minus", p.minus)] {
            if value.is_nan() {
                return Err(StrategyError::NanFitness { index, sign, value });
            }
        }
        all.push(p.plus);
        all.push(p.minus);
    }
    let ranks = centered_ranks(&all);
    Ok(ranks
        .chunks_exact(2)
        .map(|r| (r[0] - r[1]) as f32)
        .collect())
}

/// `g[j] += Σ_i weights[i] · noise[i][j]` over `i` in order, each product and sum rounded in
/// f32 (no FMA), for a block of parameters; the caller divides by 2P at the end.
///
/// Eight perturbations are applied per pass over `g`: each element still receives its terms
/// in index order, but `g` is loaded and stored once per eight noise windows instead of once
/// per window, so the pass is bound by reading the noise, not by `g`.
#[inline]
pub fn accumulate_weighted(g: &mut [f32], weights: &[f32], noise: &[&[f32]]) {
    assert_eq!(weights.len(), noise.len(), "one weight per noise window");
    let n = g.len();
    let mut groups = weights.chunks_exact(8).zip(noise.chunks_exact(8));
    for (w, eps) in &mut groups {
        let e: [&[f32]; 8] = std::array::from_fn(|k| &eps[k][..n]);
        for j in 0..n {
            let mut acc = g[j];
            for k in 0..8 {
                acc += w[k] * e[k][j];
            }
            g[j] = acc;
        }
    }
    let done = weights.len() / 8 * 8;
    for (&w, eps) in weights[done..].iter().zip(&noise[done..]) {
        for (g, &e) in g.iter_mut().zip(&eps[..n]) {
            *g += w * e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_centered_and_ties_share_their_average() {
        assert_eq!(centered_ranks(&[3.0, 1.0, 2.0]), vec![0.5, -0.5, 0.0]);
        assert_eq!(centered_ranks(&[5.0]), vec![0.0]);
        assert_eq!(centered_ranks(&[]), Vec::<f64>::new());
        // 1.0 ties at positions 1 and 2 of 0..=3: average 1.5 → 1.5/3 − 0.5 = 0.
        assert_eq!(
            centered_ranks(&[0.0, 1.0, 1.0, 2.0]),
            vec![-0.5, 0.0, 0.0, 0.5]
        );
        assert_eq!(centered_ranks(&[7.0; 6]), vec![0.0; 6]);
        let r = centered_ranks(&[f64::NEG_INFINITY, -1.0, f64::NEG_INFINITY]);
        assert_eq!(r, vec![-0.25, 0.5, -0.25]);
    }

    #[test]
    fn all_equal_fitnesses_give_zero_weights() {
        let pairs = vec![
            PairFitness {
                plus: -2.3,
                minus: -2.3
            };
            5
        ];
        assert_eq!(rank_weights(&pairs).unwrap(), vec![0.0; 5]);
    }

    #[test]
    fn tiny_populations() {
        let w = rank_weights(&[PairFitness {
            plus: 1.0,
            minus: 0.0,
        }])
        .unwrap();
        assert_eq!(w, vec![1.0]);
        let w = rank_weights(&[PairFitness {
            plus: 0.0,
            minus: 1.0,
        }])
        .unwrap();
        assert_eq!(w, vec![-1.0]);
        assert_eq!(rank_weights(&[]), Err(StrategyError::Empty));
        let err = rank_weights(&[PairFitness {
            plus: 0.0,
            minus: f64::NAN,
        }])
        .unwrap_err();
        assert!(
            err.to_string().contains("perturbation 0 (minus) is NaN"),
            "{err}"
        );
    }

    #[test]
    fn grouped_weighted_sum_equals_the_plain_loop() {
        use crate::noise::fill_standard_normal;
        use crate::seeds::{Purpose, rng};
        for count in [0, 1, 7, 8, 9, 17, 33] {
            let mut noise = vec![vec![0.0f32; 37]; count];
            for (i, v) in noise.iter_mut().enumerate() {
                fill_standard_normal(&mut rng(1, Purpose::Test, 1, i as u32), v);
            }
            let weights: Vec<f32> = (0..count).map(|i| (i as f32 - 3.3) / 7.0).collect();
            let slices: Vec<&[f32]> = noise.iter().map(|v| v.as_slice()).collect();
            let mut got = vec![0.25f32; 37];
            accumulate_weighted(&mut got, &weights, &slices);
            let mut want = vec![0.25f32; 37];
            for (w, eps) in weights.iter().zip(&noise) {
                for (g, e) in want.iter_mut().zip(eps) {
                    *g += w * e;
                }
            }
            assert_eq!(got, want, "{count} windows");
        }
    }

    /// The ranks of a stable sort by `f64::total_cmp` (the definition the integer keys
    /// implement), on values with many ties, both zeros, infinities and denormals.
    #[test]
    fn ranks_follow_total_order_with_ties_and_signed_zeros() {
        fn by_comparator(values: &[f64]) -> Vec<usize> {
            let mut order: Vec<usize> = (0..values.len()).collect();
            order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
            order
        }
        let special = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE / 4.0,
            -f64::MIN_POSITIVE / 4.0,
            f64::MAX,
            f64::MIN,
            1.0,
            -1.0,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for n in [2usize, 3, 17, 1000] {
            let values: Vec<f64> = (0..n)
                .map(|_| match next() % 3 {
                    0 => special[(next() % special.len() as u64) as usize],
                    1 => (next() % 7) as f64 - 3.0,
                    _ => f64::from_bits(next() >> 2) * if next() & 1 == 0 { 1.0 } else { -1.0 },
                })
                .collect();
            let order = by_comparator(&values);
            let keys: Vec<u64> = order.iter().map(|&i| total_order_key(values[i])).collect();
            assert!(keys.windows(2).all(|w| w[0] <= w[1]), "n = {n}");
            let expected = ranks_in_order(&values, &order);
            let ranks = centered_ranks(&values);
            for (i, (r, e)) in ranks.iter().zip(&expected).enumerate() {
                assert_eq!(r.to_bits(), e.to_bits(), "value {} (n = {n})", values[i]);
            }
        }
    }

    #[test]
    fn weighted_sum_in_index_order() {
        let mut g = vec![0.0f32; 3];
        let a = [1.0f32, 2.0, 3.0];
        let b = [1e8f32, -1e8, 0.5];
        accumulate_weighted(&mut g, &[1.0, 1.0], &[&a, &b]);
        assert_eq!(g, vec![1.0 + 1e8, 2.0 - 1e8, 3.5]);
    }

    /// ES with mirrored sampling recovers the direction of the gradient of a quadratic.
    #[test]
    fn estimator_recovers_the_gradient_of_a_quadratic() {
        use crate::noise::fill_standard_normal;
        use crate::seeds::{Purpose, rng};
        let dim = 20;
        let target: Vec<f64> = (0..dim).map(|j| (j as f64 - 10.0) / 10.0).collect();
        let theta = vec![0.0f64; dim];
        // f(θ) = −|θ − target|², gradient 2(target − θ) = 2·target.
        let f = |x: &[f64]| {
            -x.iter()
                .zip(&target)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
        };
        let sigma = 0.05;
        let pop = 2000;
        let mut noise = vec![vec![0.0f32; dim]; pop];
        let mut pairs = Vec::new();
        for (i, eps) in noise.iter_mut().enumerate() {
            fill_standard_normal(&mut rng(9, Purpose::Test, 0, i as u32), eps);
            let plus: Vec<f64> = theta
                .iter()
                .zip(eps.iter())
                .map(|(t, &e)| t + sigma * e as f64)
                .collect();
            let minus: Vec<f64> = theta
                .iter()
                .zip(eps.iter())
                .map(|(t, &e)| t - sigma * e as f64)
                .collect();
            pairs.push(PairFitness {
                plus: f(&plus),
                minus: f(&minus),
            });
        }
        let weights = rank_weights(&pairs).unwrap();
        let slices: Vec<&[f32]> = noise.iter().map(|v| v.as_slice()).collect();
        let mut g = vec![0.0f32; dim];
        accumulate_weighted(&mut g, &weights, &slices);
        let dot: f64 = g.iter().zip(&target).map(|(&a, b)| a as f64 * b).sum();
        let ng = g.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        let nt = target.iter().map(|b| b * b).sum::<f64>().sqrt();
        let cosine = dot / (ng * nt);
        assert!(
            cosine > 0.95,
            "cosine between estimate and true gradient: {cosine}"
        );
    }
}
