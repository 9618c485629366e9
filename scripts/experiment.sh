#!/usr/bin/env bash
# One reproducible training experiment (issue: reproduce and beat the seed's accuracy):
#
#   scripts/experiment.sh NAME [coordinator flags...]
#   e.g. scripts/experiment.sh ftz-b500 --batch 500 --time-limit 2400 --eval-every 50
#
# Trains embedded (release build, all cores) in runs/experiments/NAME, then keeps in
# docs/results/NAME/ what makes the run checkable and repeatable: config.toml (the resolved
# settings), metrics.jsonl (the curve), summary.json (final accuracy and its unflushed
# control), machine.txt (CPU, cores, commit, command), eval.json and eval-ieee.json
# (`underflow evaluate`: per-class accuracy and confusion matrix, in the run's arithmetic and
# with no flushing at all), eval-train.json (the same on the 60,000 training images) and
# model.safetensors (the final θ: w1, b1, w2, b2, w3, b3).
# Re-running the same command on the same commit reproduces θ bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:?usage: scripts/experiment.sh NAME [coordinator flags...]}"
shift
export UNDERFLOW_DATA="${UNDERFLOW_DATA:-$PWD/../shared/data/mnist}"
cargo build --release --locked --bin coordinator --bin underflow >&2
# The commit the binaries were built from (HEAD may move while the run trains).
commit="$(git rev-parse HEAD)$(git diff --quiet HEAD -- crates || echo ' (with uncommitted changes in crates/)')"
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
run="runs/experiments/$name"
out="docs/results/$name"
rm -rf "$run"
mkdir -p "$out" "$run/bin"
# The run and its evaluations use copies of the binaries: the tree may be rebuilt meanwhile.
cp target/release/coordinator target/release/underflow "$run/bin/"
bin="$run/bin"
"$bin/coordinator" --run-dir "$run" "$@"
cp "$run/config.toml" "$run/metrics.jsonl" "$run/summary.json" "$out/"
"$bin/underflow" evaluate "$run" --json > "$out/eval.json"
"$bin/underflow" evaluate "$run" --mode ieee --json > "$out/eval-ieee.json"
"$bin/underflow" evaluate "$run" --split train --json > "$out/eval-train.json"
"$bin/underflow" export "$run" --out "$out/model.safetensors" >&2
{
  echo "command: scripts/experiment.sh $name $*"
  echo "commit: $commit"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "cores: $(nproc)"
  echo "started: $started"
  echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$out/machine.txt"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/summary.json"))
train = json.load(open(f"{out}/eval-train.json"))["accuracy"]
print(f"{out}: {s['generations']} generations in {s['wall_secs']:.0f} s, test accuracy "
      f"{s['test_accuracy']:.4f} ({s['mode']}), train {train:.4f}; unflushed control "
      f"{s['test_accuracy_unflushed']:.4f}")
PY
