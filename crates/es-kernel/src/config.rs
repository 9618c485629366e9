//! The network's shape and arithmetic as configuration, and the flat parameter layout.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// How every f32 operation of the forward pass treats values below `f32::MIN_POSITIVE`.
///
/// The nonlinearity of the network *is* this rounding, so the mode is part of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Arithmetic {
    /// Every operation flushes denormal inputs and results to zero (x86-64 MXCSR FTZ and DAZ,
    /// aarch64 FPCR.FZ): the mission's "SIMD FTZ f32 forward pass".
    #[default]
    Ftz,
    /// OpenAI's TensorFlow/cuBLAS set-up: matrix products keep denormals (gradual underflow);
    /// the bias-add and scaling ops flush denormal inputs and results to zero.
    Seed,
    /// Plain IEEE 754 with gradual underflow everywhere: no operation flushes, so the network
    /// is a linear map (up to rounding). Not a training mode: the control that shows how much
    /// of a trained network's accuracy comes from the underflow.
    Ieee,
}

impl Arithmetic {
    /// The name used on the command line, in configs and in exported metadata.
    pub fn name(self) -> &'static str {
        match self {
            Arithmetic::Ftz => "ftz",
            Arithmetic::Seed => "seed",
            Arithmetic::Ieee => "ieee",
        }
    }
}

impl fmt::Display for Arithmetic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arithmetic {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ftz" => Ok(Arithmetic::Ftz),
            "seed" => Ok(Arithmetic::Seed),
            "ieee" => Ok(Arithmetic::Ieee),
            other => Err(ConfigError::UnknownArithmetic(other.to_string())),
        }
    }
}

/// A configuration that cannot describe a network.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("unknown arithmetic mode {0:?}: expected \"ftz\", \"seed\" or \"ieee\"")]
    UnknownArithmetic(String),
    #[error("layer width {what} is 0: every layer needs at least one neuron")]
    ZeroWidth { what: String },
    #[error(
        "{got} scale exponents for {hidden} hidden layers: expected one exponent per hidden layer"
    )]
    ScaleExponentCount { got: usize, hidden: usize },
    #[error(
        "scale exponent {value} of hidden layer {layer} is out of range: expected 0..=126 so that 2^-e is a normal f32"
    )]
    ScaleExponentRange { layer: usize, value: i32 },
    #[error("output exponent {0} is out of range: expected -126..=126")]
    OutputExponentRange(i32),
    #[error("scale step from 2^-{from} to 2^-{to} is not a normal f32 power of two")]
    ScaleStep { from: i32, to: i32 },
    #[error("{got} init multipliers for {layers} layers: expected one per layer")]
    InitMultiplierCount { got: usize, layers: usize },
    #[error("init multiplier {value} of layer {layer} is not a finite positive number")]
    InitMultiplier { layer: usize, value: f32 },
}

/// The shape of the activation-free MLP and how it is scaled into the underflow range.
///
/// Layer `l` (1-based, `L` layers) maps activations `a_{l-1}`, held at scale `2^-e_{l-1}`, to
/// `a_l` at scale `2^-e_l`, with `e_0 = 0` (pixels in) and `e_L` the output exponent:
///
/// `a_l = (a_{l-1} · W_l + b_l · 2^-e_{l-1}) · 2^(e_{l-1} - e_l)`
///
/// With hidden exponents `[125, 125]` and output exponent 0 this is the seed's
/// `h1 = (x W1 + b1)/s;  h2 = h1 W2 + b2/s;  o = (h2 W3 + b3/s) · s` with `s = 2^125`.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// Inputs per sample (784 for MNIST); input `k` is `pixel[k] as f32 / 255.0`.
    pub inputs: usize,
    /// Widths of the hidden layers, first to last.
    pub hidden: Vec<usize>,
    /// Outputs (classes).
    pub outputs: usize,
    /// Scale exponent `e_l` of each hidden layer's activations (`2^-e_l`).
    pub scale_exponents: Vec<i32>,
    /// Scale exponent `e_L` of the logits (`2^-e_L`), 0 in the seed. A positive value divides
    /// every logit by `2^e_L` exactly: a fixed softmax temperature. With the alive init the
    /// logits start huge (cross-entropy in the hundreds), and ES then spends its first
    /// generations shrinking θ, which pushes activations into the flushed range.
    pub output_exponent: i32,
    /// Per-layer multiplier of the He-normal init standard deviation `sqrt(2 / fan_in)`.
    pub init_multipliers: Vec<f32>,
    /// The arithmetic every forward pass of this network runs in.
    pub arithmetic: Arithmetic,
}

impl Default for NetConfig {
    /// The seed's 784-512-512-10 network with `s = 2^125`, in `ftz` mode, with an init that
    /// starts alive and logits at a temperature of 128. Calibrated by experiment on this
    /// project's 2-core machines (DESIGN.md §1; the runs are in the issue notes):
    /// - W2 and W3 ×8: with the seed's own init every layer-2 product in `ftz` mode is about
    ///   `2^-126 · 0.06` and flushes, so layer 2 is dead and all fitnesses tie;
    /// - W1 ×2: with the plain He init about 70% of layer-1 outputs (|x·W1 + b1| < 0.5) flush
    ///   at init; doubling W1 keeps more of them alive, and learned faster;
    /// - output exponent 7 (logits divided by 128): with 0 the alive init starts with a
    ///   cross-entropy in the hundreds, and ES then spent its generations shrinking θ, which
    ///   drove activations into the flushed range; 4 was still overconfident (a few badly
    ///   wrong images dominated each minibatch's loss) and learned half as fast as 7, while
    ///   10 was too soft to start (docs/RESULTS.md, "Exploration at equal generations").
    fn default() -> Self {
        NetConfig {
            inputs: 784,
            hidden: vec![512, 512],
            outputs: 10,
            scale_exponents: vec![125, 125],
            output_exponent: 7,
            init_multipliers: vec![2.0, 8.0, 8.0],
            arithmetic: Arithmetic::Ftz,
        }
    }
}

impl NetConfig {
    /// The seed's network exactly as published: `seed` arithmetic and plain He init.
    pub fn seed() -> Self {
        NetConfig {
            init_multipliers: vec![1.0, 1.0, 1.0],
            output_exponent: 0,
            arithmetic: Arithmetic::Seed,
            ..NetConfig::default()
        }
    }

    /// Number of weight layers.
    pub fn layers(&self) -> usize {
        self.hidden.len() + 1
    }

    /// Widths from input to output: `[inputs, hidden.., outputs]`.
    pub fn widths(&self) -> Vec<usize> {
        let mut widths = Vec::with_capacity(self.hidden.len() + 2);
        widths.push(self.inputs);
        widths.extend_from_slice(&self.hidden);
        widths.push(self.outputs);
        widths
    }

    /// Scale exponents of every activation, `[0, e_1, .., e_{L-1}, e_L]`.
    pub fn activation_exponents(&self) -> Vec<i32> {
        let mut exps = Vec::with_capacity(self.hidden.len() + 2);
        exps.push(0);
        exps.extend_from_slice(&self.scale_exponents);
        exps.push(self.output_exponent);
        exps
    }

    /// Checks that the configuration describes a network this crate can evaluate.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, &w) in self.widths().iter().enumerate() {
            if w == 0 {
                let what = if i == 0 {
                    "inputs".to_string()
                } else if i == self.hidden.len() + 1 {
                    "outputs".to_string()
                } else {
                    format!("of hidden layer {i}")
                };
                return Err(ConfigError::ZeroWidth { what });
            }
        }
        if self.scale_exponents.len() != self.hidden.len() {
            return Err(ConfigError::ScaleExponentCount {
                got: self.scale_exponents.len(),
                hidden: self.hidden.len(),
            });
        }
        for (i, &e) in self.scale_exponents.iter().enumerate() {
            if !(0..=126).contains(&e) {
                return Err(ConfigError::ScaleExponentRange {
                    layer: i + 1,
                    value: e,
                });
            }
        }
        if !(-126..=126).contains(&self.output_exponent) {
            return Err(ConfigError::OutputExponentRange(self.output_exponent));
        }
        let exps = self.activation_exponents();
        for pair in exps.windows(2) {
            if !(-126..=127).contains(&(pair[0] - pair[1])) {
                return Err(ConfigError::ScaleStep {
                    from: pair[0],
                    to: pair[1],
                });
            }
        }
        if self.init_multipliers.len() != self.layers() {
            return Err(ConfigError::InitMultiplierCount {
                got: self.init_multipliers.len(),
                layers: self.layers(),
            });
        }
        for (i, &m) in self.init_multipliers.iter().enumerate() {
            if !(m.is_finite() && m > 0.0) {
                return Err(ConfigError::InitMultiplier {
                    layer: i + 1,
                    value: m,
                });
            }
        }
        Ok(())
    }
}

/// Where each layer's weights and biases sit in the flat parameter vector θ.
///
/// Order: `W1, b1, W2, b2, …`; each `W_l` is `fan_in × fan_out`, row-major (input-major:
/// `W[k * fan_out + j]`). This is also the checkpoint and export layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    layers: Vec<LayerLayout>,
    len: usize,
}

/// One layer's place in θ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerLayout {
    pub fan_in: usize,
    pub fan_out: usize,
    pub weights: Range<usize>,
    pub bias: Range<usize>,
}

impl ParamLayout {
    pub fn new(config: &NetConfig) -> Self {
        let widths = config.widths();
        let mut offset = 0;
        let layers = widths
            .windows(2)
            .map(|pair| {
                let (fan_in, fan_out) = (pair[0], pair[1]);
                let weights = offset..offset + fan_in * fan_out;
                let bias = weights.end..weights.end + fan_out;
                offset = bias.end;
                LayerLayout {
                    fan_in,
                    fan_out,
                    weights,
                    bias,
                }
            })
            .collect();
        ParamLayout {
            layers,
            len: offset,
        }
    }

    /// Total number of parameters D.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layers(&self) -> &[LayerLayout] {
        &self.layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_design() {
        let layout = ParamLayout::new(&NetConfig::default());
        assert_eq!(layout.len(), 669_706);
        let l = layout.layers();
        assert_eq!(l[0].weights, 0..784 * 512);
        assert_eq!(l[0].bias, 401_408..401_920);
        assert_eq!(l[1].weights.len(), 512 * 512);
        assert_eq!(l[2].fan_out, 10);
        assert_eq!(l[2].bias.end, 669_706);
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(NetConfig::default().validate().is_ok());
        assert!(NetConfig::seed().validate().is_ok());
        let bad = NetConfig {
            scale_exponents: vec![125],
            ..NetConfig::default()
        };
        assert_eq!(
            bad.validate(),
            Err(ConfigError::ScaleExponentCount { got: 1, hidden: 2 })
        );
        let bad = NetConfig {
            scale_exponents: vec![127, 125],
            ..NetConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("0..=126"));
        let bad = NetConfig {
            hidden: vec![512, 0],
            ..NetConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("hidden layer 2")
        );
        assert_eq!(
            "fast".parse::<Arithmetic>().unwrap_err().to_string(),
            "unknown arithmetic mode \"fast\": expected \"ftz\", \"seed\" or \"ieee\""
        );
    }
}
