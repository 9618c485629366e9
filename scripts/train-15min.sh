#!/usr/bin/env bash
# The issue-2 acceptance run: the default configuration for 15 minutes of wall time on this
# machine, test accuracy on all 10,000 test images every 100 generations. Writes the run to
# runs/default-15min/ and prints the curve (test accuracy against wall time and generations)
# and the control: the same final parameters evaluated with no flushing at all.
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="${1:-runs/default-15min}"
export UNDERFLOW_DATA="${UNDERFLOW_DATA:-$PWD/../shared/data/mnist}"
cargo build --release --locked --bin coordinator
rm -rf "$run_dir"
./target/release/coordinator --time-limit 900 --eval-every 100 --run-dir "$run_dir"
echo
echo "generation  wall_s  test_accuracy"
python3 - "$run_dir" <<'PY'
import json, sys
d = sys.argv[1]
for line in open(f"{d}/metrics.jsonl"):
    m = json.loads(line)
    if "test_accuracy" in m:
        print(f"{m['generation'] + 1:10d}  {m['wall_secs']:6.0f}  {m['test_accuracy']:.4f}")
s = json.load(open(f"{d}/summary.json"))
print(f"final: {s['generations']} generations in {s['wall_secs']:.0f} s, test accuracy "
      f"{s['test_accuracy']:.4f}; same parameters unflushed (IEEE, no FTZ): "
      f"{s['test_accuracy_unflushed']:.4f}")
PY
