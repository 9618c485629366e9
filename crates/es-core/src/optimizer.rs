//! Adam with L2 weight decay, and the schedules of σ and the learning rate.
//!
//! Every operation is an IEEE-exact f32/f64 operation or comes from the pure-Rust `libm`, so
//! the update is bit-identical on every machine.

/// Adam's hyperparameters (DESIGN.md §2: β1 0.9, β2 0.999, ε 1e-8).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        }
    }
}

/// Adam's moments and step count: with θ, everything a checkpoint needs to resume the update.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub config: AdamConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

/// The per-step scalars of Adam, computed once and shared by every parameter block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// `lr · sqrt(1 − β2^t) / (1 − β1^t)`: the bias-corrected step size.
    pub step_size: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub epsilon: f32,
    pub l2: f32,
}

impl Adam {
    pub fn new(config: AdamConfig, dim: usize) -> Adam {
        Adam {
            config,
            m: vec![0.0; dim],
            v: vec![0.0; dim],
            t: 0,
        }
    }

    /// Advances the step count and returns the scalars of this step.
    pub fn begin_step(&mut self, lr: f32, l2: f32) -> AdamStep {
        self.t += 1;
        let c = self.config;
        // β^t by repeated squaring in f64: exact operations only (powi may differ per target).
        let b1t = pow_u64(c.beta1, self.t);
        let b2t = pow_u64(c.beta2, self.t);
        let step_size = lr as f64 * (1.0 - b2t).sqrt() / (1.0 - b1t);
        AdamStep {
            step_size: step_size as f32,
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            epsilon: c.epsilon,
            l2,
        }
    }
}

fn pow_u64(base: f64, mut exp: u64) -> f64 {
    let mut result = 1.0;
    let mut b = base;
    while exp > 0 {
        if exp & 1 == 1 {
            result *= b;
        }
        b *= b;
        exp >>= 1;
    }
    result
}

impl AdamStep {
    /// Applies the step to a block: the descent direction is `−g + l2·θ` (ES ascends the
    /// fitness), then `θ −= step_size · m / (sqrt(v) + ε)`.
    #[inline]
    pub fn apply(&self, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let n = theta.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for j in 0..n {
            let d = self.l2 * theta[j] - g[j];
            m[j] = self.beta1 * m[j] + self.one_minus_beta1 * d;
            v[j] = self.beta2 * v[j] + self.one_minus_beta2 * (d * d);
            theta[j] -= self.step_size * m[j] / (v[j].sqrt() + self.epsilon);
        }
    }
}

/// How a base value (σ or the learning rate) changes over the generations of a run.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Schedule {
    #[default]
    Constant,
    /// Linear from the base value at generation 0 to `base · final_fraction` at `over`, then
    /// constant.
    Linear { final_fraction: f64, over: u64 },
    /// Half-cosine from the base to `base · final_fraction` at `over`, then constant.
    Cosine { final_fraction: f64, over: u64 },
    /// Multiplied by `factor` every `every` generations.
    Step { factor: f64, every: u64 },
}

impl Schedule {
    /// The value at generation `t` (0-based).
    pub fn value(&self, base: f32, t: u64) -> f32 {
        let base = base as f64;
        let v = match *self {
            Schedule::Constant => base,
            Schedule::Linear {
                final_fraction,
                over,
            } => {
                let p = progress(t, over);
                base * (1.0 + (final_fraction - 1.0) * p)
            }
            Schedule::Cosine {
                final_fraction,
                over,
            } => {
                let p = progress(t, over);
                let c = 0.5 * (1.0 + libm::cos(std::f64::consts::PI * p));
                base * (final_fraction + (1.0 - final_fraction) * c)
            }
            Schedule::Step { factor, every } => {
                base * pow_u64(factor, t.checked_div(every).unwrap_or(0))
            }
        };
        v as f32
    }
}

fn progress(t: u64, over: u64) -> f64 {
    if over == 0 {
        1.0
    } else {
        (t.min(over)) as f64 / over as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_adam_step_by_hand() {
        let mut adam = Adam::new(AdamConfig::default(), 2);
        let mut theta = vec![1.0f32, -2.0];
        let g = [0.5f32, 0.0];
        let step = adam.begin_step(0.01, 0.1);
        step.apply(&mut theta, &mut adam.m, &mut adam.v, &g);
        // d = l2·θ − g = [0.1 − 0.5, −0.2] = [−0.4, −0.2].
        // m = 0.1·d, v = 0.001·d²; step size = 0.01·sqrt(0.001)/0.1;
        // θ −= step · m/(sqrt(v)+ε) ≈ step · 0.1·d / (sqrt(0.001)·|d|) = 0.01·sign(d).
        assert!((theta[0] - 1.01).abs() < 1e-6, "{}", theta[0]);
        assert!((theta[1] - (-1.99)).abs() < 1e-6, "{}", theta[1]);
        // The exact f32 operations, written out.
        let d0 = 0.1f32 * 1.0 - 0.5;
        let m0 = 0.9f32 * 0.0 + (1.0 - 0.9f64) as f32 * d0;
        let v0 = 0.999f32 * 0.0 + (1.0 - 0.999f64) as f32 * (d0 * d0);
        let s = (0.01f64 * (1.0 - 0.999f64).sqrt() / (1.0 - 0.9f64)) as f32;
        assert_eq!(theta[0], 1.0 - s * m0 / (v0.sqrt() + 1e-8));
        assert_eq!(adam.t, 1);
    }

    #[test]
    fn bias_correction_uses_exact_powers() {
        assert_eq!(pow_u64(0.9, 0), 1.0);
        assert_eq!(pow_u64(0.9, 3), 0.9 * 0.9 * 0.9);
        assert_eq!(pow_u64(2.0, 10), 1024.0);
    }

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Constant.value(0.5, 1000), 0.5);
        let lin = Schedule::Linear {
            final_fraction: 0.1,
            over: 100,
        };
        assert_eq!(lin.value(1.0, 0), 1.0);
        assert!((lin.value(1.0, 50) - 0.55).abs() < 1e-6);
        assert!((lin.value(1.0, 500) - 0.1).abs() < 1e-6);
        let cos = Schedule::Cosine {
            final_fraction: 0.0,
            over: 100,
        };
        assert_eq!(cos.value(2.0, 0), 2.0);
        assert!((cos.value(2.0, 50) - 1.0).abs() < 1e-6);
        assert!(cos.value(2.0, 100).abs() < 1e-6);
        let step = Schedule::Step {
            factor: 0.5,
            every: 10,
        };
        assert_eq!(step.value(1.0, 9), 1.0);
        assert_eq!(step.value(1.0, 25), 0.25);
    }
}
