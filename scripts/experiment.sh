#!/usr/bin/env bash
# One reproducible training experiment (issue: reproduce and beat the seed's accuracy):
#
#   scripts/experiment.sh NAME [coordinator flags...]
#   e.g. scripts/experiment.sh ftz-b500 --batch 500 --time-limit 2400 --eval-every 50
#   scripts/experiment.sh --resume NAME [--time-limit S] [--threads N] ...
#
# Trains embedded (release build, all cores) in runs/experiments/NAME, then keeps in
# docs/results/NAME/ what makes the run checkable and repeatable: config.toml (the resolved
# settings), metrics.jsonl (the curve), summary.json (final accuracy and its unflushed
# control), machine.txt (CPU, cores, commit, command), eval.json and eval-ieee.json
# (`underflow evaluate`: per-class accuracy and confusion matrix, in the run's arithmetic and
# with no flushing at all), eval-train.json (the same on the 60,000 training images) and
# model.safetensors (the final θ: w1, b1, w2, b2, w3, b3).
# Re-running the same command on the same commit reproduces θ bit for bit.
#
# A run longer than one sitting: when --time-limit stops it before its last generation, its
# newest checkpoint is also kept in docs/results/NAME/resume/ (commit the directory with
# `git add -A docs/results/NAME`), and `--resume NAME` continues it later, on any machine,
# from there and the kept curve (or from runs/experiments/NAME when that is still on disk),
# with only operational flags (time limit, threads, evaluation and checkpoint intervals). A
# resumed run ends bit-identical to one that never stopped; its wall time is the sum of its
# sittings', which machine.txt lists.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/experiment.sh [--resume] NAME [coordinator flags...]"
resume=false
if [ "${1:-}" = --resume ]; then
  resume=true
  shift
fi
name="${1:?$usage}"
shift
export UNDERFLOW_DATA="${UNDERFLOW_DATA:-$PWD/../shared/data/mnist}"
cargo build --release --locked --bin coordinator --bin underflow >&2
# The commit the binaries were built from (HEAD may move while the run trains).
commit="$(git rev-parse HEAD)$(git diff --quiet HEAD -- crates || echo ' (with uncommitted changes in crates/)')"
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
run="runs/experiments/$name"
out="docs/results/$name"
if $resume; then
  if ! ls "$run"/checkpoints/*.ckpt >/dev/null 2>&1; then
    # A new machine: the run's kept checkpoint and curve are all it needs.
    ls "$out"/resume/*.ckpt >/dev/null 2>&1 ||
      { echo "no checkpoint in $run/checkpoints or $out/resume to resume $name from" >&2; exit 1; }
    mkdir -p "$run/checkpoints"
    cp "$out"/resume/*.ckpt "$run/checkpoints/"
    cp "$out/metrics.jsonl" "$run/"
  fi
else
  rm -rf "$run" "$out/resume"
  mkdir -p "$out"
fi
mkdir -p "$run/bin"
# The run and its evaluations use copies of the binaries: the tree may be rebuilt meanwhile.
cp target/release/coordinator target/release/underflow "$run/bin/"
bin="$run/bin"
if $resume; then
  "$bin/coordinator" --resume "$run" --run-dir "$run" "$@"
else
  "$bin/coordinator" --run-dir "$run" "$@"
fi
cp "$run/config.toml" "$run/metrics.jsonl" "$run/summary.json" "$out/"
"$bin/underflow" evaluate "$run" --json > "$out/eval.json"
"$bin/underflow" evaluate "$run" --mode ieee --json > "$out/eval-ieee.json"
"$bin/underflow" evaluate "$run" --split train --json > "$out/eval-train.json"
"$bin/underflow" export "$run" --out "$out/model.safetensors" >&2
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
cpu="$cpu (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' '), model $(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')$(grep -q avx512f /proc/cpuinfo && echo ', avx512f'))"
# machine.txt: the first sitting's lines, then an indented block for each resumed one.
if $resume; then
  heading="resumed: scripts/experiment.sh --resume $name $*"
  indent="  "
else
  heading="command: scripts/experiment.sh $name $*"
  indent=""
  : > "$out/machine.txt"
fi
{
  echo "$heading"
  echo "${indent}commit: $commit"
  echo "${indent}cpu: $cpu"
  echo "${indent}cores: $(nproc)"
  echo "${indent}started: $started"
  echo "${indent}finished: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >> "$out/machine.txt"
# Stopped before its last generation: keep what --resume needs (the newest checkpoint only).
rm -rf "$out/resume"
if python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); c = open(sys.argv[2]).read()
import re; total = int(re.search(r"^generations = (\d+)", c, re.M).group(1))
sys.exit(0 if s["generations"] < total else 1)' "$out/summary.json" "$out/config.toml"; then
  mkdir -p "$out/resume"
  cp "$(ls "$run"/checkpoints/*.ckpt | sort | tail -n 1)" "$out/resume/"
  echo "$name stopped early: commit it (git add -A $out) and continue with scripts/experiment.sh --resume $name" >&2
fi
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/summary.json"))
train = json.load(open(f"{out}/eval-train.json"))["accuracy"]
# Each sitting's clock starts at zero: the run's wall time is the sum of the sittings'.
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if line.strip()]
wall = sum(a["wall_secs"] for a, b in zip(rows, rows[1:] + [None])
           if b is None or b["wall_secs"] < a["wall_secs"])
print(f"{out}: {s['generations']} generations in {wall:.0f} s, test accuracy "
      f"{s['test_accuracy']:.4f} ({s['mode']}), train {train:.4f}; unflushed control "
      f"{s['test_accuracy_unflushed']:.4f}")
PY
