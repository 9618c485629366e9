//! One generation of OpenAI ES split into the parts a cluster distributes, and the
//! single-process trainer that runs them all on the cores of one machine.
//!
//! A generation `t` is: the minibatch ([`minibatch_indices`]), the per-layer σ
//! ([`EsConfig::layer_sigmas`]), the evaluation of each mirrored pair ([`Evaluator`], run by
//! whoever holds θ and the noise source: in-process threads or remote workers), and the update
//! ([`apply_update`]) from the 2P fitnesses alone. Every part is a pure function of the config,
//! `run_seed`, `t`, θ and the fitnesses, so θ after `t` generations does not depend on who
//! evaluated what.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use es_kernel::{
    Batch, ConfigError, Evaluation, Forward, Kernel, NetConfig, ParamLayout, Prefix, layer_range,
};

use crate::init::{init_params, init_std};
use crate::noise::{NoiseError, NoiseKey, NoiseSource};
use crate::optimizer::{Adam, AdamConfig, AdamStep, Schedule};
use crate::seeds::{Purpose, rng, uniform_below};
use crate::strategy::{PairFitness, StrategyError, accumulate_weighted, rank_weights};

/// The evolution-strategies hyperparameters of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct EsConfig {
    /// Mirrored pairs per generation (2P evaluations).
    pub population: usize,
    /// Training images per minibatch; every evaluation of a generation uses the same one.
    pub batch_size: usize,
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
}

impl Default for EsConfig {
    fn default() -> Self {
        // Calibrated on MNIST with the default network (see NetConfig::default): σ 0.2 and lr
        // 1e-2 learned several times faster than 0.02 and 1e-3 in the first hundreds of
        // generations, and weight decay only shrank θ into the flushed range.
        EsConfig {
            population: 256,
            batch_size: 100,
            sigma: 0.2,
            sigma_schedule: Schedule::Constant,
            lr: 1e-2,
            lr_schedule: Schedule::Constant,
            l2: 0.0,
            adam: AdamConfig::default(),
            sigma_multipliers: Vec::new(),
            lr_multipliers: Vec::new(),
            layer_populations: Vec::new(),
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
        Ok(())
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.population == 0 || self.population > crate::seeds::INDEX_LIMIT as usize {
            return Err(TrainError::Population(self.population));
        }
        if self.batch_size == 0 {
            return Err(TrainError::BatchSize(self.batch_size));
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

    /// How generation `t` perturbs θ: each layer's σ, and which layers each pair moves.
    pub fn perturbation(&self, net: &NetConfig, t: u32) -> Perturbation {
        Perturbation {
            layer_sigmas: self.layer_sigmas(net, t),
            layer_populations: self.layer_populations.clone(),
        }
    }

    /// How the update splits θ and the pairs: each segment's gradient is the weighted sum of
    /// its own pairs' noise over its own parameters, divided by twice its pair count.
    pub fn segments(&self, layout: &ParamLayout) -> Vec<Segment> {
        if self.layer_populations.is_empty() {
            return vec![Segment {
                params: 0..layout.len(),
                pairs: 0..self.population,
            }];
        }
        let mut first = 0;
        self.layer_populations
            .iter()
            .enumerate()
            .map(|(l, &p)| {
                let segment = Segment {
                    params: layer_range(layout, l),
                    pairs: first..first + p,
                };
                first += p;
                segment
            })
            .collect()
    }
}

/// How one generation perturbs θ ([`EsConfig::perturbation`]): what an evaluator needs beyond
/// θ, the noise and the batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Perturbation {
    /// σ of each layer ([`EsConfig::layer_sigmas`]).
    pub layer_sigmas: Vec<f32>,
    /// [`EsConfig::layer_populations`].
    pub layer_populations: Vec<usize>,
}

impl Perturbation {
    /// The layers pair `index` perturbs: all of them without layer populations (or past
    /// them), else the one layer whose pairs hold it.
    pub fn layers_of(&self, index: u32) -> Range<usize> {
        let mut end = 0usize;
        for (l, &p) in self.layer_populations.iter().enumerate() {
            end += p;
            if (index as usize) < end {
                return l..l + 1;
            }
        }
        0..self.layer_sigmas.len()
    }
}

/// A range of θ and the range of pairs whose noise moves it (see [`EsConfig::segments`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub params: Range<usize>,
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

/// The minibatch of generation `t`: `batch_size` indices drawn uniformly (with replacement)
/// from `0..n` by `rng(run_seed, Minibatch, t, 0)`.
pub fn minibatch_indices(run_seed: u64, t: u32, batch_size: usize, n: usize, out: &mut Vec<usize>) {
    let mut rng = rng(run_seed, Purpose::Minibatch, t, 0);
    out.clear();
    out.extend((0..batch_size).map(|_| uniform_below(&mut rng, n as u64) as usize));
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
    /// θ + σε and θ − σε in the perturbed layers' ranges; other ranges are stale.
    plus: Vec<f32>,
    minus: Vec<f32>,
    noise_scratch: Vec<f32>,
    /// Stands in for a prefix when a pass starts at layer 1.
    empty_prefix: Prefix,
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
            empty_prefix: Prefix::new(),
        })
    }

    pub fn forward(&mut self) -> &mut Forward {
        &mut self.forward
    }

    /// Fitness of `θ + σε_i` and `θ − σε_i` on `batch`, with `σ` per layer, where `ε_i` is
    /// zero outside the layers pair `i` perturbs ([`Perturbation::layers_of`]).
    ///
    /// `prefix`, if given, must be θ's prefix on `batch` ([`Forward::prefix`]): a pair that
    /// leaves the first layers alone then starts after them. The fitnesses are the same bits
    /// either way.
    pub fn evaluate_pair(
        &mut self,
        theta: &[f32],
        noise: &NoiseSource,
        key: NoiseKey,
        perturbation: &Perturbation,
        prefix: Option<&Prefix>,
        batch: &Batch,
    ) -> Result<PairResult, NoiseError> {
        let perturbed = perturbation.layers_of(key.index);
        let dim = self.layout.len();
        assert_eq!(theta.len(), dim, "parameter vector length");
        if matches!(noise, NoiseSource::Stream) && self.noise_scratch.len() < dim {
            self.noise_scratch.resize(dim, 0.0);
        }
        let eps = noise.perturbation(key, dim, &mut self.noise_scratch)?;
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
        let (start, prefix) = match prefix {
            Some(prefix) if perturbed.start > 0 => (perturbed.start, prefix),
            _ => (0, &self.empty_prefix),
        };
        let layout = &self.layout;
        let (plus_buffer, minus_buffer) = (&self.plus[..], &self.minus[..]);
        let plus_params = |l: usize| {
            let source = if perturbed.contains(&l) {
                plus_buffer
            } else {
                theta
            };
            &source[layer_range(layout, l)]
        };
        let minus_params = |l: usize| {
            let source = if perturbed.contains(&l) {
                minus_buffer
            } else {
                theta
            };
            &source[layer_range(layout, l)]
        };
        let plus = self
            .forward
            .evaluate_from(&plus_params, start, prefix, batch);
        let minus = self
            .forward
            .evaluate_from(&minus_params, start, prefix, batch);
        Ok(PairResult {
            index: key.index,
            plus,
            minus,
        })
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
    train.validate(&net)?;
    let batch = generation_batch(net.inputs, es.batch_size, run_seed, train, generation);
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
    inputs: usize,
    batch_size: usize,
    run_seed: u64,
    train: Dataset<'_>,
    generation: u32,
) -> Batch {
    let mut indices = Vec::new();
    minibatch_indices(run_seed, generation, batch_size, train.len(), &mut indices);
    let mut batch = Batch::new(inputs);
    batch.fill(train.images, train.labels, &indices);
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
    let mut evaluator = Evaluator::new(net.clone(), kernel)?;
    // Materialise θ₀ ± σε exactly as a worker's evaluation does, then keep the logits of each.
    evaluate_index(
        &mut evaluator,
        es,
        run_seed,
        noise,
        train,
        &theta,
        generation,
        index,
    )?;
    let batch = generation_batch(net.inputs, es.batch_size, run_seed, train, generation);
    let classes = net.outputs;
    let run = |params: &[f32], forward: &mut Forward| {
        let logits = forward.logits(params, &batch).to_vec();
        let evaluation = Evaluation::from_logits(&logits, batch.labels(), classes);
        GoldenRun { evaluation, logits }
    };
    let Evaluator {
        forward,
        layout,
        plus,
        minus,
        ..
    } = &mut evaluator;
    // The evaluator wrote only the perturbed layers; the others are θ's.
    let perturbed = es.perturbation(net, generation).layers_of(index);
    for l in (0..net.layers()).filter(|l| !perturbed.contains(l)) {
        let range = layer_range(layout, l);
        plus[range.clone()].copy_from_slice(&theta[range.clone()]);
        minus[range.clone()].copy_from_slice(&theta[range]);
    }
    let center = run(&theta, forward);
    let plus = run(plus, forward);
    let minus = run(minus, forward);
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
    /// Pairs that leave layer 1 alone ([`Perturbation::layers_of`]) start from θ's
    /// activations, computed once here.
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
        let prefix = if indices.clone().any(|i| perturbation.layers_of(i).start > 0) {
            self.evaluators[0]
                .forward
                .prefix(theta, batch, &mut self.prefix);
            Some(&self.prefix)
        } else {
            None
        };
        let next = AtomicUsize::new(indices.start as usize);
        let end = indices.end as usize;
        let results = Mutex::new(Vec::with_capacity(indices.len()));
        let failure = Mutex::new(None);
        std::thread::scope(|scope| {
            for evaluator in &mut self.evaluators {
                let (next, results, failure) = (&next, &results, &failure);
                scope.spawn(move || {
                    let mut local = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end {
                            break;
                        }
                        let key = NoiseKey {
                            run_seed,
                            generation,
                            index: i as u32,
                        };
                        let evaluated =
                            evaluator.evaluate_pair(theta, noise, key, perturbation, prefix, batch);
                        match evaluated {
                            Ok(r) => local.push(r),
                            Err(e) => {
                                *failure.lock().expect("no panics while locked") = Some(e);
                                next.store(end, Ordering::Relaxed);
                                break;
                            }
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
}

impl EsState {
    /// Generation 0: θ₀ from `run_seed`, Adam at rest.
    pub fn new(net: &NetConfig, es: &EsConfig, run_seed: u64) -> EsState {
        let theta = init_params(net, run_seed);
        let adam = Adam::new(es.adam, theta.len());
        EsState {
            generation: 0,
            theta,
            adam,
        }
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
pub fn apply_update(
    state: &mut EsState,
    net: &NetConfig,
    es: &EsConfig,
    noise: &NoiseSource,
    run_seed: u64,
    pairs: &[PairFitness],
    threads: usize,
) -> Result<UpdateStats, TrainError> {
    if pairs.len() != es.population {
        return Err(TrainError::PairCount {
            got: pairs.len(),
            population: es.population,
        });
    }
    let dim = state.theta.len();
    if dim != ParamLayout::new(net).len() {
        return Err(TrainError::ThetaLength {
            got: dim,
            expected: ParamLayout::new(net).len(),
        });
    }
    noise.check_dim(dim)?;
    es.validate_for(net)?;
    let layout = ParamLayout::new(net);
    let segments = es.segments(&layout);
    // Each segment's pairs are ranked among themselves: perturbing different layers moves
    // the loss by different amounts, and one layer's pairs must not outrank another's.
    let mut weights = Vec::with_capacity(pairs.len());
    for segment in &segments {
        if !segment.pairs.is_empty() {
            weights.extend(rank_weights(&pairs[segment.pairs.clone()])?);
        }
    }
    let t = state.generation;
    let keys = |i: usize| NoiseKey {
        run_seed,
        generation: t,
        index: i as u32,
    };
    let mut g = vec![0.0f32; dim];
    match noise {
        NoiseSource::Table(_) => {
            // A table hands out borrowed windows and never touches the scratch.
            let windows: Vec<&[f32]> = (0..pairs.len())
                .map(|i| noise.perturbation(keys(i), dim, &mut []))
                .collect::<Result<_, _>>()?;
            for segment in &segments {
                let (params, pairs) = (segment.params.clone(), segment.pairs.clone());
                for_blocks(&mut g[params.clone()], threads, |start, g| {
                    let at = params.start + start;
                    let slices: Vec<&[f32]> =
                        windows[pairs.clone()].iter().map(|w| &w[at..]).collect();
                    accumulate_weighted(g, &weights[pairs.clone()], &slices);
                });
            }
        }
        NoiseSource::Stream => {
            // Regenerate ε in groups (in parallel), then add each group in index order.
            let group = threads.max(1) * 2;
            let mut buffers = vec![vec![0.0f32; dim]; group];
            for first in (0..pairs.len()).step_by(group) {
                let count = group.min(pairs.len() - first);
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
                for segment in &segments {
                    // The pairs of this group that move this segment, in index order.
                    let from = segment.pairs.start.max(first);
                    let to = segment.pairs.end.min(first + count);
                    if from >= to {
                        continue;
                    }
                    let params = segment.params.clone();
                    let w = &weights[from..to];
                    let group_buffers = &buffers[from - first..to - first];
                    for_blocks(&mut g[params.clone()], threads, |start, g| {
                        let at = params.start + start;
                        let slices: Vec<&[f32]> = group_buffers.iter().map(|b| &b[at..]).collect();
                        accumulate_weighted(g, w, &slices);
                    });
                }
            }
        }
    }
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
            let pairs_of_layer = if es.layer_populations.is_empty() {
                pairs.len()
            } else {
                es.layer_populations[l]
            };
            let two_p = (2 * pairs_of_layer.max(1)) as f32;
            (layer.bias.end - layer.weights.start, scaled, two_p)
        })
        .collect();
    let grad_sq = adam_blocks(state, &mut g, &steps, threads);
    state.generation += 1;
    let theta_norm = state
        .theta
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    Ok(UpdateStats {
        grad_norm: grad_sq.sqrt(),
        theta_norm,
        lr,
    })
}

/// Runs `f(start, block)` over `UPDATE_BLOCK`-sized blocks of `g` on `threads` threads.
fn for_blocks(g: &mut [f32], threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let blocks: Vec<(usize, &mut [f32])> = g
        .chunks_mut(UPDATE_BLOCK)
        .enumerate()
        .map(|(b, chunk)| (b * UPDATE_BLOCK, chunk))
        .collect();
    let queue = Mutex::new(blocks.into_iter());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().expect("no panics while locked").next();
                    match next {
                        Some((start, block)) => f(start, block),
                        None => break,
                    }
                }
            });
        }
    });
}

/// `g /= 2P` (each layer's own P), then Adam on every block; returns ‖g‖² summed in block
/// order.
fn adam_blocks(
    state: &mut EsState,
    g: &mut [f32],
    steps: &[(usize, AdamStep, f32)],
    threads: usize,
) -> f64 {
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
                    sums.lock().expect("no panics while locked").push((b, sq));
                }
            });
        }
    });
    let mut sums = sums.into_inner().expect("threads joined");
    sums.sort_by_key(|(b, _)| *b);
    sums.iter().map(|(_, s)| s).sum()
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
    indices: Vec<usize>,
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
            indices: Vec::new(),
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
        minibatch_indices(
            self.run_seed,
            t,
            self.es.batch_size,
            train.len(),
            &mut self.indices,
        );
        self.batch.fill(train.images, train.labels, &self.indices);
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

    /// θ's loss and accuracy on a whole dataset (e.g. the 10,000 test images).
    pub fn evaluate(&mut self, data: Dataset<'_>) -> Result<Evaluation, TrainError> {
        data.validate(&self.net)?;
        Ok(self.pool.evaluate_dataset(&self.state.theta, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::NoiseTable;
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
        for (net, es, images, labels) in [small(), small_layered()] {
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

    #[test]
    fn each_pair_moves_its_own_layer_and_the_prefix_changes_no_bit() {
        let (net, es, images, labels) = small_layered();
        let data = Dataset {
            images: &images,
            labels: &labels,
        };
        let noise = table_for(&net);
        let theta = init_params(&net, 3);
        let perturbation = es.perturbation(&net, 2);
        let layers: Vec<_> = (0..24).map(|i| perturbation.layers_of(i)).collect();
        assert_eq!(
            (layers[0].clone(), layers[9].clone(), layers[10].clone()),
            (0..1, 0..1, 1..2)
        );
        assert_eq!((layers[17].clone(), layers[18].clone()), (1..2, 2..3));
        let batch = generation_batch(net.inputs, es.batch_size, 3, data, 2);
        // The pool starts pairs of layers 2 and 3 from θ's prefix.
        let mut pool = EvalPool::new(&net, Kernel::Portable, 2).unwrap();
        let pooled = pool
            .evaluate(&theta, &noise, 3, 2, &perturbation, &batch, 0..24)
            .unwrap();
        let mut evaluator = Evaluator::new(net.clone(), Kernel::Portable).unwrap();
        let mut forward = Forward::new(net.clone(), Kernel::Portable).unwrap();
        let layout = ParamLayout::new(&net);
        for (got, layers) in pooled.iter().zip(layers) {
            let key = NoiseKey {
                run_seed: 3,
                generation: 2,
                index: got.index,
            };
            let alone = evaluator
                .evaluate_pair(&theta, &noise, key, &perturbation, None, &batch)
                .unwrap();
            assert_eq!(alone, *got, "pair {} without the prefix", got.index);
            // θ ± σε on the pair's layer, θ elsewhere, through the plain forward pass.
            let eps = noise.perturbation(key, layout.len(), &mut []).unwrap();
            let (mut plus, mut minus) = (theta.clone(), theta.clone());
            for l in layers {
                let r = layer_range(&layout, l);
                let sigma = perturbation.layer_sigmas[l];
                perturb(
                    &theta[r.clone()],
                    &eps[r.clone()],
                    sigma,
                    &mut plus[r.clone()],
                    &mut minus[r],
                );
            }
            assert_eq!(
                forward.evaluate(&plus, &batch),
                got.plus,
                "pair {}",
                got.index
            );
            assert_eq!(
                forward.evaluate(&minus, &batch),
                got.minus,
                "pair {}",
                got.index
            );
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
