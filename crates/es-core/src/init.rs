//! The initial parameters θ₀: He-normal weights scaled by the config's per-layer multipliers,
//! zero biases, drawn from `run_seed` at the positions documented in [`crate::seeds`].

use es_kernel::{NetConfig, ParamLayout};

use crate::noise::fill_standard_normal;
use crate::seeds::{Purpose, rng};

/// Standard deviation of layer `l`'s initial weights: `sqrt(2 / fan_in) · multiplier_l`.
/// Also the unit of that layer's perturbation σ.
pub fn init_std(config: &NetConfig, layer: usize) -> f32 {
    let fan_in = config.widths()[layer];
    ((2.0 / fan_in as f64).sqrt() * config.init_multipliers[layer] as f64) as f32
}

/// θ₀ for `config` and `run_seed`. The config must be valid.
pub fn init_params(config: &NetConfig, run_seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(config);
    let mut theta = vec![0.0f32; layout.len()];
    for (l, layer) in layout.layers().iter().enumerate() {
        // Weights of layer l are block 2l, its bias block 2l + 1 (zero, draws nothing).
        let block = &mut theta[layer.weights.clone()];
        fill_standard_normal(&mut rng(run_seed, Purpose::Init, 0, 2 * l as u32), block);
        let std = init_std(config, l);
        for w in block {
            *w *= std;
        }
    }
    theta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_he_normal_with_multipliers_and_zero_bias() {
        let config = NetConfig::default();
        let theta = init_params(&config, 1);
        let layout = ParamLayout::new(&config);
        for (l, layer) in layout.layers().iter().enumerate() {
            let w = &theta[layer.weights.clone()];
            let n = w.len() as f64;
            let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            let want = init_std(&config, l) as f64;
            // 5,120 weights at the smallest layer: relative error of the std well under 5%.
            assert!(
                (var.sqrt() / want - 1.0).abs() < 0.05,
                "layer {l}: std {} want {want}",
                var.sqrt()
            );
            assert!(theta[layer.bias.clone()].iter().all(|&b| b == 0.0));
        }
        assert_eq!(init_std(&config, 1), ((2.0f64 / 512.0).sqrt() * 8.0) as f32);
        assert_eq!(theta, init_params(&config, 1), "deterministic");
        assert_ne!(theta, init_params(&config, 2));
    }
}
