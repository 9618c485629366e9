//! The scalar reference forward pass: the specification every kernel must match bit for bit.
//!
//! It is written for clarity, not speed: dense loops in ascending input index, every flush
//! explicit (so it needs no float environment and runs the same on any CPU), no skipping of
//! zero terms. The fast path in [`crate::forward`] may skip terms whose input is zero; that
//! changes at most the sign of a zero, so results are compared with +0 and -0 equal.

use crate::config::{Arithmetic, NetConfig, ParamLayout};

/// `x` with a denormal value replaced by a zero of the same sign: what FTZ does to a result
/// and DAZ to an input.
#[inline]
pub fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// A product as the matrix multiply computes it in `mode`.
#[inline]
fn matmul_mul(mode: Arithmetic, a: f32, b: f32) -> f32 {
    match mode {
        Arithmetic::Ftz => flush(flush(a) * flush(b)),
        Arithmetic::Seed | Arithmetic::Ieee => a * b,
    }
}

/// A sum as the matrix multiply computes it in `mode`.
#[inline]
fn matmul_add(mode: Arithmetic, a: f32, b: f32) -> f32 {
    match mode {
        Arithmetic::Ftz => flush(flush(a) + flush(b)),
        Arithmetic::Seed | Arithmetic::Ieee => a + b,
    }
}

/// The bias add (`ftz` and `seed` flush its inputs and result: in `seed` mode it stands for
/// TensorFlow's own op, built with ftz=true; `ieee` keeps denormals).
#[inline]
pub fn epilogue_add(mode: Arithmetic, a: f32, b: f32) -> f32 {
    match mode {
        Arithmetic::Ftz | Arithmetic::Seed => flushed_add(a, b),
        Arithmetic::Ieee => a + b,
    }
}

/// The scaling ops, flushing like [`epilogue_add`].
#[inline]
pub fn epilogue_mul(mode: Arithmetic, a: f32, b: f32) -> f32 {
    match mode {
        Arithmetic::Ftz | Arithmetic::Seed => flushed_mul(a, b),
        Arithmetic::Ieee => a * b,
    }
}

#[inline]
pub fn flushed_add(a: f32, b: f32) -> f32 {
    flush(flush(a) + flush(b))
}

#[inline]
pub fn flushed_mul(a: f32, b: f32) -> f32 {
    flush(flush(a) * flush(b))
}

/// `2^-e` as an f32 for `e` in `-127..=126` (normal powers of two only).
pub fn pow2_neg(e: i32) -> f32 {
    assert!(
        (-127..=126).contains(&e),
        "2^-{e} is not a normal f32 power of two"
    );
    f32::from_bits(((127 - e) as u32) << 23)
}

/// Input `k` of a sample: `pixel as f32 / 255.0`.
#[inline]
pub fn pixel_value(pixel: u8) -> f32 {
    pixel as f32 / 255.0
}

/// Logits of `pixels.len() / inputs` samples into `logits` (`samples × outputs`).
///
/// # Panics
/// If the config is invalid or the slices do not have the config's shapes.
pub fn forward(config: &NetConfig, params: &[f32], pixels: &[u8], logits: &mut [f32]) {
    config
        .validate()
        .expect("reference forward needs a valid config");
    let layout = ParamLayout::new(config);
    assert_eq!(params.len(), layout.len(), "parameter vector length");
    assert_eq!(
        pixels.len() % config.inputs,
        0,
        "pixels must hold whole samples"
    );
    let samples = pixels.len() / config.inputs;
    assert_eq!(logits.len(), samples * config.outputs, "logits length");
    let exps = config.activation_exponents();
    let mode = config.arithmetic;

    for (s, sample) in pixels.chunks_exact(config.inputs).enumerate() {
        let mut act: Vec<f32> = sample.iter().map(|&p| pixel_value(p)).collect();
        for (l, layer) in layout.layers().iter().enumerate() {
            let w = &params[layer.weights.clone()];
            let b = &params[layer.bias.clone()];
            let bias_scale = pow2_neg(exps[l]);
            let out_scale = pow2_neg(exps[l + 1] - exps[l]);
            let mut next = vec![0.0f32; layer.fan_out];
            for (j, out) in next.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for (k, &a) in act.iter().enumerate() {
                    acc = matmul_add(mode, acc, matmul_mul(mode, a, w[k * layer.fan_out + j]));
                }
                let pre = epilogue_add(mode, acc, epilogue_mul(mode, b[j], bias_scale));
                *out = epilogue_mul(mode, pre, out_scale);
            }
            act = next;
        }
        logits[s * config.outputs..(s + 1) * config.outputs].copy_from_slice(&act);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_keeps_sign_and_normals() {
        let min = f32::MIN_POSITIVE;
        assert_eq!(flush(0.5 * min).to_bits(), 0);
        assert_eq!(flush(-0.5 * min).to_bits(), 0x8000_0000);
        assert_eq!(flush(min), min);
        assert_eq!(flush(-1.5), -1.5);
        assert!(flush(f32::NAN).is_nan());
        assert_eq!(flush(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn powers_of_two() {
        assert_eq!(pow2_neg(0), 1.0);
        assert_eq!(pow2_neg(125), 2.0f32.powi(-125));
        assert_eq!(pow2_neg(-125), 2.0f32.powi(125));
        assert_eq!(pow2_neg(126), f32::MIN_POSITIVE);
    }

    /// A 1-1-1 network written out by hand, in the seed's form with s = 2^125.
    #[test]
    fn tiny_network_by_hand() {
        let config = NetConfig {
            inputs: 1,
            hidden: vec![1],
            outputs: 1,
            scale_exponents: vec![125],
            output_exponent: 0,
            init_multipliers: vec![1.0, 1.0],
            arithmetic: Arithmetic::Ftz,
        };
        // h = (x·w1 + b1)/s; o = (h·w2 + b2/s)·s with x = 255/255 = 1.
        // w1 = 0.25: h = 0.25·2^-125 = 2^-127 is denormal and flushes, so o = b2/s·s = b2.
        let params = [0.25, 0.0, 3.0, 1.0];
        let mut o = [f32::NAN];
        forward(&config, &params, &[255], &mut o);
        assert_eq!(o[0], 1.0);
        // In seed mode the scaling op flushes too: same result.
        let seed = NetConfig {
            arithmetic: Arithmetic::Seed,
            ..config.clone()
        };
        forward(&seed, &params, &[255], &mut o);
        assert_eq!(o[0], 1.0);
        // w1 = 0.5: h = 2^-126 survives; h·w2 = 1.5·2^-125 is normal: o = 1.5·... + 1.
        let params = [0.5, 0.0, 3.0, 1.0];
        forward(&config, &params, &[255], &mut o);
        assert_eq!(o[0], 3.0 * 0.5 + 1.0);
        // In seed mode the bias add flushes a denormal input too: a denormal product alone
        // dies in both modes.
        let params = [0.5, 0.0, 0.75, 1.0];
        forward(&config, &params, &[255], &mut o);
        assert_eq!(o[0], 1.0);
        forward(&seed, &params, &[255], &mut o);
        assert_eq!(o[0], 1.0);
        // Two hidden units: each product h·w2 = 0.75·2^-126 is denormal. `ftz` flushes both;
        // `seed` mode's matrix product keeps them, and their sum 1.5·2^-126 is normal.
        let wide = NetConfig {
            hidden: vec![2],
            ..config.clone()
        };
        let params = [0.5, 0.5, 0.0, 0.0, 0.75, 0.75, 0.0];
        forward(&wide, &params, &[255], &mut o);
        assert_eq!(o[0], 0.0);
        let wide_seed = NetConfig {
            arithmetic: Arithmetic::Seed,
            ..wide
        };
        forward(&wide_seed, &params, &[255], &mut o);
        assert_eq!(o[0], 0.75);
    }
}
