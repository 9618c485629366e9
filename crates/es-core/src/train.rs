//! One generation of OpenAI ES split into the parts a cluster distributes, and the
//! single-process trainer that runs them all on the cores of one machine.
//!
//! A generation `t` is: the minibatch ([`minibatch_indices`]), the per-layer σ
//! ([`EsConfig::layer_sigmas`]), the evaluation of each mirrored pair ([`Evaluator`], run by
//! whoever holds θ and the noise source: in-process threads or remote workers), and the update
//! ([`apply_update`]; its weighted sum of the noise, [`noise_sums`], in slices if need be) from
//! the 2P fitnesses alone. Every part is a pure function of the config,
//! `run_seed`, `t`, θ and the fitnesses, so θ after `t` generations does not depend on who
//! evaluated what.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use es_kernel::config::LayerLayout;
use es_kernel::kernels::{PaddedWeights, prefetch};
use es_kernel::{
    Batch, ConfigError, Evaluation, Forward, GroupCopies, Kernel, NetConfig, ParamLayout, Prefix,
    layer_range,
};

use crate::init::{init_params, init_std};
pub use crate::minibatch::minibatch_indices;
use crate::minibatch::{MinibatchBuilder, square_side};
use crate::noise::{NoiseError, NoiseKey, NoiseSource};
use crate::optimizer::{Adam, AdamConfig, AdamStep, Schedule};
use crate::strategy::{PairFitness, StrategyError, accumulate_weighted, rank_weights};

/// The largest minibatch a batch schedule may reach: far beyond MNIST's 60,000 training
/// images (minibatches draw with replacement), small enough that a generation's buffers fit.
pub const MAX_BATCH: usize = 1 << 20;

/// The evolution-strategies hyperparameters of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct EsConfig {
    /// Mirrored pairs per generation (2P evaluations).
    pub population: usize,
    /// Training images per minibatch at generation 0 ([`EsConfig::batch_at`]); every
    /// evaluation of a generation uses the same one.
    pub batch_size: usize,
    /// How the minibatch grows (or shrinks) over the run: [`Schedule::Constant`],
    /// [`Schedule::Linear`] or [`Schedule::Cosine`] of `batch_size`. Late in a run the few
    /// images a network still gets wrong are a small part of a small batch, so a larger one
    /// gives each pair's fitness difference less sampling noise where that matters.
    pub batch_schedule: Schedule,
    /// Perturbation scale, relative to each layer's init standard deviation: layer `l` is
    /// perturbed by `σ · init_std_l · ε`.
    pub sigma: f32,
    pub sigma_schedule: Schedule,
    /// Adam's learning rate.
    pub lr: f32,
    pub lr_schedule: Schedule,
    /// L2 weight decay added to the descent direction (`−g + l2·θ`); 0 disables it.
    pub l2: f32,
    pub adam: AdamConfig,
    /// Per-layer multipliers of σ (empty: all 1).
    pub sigma_multipliers: Vec<f32>,
    /// Per-layer multipliers of Adam's step (empty: all 1). Adam's step is about `lr` per
    /// parameter whatever the layer's scale, so layers with larger weights may want more.
    pub lr_multipliers: Vec<f32>,
    /// Mirrored pairs per layer, summing to `population` (empty: every pair perturbs every
    /// layer). With `[P_1, …, P_L]` the first `P_1` pairs perturb only layer 1's weights and
    /// bias, the next `P_2` only layer 2's, and so on; each layer's gradient comes from its
    /// own pairs, ranked among themselves. A pair that leaves the first layers alone starts
    /// its forward pass from θ's activations there, so pairs of the small top layer cost a
    /// fraction of a full evaluation, and its gradient is not drowned in the noise of the
    /// 400,000 parameters of layer 1.
    pub layer_populations: Vec<usize>,
    /// Per layer, the groups its neurons are split into (empty: all 1; needs layer
    /// populations). With `G_l` groups, layer `l`'s pairs are split into `G_l` equal runs in
    /// index order, and the pairs of run `g` perturb only the incoming weights and biases of
    /// the `g`-th of `G_l` equal ranges of the layer's neurons. Such a pair costs the group's
    /// share of its layer plus the layers after it: the other neurons' outputs are θ's.
    pub neuron_groups: Vec<usize>,
    /// The largest move, in pixels, of a training image in a minibatch (0: none). Each image
    /// of generation `t`'s minibatch is shifted by its own `(dx, dy)`, each uniform in
    /// `−image_shift..=image_shift` ([`crate::minibatch::image_shifts`]), the uncovered edge
    /// black. The network then never sees the same pixels twice, which narrows the gap
    /// between training and test accuracy that many generations on 60,000 images open. Needs
    /// square images.
    pub image_shift: usize,
    /// Decay of the running average of θ the run reports (0: none, θ itself). With decay
    /// `β`, after every update `θ̄ ← θ̄ + (1 − β)·(θ − θ̄)`, from `θ̄ = θ₀`: an average over
    /// about the last `1 / (1 − β)` generations. ES moves θ by noisy steps around the
    /// optimum; their average lies nearer to it, and scores better on held-out images. The
    /// average is what a run evaluates, writes and exports ([`EsState::model`]); training
    /// itself never reads it.
    pub average_decay: f32,
}

impl Default for EsConfig {
    fn default() -> Self {
        // Calibrated on MNIST with the default network (see NetConfig::default): σ 0.2 and lr
        // 1e-2 learned several times faster than 0.02 and 1e-3 in the first hundreds of
        // generations, and weight decay only shrank θ into the flushed range.
        EsConfig {
            population: 256,
            batch_size: 100,
            batch_schedule: Schedule::Constant,
            sigma: 0.2,
            sigma_schedule: Schedule::Constant,
            lr: 1e-2,
            lr_schedule: Schedule::Constant,
            l2: 0.0,
            adam: AdamConfig::default(),
            sigma_multipliers: Vec::new(),
            lr_multipliers: Vec::new(),
            layer_populations: Vec::new(),
            neuron_groups: Vec::new(),
            image_shift: 0,
            average_decay: 0.0,
        }
    }
}

/// A configuration or input the trainer cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    #[error("population {0} is out of range: expected 1..=2^24 mirrored pairs")]
    Population(usize),
    #[error("batch size {0} is out of range: expected at least 1")]
    BatchSize(usize),
    #[error(
        "batch schedule {schedule:?} of batch size {batch} is not usable: expected constant, \
         linear or cosine, with a final batch of 1..={max} images"
    )]
    BatchSchedule {
        schedule: Schedule,
        batch: usize,
        max: usize,
    },
    #[error("{what} is {value}: expected a finite number {expected}")]
    Hyperparameter {
        what: &'static str,
        value: f32,
        expected: &'static str,
    },
    #[error("dataset has {images} pixels for {labels} labels: expected {inputs} pixels per label")]
    DatasetShape {
        images: usize,
        labels: usize,
        inputs: usize,
    },
    #[error("dataset is empty: expected at least one image")]
    EmptyDataset,
    #[error("label {label} of image {index} is out of range: expected 0..{classes}")]
    Label {
        index: usize,
        label: u8,
        classes: usize,
    },
    #[error("{got} fitness pairs for population {population}: expected one per perturbation")]
    PairCount { got: usize, population: usize },
    #[error("{got} {what} multipliers for {layers} layers: expected one per layer (or none)")]
    Multipliers {
        what: &'static str,
        got: usize,
        layers: usize,
    },
    #[error("parameter vector has {got} values: expected {expected}")]
    ThetaLength { got: usize, expected: usize },
    #[error("gradient sums have {got} values: expected one per parameter, {expected}")]
    GradientLength { got: usize, expected: usize },
    #[error("parameter range {start}..{end} is not within θ: expected a range inside 0..{dim}")]
    ParamRange {
        start: usize,
        end: usize,
        dim: usize,
    },
    #[error(
        "running average of θ has {got} values: expected {expected} (a run with an average \
         decay keeps one from its start)"
    )]
    AverageLength { got: usize, expected: usize },
    #[error("{got} layer populations for {layers} layers: expected one per layer (or none)")]
    LayerPopulationCount { got: usize, layers: usize },
    #[error(
        "layer populations {populations:?} sum to {sum}: expected the population, {population}"
    )]
    LayerPopulationSum {
        populations: Vec<usize>,
        sum: usize,
        population: usize,
    },
    #[error(
        "neuron groups {groups:?} need layer populations: expected one population per layer too"
    )]
    NeuronGroupsWithoutLayerPopulations { groups: Vec<usize> },
    #[error("{got} neuron groups for {layers} layers: expected one per layer (or none)")]
    NeuronGroupCount { got: usize, layers: usize },
    #[error(
        "layer {layer} has {groups} neuron groups: expected 1 to its {neurons} neurons, \
         dividing its {pairs} pairs"
    )]
    NeuronGroups {
        layer: usize,
        groups: usize,
        neurons: usize,
        pairs: usize,
    },
    #[error(
        "image shift {shift} needs square images wider than {shift} pixels: the network has \
         {inputs} inputs"
    )]
    ImageShift { shift: usize, inputs: usize },
}

impl EsConfig {
    /// Checks the hyperparameters against the network they will train.
    pub fn validate_for(&self, net: &NetConfig) -> Result<(), TrainError> {
        self.validate()?;
        for (what, list) in [
            ("sigma", &self.sigma_multipliers),
            ("lr", &self.lr_multipliers),
        ] {
            if !list.is_empty() && list.len() != net.layers() {
                return Err(TrainError::Multipliers {
                    what,
                    got: list.len(),
                    layers: net.layers(),
                });
            }
            if let Some(&value) = list.iter().find(|m| !(m.is_finite() && **m >= 0.0)) {
                return Err(TrainError::Hyperparameter {
                    what: if what == "sigma" {
                        "a sigma multiplier"
                    } else {
                        "an lr multiplier"
                    },
                    value,
                    expected: ">= 0",
                });
            }
        }
        let populations = &self.layer_populations;
        if !populations.is_empty() && populations.len() != net.layers() {
            return Err(TrainError::LayerPopulationCount {
                got: populations.len(),
                layers: net.layers(),
            });
        }
        let groups = &self.neuron_groups;
        if !groups.is_empty() {
            if populations.is_empty() {
                return Err(TrainError::NeuronGroupsWithoutLayerPopulations {
                    groups: groups.clone(),
                });
            }
            if groups.len() != net.layers() {
                return Err(TrainError::NeuronGroupCount {
                    got: groups.len(),
                    layers: net.layers(),
                });
            }
            let widths = net.widths();
            for (l, (&g, &pairs)) in groups.iter().zip(populations).enumerate() {
                let neurons = widths[l + 1];
                if g == 0 || g > neurons || pairs % g != 0 {
                    return Err(TrainError::NeuronGroups {
                        layer: l + 1,
                        groups: g,
                        neurons,
                        pairs,
                    });
                }
            }
        }
        if self.image_shift > 0
            && square_side(net.inputs).is_none_or(|side| side <= self.image_shift)
        {
            return Err(TrainError::ImageShift {
                shift: self.image_shift,
                inputs: net.inputs,
            });
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.population == 0 || self.population > crate::seeds::INDEX_LIMIT as usize {
            return Err(TrainError::Population(self.population));
        }
        if self.batch_size == 0 {
            return Err(TrainError::BatchSize(self.batch_size));
        }
        let final_batch = match self.batch_schedule {
            Schedule::Constant => Some(self.batch_size as f64),
            Schedule::Linear { final_fraction, .. } | Schedule::Cosine { final_fraction, .. } => {
                Some(self.batch_size as f64 * final_fraction)
            }
            // A step schedule has no last value: its batch would grow or shrink without end.
            Schedule::Step { .. } => None,
        };
        if !final_batch.is_some_and(|b| (1.0..=MAX_BATCH as f64).contains(&b)) {
            return Err(TrainError::BatchSchedule {
                schedule: self.batch_schedule,
                batch: self.batch_size,
                max: MAX_BATCH,
            });
        }
        if !self.layer_populations.is_empty() {
            // Each term is at most `population` once the sum matches, so the sum cannot
            // overflow unless it is already wrong.
            let sum = self
                .layer_populations
                .iter()
                .try_fold(0usize, |a, &p| a.checked_add(p))
                .unwrap_or(usize::MAX);
            if sum != self.population {
                return Err(TrainError::LayerPopulationSum {
                    populations: self.layer_populations.clone(),
                    sum,
                    population: self.population,
                });
            }
        }
        let checks = [
            ("sigma", self.sigma, self.sigma > 0.0, "> 0"),
            ("learning rate", self.lr, self.lr > 0.0, "> 0"),
            ("l2", self.l2, self.l2 >= 0.0, ">= 0"),
            (
                "average decay",
                self.average_decay,
                (0.0..1.0).contains(&self.average_decay),
                "in [0, 1)",
            ),
        ];
        for (what, value, ok, expected) in checks {
            if !(value.is_finite() && ok) {
                return Err(TrainError::Hyperparameter {
                    what,
                    value,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// σ of each layer at generation `t`: `sigma_schedule(σ, t) · init_std_l · multiplier_l`.
    pub fn layer_sigmas(&self, net: &NetConfig, t: u32) -> Vec<f32> {
        let sigma = self.sigma_schedule.value(self.sigma, t as u64);
        (0..net.layers())
            .map(|l| sigma * init_std(net, l) * multiplier(&self.sigma_multipliers, l))
            .collect()
    }

    /// The multiplier of Adam's step for layer `l`.
    pub fn lr_multiplier(&self, l: usize) -> f32 {
        multiplier(&self.lr_multipliers, l)
    }

    pub fn lr_at(&self, t: u32) -> f32 {
        self.lr_schedule.value(self.lr, t as u64)
    }

    /// The generation whose evaluation a worker proves before it gets work
    /// ([`golden_task`]): 0, or with a batch schedule the generation where the schedule ends,
    /// so that a peer that does not apply the schedule (one that predates it) draws another
    /// minibatch there and is refused.
    pub fn golden_generation(&self) -> u32 {
        match self.batch_schedule {
            Schedule::Linear { over, .. } | Schedule::Cosine { over, .. } => {
                over.min(u32::MAX as u64) as u32
            }
            Schedule::Constant | Schedule::Step { .. } => 0,
        }
    }

    /// Training images in generation `t`'s minibatch: `batch_schedule(batch_size, t)`, rounded
    /// to the nearest integer (the schedule's operations are exact or pure Rust, so every
    /// machine draws the same size).
    pub fn batch_at(&self, t: u32) -> usize {
        let value = self.batch_schedule.value(self.batch_size as f32, t as u64);
        (value.round() as usize).clamp(1, MAX_BATCH)
    }

    /// How generation `t` perturbs θ: each layer's σ, and which parameters each pair moves.
    pub fn perturbation(&self, net: &NetConfig, t: u32) -> Perturbation {
        Perturbation {
            layer_sigmas: self.layer_sigmas(net, t),
            layer_populations: self.layer_populations.clone(),
            neuron_groups: self.neuron_groups.clone(),
            layer_widths: net.widths()[1..].to_vec(),
        }
    }

    /// The pairs of each layer ([`EsConfig::layer_populations`]), or one range of all pairs
    /// when every pair perturbs every layer: the fitnesses ranked together.
    pub fn layer_pairs(&self) -> Vec<Range<usize>> {
        if self.layer_populations.is_empty() {
            return std::iter::once(0..self.population).collect();
        }
        let mut first = 0;
        self.layer_populations
            .iter()
            .map(|&p| {
                first += p;
                first - p..first
            })
            .collect()
    }

    /// Layer `l`'s neuron groups (1 without [`EsConfig::neuron_groups`]).
    fn groups(&self, l: usize) -> usize {
        groups_of(&self.neuron_groups, l)
    }

    /// Pairs moving each parameter of layer `l` (every pair without layer populations).
    fn pairs_per_parameter(&self, l: usize) -> usize {
        match self.layer_populations.get(l) {
            Some(&p) => p / self.groups(l),
            None => self.population,
        }
    }

    /// How the update splits θ and the pairs: each segment's gradient is the weighted sum of
    /// its own pairs' noise over its own parameters.
    pub fn segments(&self, layout: &ParamLayout) -> Vec<Segment> {
        if self.layer_populations.is_empty() {
            return vec![Segment {
                params: std::iter::once(0..layout.len()).collect(),
                pairs: 0..self.population,
            }];
        }
        let mut segments = Vec::new();
        for (l, (layer, pairs)) in layout.layers().iter().zip(self.layer_pairs()).enumerate() {
            let groups = self.groups(l);
            let per_group = pairs.len() / groups;
            for g in 0..groups {
                let params = if groups == 1 {
                    vec![layer_range(layout, l)]
                } else {
                    group_ranges(layer, group_neurons(layer.fan_out, groups, g)).collect()
                };
                let first = pairs.start + g * per_group;
                segments.push(Segment {
                    params,
                    pairs: first..first + per_group,
                });
            }
        }
        segments
    }
}

/// Layer `l`'s entry of a neuron-groups list: 1 when the list is empty.
fn groups_of(neuron_groups: &[usize], l: usize) -> usize {
    neuron_groups.get(l).copied().unwrap_or(1)
}

/// Neurons of group `g` of `groups` in a layer of `width`: equal ranges in order.
fn group_neurons(width: usize, groups: usize, g: usize) -> Range<usize> {
    width * g / groups..width * (g + 1) / groups
}

/// How many weight rows ahead a neuron group's loops over θ and its noise prefetch.
const PREFETCH_ROWS: usize = 16;

/// The ranges of θ holding `neurons`' incoming weights (one per input) and their biases.
fn group_ranges(layer: &LayerLayout, neurons: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let row = move |start: usize| start + neurons.start..start + neurons.end;
    (0..layer.fan_in)
        .map(move |k| row(layer.weights.start + k * layer.fan_out))
        .chain(std::iter::once(row(layer.bias.start)))
}

/// The ranges of θ that `scope` perturbs, with their layers.
fn scope_ranges(layout: &ParamLayout, scope: &PairScope) -> Vec<(usize, Range<usize>)> {
    scope
        .layers
        .clone()
        .flat_map(|l| match &scope.neurons {
            None => vec![(l, layer_range(layout, l))],
            Some(neurons) => group_ranges(&layout.layers()[l], neurons.clone())
                .map(|r| (l, r))
                .collect(),
        })
        .collect()
}

/// How one generation perturbs θ ([`EsConfig::perturbation`]): what an evaluator needs beyond
/// θ, the noise and the batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Perturbation {
    /// σ of each layer ([`EsConfig::layer_sigmas`]).
    pub layer_sigmas: Vec<f32>,
    /// [`EsConfig::layer_populations`].
    pub layer_populations: Vec<usize>,
    /// [`EsConfig::neuron_groups`].
    pub neuron_groups: Vec<usize>,
    /// Neurons (outputs) of each layer.
    pub layer_widths: Vec<usize>,
}

/// What one pair perturbs ([`Perturbation::scope`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairScope {
    pub layers: Range<usize>,
    /// Only these neurons' incoming weights and biases of its one layer (`None`: all).
    pub neurons: Option<Range<usize>>,
}

impl Perturbation {
    /// What pair `index` perturbs: every layer without layer populations (or past them),
    /// else the one layer whose pairs hold it, and of that layer the neurons of its group.
    pub fn scope(&self, index: u32) -> PairScope {
        let mut first = 0usize;
        for (l, &pairs) in self.layer_populations.iter().enumerate() {
            if (index as usize) < first + pairs {
                let groups = groups_of(&self.neuron_groups, l);
                let neurons = (groups > 1).then(|| {
                    let g = (index as usize - first) / (pairs / groups);
                    group_neurons(self.layer_widths[l], groups, g)
                });
                return PairScope {
                    layers: l..l + 1,
                    neurons,
                };
            }
            first += pairs;
        }
        PairScope {
            layers: 0..self.layer_sigmas.len(),
            neurons: None,
        }
    }
}

impl Perturbation {
    /// Asks `prefix` to keep, for each layer after one with neuron groups, θ's running sums
    /// at each group's first neuron past 0, so that the group's pairs resume them instead of
    /// running the whole next layer ([`Forward::evaluate_group`]); other layers keep none.
    pub fn keep_group_sums(&self, prefix: &mut Prefix) {
        for l in 1..self.layer_widths.len() {
            let before = l - 1;
            let groups = groups_of(&self.neuron_groups, before);
            let pairs = self.layer_populations.get(before).copied().unwrap_or(0);
            let at: Vec<usize> = if groups > 1 && pairs > 0 {
                (1..groups)
                    .map(|g| group_neurons(self.layer_widths[before], groups, g).start)
                    .collect()
            } else {
                Vec::new()
            };
            prefix.keep_running_sums(l, &at);
        }
    }

    /// The end of the run of pairs from `index` (up to `end`) that
    /// [`Evaluator::evaluate_pairs`] evaluates in one pass: pairs of the same neuron group,
    /// as many as give at most [`MAX_COPY_COLUMNS`] columns; only `index` outside groups.
    pub fn group_run(&self, index: u32, end: u32) -> u32 {
        let scope = self.scope(index);
        let Some(neurons) = &scope.neurons else {
            return index + 1;
        };
        let most = (MAX_COPY_COLUMNS / (2 * neurons.len())).max(1) as u32;
        let mut stop = index + 1;
        while stop < end && stop - index < most && self.scope(stop) == scope {
            stop += 1;
        }
        stop
    }
}

/// The widest pass of a neuron group's perturbed copies ([`Perturbation::group_run`]): wide
/// enough to fill whole vectors for narrow groups, narrow enough that the copies' weights
/// of one input stay a few cache lines.
pub const MAX_COPY_COLUMNS: usize = 256;

impl PairScope {
    /// Whether the pair can start from θ's [`Prefix`] instead of the first layer.
    fn uses_prefix(&self) -> bool {
        self.layers.start > 0 || self.neurons.is_some()
    }
}

/// Layer `l`'s parameters: `buffer`'s where the layer is `perturbed`, else `theta`'s.
fn layer_of<'a>(
    layout: &ParamLayout,
    perturbed: &Range<usize>,
    buffer: &'a [f32],
    theta: &'a [f32],
    l: usize,
) -> &'a [f32] {
    let source = if perturbed.contains(&l) {
        buffer
    } else {
        theta
    };
    &source[layer_range(layout, l)]
}

/// `θ + σε` and `θ − σε` of pair `index` as whole parameter vectors: what
/// [`Evaluator::evaluate_pair`] evaluates, written out.
pub fn pair_vectors(
    theta: &[f32],
    eps: &[f32],
    perturbation: &Perturbation,
    layout: &ParamLayout,
    index: u32,
) -> (Vec<f32>, Vec<f32>) {
    let (mut plus, mut minus) = (theta.to_vec(), theta.to_vec());
    for (l, r) in scope_ranges(layout, &perturbation.scope(index)) {
        let sigma = perturbation.layer_sigmas[l];
        perturb(
            &theta[r.clone()],
            &eps[r.clone()],
            sigma,
            &mut plus[r.clone()],
            &mut minus[r],
        );
    }
    (plus, minus)
}

/// Ranges of θ and the range of pairs whose noise moves them (see [`EsConfig::segments`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub params: Vec<Range<usize>>,
    pub pairs: Range<usize>,
}

fn multiplier(list: &[f32], l: usize) -> f32 {
    if list.is_empty() { 1.0 } else { list[l] }
}

/// Images and labels held elsewhere (the data crate owns the files).
#[derive(Clone, Copy, Debug)]
pub struct Dataset<'a> {
    /// `labels.len() × inputs` pixels, one image after another.
    pub images: &'a [u8],
    pub labels: &'a [u8],
}

impl Dataset<'_> {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Checks the shapes and labels against the network.
    pub fn validate(&self, net: &NetConfig) -> Result<(), TrainError> {
        if self.labels.is_empty() {
            return Err(TrainError::EmptyDataset);
        }
        if self.images.len() != self.labels.len() * net.inputs {
            return Err(TrainError::DatasetShape {
                images: self.images.len(),
                labels: self.labels.len(),
                inputs: net.inputs,
            });
        }
        if let Some((index, &label)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= net.outputs)
        {
            return Err(TrainError::Label {
                index,
                label,
                classes: net.outputs,
            });
        }
        Ok(())
    }
}

/// The fitnesses of one perturbation, as returned by an evaluator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairResult {
    pub index: u32,
    pub plus: Evaluation,
    pub minus: Evaluation,
}

impl PairResult {
    pub fn fitness(&self) -> PairFitness {
        PairFitness {
            plus: self.plus.fitness,
            minus: self.minus.fitness,
        }
    }
}

/// Evaluates mirrored perturbations of θ on one thread, reusing its buffers: after the first
/// call it does not allocate.
#[derive(Clone, Debug)]
pub struct Evaluator {
    forward: Forward,
    layout: ParamLayout,
    /// θ + σε and θ − σε in the perturbed layers' ranges (pairs of whole layers); the rest
    /// is stale.
    plus: Vec<f32>,
    minus: Vec<f32>,
    noise_scratch: Vec<f32>,
    /// θ's prefix when a pair that needs one comes without it.
    own_prefix: Prefix,
    /// A neuron group's perturbed copies side by side ([`GroupCopies`]), rows padded so the
    /// kernel's walk down them stays in cache (`es_kernel::kernels::padded_stride`).
    copy_weights: PaddedWeights,
    copy_bias: Vec<f32>,
    evaluations: Vec<Evaluation>,
}

impl Evaluator {
    pub fn new(net: NetConfig, kernel: Kernel) -> Result<Evaluator, ConfigError> {
        let forward = Forward::new(net, kernel)?;
        let dim = forward.layout().len();
        Ok(Evaluator {
            layout: forward.layout().clone(),
            forward,
            plus: vec![0.0; dim],
            minus: vec![0.0; dim],
            noise_scratch: Vec::new(),
            own_prefix: Prefix::new(),
            copy_weights: PaddedWeights::new(),
            copy_bias: Vec::new(),
            evaluations: Vec::new(),
        })
    }

    pub fn forward(&mut self) -> &mut Forward {
        &mut self.forward
    }

    /// Fitness of `θ + σε_i` and `θ − σε_i` on `batch`, with `σ` per layer, where `ε_i` is
    /// zero outside what pair `i` perturbs ([`Perturbation::scope`]): the fitnesses of
    /// [`pair_vectors`].
    ///
    /// `prefix`, if given, must be θ's prefix on `batch` ([`Forward::prefix`]): a pair that
    /// leaves the first layers alone then starts after them, and a pair of a neuron group runs
    /// only the group's neurons of its layer. The fitnesses are the same bits either way.
    pub fn evaluate_pair(
        &mut self,
        theta: &[f32],
        noise: &NoiseSource,
        key: NoiseKey,
        perturbation: &Perturbation,
        prefix: Option<&Prefix>,
        batch: &Batch,
    ) -> Result<PairResult, NoiseError> {
        let mut results = Vec::with_capacity(1);
        self.evaluate_pairs(
            theta,
            noise,
            key,
            1,
            perturbation,
            prefix,
            batch,
            &mut results,
        )?;
        Ok(results.pop().expect("one pair evaluated"))
    }

    /// [`Evaluator::evaluate_pair`] for the `count` pairs from `first.index` on, appended to
    /// `out` in index order: the same bits as one at a time. When they are pairs of one
    /// neuron group ([`Perturbation::group_run`]) and a prefix serves them, all `2 · count`
    /// perturbed copies of the group share one pass over its inputs
    /// ([`Forward::evaluate_group_copies`]).
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_pairs(
        &mut self,
        theta: &[f32],
        noise: &NoiseSource,
        first: NoiseKey,
        count: u32,
        perturbation: &Perturbation,
        prefix: Option<&Prefix>,
        batch: &Batch,
        out: &mut Vec<PairResult>,
    ) -> Result<(), NoiseError> {
        let scope = perturbation.scope(first.index);
        let dim = self.layout.len();
        assert_eq!(theta.len(), dim, "parameter vector length");
        if matches!(noise, NoiseSource::Stream) && self.noise_scratch.len() < dim {
            self.noise_scratch.resize(dim, 0.0);
        }
        let keys = (first.index..first.index + count).map(|index| NoiseKey { index, ..first });
        if scope.uses_prefix() && prefix.is_none() {
            self.forward.prefix(theta, batch, &mut self.own_prefix);
        }
        let prefix = match scope.uses_prefix() {
            true => Some(prefix.unwrap_or(&self.own_prefix)),
            false => None,
        };
        if let (Some(neurons), Some(prefix)) = (&scope.neurons, prefix) {
            assert!(
                keys.clone()
                    .all(|key| perturbation.scope(key.index) == scope),
                "pairs {}..{} are not all of one neuron group",
                first.index,
                first.index + count
            );
            // Copy 2c is pair c's θ + σε, copy 2c + 1 its θ − σε.
            let l = scope.layers.start;
            let layer = &self.layout.layers()[l];
            let width = neurons.len();
            let columns = 2 * count as usize * width;
            self.copy_weights.reset(layer.fan_in, columns);
            self.copy_bias.resize(columns, 0.0);
            for (c, key) in keys.clone().enumerate() {
                let eps = noise.perturbation(key, dim, &mut self.noise_scratch)?;
                let copy = GroupCopy {
                    sigma: perturbation.layer_sigmas[l],
                    at: 2 * c * width,
                };
                copy.pack(
                    layer,
                    neurons,
                    theta,
                    eps,
                    &mut self.copy_weights,
                    &mut self.copy_bias,
                );
            }
            let copies = GroupCopies {
                layer: l,
                neurons: neurons.clone(),
                copies: 2 * count as usize,
                weights: self.copy_weights.weights(),
                bias: &self.copy_bias,
            };
            self.evaluations.clear();
            self.forward.evaluate_group_copies(
                theta,
                &copies,
                prefix,
                batch,
                &mut self.evaluations,
            );
            let mut evaluations = self.evaluations.drain(..);
            for key in keys {
                let plus = evaluations.next().expect("two evaluations per pair");
                let minus = evaluations.next().expect("two evaluations per pair");
                out.push(PairResult {
                    index: key.index,
                    plus,
                    minus,
                });
            }
            return Ok(());
        }
        for key in keys {
            let eps = noise.perturbation(key, dim, &mut self.noise_scratch)?;
            let perturbed = scope.layers.clone();
            for l in perturbed.clone() {
                let range = layer_range(&self.layout, l);
                perturb(
                    &theta[range.clone()],
                    &eps[range.clone()],
                    perturbation.layer_sigmas[l],
                    &mut self.plus[range.clone()],
                    &mut self.minus[range],
                );
            }
            let start = if prefix.is_some() { perturbed.start } else { 0 };
            let prefix = prefix.unwrap_or(&self.own_prefix);
            let layout = &self.layout;
            let (plus_buffer, minus_buffer) = (&self.plus[..], &self.minus[..]);
            let forward = &mut self.forward;
            let mut run = |buffer: &[f32]| {
                let params = |l| layer_of(layout, &perturbed, buffer, theta, l);
                forward.evaluate_from(&params, start, prefix, batch)
            };
            let (plus, minus) = (run(plus_buffer), run(minus_buffer));
            out.push(PairResult {
                index: key.index,
                plus,
                minus,
            });
        }
        Ok(())
    }
}

/// Where one perturbed copy of a neuron group goes among [`GroupCopies`]' columns.
struct GroupCopy {
    sigma: f32,
    /// This copy's θ + σε starts at this column, its θ − σε right after it.
    at: usize,
}

impl GroupCopy {
    /// Writes `θ ± σ·ε` of the group's weights and biases into their columns.
    fn pack(
        &self,
        layer: &LayerLayout,
        neurons: &Range<usize>,
        theta: &[f32],
        eps: &[f32],
        weights: &mut PaddedWeights,
        bias: &mut [f32],
    ) {
        let width = neurons.len();
        let copy = self.at..self.at + 2 * width;
        // The group's noise is one short run per weight row, a row apart, in a table far
        // larger than the caches: each row would wait on memory (and a page walk), so the
        // rows PREFETCH_ROWS ahead are asked for while this one is formed.
        let ahead = PREFETCH_ROWS * layer.fan_out;
        for r in group_ranges(layer, neurons.clone()).take(PREFETCH_ROWS) {
            prefetch(eps, r.clone());
            prefetch(theta, r);
        }
        // The group's ranges of θ: one per weight row, then its biases.
        for (k, r) in group_ranges(layer, neurons.clone()).enumerate() {
            prefetch(eps, r.start + ahead..r.end + ahead);
            prefetch(theta, r.start + ahead..r.end + ahead);
            let row = match k < layer.fan_in {
                true => weights.row_mut(k),
                false => &mut *bias,
            };
            let (plus_row, minus_row) = row[copy.clone()].split_at_mut(width);
            perturb(&theta[r.clone()], &eps[r], self.sigma, plus_row, minus_row);
        }
    }
}

/// `plus = θ + σ·ε`, `minus = θ − σ·ε`: the product rounded, then the sum (no FMA).
fn perturb(theta: &[f32], eps: &[f32], sigma: f32, plus: &mut [f32], minus: &mut [f32]) {
    for (((&t, &e), p), m) in theta.iter().zip(eps).zip(plus).zip(minus) {
        let step = sigma * e;
        *p = t + step;
        *m = t - step;
    }
}

/// Evaluates perturbation `index` of `generation` at `theta` exactly as a worker does: that
/// generation's minibatch and sigmas. The coordinator uses it to settle two workers that
/// disagree on an index.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_index(
    evaluator: &mut Evaluator,
    es: &EsConfig,
    run_seed: u64,
    noise: &NoiseSource,
    train: Dataset<'_>,
    theta: &[f32],
    generation: u32,
    index: u32,
) -> Result<PairResult, TrainError> {
    let net = evaluator.forward.config().clone();
    es.validate_for(&net)?;
    train.validate(&net)?;
    let batch = generation_batch(es, net.inputs, run_seed, train, generation);
    let perturbation = es.perturbation(&net, generation);
    let key = NoiseKey {
        run_seed,
        generation,
        index,
    };
    Ok(evaluator.evaluate_pair(theta, noise, key, &perturbation, None, &batch)?)
}

/// Generation `generation`'s minibatch of `train`, drawn from `run_seed`.
fn generation_batch(
    es: &EsConfig,
    inputs: usize,
    run_seed: u64,
    train: Dataset<'_>,
    generation: u32,
) -> Batch {
    let mut batch = Batch::new(inputs);
    MinibatchBuilder::new().fill(es, run_seed, train, generation, &mut batch);
    batch
}

/// One evaluation of the golden task: its score and its logits.
#[derive(Clone, Debug, PartialEq)]
pub struct GoldenRun {
    pub evaluation: Evaluation,
    pub logits: Vec<f32>,
}

/// The golden task a worker proves before it gets work: θ₀ of `run_seed` (center), and
/// `θ₀ ± σε` for perturbation `index` of `generation`, on that generation's minibatch with its
/// sigmas. It exercises the data, the init, the noise, the sigmas and the arithmetic, so two
/// machines that agree on it compute the same bits for every evaluation of the run.
#[allow(clippy::too_many_arguments)]
pub fn golden_task(
    net: &NetConfig,
    es: &EsConfig,
    run_seed: u64,
    noise: &NoiseSource,
    train: Dataset<'_>,
    generation: u32,
    index: u32,
    kernel: Kernel,
) -> Result<[GoldenRun; 3], TrainError> {
    net.validate()?;
    es.validate_for(net)?;
    train.validate(net)?;
    let theta = init_params(net, run_seed);
    let layout = ParamLayout::new(net);
    let key = NoiseKey {
        run_seed,
        generation,
        index,
    };
    let mut scratch = Vec::new();
    if matches!(noise, NoiseSource::Stream) {
        scratch.resize(layout.len(), 0.0);
    }
    let eps = noise.perturbation(key, layout.len(), &mut scratch)?;
    // θ₀ ± σε written out, with the same operations as a worker's evaluation.
    let perturbation = es.perturbation(net, generation);
    let (plus, minus) = pair_vectors(&theta, eps, &perturbation, &layout, index);
    let batch = generation_batch(es, net.inputs, run_seed, train, generation);
    let classes = net.outputs;
    let forward = &mut Forward::new(net.clone(), kernel)?;
    let run = |params: &[f32], forward: &mut Forward| {
        let logits = forward.logits(params, &batch).to_vec();
        let evaluation = Evaluation::from_logits(&logits, batch.labels(), classes);
        GoldenRun { evaluation, logits }
    };
    let center = run(&theta, forward);
    let plus = run(&plus, forward);
    let minus = run(&minus, forward);
    Ok([center, plus, minus])
}

/// A set of evaluators, one per thread, that evaluates many perturbations in parallel.
#[derive(Debug)]
pub struct EvalPool {
    evaluators: Vec<Evaluator>,
    /// θ's prefix on the batch of the last call that needed one.
    prefix: Prefix,
}

impl EvalPool {
    pub fn new(net: &NetConfig, kernel: Kernel, threads: usize) -> Result<EvalPool, ConfigError> {
        let evaluators = (0..threads.max(1))
            .map(|_| Evaluator::new(net.clone(), kernel))
            .collect::<Result<_, _>>()?;
        Ok(EvalPool {
            evaluators,
            prefix: Prefix::new(),
        })
    }

    pub fn threads(&self) -> usize {
        self.evaluators.len()
    }

    /// Evaluates perturbations `indices` of generation `generation`; results in index order.
    /// Pairs that leave layer 1 alone ([`Perturbation::scope`]) start from θ's
    /// activations, computed once here, and pairs of a neuron group resume θ's running sums
    /// of the next layer ([`Perturbation::keep_group_sums`]). Each thread takes the pairs of
    /// one group in runs ([`Perturbation::group_run`]), evaluated in one pass.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &mut self,
        theta: &[f32],
        noise: &NoiseSource,
        run_seed: u64,
        generation: u32,
        perturbation: &Perturbation,
        batch: &Batch,
        indices: Range<u32>,
    ) -> Result<Vec<PairResult>, NoiseError> {
        let prefix = if indices.clone().any(|i| perturbation.scope(i).uses_prefix()) {
            perturbation.keep_group_sums(&mut self.prefix);
            self.evaluators[0]
                .forward
                .prefix(theta, batch, &mut self.prefix);
            Some(&self.prefix)
        } else {
            None
        };
        let next = Mutex::new(indices.start);
        let end = indices.end;
        let results = Mutex::new(Vec::with_capacity(indices.len()));
        let failure = Mutex::new(None);
        std::thread::scope(|scope| {
            for evaluator in &mut self.evaluators {
                let (next, results, failure) = (&next, &results, &failure);
                scope.spawn(move || {
                    let mut local = Vec::new();
                    loop {
                        // The next run of pairs one pass evaluates together.
                        let run = {
                            let mut next = next.lock().expect("no panics while locked");
                            let start = *next;
                            *next = match start < end {
                                true => perturbation.group_run(start, end),
                                false => end,
                            };
                            start..*next
                        };
                        if run.is_empty() {
                            break;
                        }
                        let first = NoiseKey {
                            run_seed,
                            generation,
                            index: run.start,
                        };
                        let evaluated = evaluator.evaluate_pairs(
                            theta,
                            noise,
                            first,
                            run.len() as u32,
                            perturbation,
                            prefix,
                            batch,
                            &mut local,
                        );
                        if let Err(e) = evaluated {
                            *failure.lock().expect("no panics while locked") = Some(e);
                            *next.lock().expect("no panics while locked") = end;
                            break;
                        }
                    }
                    results
                        .lock()
                        .expect("no panics while locked")
                        .extend(local);
                });
            }
        });
        if let Some(e) = failure.into_inner().expect("threads joined") {
            return Err(e);
        }
        let mut results = results.into_inner().expect("threads joined");
        results.sort_by_key(|r| r.index);
        Ok(results)
    }

    /// θ's fitness and accuracy on a whole dataset, split across the pool's threads.
    pub fn evaluate_dataset(&mut self, theta: &[f32], data: Dataset<'_>) -> Evaluation {
        const CHUNK: usize = 1000;
        let inputs = self.evaluators[0].forward.config().inputs;
        let classes = self.evaluators[0].forward.config().outputs;
        let chunks = data.len().div_ceil(CHUNK);
        let next = AtomicUsize::new(0);
        let totals = Mutex::new(Vec::with_capacity(chunks));
        std::thread::scope(|scope| {
            for evaluator in &mut self.evaluators {
                let (next, totals) = (&next, &totals);
                scope.spawn(move || {
                    let mut batch = Batch::new(inputs);
                    loop {
                        let c = next.fetch_add(1, Ordering::Relaxed);
                        if c >= chunks {
                            break;
                        }
                        let range = c * CHUNK..((c + 1) * CHUNK).min(data.len());
                        let indices: Vec<usize> = range.collect();
                        batch.fill(data.images, data.labels, &indices);
                        let logits = evaluator.forward.logits(theta, &batch);
                        let e = Evaluation::from_logits(logits, batch.labels(), classes);
                        totals.lock().expect("no panics while locked").push((c, e));
                    }
                });
            }
        });
        // Combine in chunk order so the mean does not depend on thread timing.
        let mut totals = totals.into_inner().expect("threads joined");
        totals.sort_by_key(|(c, _)| *c);
        let (mut loss, mut correct) = (0.0, 0);
        for (_, e) in &totals {
            loss += -e.fitness * e.samples as f64;
            correct += e.correct;
        }
        Evaluation {
            fitness: -loss / data.len().max(1) as f64,
            correct,
            samples: data.len(),
        }
    }
}

/// θ and the optimizer: the state a run carries from one generation to the next.
#[derive(Clone, Debug, PartialEq)]
pub struct EsState {
    /// The next generation to run (generations done so far).
    pub generation: u32,
    pub theta: Vec<f32>,
    pub adam: Adam,
    /// The running average θ̄ of θ ([`EsConfig::average_decay`]); empty when the run keeps
    /// none.
    pub average: Vec<f32>,
}

impl EsState {
    /// Generation 0: θ₀ from `run_seed`, Adam at rest, the average (if kept) θ₀.
    pub fn new(net: &NetConfig, es: &EsConfig, run_seed: u64) -> EsState {
        let theta = init_params(net, run_seed);
        let adam = Adam::new(es.adam, theta.len());
        let average = match es.average_decay > 0.0 {
            true => theta.clone(),
            false => Vec::new(),
        };
        EsState {
            generation: 0,
            theta,
            adam,
            average,
        }
    }

    /// The parameters the run reports, evaluates, writes and exports: θ̄ when it keeps an
    /// average, else θ.
    pub fn model(&self) -> &[f32] {
        match self.average.is_empty() {
            true => &self.theta,
            false => &self.average,
        }
    }

    /// [`EsState::model`], taken out of the state.
    pub fn into_model(self) -> Vec<f32> {
        match self.average.is_empty() {
            true => self.theta,
            false => self.average,
        }
    }
}

/// One step of the running average: `average ← average + (1 − decay)·(theta − average)`,
/// each operation rounded on its own (the same bits on every machine).
pub fn update_average(average: &mut [f32], theta: &[f32], decay: f32) {
    let rate = 1.0 - decay;
    for (a, &t) in average.iter_mut().zip(theta) {
        *a += rate * (t - *a);
    }
}

/// What one update did, for the logs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateStats {
    /// ‖g‖ of the gradient estimate.
    pub grad_norm: f64,
    /// ‖θ‖ after the step.
    pub theta_norm: f64,
    /// The learning rate used.
    pub lr: f32,
}

/// Parameters per block of the update: 16 KiB of g stays in L1 while the P noise windows of
/// the block stream through it, each read once per generation.
const UPDATE_BLOCK: usize = 4096;

/// Applies generation `state.generation`'s update from its fitness pairs (index order) and
/// advances the state to the next generation. Parallel over parameter blocks on `threads`
/// threads; the result does not depend on `threads`.
///
/// It is [`update_weights`], then [`noise_sums`] over all of θ, then [`finish_update`]: a
/// cluster computes the middle part in slices on its workers, with the same bits.
pub fn apply_update(
    state: &mut EsState,
    net: &NetConfig,
    es: &EsConfig,
    noise: &NoiseSource,
    run_seed: u64,
    pairs: &[PairFitness],
    threads: usize,
) -> Result<UpdateStats, TrainError> {
    let weights = update_weights(es, pairs)?;
    let dim = ParamLayout::new(net).len();
    let g = noise_sums(
        net,
        es,
        noise,
        run_seed,
        state.generation,
        &weights,
        0..dim,
        threads,
    )?;
    finish_update(state, net, es, g, threads)
}

/// The weight of each perturbation `ε_i` in a generation's gradient estimate, from its
/// fitness pairs in index order: `r⁺_i − r⁻_i`, where each layer's pairs are ranked among
/// themselves (perturbing different layers moves the loss by different amounts, and one
/// layer's pairs must not outrank another's).
pub fn update_weights(es: &EsConfig, pairs: &[PairFitness]) -> Result<Vec<f32>, TrainError> {
    if pairs.len() != es.population {
        return Err(TrainError::PairCount {
            got: pairs.len(),
            population: es.population,
        });
    }
    let mut weights = Vec::with_capacity(pairs.len());
    for layer_pairs in es.layer_pairs() {
        if !layer_pairs.is_empty() {
            weights.extend(rank_weights(&pairs[layer_pairs])?);
        }
    }
    Ok(weights)
}

/// `Σ_i weights[i]·ε_i[j]` for each parameter `j` of `range`, over the pairs of generation
/// `generation` that perturb `j` (all of them, or those of its layer and neuron group), in
/// index order, each product and sum rounded in f32; 0 where no pair perturbs `j`. Not yet
/// divided by 2P: that is [`finish_update`]'s.
///
/// Every element is summed on its own, so a slice of θ gets exactly the bits of the same
/// elements in the whole vector: workers can each compute a slice. Parallel over parameter
/// blocks on `threads` threads. A table source reads each window's part in `range` once; a
/// stream source must regenerate every ε_i in full, whatever the range.
#[allow(clippy::too_many_arguments)] // the generation's inputs, each its own thing
pub fn noise_sums(
    net: &NetConfig,
    es: &EsConfig,
    noise: &NoiseSource,
    run_seed: u64,
    generation: u32,
    weights: &[f32],
    range: Range<usize>,
    threads: usize,
) -> Result<Vec<f32>, TrainError> {
    let layout = ParamLayout::new(net);
    let dim = layout.len();
    if weights.len() != es.population {
        return Err(TrainError::PairCount {
            got: weights.len(),
            population: es.population,
        });
    }
    if range.start > range.end || range.end > dim {
        return Err(TrainError::ParamRange {
            start: range.start,
            end: range.end,
            dim,
        });
    }
    noise.check_dim(dim)?;
    es.validate_for(net)?;
    let segments = es.segments(&layout);
    let keys = |i: usize| NoiseKey {
        run_seed,
        generation,
        index: i as u32,
    };
    let mut g = vec![0.0f32; range.len()];
    match noise {
        NoiseSource::Table(_) => {
            // A table hands out borrowed windows and never touches the scratch.
            let windows: Vec<&[f32]> = (0..weights.len())
                .map(|i| noise.perturbation(keys(i), dim, &mut []))
                .collect::<Result<_, _>>()?;
            for_pieces(&mut pieces(&mut g, &range, &segments), threads, |piece| {
                let pairs = piece.pairs.clone();
                let slices: Vec<&[f32]> = windows[pairs.clone()]
                    .iter()
                    .map(|w| &w[piece.at..])
                    .collect();
                accumulate_weighted(piece.g, &weights[pairs], &slices);
            });
        }
        NoiseSource::Stream => {
            // Regenerate ε in groups (in parallel), then add each group in index order.
            let group = threads.max(1) * 2;
            let mut buffers = vec![vec![0.0f32; dim]; group];
            let mut pieces = pieces(&mut g, &range, &segments);
            for first in (0..weights.len()).step_by(group) {
                let count = group.min(weights.len() - first);
                std::thread::scope(|scope| {
                    let handles: Vec<_> = buffers[..count]
                        .iter_mut()
                        .enumerate()
                        .map(|(j, buf)| {
                            scope.spawn(move || {
                                noise.perturbation(keys(first + j), dim, buf).map(|_| ())
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .try_for_each(|h| h.join().expect("noise generation does not panic"))
                })?;
                let buffers = &buffers;
                for_pieces(&mut pieces, threads, |piece| {
                    // The pairs of this group that move this piece, in index order.
                    let from = piece.pairs.start.max(first);
                    let to = piece.pairs.end.min(first + count);
                    if from < to {
                        let slices: Vec<&[f32]> = buffers[from - first..to - first]
                            .iter()
                            .map(|b| &b[piece.at..])
                            .collect();
                        accumulate_weighted(piece.g, &weights[from..to], &slices);
                    }
                });
            }
        }
    }
    Ok(g)
}

/// Finishes generation `state.generation`'s update from `g`, the [`noise_sums`] of all of θ:
/// divides each layer's sums by its 2P, steps Adam (and the running average, if the run keeps
/// one) and advances the state to the next generation. Parallel over parameter blocks on
/// `threads` threads; the result does not depend on `threads`.
pub fn finish_update(
    state: &mut EsState,
    net: &NetConfig,
    es: &EsConfig,
    mut g: Vec<f32>,
    threads: usize,
) -> Result<UpdateStats, TrainError> {
    let layout = ParamLayout::new(net);
    let dim = layout.len();
    if state.theta.len() != dim {
        return Err(TrainError::ThetaLength {
            got: state.theta.len(),
            expected: dim,
        });
    }
    if g.len() != dim {
        return Err(TrainError::GradientLength {
            got: g.len(),
            expected: dim,
        });
    }
    if es.average_decay > 0.0 && state.average.len() != dim {
        return Err(TrainError::AverageLength {
            got: state.average.len(),
            expected: dim,
        });
    }
    es.validate_for(net)?;
    let t = state.generation;
    let lr = es.lr_at(t);
    let step = state.adam.begin_step(lr, es.l2);
    // Per layer: its share of θ, its step and the divisor 2P of the pairs that moved it.
    let steps: Vec<(usize, AdamStep, f32)> = layout
        .layers()
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let scaled = AdamStep {
                step_size: step.step_size * es.lr_multiplier(l),
                ..step
            };
            let two_p = (2 * es.pairs_per_parameter(l).max(1)) as f32;
            (layer.bias.end - layer.weights.start, scaled, two_p)
        })
        .collect();
    let (grad_sq, theta_sq) = adam_blocks(state, &mut g, &steps, threads);
    if es.average_decay > 0.0 {
        update_average(&mut state.average, &state.theta, es.average_decay);
    }
    state.generation += 1;
    Ok(UpdateStats {
        grad_norm: grad_sq.sqrt(),
        theta_norm: theta_sq.sqrt(),
        lr,
    })
}

/// A piece of the gradient: `g` is θ's range starting at `at`, the weighted sum of the noise
/// of `pairs`.
struct Piece<'g> {
    at: usize,
    g: &'g mut [f32],
    pairs: Range<usize>,
}

/// `g`, θ's `range`, cut into the segments' ranges (those with pairs) within it, each in
/// pieces of at most `UPDATE_BLOCK`, in θ's order.
fn pieces<'g>(mut g: &'g mut [f32], range: &Range<usize>, segments: &[Segment]) -> Vec<Piece<'g>> {
    let mut ranges: Vec<(Range<usize>, Range<usize>)> = segments
        .iter()
        .filter(|s| !s.pairs.is_empty())
        .flat_map(|s| s.params.iter().map(|r| (r.clone(), s.pairs.clone())))
        .map(|(r, pairs)| (r.start.max(range.start)..r.end.min(range.end), pairs))
        .filter(|(r, _)| r.start < r.end)
        .collect();
    ranges.sort_by_key(|(r, _)| r.start);
    let mut pieces = Vec::new();
    let mut offset = range.start;
    for (params, pairs) in ranges {
        let rest = std::mem::take(&mut g);
        let (_, rest) = rest.split_at_mut(params.start - offset);
        let (this, rest) = rest.split_at_mut(params.len());
        (g, offset) = (rest, params.end);
        for (c, chunk) in this.chunks_mut(UPDATE_BLOCK).enumerate() {
            pieces.push(Piece {
                at: params.start + c * UPDATE_BLOCK,
                g: chunk,
                pairs: pairs.clone(),
            });
        }
    }
    pieces
}

/// Runs `f` on every piece on `threads` threads.
fn for_pieces(pieces: &mut [Piece<'_>], threads: usize, f: impl Fn(&mut Piece<'_>) + Sync) {
    let queue = Mutex::new(pieces.iter_mut());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().expect("no panics while locked").next();
                    match next {
                        Some(piece) => f(piece),
                        None => break,
                    }
                }
            });
        }
    });
}

/// `g /= 2P` (each layer's own P), then Adam on every block; returns ‖g‖² and the new
/// ‖θ‖², each summed in block order.
fn adam_blocks(
    state: &mut EsState,
    g: &mut [f32],
    steps: &[(usize, AdamStep, f32)],
    threads: usize,
) -> (f64, f64) {
    // Cut θ, m, v and g into per-layer segments (each with its own step), then into blocks.
    let mut blocks = Vec::new();
    let (mut theta, mut m, mut v, mut g) = (
        &mut state.theta[..],
        &mut state.adam.m[..],
        &mut state.adam.v[..],
        g,
    );
    for (len, step, two_p) in steps {
        let (t_seg, t_rest) = theta.split_at_mut(*len);
        let (m_seg, m_rest) = m.split_at_mut(*len);
        let (v_seg, v_rest) = v.split_at_mut(*len);
        let (g_seg, g_rest) = g.split_at_mut(*len);
        (theta, m, v, g) = (t_rest, m_rest, v_rest, g_rest);
        let segment = t_seg
            .chunks_mut(UPDATE_BLOCK)
            .zip(m_seg.chunks_mut(UPDATE_BLOCK))
            .zip(v_seg.chunks_mut(UPDATE_BLOCK))
            .zip(g_seg.chunks_mut(UPDATE_BLOCK))
            .map(move |(((t, m), v), g)| (step, *two_p, t, m, v, g));
        blocks.extend(segment);
    }
    let blocks: Vec<_> = blocks.into_iter().enumerate().collect();
    let sums = Mutex::new(Vec::with_capacity(blocks.len()));
    let queue = Mutex::new(blocks.into_iter());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().expect("no panics while locked").next();
                    let Some((b, (step, two_p, theta, m, v, g))) = next else {
                        break;
                    };
                    let mut sq = 0.0f64;
                    for x in g.iter_mut() {
                        *x /= two_p;
                        sq += (*x as f64) * (*x as f64);
                    }
                    step.apply(theta, m, v, g);
                    // θ's norm from the block while it is in cache, not in a serial pass.
                    let theta_sq: f64 = theta.iter().map(|&x| (x as f64) * (x as f64)).sum();
                    sums.lock()
                        .expect("no panics while locked")
                        .push((b, sq, theta_sq));
                }
            });
        }
    });
    let mut sums = sums.into_inner().expect("threads joined");
    // Block order, whatever thread summed which block: the same sums for any thread count.
    sums.sort_by_key(|(b, _, _)| *b);
    sums.iter()
        .fold((0.0, 0.0), |(g, t), (_, gs, ts)| (g + gs, t + ts))
}

/// What one generation of the single-process trainer did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerationReport {
    /// The generation just completed (0-based).
    pub generation: u32,
    pub fitness_mean: f64,
    pub fitness_max: f64,
    /// Mean accuracy of the 2P perturbed networks on the minibatch.
    pub batch_accuracy: f64,
    pub evaluations: usize,
    pub update: UpdateStats,
    /// Wall-clock seconds the update took (for monitoring only; no result depends on it).
    pub update_secs: f64,
}

/// The single-process trainer: a run's state, its noise and a pool of evaluators on all
/// cores. The coordinator's embedded mode is this.
#[derive(Debug)]
pub struct Trainer {
    net: NetConfig,
    es: EsConfig,
    run_seed: u64,
    noise: NoiseSource,
    state: EsState,
    pool: EvalPool,
    batch: Batch,
    minibatch: MinibatchBuilder,
}

impl Trainer {
    pub fn new(
        net: NetConfig,
        es: EsConfig,
        run_seed: u64,
        noise: NoiseSource,
        kernel: Kernel,
        threads: usize,
    ) -> Result<Trainer, TrainError> {
        // θ₀ needs a valid shape; `resume` checks everything else.
        net.validate()?;
        let state = EsState::new(&net, &es, run_seed);
        Trainer::resume(net, es, run_seed, noise, kernel, threads, state)
    }

    /// A trainer continuing from `state` (e.g. a checkpoint).
    pub fn resume(
        net: NetConfig,
        es: EsConfig,
        run_seed: u64,
        noise: NoiseSource,
        kernel: Kernel,
        threads: usize,
        state: EsState,
    ) -> Result<Trainer, TrainError> {
        net.validate()?;
        es.validate_for(&net)?;
        let dim = ParamLayout::new(&net).len();
        noise.check_dim(dim)?;
        if state.theta.len() != dim {
            return Err(TrainError::ThetaLength {
                got: state.theta.len(),
                expected: dim,
            });
        }
        let average = if es.average_decay > 0.0 { dim } else { 0 };
        if state.average.len() != average {
            return Err(TrainError::AverageLength {
                got: state.average.len(),
                expected: average,
            });
        }
        let pool = EvalPool::new(&net, kernel, threads)?;
        let batch = Batch::new(net.inputs);
        Ok(Trainer {
            net,
            es,
            run_seed,
            noise,
            state,
            pool,
            batch,
            minibatch: MinibatchBuilder::new(),
        })
    }

    pub fn state(&self) -> &EsState {
        &self.state
    }

    pub fn net(&self) -> &NetConfig {
        &self.net
    }

    pub fn es(&self) -> &EsConfig {
        &self.es
    }

    /// Runs generation `state.generation` on `train` and applies its update.
    pub fn step(&mut self, train: Dataset<'_>) -> Result<GenerationReport, TrainError> {
        train.validate(&self.net)?;
        let t = self.state.generation;
        self.minibatch
            .fill(&self.es, self.run_seed, train, t, &mut self.batch);
        let perturbation = self.es.perturbation(&self.net, t);
        let results = self.pool.evaluate(
            &self.state.theta,
            &self.noise,
            self.run_seed,
            t,
            &perturbation,
            &self.batch,
            0..self.es.population as u32,
        )?;
        let pairs: Vec<PairFitness> = results.iter().map(PairResult::fitness).collect();
        let update_started = std::time::Instant::now();
        let update = apply_update(
            &mut self.state,
            &self.net,
            &self.es,
            &self.noise,
            self.run_seed,
            &pairs,
            self.pool.threads(),
        )?;
        let all = results.iter().flat_map(|r| [r.plus, r.minus]);
        let n = 2 * results.len();
        let fitness_mean = all.clone().map(|e| e.fitness).sum::<f64>() / n as f64;
        let fitness_max = all
            .clone()
            .map(|e| e.fitness)
            .fold(f64::NEG_INFINITY, f64::max);
        let batch_accuracy = all.map(|e| e.accuracy()).sum::<f64>() / n as f64;
        Ok(GenerationReport {
            generation: t,
            fitness_mean,
            fitness_max,
            batch_accuracy,
            evaluations: n,
            update,
            update_secs: update_started.elapsed().as_secs_f64(),
        })
    }

    /// The model's ([`EsState::model`]: θ̄ or θ) loss and accuracy on a whole dataset (e.g.
    /// the 10,000 test images).
    pub fn evaluate(&mut self, data: Dataset<'_>) -> Result<Evaluation, TrainError> {
        data.validate(&self.net)?;
        Ok(self.pool.evaluate_dataset(self.state.model(), data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::NoiseTable;
    use crate::seeds::{Purpose, rng, uniform_below};
    use std::sync::Arc;

    /// A small network and a synthetic 2-class task whose class decides which half of the
    /// image is bright.
    fn small() -> (NetConfig, EsConfig, Vec<u8>, Vec<u8>) {
        let net = NetConfig {
            inputs: 16,
            hidden: vec![24, 24],
            outputs: 2,
            ..NetConfig::default()
        };
        let es = EsConfig {
            population: 24,
            batch_size: 32,
            sigma: 0.05,
            lr: 0.01,
            l2: 0.0,
            ..EsConfig::default()
        };
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut r = rng(5, Purpose::Test, 0, 0);
        for i in 0..256 {
            let label = (i % 2) as u8;
            for k in 0..16 {
                let bright = (k < 8) == (label == 0);
                let base = if bright { 160 } else { 0 };
                images.push(base + uniform_below(&mut r, 90) as u8);
            }
            labels.push(label);
        }
        (net, es, images, labels)
    }

    /// `small()` with pairs of their own for each layer: 10, 8 and 6 of the 24.
    fn small_layered() -> (NetConfig, EsConfig, Vec<u8>, Vec<u8>) {
        let (net, es, images, labels) = small();
        let es = EsConfig {
            layer_populations: vec![10, 8, 6],
            ..es
        };
        (net, es, images, labels)
    }

    fn table_for(net: &NetConfig) -> NoiseSource {
        let dim = ParamLayout::new(net).len();
        NoiseSource::Table(Arc::new(NoiseTable::generate(11, dim * 8)))
    }

    #[test]
    fn training_is_independent_of_thread_count_and_learns() {
        training_is_independent_of_thread_count_and_learns_with(small());
    }

    #[test]
    fn training_with_layer_populations_is_independent_of_thread_count_and_learns() {
        training_is_independent_of_thread_count_and_learns_with(small_layered());
    }

    #[test]
    fn training_with_neuron_groups_is_independent_of_thread_count_and_learns() {
        training_is_independent_of_thread_count_and_learns_with(small_grouped());
    }

    #[test]
    fn training_with_image_shift_is_independent_of_thread_count_and_learns() {
        let (net, es, images, labels) = small_grouped();
        let shifted = EsConfig {
            image_shift: 1,
            ..es.clone()
        };
        training_is_independent_of_thread_count_and_learns_with((
            net.clone(),
            shifted.clone(),
            images.clone(),
            labels.clone(),
        ));
        // The shift reaches the evaluations: the same run without it ends elsewhere.
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let states: Vec<EsState> = [es, shifted]
            .into_iter()
            .map(|es| {
                let mut trainer =
                    Trainer::new(net.clone(), es, 42, table_for(&net), Kernel::Portable, 1)
                        .unwrap();
                for _ in 0..3 {
                    trainer.step(data).unwrap();
                }
                trainer.state().clone()
            })
            .collect();
        assert_ne!(states[0].theta, states[1].theta);
    }

    #[test]
    fn a_running_average_follows_theta_and_is_what_the_trainer_evaluates() {
        let (net, es, images, labels) = small_layered();
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let averaged = EsConfig {
            average_decay: 0.9,
            ..es.clone()
        };
        // θ̄ and Adam do not depend on the thread count either.
        training_is_independent_of_thread_count_and_learns_with((
            net.clone(),
            averaged.clone(),
            images.clone(),
            labels.clone(),
        ));
        let mut trainer = Trainer::new(
            net.clone(),
            averaged,
            42,
            table_for(&net),
            Kernel::Portable,
            2,
        )
        .unwrap();
        assert_eq!(trainer.state().average, trainer.state().theta);
        let mut expected = trainer.state().theta.clone();
        // 1 − 0.9 in f32, as the update computes it (0.1000000238…, not 0.1f32).
        let rate = 1.0f32 - 0.9f32;
        for _ in 0..20 {
            trainer.step(data).unwrap();
            for (a, &t) in expected.iter_mut().zip(&trainer.state().theta) {
                *a = *a + rate * (t - *a);
            }
        }
        let state = trainer.state();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&state.average), bits(&expected));
        assert_ne!(state.average, state.theta);
        assert_eq!(state.model(), &state.average[..]);
        let average = state.average.clone();
        let theta = state.theta.clone();
        let mut pool = EvalPool::new(&net, Kernel::Portable, 1).unwrap();
        let of_average = pool.evaluate_dataset(&average, data);
        assert_eq!(trainer.evaluate(data).unwrap(), of_average);
        assert_ne!(pool.evaluate_dataset(&theta, data), of_average);
        // Without a decay the state keeps no average and the model is θ.
        let plain =
            Trainer::new(net.clone(), es, 42, table_for(&net), Kernel::Portable, 1).unwrap();
        assert!(plain.state().average.is_empty());
        assert_eq!(plain.state().model(), &plain.state().theta[..]);
    }

    #[test]
    fn an_average_decay_outside_0_to_1_is_refused() {
        let (_, es, ..) = small();
        for decay in [1.0, 1.5, -0.1, f32::NAN] {
            let e = EsConfig {
                average_decay: decay,
                ..es.clone()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("average decay"), "{decay}: {e}");
        }
    }

    #[test]
    fn an_image_shift_needs_square_images_wider_than_the_shift() {
        let (net, es, ..) = small();
        for (inputs, shift, ok) in [(16, 1, true), (16, 3, true), (16, 4, false), (15, 1, false)] {
            let net = NetConfig {
                inputs,
                ..net.clone()
            };
            let es = EsConfig {
                image_shift: shift,
                ..es.clone()
            };
            match es.validate_for(&net) {
                Ok(()) => assert!(ok, "{inputs} inputs, shift {shift} accepted"),
                Err(e) => {
                    assert!(!ok, "{inputs} inputs, shift {shift}: {e}");
                    assert!(matches!(e, TrainError::ImageShift { .. }), "{e}");
                    assert!(e.to_string().contains(&format!("{inputs} inputs")), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_peer_without_the_image_shift_fails_the_golden_task() {
        // A peer that predates the shift evaluates the unshifted images.
        let (net, es, images, labels) = small();
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let noise = table_for(&net);
        let shifted = EsConfig {
            image_shift: 1,
            ..es.clone()
        };
        let golden = |es: &EsConfig| {
            golden_task(
                &net,
                es,
                3,
                &noise,
                data,
                es.golden_generation(),
                0,
                Kernel::Portable,
            )
            .unwrap()
        };
        assert_ne!(golden(&shifted)[0], golden(&es)[0]);
    }

    fn training_is_independent_of_thread_count_and_learns_with(
        (net, es, images, labels): (NetConfig, EsConfig, Vec<u8>, Vec<u8>),
    ) {
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let mut runs = Vec::new();
        for threads in [1, 3] {
            let mut trainer = Trainer::new(
                net.clone(),
                es.clone(),
                42,
                table_for(&net),
                Kernel::Portable,
                threads,
            )
            .unwrap();
            let before = trainer.evaluate(data).unwrap();
            let mut reports = Vec::new();
            for _ in 0..60 {
                reports.push(trainer.step(data).unwrap());
            }
            let after = trainer.evaluate(data).unwrap();
            runs.push((trainer.state().clone(), before, after, reports));
        }
        assert_eq!(
            runs[0].0, runs[1].0,
            "θ and Adam bit-identical for 1 and 3 threads"
        );
        let (_, before, after, _) = &runs[0];
        assert!(
            after.fitness > before.fitness + 0.05,
            "fitness {} → {}",
            before.fitness,
            after.fitness
        );
        assert!(
            after.accuracy() > 0.9,
            "accuracy {} → {}",
            before.accuracy(),
            after.accuracy()
        );
    }

    #[test]
    fn stream_noise_is_thread_independent_too() {
        for (net, es, images, labels) in [small(), small_layered(), small_grouped()] {
            stream_noise_is_thread_independent_with(net, es, images, labels);
        }
    }

    fn stream_noise_is_thread_independent_with(
        net: NetConfig,
        es: EsConfig,
        images: Vec<u8>,
        labels: Vec<u8>,
    ) {
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let states: Vec<EsState> = [1, 2]
            .into_iter()
            .map(|threads| {
                let mut t = Trainer::new(
                    net.clone(),
                    es.clone(),
                    7,
                    NoiseSource::Stream,
                    Kernel::Portable,
                    threads,
                )
                .unwrap();
                for _ in 0..3 {
                    t.step(data).unwrap();
                }
                t.state().clone()
            })
            .collect();
        assert_eq!(states[0], states[1]);
        assert_eq!(states[0].generation, 3);
    }

    #[test]
    fn tied_fitnesses_move_nothing_but_weight_decay() {
        let (net, es, ..) = small();
        let mut state = EsState::new(&net, &es, 1);
        let before = state.theta.clone();
        let pairs = vec![
            PairFitness {
                plus: -1.0,
                minus: -1.0
            };
            es.population
        ];
        apply_update(&mut state, &net, &es, &table_for(&net), 1, &pairs, 2).unwrap();
        assert_eq!(state.theta, before, "l2 = 0 and all ties: zero step");
        let err =
            apply_update(&mut state, &net, &es, &table_for(&net), 1, &pairs[1..], 2).unwrap_err();
        assert!(
            err.to_string()
                .contains("23 fitness pairs for population 24"),
            "{err}"
        );
    }

    #[test]
    fn layer_populations_must_match_the_layers_and_the_population() {
        let (net, es, ..) = small();
        let with = |layer_populations: Vec<usize>| {
            EsConfig {
                layer_populations,
                ..es.clone()
            }
            .validate_for(&net)
        };
        with(vec![10, 8, 6]).unwrap();
        with(Vec::new()).unwrap();
        assert_eq!(
            with(vec![12, 12]).unwrap_err().to_string(),
            "2 layer populations for 3 layers: expected one per layer (or none)"
        );
        assert_eq!(
            with(vec![10, 8, 5]).unwrap_err().to_string(),
            "layer populations [10, 8, 5] sum to 23: expected the population, 24"
        );
        assert!(matches!(
            with(vec![usize::MAX, 8, 6]),
            Err(TrainError::LayerPopulationSum { .. })
        ));
    }

    /// `small()` with 12, 8 and 4 pairs per layer and neuron groups: 3 groups of 8 neurons (4
    /// pairs each) in layer 1, 4 of 6 neurons (2 pairs each) in layer 2, and 2 of 1 neuron (2
    /// pairs each) in layer 3.
    fn small_grouped() -> (NetConfig, EsConfig, Vec<u8>, Vec<u8>) {
        let (net, es, images, labels) = small();
        let es = EsConfig {
            layer_populations: vec![12, 8, 4],
            neuron_groups: vec![3, 4, 2],
            ..es
        };
        (net, es, images, labels)
    }

    #[test]
    fn a_group_run_ends_at_its_group_at_the_end_and_at_the_column_cap() {
        let (net, es, ..) = small_grouped();
        let perturbation = es.perturbation(&net, 0);
        // Layer 1: three groups of 8 neurons, 4 pairs each; layer 2: four groups of 2 pairs.
        assert_eq!(perturbation.group_run(0, 24), 4);
        assert_eq!(perturbation.group_run(1, 24), 4);
        assert_eq!(perturbation.group_run(4, 24), 8);
        assert_eq!(perturbation.group_run(4, 6), 6);
        assert_eq!(perturbation.group_run(12, 24), 14);
        assert_eq!(perturbation.group_run(23, 24), 24);
        // Without neuron groups every pair is a run of its own.
        let (net, es, ..) = small_layered();
        assert_eq!(es.perturbation(&net, 0).group_run(0, 24), 1);
        // Two groups of 64 neurons, 12 pairs each: 2 pairs (4 copies) fill 256 columns.
        let wide = EsConfig {
            layer_populations: vec![24, 0, 0],
            neuron_groups: vec![2, 1, 1],
            ..small().1
        };
        let net = NetConfig {
            hidden: vec![128, 4],
            ..small().0
        };
        wide.validate_for(&net).unwrap();
        let perturbation = wide.perturbation(&net, 0);
        assert_eq!(perturbation.scope(0).neurons, Some(0..64));
        assert_eq!(MAX_COPY_COLUMNS / (2 * 64), 2);
        assert_eq!(perturbation.group_run(0, 24), 2);
        assert_eq!(perturbation.group_run(10, 24), 12);
        assert_eq!(perturbation.group_run(11, 24), 12);
        assert_eq!(perturbation.group_run(12, 24), 14);
    }

    #[test]
    fn pairs_are_assigned_to_layers_and_neuron_groups_in_index_order() {
        let (net, es, ..) = small_layered();
        let scope = |es: &EsConfig, i| es.perturbation(&net, 0).scope(i);
        let layer = |layers, neurons| PairScope { layers, neurons };
        assert_eq!(scope(&es, 0), layer(0..1, None));
        assert_eq!(scope(&es, 9), layer(0..1, None));
        assert_eq!(scope(&es, 10), layer(1..2, None));
        assert_eq!(scope(&es, 17), layer(1..2, None));
        assert_eq!(scope(&es, 18), layer(2..3, None));
        assert_eq!(scope(&small().1, 18), layer(0..3, None));
        let (_, es, ..) = small_grouped();
        assert_eq!(scope(&es, 0), layer(0..1, Some(0..8)));
        assert_eq!(scope(&es, 5), layer(0..1, Some(8..16)));
        assert_eq!(scope(&es, 11), layer(0..1, Some(16..24)));
        assert_eq!(scope(&es, 12), layer(1..2, Some(0..6)));
        assert_eq!(scope(&es, 19), layer(1..2, Some(18..24)));
        assert_eq!(scope(&es, 21), layer(2..3, Some(0..1)));
        assert_eq!(scope(&es, 22), layer(2..3, Some(1..2)));
    }

    #[test]
    fn each_pair_moves_its_own_parameters_and_the_prefix_changes_no_bit() {
        for (net, es, images, labels) in [small_layered(), small_grouped()] {
            let data = Dataset {
                images: &images,
                labels: &labels,
            };
            let noise = table_for(&net);
            let theta = init_params(&net, 3);
            let perturbation = es.perturbation(&net, 2);
            let batch = generation_batch(&es, net.inputs, 3, data, 2);
            // The pool starts pairs past layer 1, and groups, from θ's prefix.
            let mut pool = EvalPool::new(&net, Kernel::Portable, 2).unwrap();
            let pooled = pool
                .evaluate(&theta, &noise, 3, 2, &perturbation, &batch, 0..24)
                .unwrap();
            let mut evaluator = Evaluator::new(net.clone(), Kernel::Portable).unwrap();
            let mut forward = Forward::new(net.clone(), Kernel::Portable).unwrap();
            let layout = ParamLayout::new(&net);
            for got in &pooled {
                let i = got.index;
                let key = NoiseKey {
                    run_seed: 3,
                    generation: 2,
                    index: i,
                };
                let alone = evaluator
                    .evaluate_pair(&theta, &noise, key, &perturbation, None, &batch)
                    .unwrap();
                assert_eq!(alone, *got, "pair {i} without the prefix");
                // θ ± σε on the pair's parameters, θ elsewhere, written out parameter by
                // parameter and run through the plain forward pass.
                let scope = perturbation.scope(i);
                let eps = noise.perturbation(key, layout.len(), &mut []).unwrap();
                let (mut plus, mut minus) = (theta.clone(), theta.clone());
                for l in scope.layers.clone() {
                    let layer = &layout.layers()[l];
                    let neurons = scope.neurons.clone().unwrap_or(0..layer.fan_out);
                    let sigma = perturbation.layer_sigmas[l];
                    let weights = (0..layer.fan_in).flat_map(|k| {
                        neurons
                            .clone()
                            .map(move |j| layer.weights.start + k * layer.fan_out + j)
                    });
                    let biases = neurons.clone().map(|j| layer.bias.start + j);
                    for p in weights.chain(biases) {
                        let step = sigma * eps[p];
                        (plus[p], minus[p]) = (theta[p] + step, theta[p] - step);
                    }
                }
                let changed = plus.iter().zip(&theta).filter(|(a, b)| a != b).count();
                assert!(changed > 0, "pair {i} perturbs nothing");
                assert_eq!(
                    pair_vectors(&theta, eps, &perturbation, &layout, i),
                    (plus.clone(), minus.clone()),
                    "pair {i}: pair_vectors"
                );
                assert_eq!(forward.evaluate(&plus, &batch), got.plus, "pair {i}");
                assert_eq!(forward.evaluate(&minus, &batch), got.minus, "pair {i}");
            }
        }
    }

    #[test]
    fn neuron_groups_must_fit_their_layers_and_pairs() {
        let (net, es, ..) = small_grouped();
        let with = |layer_populations: Vec<usize>, neuron_groups: Vec<usize>| {
            EsConfig {
                layer_populations,
                neuron_groups,
                ..es.clone()
            }
            .validate_for(&net)
        };
        with(vec![12, 8, 4], vec![3, 4, 2]).unwrap();
        with(vec![12, 8, 4], vec![1, 1, 1]).unwrap();
        assert_eq!(
            with(Vec::new(), vec![3, 4, 2]).unwrap_err().to_string(),
            "neuron groups [3, 4, 2] need layer populations: expected one population per layer too"
        );
        assert_eq!(
            with(vec![12, 8, 4], vec![3, 4]).unwrap_err().to_string(),
            "2 neuron groups for 3 layers: expected one per layer (or none)"
        );
        for (groups, layer) in [(vec![5, 4, 2], 1), (vec![3, 0, 2], 2), (vec![3, 4, 4], 3)] {
            let e = with(vec![12, 8, 4], groups).unwrap_err();
            assert!(
                matches!(e, TrainError::NeuronGroups { layer: l, .. } if l == layer),
                "{e}"
            );
        }
        assert_eq!(
            with(vec![12, 8, 4], vec![3, 4, 4]).unwrap_err().to_string(),
            "layer 3 has 4 neuron groups: expected 1 to its 2 neurons, dividing its 4 pairs"
        );
    }

    /// Weights of distinct magnitudes for every pair of `es`, from made-up fitnesses.
    fn some_weights(es: &EsConfig) -> Vec<f32> {
        let pairs: Vec<PairFitness> = (0..es.population)
            .map(|i| PairFitness {
                plus: -((i * 7919 % 23) as f64),
                minus: -((i * 104_729 % 31) as f64) / 3.0,
            })
            .collect();
        update_weights(es, &pairs).unwrap()
    }

    #[test]
    fn noise_sums_follow_their_definition_and_any_slices_have_the_same_bits() {
        for (name, (net, es, ..)) in [
            ("whole θ", small()),
            ("layer populations", small_layered()),
            ("neuron groups", small_grouped()),
        ] {
            let dim = ParamLayout::new(&net).len();
            let weights = some_weights(&es);
            for noise in [table_for(&net), NoiseSource::Stream] {
                let t = 3;
                let whole = noise_sums(&net, &es, &noise, 1, t, &weights, 0..dim, 2).unwrap();
                // The definition: each parameter sums the pairs of its segment in index order.
                let eps: Vec<Vec<f32>> = (0..es.population)
                    .map(|i| {
                        let key = NoiseKey {
                            run_seed: 1,
                            generation: t,
                            index: i as u32,
                        };
                        let mut buf = vec![0.0; dim];
                        noise.perturbation(key, dim, &mut buf).unwrap().to_vec()
                    })
                    .collect();
                let mut want = vec![0.0f32; dim];
                for segment in es.segments(&ParamLayout::new(&net)) {
                    for j in segment.params.iter().flat_map(|r| r.clone()) {
                        for i in segment.pairs.clone() {
                            want[j] += weights[i] * eps[i][j];
                        }
                    }
                }
                assert!(
                    whole
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: noise sums differ from their definition"
                );
                assert!(whole.iter().any(|&x| x != 0.0), "{name}: all sums are zero");
                // Cuts inside layers, at layer edges, empty and one-element slices.
                let layers = ParamLayout::new(&net).layers().to_vec();
                let mut cuts = vec![0, 1, 1, 17, layers[0].bias.start, layers[1].weights.start];
                cuts.extend([
                    layers[1].weights.start + 5,
                    layers[2].bias.start,
                    dim - 1,
                    dim,
                ]);
                cuts.sort_unstable();
                let mut sliced = Vec::with_capacity(dim);
                for cut in cuts.windows(2) {
                    let threads = 1 + cut[0] % 3;
                    let part =
                        noise_sums(&net, &es, &noise, 1, t, &weights, cut[0]..cut[1], threads)
                            .unwrap();
                    assert_eq!(part.len(), cut[1] - cut[0], "{name}: slice length");
                    sliced.extend(part);
                }
                assert!(
                    sliced
                        .iter()
                        .zip(&whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: slices differ from the whole"
                );
            }
        }
    }

    #[test]
    fn update_parts_refuse_inputs_of_the_wrong_size() {
        let (net, es, ..) = small_grouped();
        let dim = ParamLayout::new(&net).len();
        let noise = table_for(&net);
        let weights = some_weights(&es);
        let e = noise_sums(&net, &es, &noise, 1, 0, &weights[1..], 0..dim, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "23 fitness pairs for population 24: expected one per perturbation"
        );
        let e = noise_sums(&net, &es, &noise, 1, 0, &weights, 5..dim + 1, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "parameter range 5..{} is not within θ: expected a range inside 0..{dim}",
                dim + 1
            )
        );
        let mut state = EsState::new(&net, &es, 1);
        let before = state.clone();
        let e = finish_update(&mut state, &net, &es, vec![0.0; dim - 1], 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "gradient sums have {} values: expected one per parameter, {dim}",
                dim - 1
            )
        );
        assert_eq!(state, before, "a refused update changes nothing");
    }

    #[test]
    fn a_neuron_group_whose_own_pairs_tie_does_not_move() {
        let (net, es, ..) = small_grouped();
        let mut state = EsState::new(&net, &es, 1);
        let before = state.theta.clone();
        // Pairs 12 and 13 perturb neurons 0..6 of layer 2 only: they tie, the others do not.
        let pairs: Vec<PairFitness> = (0..24)
            .map(|i| PairFitness {
                plus: if i == 12 || i == 13 {
                    -1.0
                } else {
                    -(i as f64)
                },
                minus: -1.0,
            })
            .collect();
        apply_update(&mut state, &net, &es, &table_for(&net), 1, &pairs, 2).unwrap();
        let layer = ParamLayout::new(&net).layers()[1].clone();
        let moved = |p: usize| state.theta[p] != before[p];
        for j in 0..layer.fan_out {
            let params: Vec<usize> = (0..layer.fan_in)
                .map(|k| layer.weights.start + k * layer.fan_out + j)
                .chain([layer.bias.start + j])
                .collect();
            let moved = params.iter().filter(|&&p| moved(p)).count();
            let want = if j < 6 { 0 } else { params.len() };
            assert_eq!(moved, want, "neuron {j} of layer 2: parameters moved");
        }
    }

    #[test]
    fn a_layer_whose_own_pairs_tie_does_not_move() {
        let (net, es, ..) = small_layered();
        let mut state = EsState::new(&net, &es, 1);
        let before = state.theta.clone();
        // Pairs 10..18 perturb layer 2 only: they tie, and the other layers' pairs do not.
        let pairs: Vec<PairFitness> = (0..24)
            .map(|i| match i {
                10..18 => PairFitness {
                    plus: -1.0,
                    minus: -1.0,
                },
                _ => PairFitness {
                    plus: -(i as f64),
                    minus: -0.5 * i as f64,
                },
            })
            .collect();
        apply_update(&mut state, &net, &es, &table_for(&net), 1, &pairs, 2).unwrap();
        let layout = ParamLayout::new(&net);
        for l in 0..net.layers() {
            let r = layer_range(&layout, l);
            let moved = state.theta[r.clone()] != before[r];
            assert_eq!(moved, l != 1, "layer {} moved: {moved}", l + 1);
        }
    }

    #[test]
    fn bad_datasets_are_refused_with_clear_errors() {
        let (net, es, images, mut labels) = small();
        let mut trainer =
            Trainer::new(net, es, 1, NoiseSource::Stream, Kernel::Portable, 1).unwrap();
        let short = Dataset {
            images: &images[1..],
            labels: &labels,
        };
        let err = trainer.step(short).unwrap_err().to_string();
        assert!(err.contains("expected 16 pixels per label"), "{err}");
        labels[3] = 7;
        let bad = Dataset {
            images: &images,
            labels: &labels,
        };
        let err = trainer.step(bad).unwrap_err().to_string();
        assert_eq!(err, "label 7 of image 3 is out of range: expected 0..2");
    }

    #[test]
    fn golden_task_agrees_with_the_evaluator_and_across_kernels() {
        let (net, es, images, labels) = small();
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let noise = table_for(&net);
        let runs: Vec<_> = Kernel::supported()
            .into_iter()
            .map(|k| golden_task(&net, &es, 3, &noise, data, 2, 5, k).unwrap())
            .collect();
        for r in &runs[1..] {
            for (a, b) in r.iter().zip(&runs[0]) {
                assert_eq!(a.evaluation, b.evaluation);
            }
        }
        let [center, plus, minus] = &runs[0];
        assert_ne!(plus.evaluation, minus.evaluation);
        assert_eq!(center.logits.len(), es.batch_size * net.outputs);
        // The same pair through the evaluator used in training.
        let mut indices = Vec::new();
        minibatch_indices(3, 2, es.batch_size, data.len(), &mut indices);
        let mut batch = Batch::new(net.inputs);
        batch.fill(data.images, data.labels, &indices);
        let mut evaluator = Evaluator::new(net.clone(), Kernel::Portable).unwrap();
        let key = NoiseKey {
            run_seed: 3,
            generation: 2,
            index: 5,
        };
        let theta = init_params(&net, 3);
        let pair = evaluator
            .evaluate_pair(&theta, &noise, key, &es.perturbation(&net, 2), None, &batch)
            .unwrap();
        assert_eq!(pair.plus, plus.evaluation);
        assert_eq!(pair.minus, minus.evaluation);
    }

    #[test]
    fn a_batch_schedule_sets_each_generations_batch_and_the_golden_generation() {
        let es = EsConfig {
            batch_size: 100,
            batch_schedule: Schedule::Linear {
                final_fraction: 4.0,
                over: 300,
            },
            ..EsConfig::default()
        };
        es.validate().unwrap();
        let sizes: Vec<usize> = [0, 1, 150, 299, 300, 10_000]
            .iter()
            .map(|&t| es.batch_at(t))
            .collect();
        assert_eq!(sizes, [100, 101, 250, 399, 400, 400]);
        assert_eq!(es.golden_generation(), 300);
        assert_eq!(EsConfig::default().batch_at(7), 100);
        assert_eq!(EsConfig::default().golden_generation(), 0);
        // Shrinking is allowed down to one image; a step schedule, a batch that ends below
        // one image or beyond MAX_BATCH, and non-finite fractions are refused.
        let with = |batch_schedule| EsConfig {
            batch_schedule,
            ..es.clone()
        };
        let cosine = |final_fraction| Schedule::Cosine {
            final_fraction,
            over: 10,
        };
        with(cosine(0.01)).validate().unwrap();
        for bad in [
            Schedule::Step {
                factor: 2.0,
                every: 10,
            },
            cosine(0.001),
            cosine(-1.0),
            cosine(1e9),
            cosine(f64::NAN),
        ] {
            let e = with(bad).validate().unwrap_err();
            assert!(
                matches!(e, TrainError::BatchSchedule { .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("batch schedule"), "{e}");
        }
    }

    #[test]
    fn a_peer_without_the_batch_schedule_fails_the_golden_task() {
        // A peer that predates the schedule evaluates with the constant batch: at generation 0
        // it would agree, at the golden generation (where the schedule ends) it does not.
        let (net, es, images, labels) = small();
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let noise = table_for(&net);
        let growing = EsConfig {
            batch_schedule: Schedule::Cosine {
                final_fraction: 2.0,
                over: 40,
            },
            ..es.clone()
        };
        let golden = |es: &EsConfig, t| {
            golden_task(&net, es, 3, &noise, data, t, 0, Kernel::Portable).unwrap()
        };
        assert_eq!(golden(&growing, 0), golden(&es, 0));
        let t = growing.golden_generation();
        assert_eq!(t, 40);
        let [center, ..] = golden(&growing, t);
        assert_eq!(center.logits.len(), 2 * es.batch_size * net.outputs);
        assert_ne!(golden(&growing, t), golden(&es, t));
    }

    #[test]
    fn minibatches_are_deterministic_and_in_range() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        minibatch_indices(3, 10, 500, 60_000, &mut a);
        minibatch_indices(3, 10, 500, 60_000, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|&i| i < 60_000));
        minibatch_indices(3, 11, 500, 60_000, &mut b);
        assert_ne!(a, b);
    }
}
