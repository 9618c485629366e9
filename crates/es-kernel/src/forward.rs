//! The fast forward pass: sparse inputs, SIMD kernels, the float environment of the mode.
//!
//! [`Forward`] owns every buffer it needs, so after the first call with the largest batch it
//! evaluates any number of parameter vectors without allocating.

use crate::config::{Arithmetic, ConfigError, LayerLayout, NetConfig, ParamLayout};
use crate::float_env::with_float_env;
use crate::kernels::{Kernel, PaddedWeights, Weights, WindowCopies, padded_stride};
use crate::loss::Evaluation;
use crate::reference::{epilogue_add, epilogue_mul, pow2_neg};
use crate::sparse::{Forms, SparseRows};

/// A minibatch prepared once and evaluated under many parameter vectors: the dense pixels, the
/// labels and the nonzero pixels of each sample.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    inputs: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    rows: SparseRows,
}

impl Batch {
    /// An empty batch of samples `inputs` pixels wide.
    pub fn new(inputs: usize) -> Batch {
        Batch {
            inputs,
            ..Batch::default()
        }
    }

    /// The batch of samples `indices` of a dataset (`images`: `n × inputs` pixels).
    ///
    /// # Panics
    /// If an index is out of range or the shapes disagree.
    pub fn fill(&mut self, images: &[u8], labels: &[u8], indices: &[usize]) {
        assert_eq!(
            images.len(),
            labels.len() * self.inputs,
            "images and labels disagree"
        );
        self.pixels.clear();
        self.labels.clear();
        for &i in indices {
            self.pixels
                .extend_from_slice(&images[i * self.inputs..(i + 1) * self.inputs]);
            self.labels.push(labels[i]);
        }
        self.rows.fill_from_pixels(&self.pixels, self.inputs);
    }

    /// The batch of all `images` (`labels.len() × inputs` pixels) in order.
    ///
    /// # Panics
    /// If the shapes disagree.
    pub fn fill_all(&mut self, images: &[u8], labels: &[u8]) {
        assert_eq!(
            images.len(),
            labels.len() * self.inputs,
            "images and labels disagree"
        );
        self.pixels.clear();
        self.pixels.extend_from_slice(images);
        self.labels.clear();
        self.labels.extend_from_slice(labels);
        self.rows.fill_from_pixels(&self.pixels, self.inputs);
    }

    /// A batch holding whole `images` (`labels.len() × inputs` pixels) in order.
    pub fn from_images(inputs: usize, images: &[u8], labels: &[u8]) -> Batch {
        let mut batch = Batch::new(inputs);
        batch.fill_all(images, labels);
        batch
    }

    /// Pixels per sample.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Fraction of pixels that are nonzero (the layer-1 work the kernels do).
    pub fn density(&self) -> f64 {
        self.rows.nonzeros() as f64 / self.pixels.len().max(1) as f64
    }
}

/// Fraction of nonzero inputs from which a layer's pass reads them dense instead of
/// building [`SparseRows`]: the blocked form's union of four samples is then nearly every
/// input anyway, and the rows cost about what the kernel does. (With trained parameters
/// the last hidden layer's outputs are 96–97% nonzero, the first's about 65%.) Only speed
/// depends on it: both ways give the same sums.
const DENSE_INPUTS: f64 = 0.9;

/// How many of `values` are nonzero. Counted in `u32` lanes per chunk: a `usize` count
/// compiles to 64-bit lanes, which made this count cost half as much as the layer it
/// measures.
fn count_nonzero(values: &[f32]) -> usize {
    values
        .chunks(1 << 20)
        .map(|chunk| chunk.iter().map(|&x| u32::from(x != 0.0)).sum::<u32>() as usize)
        .sum()
}

/// Evaluates parameter vectors of one network on batches, reusing its buffers.
#[derive(Clone, Debug)]
pub struct Forward {
    config: NetConfig,
    layout: ParamLayout,
    kernel: Kernel,
    /// Each layer's bias add and scaling.
    epilogue: Epilogue,
    rows: SparseRows,
    act: Vec<f32>,
    /// A neuron group's outputs ([`Forward::evaluate_group`]).
    group_act: Vec<f32>,
    /// The outputs of several copies of a group, rows of `copies · width`
    /// ([`Forward::evaluate_group_copies`]).
    copies_act: Vec<f32>,
    /// The next layer's sums of a block of those copies, copy after copy.
    copies_next: Vec<f32>,
    /// Per sample, where θ's inputs of that next layer after the group begin in its row
    /// (`SparseRows::positions_at`), found once for all the blocks of copies.
    rest_positions: Vec<u32>,
    /// Some columns of a layer's inputs, dense, and their nonzeros: what a pass that keeps or
    /// resumes running sums adds over.
    columns: Vec<f32>,
    column_rows: SparseRows,
    /// Scratch for the sums of a layer whose running sums a prefix keeps, and for those of a
    /// layer that reads its inputs dense (then swapped with `act`).
    sums: Vec<f32>,
    scaled_bias: Vec<f32>,
    /// A layer's weights copied to rows the caches like ([`padded_stride`]), for a pass that
    /// keeps no prefix; a prefix keeps its own ([`Prefix`]).
    padded: PaddedWeights,
    /// Whether weights are padded at all (see [`Forward::set_padding`]).
    padding: bool,
    /// Fraction of nonzero inputs each layer saw in the last pass that ran it whole (a
    /// neuron group's pass leaves the entries of its layer and of the one it resumes); a
    /// layer past the first whose last pass saw at least [`DENSE_INPUTS`] reads its inputs
    /// dense ([`Kernel::accumulate_dense`]).
    density: Vec<f64>,
    fill: Fill,
}

/// What finishes a layer after its kernel: the bias add and the scaling into the next layer's
/// range, in the network's arithmetic.
#[derive(Clone, Debug)]
struct Epilogue {
    mode: Arithmetic,
    /// `2^-e_{l-1}`, which scales layer l's bias.
    bias_scales: Vec<f32>,
    /// `2^(e_{l-1} - e_l)`, which scales layer l's output.
    out_scales: Vec<f32>,
    /// Flush explicitly in `ftz` mode too (see [`Forward::set_explicit_flush`]).
    explicit_flush: bool,
}

impl Epilogue {
    /// Layer `l`'s sums in `act` (rows of `bias.len()`) plus its bias `bias`, times its
    /// output scale; `scaled_bias` is scratch.
    fn finish(&self, l: usize, bias: &[f32], scaled_bias: &mut Vec<f32>, act: &mut Vec<f32>) {
        self.finish_from(l, bias, scaled_bias, None, act);
    }

    /// [`Epilogue::finish`] of the sums in `sums` when given (written to `act`, which is
    /// resized to them: one pass where a copy and then the epilogue would take two), else of
    /// those in `act`.
    fn finish_from(
        &self,
        l: usize,
        bias: &[f32],
        scaled_bias: &mut Vec<f32>,
        sums: Option<&[f32]>,
        act: &mut Vec<f32>,
    ) {
        scale_bias(self.mode, bias, self.bias_scales[l], scaled_bias);
        epilogue(
            self.mode,
            self.explicit_flush,
            sums,
            act,
            scaled_bias,
            self.out_scales[l],
        );
    }
}

/// How a pass builds each later layer's nonzero inputs from the previous layer's outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fill {
    /// Only the form the kernel reads ([`Kernel::form`]), without branches on the data.
    #[default]
    Needed,
    /// Both forms with a branch per input ([`SparseRows::fill_from_dense_simple`]), as passes
    /// did before `Needed`; es-bench times the two side by side. Same bits.
    Simple,
}

impl Forward {
    pub fn new(config: NetConfig, kernel: Kernel) -> Result<Forward, ConfigError> {
        config.validate()?;
        let exps = config.activation_exponents();
        let bias_scales = exps[..exps.len() - 1]
            .iter()
            .map(|&e| pow2_neg(e))
            .collect();
        let out_scales = exps.windows(2).map(|p| pow2_neg(p[1] - p[0])).collect();
        let layers = config.layers();
        let mode = config.arithmetic;
        Ok(Forward {
            layout: ParamLayout::new(&config),
            config,
            kernel,
            epilogue: Epilogue {
                mode,
                bias_scales,
                out_scales,
                explicit_flush: false,
            },
            rows: SparseRows::new(),
            act: Vec::new(),
            group_act: Vec::new(),
            copies_act: Vec::new(),
            copies_next: Vec::new(),
            rest_positions: Vec::new(),
            columns: Vec::new(),
            column_rows: SparseRows::new(),
            sums: Vec::new(),
            scaled_bias: Vec::new(),
            padded: PaddedWeights::new(),
            padding: true,
            density: vec![0.0; layers],
            fill: Fill::default(),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Chooses how later layers' inputs are built (for benchmarks; the results are the same).
    pub fn set_fill(&mut self, fill: Fill) {
        self.fill = fill;
    }

    /// Whether the bias add and scaling flush explicitly in `ftz` mode as well, as passes did
    /// before leaving it to the float environment (for benchmarks; the results are the same).
    pub fn set_explicit_flush(&mut self, explicit: bool) {
        self.epilogue.explicit_flush = explicit;
    }

    /// Whether the kernels read weight matrices from copies padded to rows the caches like
    /// ([`padded_stride`]), as by default, or as θ packs them, as passes did before (for
    /// benchmarks; the results are the same).
    pub fn set_padding(&mut self, padding: bool) {
        self.padding = padding;
    }

    /// Fraction of nonzero inputs each layer saw in the last pass that ran it whole (layer 1:
    /// pixels).
    pub fn density(&self) -> &[f64] {
        &self.density
    }

    /// Logits (`batch.len() × outputs`) of the network with parameters `params`.
    ///
    /// # Panics
    /// If `params` is not the layout's length or the batch is not `inputs` wide.
    pub fn logits(&mut self, params: &[f32], batch: &Batch) -> &[f32] {
        assert_eq!(params.len(), self.layout.len(), "parameter vector length");
        assert_eq!(batch.inputs, self.config.inputs, "batch width");
        let mode = self.config.arithmetic;
        with_float_env(mode, || {
            self.run_layers(Params::Whole(params), 0, Some(&batch.rows), None)
        });
        &self.act
    }

    /// Fitness (minus mean cross-entropy) and accuracy of `params` on `batch`.
    pub fn evaluate(&mut self, params: &[f32], batch: &Batch) -> Evaluation {
        let classes = self.config.outputs;
        // The loss runs after the float guard is released.
        let logits = self.logits(params, batch);
        Evaluation::from_logits(logits, batch.labels(), classes)
    }

    /// Runs `params` on `batch` and keeps what every layer was given and gave, so that
    /// networks equal to `params` up to some layer ([`Forward::evaluate_from`]), or in all but
    /// some neurons of one layer ([`Forward::evaluate_group`]), can start there.
    pub fn prefix(&mut self, params: &[f32], batch: &Batch, prefix: &mut Prefix) {
        assert_eq!(params.len(), self.layout.len(), "parameter vector length");
        assert_eq!(batch.inputs, self.config.inputs, "batch width");
        let layers = self.layout.layers();
        for (l, kept) in prefix.running_sums.iter().enumerate() {
            if let Some(&last) = kept.at.last() {
                assert!(
                    l > 0 && l < layers.len() && last < layers[l].fan_in,
                    "running sums of layer {l} at input {last}"
                );
            }
        }
        let layers = layers.len();
        prefix.inputs.resize_with(layers - 1, SparseRows::new);
        prefix.outputs.resize_with(layers, Vec::new);
        prefix.weights.resize_with(layers, || None);
        prefix.samples = batch.len();
        let mode = self.config.arithmetic;
        with_float_env(mode, || {
            self.run_layers(Params::Whole(params), 0, Some(&batch.rows), Some(prefix))
        });
    }

    /// Fitness and accuracy on `batch` of the network whose layer `l` has the parameters
    /// `layer_params(l)` (its weights, then its bias: `layout().layers()[l]`'s range of θ),
    /// starting at layer `start` from the inputs `prefix` kept for that layer.
    ///
    /// Layers before `start` are not run: the result is bit for bit that of [`Forward::evaluate`]
    /// on the vector whose layers before `start` are those `prefix` was made from and whose
    /// other layers are `layer_params`'s, since the kept inputs are the very values that
    /// forward pass would compute. `start` 0 runs every layer from the batch.
    ///
    /// # Panics
    /// If `start` is not a layer, a layer's parameters have the wrong length, or `prefix` was
    /// not made on a batch of this batch's size (when `start` > 0).
    pub fn evaluate_from<'p>(
        &mut self,
        layer_params: &dyn Fn(usize) -> &'p [f32],
        start: usize,
        prefix: &Prefix,
        batch: &Batch,
    ) -> Evaluation {
        let layers = self.layout.layers().len();
        assert!(start < layers, "start layer {start} of {layers}");
        assert_eq!(batch.inputs, self.config.inputs, "batch width");
        let input = if start == 0 {
            &batch.rows
        } else {
            assert_eq!(prefix.samples, batch.len(), "prefix made on another batch");
            &prefix.inputs[start - 1]
        };
        let mode = self.config.arithmetic;
        with_float_env(mode, || {
            self.run_layers(Params::Layers(layer_params), start, Some(input), None)
        });
        Evaluation::from_logits(&self.act, batch.labels(), self.config.outputs)
    }

    /// Fitness and accuracy on `batch` of θ with `group`'s neurons changed: the network whose
    /// parameters are `theta`'s except the incoming weights and biases of `group.neurons` in
    /// layer `group.layer`, which are `group.weights` and `group.bias`. `prefix` must be θ's
    /// on `batch` ([`Forward::prefix`]).
    ///
    /// Only the group's neurons of its layer and the layers after it are run: every other
    /// neuron of the layer computes from the same inputs and parameters as in θ's pass, so its
    /// output is θ's, which `prefix` kept. If `prefix` kept θ's running sums of the next
    /// layer at the group's first neuron ([`Prefix::keep_running_sums`]), the next layer
    /// resumes them and adds only the terms from the group on: the inputs before it are θ's,
    /// so were their terms. The result is bit for bit that of [`Forward::evaluate`] on the
    /// whole changed vector.
    ///
    /// # Panics
    /// If the group's shapes disagree with its layer, `theta` has the wrong length, or
    /// `prefix` was not made on a batch of this batch's size.
    pub fn evaluate_group(
        &mut self,
        theta: &[f32],
        group: NeuronGroup<'_>,
        prefix: &Prefix,
        batch: &Batch,
    ) -> Evaluation {
        let width = group.neurons.len();
        let copies = GroupCopies {
            layer: group.layer,
            neurons: group.neurons,
            copies: 1,
            weights: Weights::packed(group.weights, width),
            bias: group.bias,
        };
        let mut out = Vec::with_capacity(1);
        self.evaluate_group_copies(theta, &copies, prefix, batch, &mut out);
        out.pop().expect("one copy, one evaluation")
    }

    /// [`Forward::evaluate_group`] for each of several copies of one group that differ only
    /// in their own weights and biases (the perturbations of one neuron group), appended to
    /// `out` in copy order. Each result is bit for bit what `evaluate_group` gives that copy
    /// alone: the kernel sums every output column on its own in the same order whatever the
    /// width, so one pass over the group's inputs computes all copies' outputs at once (full
    /// vectors and one sweep of the inputs, where a narrow group alone fills a fraction of
    /// each vector). The next layer, when θ's prefix kept its running sums at the group's
    /// first neuron, runs for blocks of copies together (the terms after the group are θ's,
    /// so each product is computed once per block: [`Kernel::accumulate_window_copies`]);
    /// each copy then continues through the layers after it alone.
    ///
    /// # Panics
    /// As [`Forward::evaluate_group`], for any copy.
    pub fn evaluate_group_copies(
        &mut self,
        theta: &[f32],
        copies: &GroupCopies<'_>,
        prefix: &Prefix,
        batch: &Batch,
        out: &mut Vec<Evaluation>,
    ) {
        let layers = self.layout.layers();
        assert!(copies.layer < layers.len(), "group layer {}", copies.layer);
        let layer = &layers[copies.layer];
        let width = copies.neurons.len();
        assert!(
            width > 0 && copies.neurons.end <= layer.fan_out,
            "neurons {:?} of a layer of {}",
            copies.neurons,
            layer.fan_out
        );
        let columns = copies.copies * width;
        assert!(
            copies.weights.rows() == layer.fan_in && copies.weights.n_out() == columns,
            "group weights of {} rows of {}: expected {} rows of {columns}",
            copies.weights.rows(),
            copies.weights.n_out(),
            layer.fan_in
        );
        assert_eq!(copies.bias.len(), columns, "group bias");
        assert_eq!(theta.len(), self.layout.len(), "parameter vector length");
        assert_eq!(batch.inputs, self.config.inputs, "batch width");
        assert_eq!(prefix.samples, batch.len(), "prefix made on another batch");
        let input = match copies.layer {
            0 => &batch.rows,
            l => &prefix.inputs[l - 1],
        };
        let mode = self.config.arithmetic;
        with_float_env(mode, || self.run_group_layer(copies, input));
        let samples = input.samples();
        let next = copies.layer + 1;
        let resumed = match next < self.layout.layers().len() {
            true => prefix.running_sums(next, copies.neurons.start),
            false => None,
        };
        if let Some(sums) = resumed {
            // The next layer of every copy from θ's running sums at the group: the group's
            // outputs, then θ's inputs after it, shared by the copies of a block.
            prefix.inputs[copies.layer].positions_at(copies.neurons.end, &mut self.rest_positions);
            let pass = self
                .kernel
                .copies_per_pass(self.layout.layers()[next].fan_out);
            for first in (0..copies.copies).step_by(pass) {
                let count = (copies.copies - first).min(pass);
                with_float_env(mode, || {
                    self.run_next_layer_of_copies(theta, copies, first..first + count, prefix, sums)
                });
                for i in 0..count {
                    with_float_env(mode, || self.finish_copy(theta, prefix, next, i, samples));
                    out.push(Evaluation::from_logits(
                        &self.act,
                        batch.labels(),
                        self.config.outputs,
                    ));
                }
            }
            return;
        }
        for c in 0..copies.copies {
            // Copy c's outputs: its columns of every sample's row.
            self.group_act.clear();
            for row in self.copies_act.chunks_exact(columns) {
                self.group_act
                    .extend_from_slice(&row[c * width..(c + 1) * width]);
            }
            debug_assert_eq!(self.group_act.len(), samples * width);
            let neurons = copies.neurons.clone();
            with_float_env(mode, || {
                self.run_after_group(theta, copies.layer, neurons, prefix)
            });
            out.push(Evaluation::from_logits(
                &self.act,
                batch.labels(),
                self.config.outputs,
            ));
        }
    }

    /// The copies' outputs of the group's layer from `input` into `copies_act` (rows of
    /// `copies · width`), run inside the float environment. Not inlined: see `float_env`.
    #[inline(never)]
    fn run_group_layer(&mut self, copies: &GroupCopies<'_>, input: &SparseRows) {
        let columns = copies.copies * copies.neurons.len();
        self.copies_act.resize(input.samples() * columns, 0.0);
        self.kernel
            .accumulate(input, copies.weights, &mut self.copies_act);
        self.epilogue.finish(
            copies.layer,
            copies.bias,
            &mut self.scaled_bias,
            &mut self.copies_act,
        );
    }

    /// The sums of the layer after the group's for copies `chosen` of `copies` (their
    /// outputs in `copies_act`), into `copies_next` (copy after copy), from θ's running sums
    /// `sums` at the group's first neuron, run inside the float environment. Not inlined: see
    /// `float_env`.
    #[inline(never)]
    fn run_next_layer_of_copies(
        &mut self,
        theta: &[f32],
        copies: &GroupCopies<'_>,
        chosen: std::ops::Range<usize>,
        prefix: &Prefix,
        sums: &[f32],
    ) {
        let next = copies.layer + 1;
        let layer = &self.layout.layers()[next];
        let width = copies.neurons.len();
        let columns = copies.copies * width;
        let rest = &prefix.inputs[copies.layer];
        let samples = rest.samples();
        self.copies_next
            .resize(chosen.len() * samples * layer.fan_out, 0.0);
        self.kernel.accumulate_window_copies(
            &WindowCopies {
                window: &self.copies_act,
                columns,
                width,
                copies: chosen,
                from: copies.neurons.start,
                rest,
                rest_at: &self.rest_positions,
                start: sums,
            },
            prefix.weights(next, &theta[layer.weights.clone()], layer.fan_out),
            &mut self.copies_next,
        );
    }

    /// Copy `i` of the last [`Forward::run_next_layer_of_copies`] on `samples` samples: its
    /// sums of layer `l` finished with the layer's bias and scaling, then θ's layers after it
    /// (their padded weights read from `prefix`, θ's), leaving the logits in `act`; run
    /// inside the float environment. Not inlined: see `float_env`.
    #[inline(never)]
    fn finish_copy(&mut self, theta: &[f32], prefix: &Prefix, l: usize, i: usize, samples: usize) {
        let layer = &self.layout.layers()[l];
        let size = samples * layer.fan_out;
        self.epilogue.finish_from(
            l,
            &theta[layer.bias.clone()],
            &mut self.scaled_bias,
            Some(&self.copies_next[i * size..(i + 1) * size]),
            &mut self.act,
        );
        if l + 1 < self.layout.layers().len() {
            self.run_layers(Params::Theta(theta, prefix), l + 1, None, None);
        }
    }

    /// θ's outputs of layer `l` with `neurons` replaced by the group's outputs in
    /// `group_act`, then the layers after it (the last layer's group, or a group whose next
    /// layer kept no running sums at it), run inside the float environment. Not inlined: see
    /// `float_env`.
    #[inline(never)]
    fn run_after_group(
        &mut self,
        theta: &[f32],
        l: usize,
        neurons: std::ops::Range<usize>,
        prefix: &Prefix,
    ) {
        let fan_out = self.layout.layers()[l].fan_out;
        let width = neurons.len();
        // The layer's outputs: θ's, with the group's neurons replaced.
        self.act.clear();
        self.act.extend_from_slice(&prefix.outputs[l]);
        for (row, group_row) in self
            .act
            .chunks_exact_mut(fan_out)
            .zip(self.group_act.chunks_exact(width))
        {
            row[neurons.clone()].copy_from_slice(group_row);
        }
        if l + 1 < self.layout.layers().len() {
            self.run_layers(Params::Theta(theta, prefix), l + 1, None, None);
        }
    }

    /// Layers `start..` from `input` (layer `start`'s nonzero inputs; `None`: the nonzeros of
    /// the activations in `act`), run inside the float environment; keeps what each layer was
    /// given and gave in `save`. Not inlined: see `float_env`.
    #[inline(never)]
    fn run_layers<'p>(
        &mut self,
        params: Params<'_, 'p>,
        start: usize,
        input: Option<&SparseRows>,
        mut save: Option<&mut Prefix>,
    ) {
        let layers = self.layout.layers();
        let samples = match input {
            Some(input) => input.samples(),
            None => self.act.len() / layers[start].fan_in,
        };
        for (l, layer) in layers.iter().enumerate().skip(start) {
            let (params, kept) = match params {
                Params::Whole(theta) => (&theta[layer.weights.start..layer.bias.end], None),
                Params::Theta(theta, prefix) => (
                    &theta[layer.weights.start..layer.bias.end],
                    prefix.kept_weights(l),
                ),
                Params::Layers(layer_params) => (layer_params(l), None),
            };
            let n_weights = layer.fan_in * layer.fan_out;
            assert_eq!(
                params.len(),
                n_weights + layer.fan_out,
                "layer {l} parameter count"
            );
            let (packed, bias) = params.split_at(n_weights);
            // Padded where the stride would otherwise be one the caches dislike: the copy
            // costs one read and write of the weights, small beside a kernel pass that reads
            // each row once per block of samples.
            let padded = self.padding && padded_stride(layer.fan_out) != layer.fan_out;
            let weights = match (padded, kept) {
                (false, _) => Weights::packed(packed, layer.fan_out),
                (true, Some(kept)) => kept.weights(),
                (true, None) => {
                    self.padded.fill(packed, layer.fan_out);
                    self.padded.weights()
                }
            };
            let from_act = !(input.is_some() && l == start);
            let nonzeros = if from_act && save.is_none() && self.density[l] >= DENSE_INPUTS {
                // Nearly every input is nonzero (it was on the last pass): read the outputs
                // where they are instead of building rows that would hold them all.
                let nonzeros = count_nonzero(&self.act);
                self.sums.resize(samples * layer.fan_out, 0.0);
                self.kernel
                    .accumulate_dense(&self.act, layer.fan_in, weights, &mut self.sums);
                std::mem::swap(&mut self.act, &mut self.sums);
                nonzeros
            } else {
                let rows = match input {
                    Some(input) if l == start => input,
                    _ => {
                        match (self.fill, save.is_some()) {
                            // A prefix may serve a pass whose kernel reads the other form.
                            (Fill::Needed, true) => {
                                self.rows
                                    .fill_from_dense_in(&self.act, layer.fan_in, Forms::Both)
                            }
                            (Fill::Needed, false) => self.rows.fill_from_dense_in(
                                &self.act,
                                layer.fan_in,
                                self.kernel.form(samples).into(),
                            ),
                            (Fill::Simple, _) => {
                                self.rows.fill_from_dense_simple(&self.act, layer.fan_in)
                            }
                        }
                        if let Some(prefix) = save.as_deref_mut() {
                            prefix.inputs[l - 1].clone_from(&self.rows);
                        }
                        &self.rows
                    }
                };
                let kept = save
                    .as_deref()
                    .map_or(0, |prefix| prefix.running_sums_at(l).len());
                if kept == 0 {
                    self.act.resize(samples * layer.fan_out, 0.0);
                    self.kernel.accumulate(rows, weights, &mut self.act);
                } else {
                    let prefix = save.as_deref_mut().expect("kept sums come with a prefix");
                    let buffers = ColumnBuffers {
                        kernel: self.kernel,
                        act: &mut self.act,
                        sums: &mut self.sums,
                        columns: &mut self.columns,
                        rows: &mut self.column_rows,
                    };
                    keep_running_sums(
                        buffers,
                        &mut prefix.running_sums[l],
                        layer,
                        weights,
                        samples,
                    );
                }
                rows.nonzeros()
            };
            self.density[l] = nonzeros as f64 / (samples * layer.fan_in).max(1) as f64;
            self.epilogue
                .finish(l, bias, &mut self.scaled_bias, &mut self.act);
            if let Some(prefix) = save.as_deref_mut() {
                prefix.outputs[l].clone_from(&self.act);
                // θ's padded weights stay with the prefix for the passes that start from it;
                // the buffers trade places, so neither is copied again.
                let kept = &mut prefix.weights[l];
                if !padded {
                    *kept = None;
                } else {
                    let mut buffer = kept.take().unwrap_or_default();
                    std::mem::swap(&mut buffer, &mut self.padded);
                    *kept = Some(buffer);
                }
            }
        }
    }
}

/// What [`keep_running_sums`] works in: the kernel, the previous layer's outputs (replaced by
/// this layer's sums), and scratch.
struct ColumnBuffers<'f> {
    kernel: Kernel,
    act: &'f mut Vec<f32>,
    sums: &'f mut Vec<f32>,
    columns: &'f mut Vec<f32>,
    rows: &'f mut SparseRows,
}

/// Layer `layer`'s sums of the previous layer's outputs (in `buffers.act`, replaced by the
/// sums), added up in runs of inputs between the points where `kept` asks for θ's running
/// sums, which it stores on the way. Each run continues the sums of the one before: the same
/// terms in the same order as one pass, so the same bits.
fn keep_running_sums(
    buffers: ColumnBuffers<'_>,
    kept: &mut RunningSums,
    layer: &LayerLayout,
    weights: Weights<'_>,
    samples: usize,
) {
    let ColumnBuffers {
        kernel,
        act,
        sums,
        columns,
        rows,
    } = buffers;
    let (fan_in, fan_out) = (layer.fan_in, layer.fan_out);
    let forms = kernel.form(samples).into();
    kept.sums.resize_with(kept.at.len(), Vec::new);
    sums.clear();
    sums.resize(samples * fan_out, 0.0);
    let mut from = 0;
    for (i, to) in kept.at.iter().copied().chain([fan_in]).enumerate() {
        if to > from {
            fill_columns(act, fan_in, from..to, columns, rows, forms);
            kernel.accumulate_onto(rows, weights.rows_in(from..to), sums);
        }
        if let Some(kept_sums) = kept.sums.get_mut(i) {
            kept_sums.clone_from(sums);
        }
        from = to;
    }
    std::mem::swap(act, sums);
}

/// The columns `columns` of `dense` (rows of `width`), packed, and their nonzeros in
/// `forms`.
fn fill_columns(
    dense: &[f32],
    width: usize,
    columns: std::ops::Range<usize>,
    packed: &mut Vec<f32>,
    rows: &mut SparseRows,
    forms: Forms,
) {
    packed.clear();
    for row in dense.chunks_exact(width) {
        packed.extend_from_slice(&row[columns.clone()]);
    }
    rows.fill_from_dense_in(packed, columns.len(), forms);
}

/// `bias · 2^-e` of the layer's input scale, as the epilogue adds it.
fn scale_bias(mode: Arithmetic, bias: &[f32], bias_scale: f32, scaled: &mut Vec<f32>) {
    scaled.clear();
    scaled.extend(bias.iter().map(|&b| epilogue_mul(mode, b, bias_scale)));
}

/// Each sample's sums (rows of `scaled_bias.len()`) plus the bias, times the output scale.
///
/// Bias add and scaling flush inputs and results in `ftz` and `seed` mode. In `ftz` mode the
/// float environment already does (as it does for the kernels: the
/// `hardware_flush_matches_the_explicit_flush_of_the_reference` test), so unless
/// `explicit_flush` asks for the reference's form, the plain operations give the same bits and
/// skip six explicit flushes per output.
fn epilogue(
    mode: Arithmetic,
    explicit_flush: bool,
    sums: Option<&[f32]>,
    act: &mut Vec<f32>,
    scaled_bias: &[f32],
    out_scale: f32,
) {
    if mode == Arithmetic::Ftz && !explicit_flush {
        each_output(sums, act, scaled_bias, |v, b| (v + b) * out_scale);
    } else {
        each_output(sums, act, scaled_bias, |v, b| {
            epilogue_mul(mode, epilogue_add(mode, v, b), out_scale)
        });
    }
}

/// `act[s, j] = finish(sum[s, j], scaled_bias[j])` for every sample `s` and output `j`, the
/// sums read from `sums` when given (`act` then resized to them), else from `act` itself.
/// Inlined into each of [`epilogue`]'s branches, so each loop vectorises with its own
/// arithmetic.
#[inline(always)]
fn each_output(
    sums: Option<&[f32]>,
    act: &mut Vec<f32>,
    scaled_bias: &[f32],
    finish: impl Fn(f32, f32) -> f32,
) {
    let n = scaled_bias.len();
    match sums {
        None => {
            for out in act.chunks_exact_mut(n) {
                for (v, &b) in out.iter_mut().zip(scaled_bias) {
                    *v = finish(*v, b);
                }
            }
        }
        Some(sums) => {
            act.clear();
            for row in sums.chunks_exact(n) {
                act.extend(row.iter().zip(scaled_bias).map(|(&v, &b)| finish(v, b)));
            }
        }
    }
}

/// Some neurons of one layer with incoming weights and biases of their own
/// ([`Forward::evaluate_group`]).
#[derive(Clone, Debug)]
pub struct NeuronGroup<'a> {
    pub layer: usize,
    /// The neurons (outputs) of the layer, a range of `0..fan_out`.
    pub neurons: std::ops::Range<usize>,
    /// `fan_in × neurons.len()`, input-major like the layer's weights.
    pub weights: &'a [f32],
    pub bias: &'a [f32],
}

/// Several copies of one neuron group, each with incoming weights and biases of its own
/// ([`Forward::evaluate_group_copies`]): the perturbations of one group side by side.
#[derive(Clone, Debug)]
pub struct GroupCopies<'a> {
    pub layer: usize,
    /// The neurons (outputs) of the layer, a range of `0..fan_out`.
    pub neurons: std::ops::Range<usize>,
    pub copies: usize,
    /// `fan_in` rows of `copies · neurons.len()`: each input's row holds copy 0's weights of
    /// the group, then copy 1's, and so on. The kernel reads them as they are given: a
    /// caller that packs many copies does best to write them into [`PaddedWeights`]
    /// (`crate::kernels::padded_stride`).
    pub weights: Weights<'a>,
    /// `copies · neurons.len()`: copy 0's biases, then copy 1's, and so on.
    pub bias: &'a [f32],
}

/// Where [`Forward::run_layers`] finds each layer's weights and bias.
#[derive(Clone, Copy)]
enum Params<'f, 'p> {
    /// One whole parameter vector in the layout's order.
    Whole(&'p [f32]),
    /// θ, whose padded weights (where padded) the prefix made from it keeps: read there
    /// instead of padded again for every pass.
    Theta(&'p [f32], &'f Prefix),
    /// Layer `l`'s weights then bias, from anywhere.
    Layers(&'f dyn Fn(usize) -> &'p [f32]),
}

/// Layer `l`'s weights and bias as one range of θ.
pub fn layer_range(layout: &ParamLayout, l: usize) -> std::ops::Range<usize> {
    let layer = &layout.layers()[l];
    layer.weights.start..layer.bias.end
}

/// What each layer is given and gives when one parameter vector runs on one batch (made by
/// [`Forward::prefix`]). A generation evaluates hundreds of networks that differ from θ only
/// from some layer on, or only in some neurons; they all start from θ's prefix instead of
/// recomputing it.
#[derive(Clone, Debug, Default)]
pub struct Prefix {
    /// `inputs[l - 1]`: the nonzero inputs of layer `l`.
    inputs: Vec<SparseRows>,
    /// `outputs[l]`: layer `l`'s activations, `samples × fan_out` (the last: the logits).
    outputs: Vec<Vec<f32>>,
    /// `running_sums[l]`: θ's sums of layer `l` over its first inputs, where asked for.
    running_sums: Vec<RunningSums>,
    /// `weights[l]`: θ's weights of layer `l` padded ([`padded_stride`]), or `None` where
    /// the packed rows are read as they are.
    weights: Vec<Option<PaddedWeights>>,
    samples: usize,
}

/// A layer's sums before its bias (`samples × fan_out`), over inputs `0..at[i]` in `sums[i]`.
#[derive(Clone, Debug, Default)]
struct RunningSums {
    at: Vec<usize>,
    sums: Vec<Vec<f32>>,
}

impl Prefix {
    pub fn new() -> Prefix {
        Prefix::default()
    }

    /// Asks the next [`Forward::prefix`] to keep layer `layer`'s sums over its inputs
    /// `0..a` for each `a` of `at` (ascending, each `0 < a < fan_in`, layer > 0), so that a
    /// neuron group of the layer before whose first neuron is `a` resumes them
    /// ([`Forward::evaluate_group`]). Costs `at.len()` copies of the layer's sums; the pass
    /// itself does the same arithmetic.
    ///
    /// # Panics
    /// If `at` is not strictly ascending or holds 0.
    pub fn keep_running_sums(&mut self, layer: usize, at: &[usize]) {
        assert!(
            at.windows(2).all(|p| p[0] < p[1]) && at.first() != Some(&0),
            "running sums at {at:?}: expected ascending inputs past 0"
        );
        if self.running_sums.len() <= layer {
            self.running_sums
                .resize_with(layer + 1, RunningSums::default);
        }
        let kept = &mut self.running_sums[layer];
        if kept.at != at {
            kept.at = at.to_vec();
            kept.sums.clear();
        }
    }

    /// θ's padded weights of layer `l`, if the pass that made the prefix padded them.
    fn kept_weights(&self, l: usize) -> Option<&PaddedWeights> {
        self.weights.get(l).and_then(Option::as_ref)
    }

    /// θ's weights of layer `l` as the kernels read them: the padded copy kept, else
    /// `packed` (θ's rows of `n_out`) as it is.
    fn weights<'w>(&'w self, l: usize, packed: &'w [f32], n_out: usize) -> Weights<'w> {
        match self.kept_weights(l) {
            Some(padded) => padded.weights(),
            None => Weights::packed(packed, n_out),
        }
    }

    /// Input indices at which layer `l`'s running sums are kept.
    fn running_sums_at(&self, l: usize) -> &[usize] {
        self.running_sums.get(l).map_or(&[], |kept| &kept.at)
    }

    /// θ's sums of layer `l` over inputs `0..at`, if kept.
    fn running_sums(&self, l: usize, at: usize) -> Option<&[f32]> {
        let kept = self.running_sums.get(l)?;
        let i = kept.at.iter().position(|&a| a == at)?;
        kept.sums.get(i).map(Vec::as_slice)
    }
}
