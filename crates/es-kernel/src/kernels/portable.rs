//! The portable kernel: plain Rust over whole output rows, vectorised by the compiler across
//! outputs (which keeps the per-output order of operations, hence the bits).

use super::Start;
use crate::sparse::SparseRows;

pub(super) fn accumulate(
    rows: &SparseRows,
    weights: &[f32],
    n_out: usize,
    out: &mut [f32],
    start: Start<'_>,
) {
    for (s, acc) in out.chunks_exact_mut(n_out).enumerate() {
        match start {
            Start::Zero => acc.fill(0.0),
            Start::Out => {}
            Start::From(start) => acc.copy_from_slice(&start[s * n_out..(s + 1) * n_out]),
        }
        let (index, value) = rows.row(s);
        for (&k, &x) in index.iter().zip(value) {
            let k = k as usize;
            let w = &weights[k * n_out..(k + 1) * n_out];
            for (a, &w) in acc.iter_mut().zip(w) {
                *a += x * w;
            }
        }
    }
}
