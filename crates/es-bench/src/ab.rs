//! Side-by-side comparisons: an earlier path and the one that replaced it, timed in
//! alternating rounds of one run ([`measure_pair`]), so the ratio holds even on a machine
//! shared with other work.

use std::hint::black_box;

use anyhow::Context;
use es_kernel::loss::{Evaluation, MathPath, row_max};
use es_kernel::{Arithmetic, Batch, Fill, Forward, Kernel, NetConfig};

use crate::report::{Row, sig3};
use crate::timing::{Budget, Paired, measure_pair};

/// A row of a paired measurement: the new path's speed, and its speed-up over the old one.
fn paired_row(case: String, paired: &Paired, per_call: f64, unit: &'static str) -> Row {
    Row::new("a/b", case, per_call / paired.b.median, unit)
        .timed(&paired.b)
        .versus(paired.ratio, "old", false)
        .note(format!(
            "old {} {unit}; speed-up per round {}–{} over {} rounds",
            sig3(per_call / paired.a.median),
            sig3(paired.ratio_min),
            sig3(paired.ratio_max),
            paired.a.rounds
        ))
        .metric("old_median_s_per_call", paired.a.median)
        .metric("speedup", paired.ratio)
        .metric("speedup_min", paired.ratio_min)
        .metric("speedup_max", paired.ratio_max)
}

/// The changes to the forward pass timed side by side, each old form against the current one.
const FORWARD_CHANGES: [Change; 3] = [
    // Each layer's inputs built both ways: [`Fill::Simple`] then [`Fill::Needed`].
    Change {
        label: "fill",
        what: "fills",
        description: "layer inputs both forms branching → the kernel's form branch-free",
        old: |forward| forward.set_fill(Fill::Simple),
    },
    // The bias add and scaling flushed explicitly (as before), then by the float environment.
    Change {
        label: "epilogue",
        what: "epilogues",
        description: "bias add and scaling flushed explicitly → by the float environment",
        old: |forward| forward.set_explicit_flush(true),
    },
    // θ's weight rows read as they are packed (as before), then from copies whose rows the
    // caches like (`es_kernel::kernels::padded_stride`), the copy included in the time.
    Change {
        label: "padding",
        what: "weight layouts",
        description: "weight rows packed → padded to an odd number of cache lines",
        old: |forward| forward.set_padding(false),
    },
];

/// One forward pass (`Forward::logits`, ftz) before and after each of [`FORWARD_CHANGES`],
/// for each kernel and parameter set.
pub fn forward_change_rows(
    budget: Budget,
    kernels: &[Kernel],
    params: &[(&str, &[f32])],
    batch: &Batch,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for change in &FORWARD_CHANGES {
        rows.extend(forward_rows(budget, kernels, params, batch, change)?);
    }
    Ok(rows)
}

/// A change to the forward pass measured by [`forward_rows`].
struct Change {
    /// Progress label.
    label: &'static str,
    /// What differs, plural, for the error when the two give different logits.
    what: &'static str,
    description: &'static str,
    /// Turns a new forward pass into the old one.
    old: fn(&mut Forward),
}

/// The old and the new forward pass of `change` (ftz, default network), for each kernel and
/// parameter set, alternated in one run, after checking that they give the same logits.
fn forward_rows(
    budget: Budget,
    kernels: &[Kernel],
    params: &[(&str, &[f32])],
    batch: &Batch,
    change: &Change,
) -> anyhow::Result<Vec<Row>> {
    let config = NetConfig::default();
    assert_eq!(config.arithmetic, Arithmetic::Ftz);
    let mut rows = Vec::new();
    for &kernel in kernels {
        for &(name, theta) in params {
            crate::progress(&format!(
                "a/b {} {kernel} B={} {name}",
                change.label,
                batch.len()
            ));
            let build = || {
                Forward::new(config.clone(), kernel)
                    .with_context(|| format!("building the {kernel} forward pass"))
            };
            let (mut old, mut new) = (build()?, build()?);
            (change.old)(&mut old);
            // Same bits both ways, or the comparison means nothing.
            anyhow::ensure!(
                old.logits(theta, batch)
                    .iter()
                    .zip(new.logits(theta, batch))
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0)),
                "{kernel} {name}: the two {} gave different logits",
                change.what
            );
            let paired = measure_pair(
                budget,
                || {
                    black_box(old.logits(black_box(theta), batch));
                },
                || {
                    black_box(new.logits(black_box(theta), batch));
                },
            );
            rows.push(paired_row(
                format!(
                    "forward {kernel} ftz B={} {name}: {}",
                    batch.len(),
                    change.description
                ),
                &paired,
                batch.len() as f64,
                "samples/s/core",
            ));
        }
    }
    Ok(rows)
}

/// A function of [`MathPath`] that replaces each value by its image.
type InPlace = fn(MathPath, &mut [f64]);

/// libm's `exp` and `log`, one value at a time, against each vector [`MathPath`] of this CPU,
/// on the loss's own inputs (`Evaluation::from_logits`): each logit minus its sample's
/// largest for `exp`, each sample's sum of those exponentials for `log`. `logits` are a
/// forward pass's, `classes` per sample.
pub fn math_rows(budget: Budget, logits: &[f32], classes: usize) -> anyhow::Result<Vec<Row>> {
    let shifted: Vec<f64> = logits
        .chunks_exact(classes)
        .flat_map(|o| {
            let max = row_max(o);
            o.iter().map(move |&v| v as f64 - max)
        })
        .collect();
    let mut exps = shifted.clone();
    MathPath::Scalar.exp_in_place(&mut exps);
    let sums: Vec<f64> = exps.chunks_exact(classes).map(|e| e.iter().sum()).collect();
    let functions: [(&str, &[f64], InPlace); 2] = [
        ("exp of logit − row max", &shifted, MathPath::exp_in_place),
        ("log of a sample's sum of exp", &sums, MathPath::ln_in_place),
    ];
    let mut rows = Vec::new();
    for (what, inputs, function) in functions {
        for path in MathPath::supported() {
            if path == MathPath::Scalar {
                continue;
            }
            crate::progress(&format!("a/b {what} {path:?} ({} values)", inputs.len()));
            let (mut old, mut new) = (inputs.to_vec(), inputs.to_vec());
            function(MathPath::Scalar, &mut old);
            function(path, &mut new);
            // Same bits both ways, or the comparison means nothing.
            anyhow::ensure!(
                old.iter()
                    .zip(&new)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what} {path:?}: the vector path differs from libm's bits"
            );
            let paired = measure_pair(
                budget,
                || {
                    old.copy_from_slice(inputs);
                    function(MathPath::Scalar, black_box(&mut old));
                },
                || {
                    new.copy_from_slice(inputs);
                    function(path, black_box(&mut new));
                },
            );
            rows.push(paired_row(
                format!(
                    "{what} ({} loss inputs): libm one at a time → {path:?}",
                    inputs.len()
                ),
                &paired,
                inputs.len() as f64,
                "values/s",
            ));
        }
    }
    Ok(rows)
}

/// A batch's whole loss (`Evaluation::from_logits_on`: maxima, exponentials, sums,
/// logarithms, argmax) one sample at a time with libm, against each vector [`MathPath`] of
/// this CPU, which scores samples side by side, one per lane. `logits` are a forward pass's,
/// `classes` per sample, scored against `labels`.
pub fn loss_rows(
    budget: Budget,
    logits: &[f32],
    labels: &[u8],
    classes: usize,
) -> anyhow::Result<Vec<Row>> {
    let scalar = Evaluation::from_logits_on(MathPath::Scalar, logits, labels, classes);
    let mut rows = Vec::new();
    for path in MathPath::supported() {
        if path == MathPath::Scalar {
            continue;
        }
        crate::progress(&format!("a/b loss of {} samples {path:?}", labels.len()));
        let vector = Evaluation::from_logits_on(path, logits, labels, classes);
        // Same bits both ways, or the comparison means nothing.
        anyhow::ensure!(
            vector.fitness.to_bits() == scalar.fitness.to_bits()
                && vector.correct == scalar.correct,
            "loss on {path:?}: {vector:?}, one sample at a time {scalar:?}"
        );
        let paired = measure_pair(
            budget,
            || {
                black_box(Evaluation::from_logits_on(
                    MathPath::Scalar,
                    black_box(logits),
                    labels,
                    classes,
                ));
            },
            || {
                black_box(Evaluation::from_logits_on(
                    path,
                    black_box(logits),
                    labels,
                    classes,
                ));
            },
        );
        rows.push(paired_row(
            format!(
                "loss of a batch ({} samples): one sample at a time, libm → samples side by side, {path:?}",
                labels.len()
            ),
            &paired,
            labels.len() as f64,
            "samples/s",
        ));
    }
    Ok(rows)
}
