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
# The portable kernel is what a CPU without AVX2 runs: run the end-to-end training tests on
# it too (the fault scenarios test the cluster's bookkeeping, not the kernel: once is enough).
UNDERFLOW_KERNEL=portable cargo test --locked -p underflow-tests --test embedded --test cluster

# Deployment: the Kubernetes manifests against the API schemas (offline, after a pip install),
# and the Compose cluster for real — it needs a Docker engine: always there in CI
# (UNDERFLOW_REQUIRE_DOCKER=1), elsewhere skipped with a notice when there is none.
deploy/validate-k8s.sh
if docker info >/dev/null 2>&1; then
  deploy/test-compose.sh
elif [ "${UNDERFLOW_REQUIRE_DOCKER:-0}" = 1 ]; then
  echo "no usable Docker engine: deploy/test-compose.sh cannot run" >&2
  exit 1
else
  echo "SKIPPED deploy/test-compose.sh: no usable Docker engine on this machine" >&2
fi
