#!/usr/bin/env bash
# Cluster against embedded, side by side in one run on this machine: the same run config
# trained (1) embedded with all cores and (2) by a coordinator with 2 worker processes of one
# thread each on loopback. Prints evaluations/s and generation time of both, their ratio, and
# the protobuf payload bytes per generation (total and per worker), then the bytes for other
# populations and worker counts (short runs: bytes do not depend on speed).
set -euo pipefail
cd "$(dirname "$0")/.."
export UNDERFLOW_DATA="${UNDERFLOW_DATA:-$PWD/../shared/data/mnist}"
generations="${GENERATIONS:-60}"
population="${POPULATION:-256}"
cargo build --release --locked --bin coordinator --bin worker >&2
out="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT
# The first release's settings (an empty config file): pairs perturbing all of θ, constant
# B 100, as the earlier measurements of this script used.
first_release="$out/first-release.toml"
: >"$first_release"
settings=(--config "$first_release" --eval-every 0 --mirror none --data "$UNDERFLOW_DATA")
common=(--generations "$generations" --population "$population" "${settings[@]}")

./target/release/coordinator "${common[@]}" --run-dir "$out/embedded" >/dev/null 2>"$out/embedded.log"

cluster() { # name workers population generations
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # The coordinator keeps all cores: it computes only while the workers wait (the update).
  ./target/release/coordinator --workers "$2" --listen "127.0.0.1:$port" \
    --generations "$4" --population "$3" "${settings[@]}" --run-dir "$out/$1" >/dev/null 2>"$out/$1.log" &
  local coordinator=$!
  for _ in $(seq "$2"); do
    ./target/release/worker --connect "127.0.0.1:$port" --threads 1 --data "$UNDERFLOW_DATA" 2>>"$out/$1.workers.log" &
  done
  wait "$coordinator"
  wait
}
cluster cluster2 2 "$population" "$generations"
cluster bytes_p512_w2 2 512 3
cluster bytes_p256_w4 4 256 3

python3 - "$out" "$population" <<'PY'
import json, statistics, sys
out, population = sys.argv[1], int(sys.argv[2])
def load(name):
    return [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
def summary(name):
    m = load(name)[1:]  # the first generation includes start-up
    gen = statistics.median(b["wall_secs"] - a["wall_secs"] for a, b in zip(m, m[1:]))
    eps = statistics.median(x["evals_per_sec"] for x in m)
    return gen, eps, m
e_gen, e_eps, _ = summary("embedded")
c_gen, c_eps, cm = summary("cluster2")
print(f"population {population}, batch 100, generations {len(cm) + 1}; medians over generations 2..")
print(f"{'mode':<28}{'evals/s':>10}{'gen time s':>12}")
print(f"{'embedded (2 threads)':<28}{e_eps:>10.0f}{e_gen:>12.3f}")
print(f"{'cluster (2 workers x 1)':<28}{c_eps:>10.0f}{c_gen:>12.3f}")
print(f"cluster / embedded: evals/s {c_eps / e_eps:.3f}, generation time {c_gen / e_gen:.3f}")
print()
print(f"{'run':<24}{'workers':>8}{'P':>6}{'sent B/gen':>14}{'recv B/gen':>12}{'sent/worker':>13}")
for name, workers, p in [("cluster2", 2, population), ("bytes_p512_w2", 2, 512), ("bytes_p256_w4", 4, 256)]:
    m = load(name)
    sent = statistics.median(x["wire_bytes_sent"] for x in m)
    recv = statistics.median(x["wire_bytes_received"] for x in m)
    print(f"{name:<24}{workers:>8}{p:>6}{sent:>14.0f}{recv:>12.0f}{sent / workers:>13.0f}")
PY
