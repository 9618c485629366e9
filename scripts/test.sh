#!/usr/bin/env bash
# Runs every test of the workspace (unit tests beside the code, the end-to-end tests in
# tests/), then the end-to-end tests again on the portable kernel (UNDERFLOW_KERNEL), the
# path a CPU without AVX2 takes, so that it is exercised through the whole trainer too.
set -euo pipefail
cd "$(dirname "$0")/.."
# MNIST for the tests: $UNDERFLOW_DATA, else the shared copy beside the checkout (CI), else
# the trainer's download cache (after a first `cargo run --release --bin coordinator`).
if [ -z "${UNDERFLOW_DATA:-}" ]; then
  if [ -d "$PWD/../shared/data/mnist" ]; then
    UNDERFLOW_DATA="$PWD/../shared/data/mnist"
  else
    UNDERFLOW_DATA="${XDG_CACHE_HOME:-$HOME/.cache}/underflow/mnist"
  fi
fi
export UNDERFLOW_DATA
export UNDERFLOW_CACHE="${UNDERFLOW_CACHE:-$PWD/target/underflow-cache}"
if ! ls "$UNDERFLOW_DATA"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  # A fresh machine with internet: let the trainer download and verify MNIST (zero
  # generations), so that the tests have their data.
  echo "MNIST not found in $UNDERFLOW_DATA: downloading it with the coordinator" >&2
  cargo run --release --locked --bin coordinator -- --generations 0 --eval-every 0 \
    --data "$UNDERFLOW_DATA" --run-dir target/mnist-download
fi
export UNDERFLOW_TEST_MNIST="${UNDERFLOW_TEST_MNIST:-$UNDERFLOW_DATA}"

cargo test --workspace --locked
# The portable kernel is what a CPU without AVX2 runs: run the end-to-end tests on it too.
UNDERFLOW_KERNEL=portable cargo test --locked -p underflow-tests
