//! The portable kernel: plain Rust over whole output rows, vectorised by the compiler across
//! outputs (which keeps the per-output order of operations, hence the bits).

use super::{Start, Weights, WindowCopies, rest_after};
use crate::sparse::SparseRows;

/// [`super::Kernel::accumulate_dense`]: every term of each dense row, in input order.
pub(super) fn accumulate_dense(dense: &[f32], width: usize, weights: Weights<'_>, out: &mut [f32]) {
    let n_out = weights.n_out();
    for (acc, row) in out.chunks_exact_mut(n_out).zip(dense.chunks_exact(width)) {
        acc.fill(0.0);
        for (k, &x) in row.iter().enumerate() {
            for (a, &w) in acc.iter_mut().zip(weights.row(k)) {
                *a += x * w;
            }
        }
    }
}

pub(super) fn accumulate(
    rows: &SparseRows,
    weights: Weights<'_>,
    out: &mut [f32],
    start: Start<'_>,
) {
    let n_out = weights.n_out();
    for (s, acc) in out.chunks_exact_mut(n_out).enumerate() {
        match start {
            Start::Zero => acc.fill(0.0),
            Start::Out => {}
            Start::From(start) => acc.copy_from_slice(&start[s * n_out..(s + 1) * n_out]),
        }
        let (index, value) = rows.row(s);
        for (&k, &x) in index.iter().zip(value) {
            for (a, &w) in acc.iter_mut().zip(weights.row(k as usize)) {
                *a += x * w;
            }
        }
    }
}

/// [`super::Kernel::accumulate_window_copies`], one copy at a time (each product of a shared
/// term recomputed per copy: the same bits, since a product is a function of its operands).
pub(super) fn accumulate_window_copies(
    copies: &WindowCopies<'_>,
    weights: Weights<'_>,
    out: &mut [f32],
) {
    let n_out = weights.n_out();
    let samples = copies.rest.samples();
    for (c, out) in copies
        .copies
        .clone()
        .zip(out.chunks_exact_mut(samples * n_out))
    {
        for (s, acc) in out.chunks_exact_mut(n_out).enumerate() {
            acc.copy_from_slice(&copies.start[s * n_out..(s + 1) * n_out]);
            let row = &copies.window[s * copies.columns..(s + 1) * copies.columns];
            let window = &row[c * copies.width..(c + 1) * copies.width];
            let (index, value) = rest_after(copies, s);
            let window_terms = window
                .iter()
                .enumerate()
                .map(|(k, &x)| (copies.from + k, x));
            let rest_terms = index.iter().zip(value).map(|(&k, &x)| (k as usize, x));
            for (k, x) in window_terms.chain(rest_terms) {
                for (a, &w) in acc.iter_mut().zip(weights.row(k)) {
                    *a += x * w;
                }
            }
        }
    }
}
