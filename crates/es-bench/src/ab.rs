//! Side-by-side comparisons: an earlier path and the one that replaced it, timed in
//! alternating rounds of one run ([`measure_pair`]), so the ratio holds even on a machine
//! shared with other work.

use std::hint::black_box;

use anyhow::Context;
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

/// One forward pass (`Forward::logits`, ftz) with each layer's inputs built both ways
/// ([`Fill::Simple`] then [`Fill::Needed`]), for `kernel` and each parameter set.
pub fn fill_rows(
    budget: Budget,
    kernels: &[Kernel],
    params: &[(&str, &[f32])],
    batch: &Batch,
) -> anyhow::Result<Vec<Row>> {
    let change = Change {
        label: "fill",
        what: "fills",
        description: "layer inputs both forms branching → the kernel's form branch-free",
        old: |forward| forward.set_fill(Fill::Simple),
    };
    forward_rows(budget, kernels, params, batch, &change)
}

/// One forward pass (`Forward::logits`, ftz) whose bias add and scaling flush explicitly
/// (as before) against one that leaves the flushing to the float environment.
pub fn flush_rows(
    budget: Budget,
    kernels: &[Kernel],
    params: &[(&str, &[f32])],
    batch: &Batch,
) -> anyhow::Result<Vec<Row>> {
    let change = Change {
        label: "epilogue",
        what: "epilogues",
        description: "bias add and scaling flushed explicitly → by the float environment",
        old: |forward| forward.set_explicit_flush(true),
    };
    forward_rows(budget, kernels, params, batch, &change)
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
