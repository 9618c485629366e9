#!/usr/bin/env bash
# Runs every test of the workspace: unit tests beside the code, the end-to-end tests in
# tests/, and the kernels forced one at a time (UNDERFLOW_KERNEL) so that each SIMD path is
# exercised through the whole trainer, not only in the kernel tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export UNDERFLOW_DATA="${UNDERFLOW_DATA:-$PWD/../shared/data/mnist}"
export UNDERFLOW_TEST_MNIST="${UNDERFLOW_TEST_MNIST:-$UNDERFLOW_DATA}"
export UNDERFLOW_CACHE="${UNDERFLOW_CACHE:-$PWD/target/underflow-cache}"

cargo test --workspace --locked
# The portable kernel is what a CPU without AVX2 runs: run the end-to-end tests on it too.
UNDERFLOW_KERNEL=portable cargo test --locked -p underflow-tests
