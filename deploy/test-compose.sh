#!/usr/bin/env bash
# The Compose cluster, tested for real on this machine's Docker engine:
#  1. build the images (FROM scratch) and report their sizes;
#  2. train the same run embedded (natively) for the reference θ and generation time;
#  3. bring up a coordinator and 3 workers, `docker kill` one worker and disconnect another
#     from the network (and reconnect it) mid-run; the run completes, θ is bit-identical to
#     the reference, and all 3 workers contributed;
#  4. `docker-compose down -v` leaves no container, network or volume (the run directory on
#     the host stays);
#  5. the same run with a hub between the coordinator and 2 workers
#     (deploy/docker-compose.hubs.yml): θ again bit-identical, both workers contributed.
# Prints start-up time and the generation time of the cluster against the embedded run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
mnist="${UNDERFLOW_DATA:-$repo/../shared/data/mnist}"
mnist="$(cd "$mnist" && pwd)"
compose=(docker-compose)
if ! command -v docker-compose >/dev/null; then compose=(docker compose); fi

deploy/build-images.sh

work="$(mktemp -d)"
project="underflowtest$$"
export COMPOSE_PROJECT_NAME="$project"
export UNDERFLOW_MNIST="$mnist" UNDERFLOW_RUNS="$work/runs" UNDERFLOW_CONFIG="$work/run.toml"
# Fanout 1: the coordinator sends θ to one worker, which relays it on (a chain through the
# faults below, which break it: the workers fall back to asking the coordinator).
export UNDERFLOW_RELAY_FANOUT=1
export UNDERFLOW_WORKERS=3 UNDERFLOW_UID="$(id -u)" UNDERFLOW_GID="$(id -g)"
export UNDERFLOW_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export UNDERFLOW_HTTP_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
dc() { "${compose[@]}" -f deploy/docker-compose.yml "$@"; }
cleanup() {
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/runs"
# The run's token, a secret the containers read as a file.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
chmod 644 "$work/token"
export UNDERFLOW_TOKEN_FILE="$work/token"
# Generations of a few tenths of a second, so that the faults land mid-run.
cat > "$work/run.toml" <<'TOML'
generations = 40
population = 48
batch = 1000
eval_every = 0
checkpoint_every = 10
noise_table_len = 4194304
TOML

echo "== reference: the same run embedded, natively"
UNDERFLOW_CACHE="$work/cache" ./target/release/coordinator --config "$work/run.toml" \
  --mirror none --data "$mnist" --run-dir "$work/reference" >/dev/null 2>"$work/reference.log"

echo "== compose: a coordinator and 3 workers"
started=$(date +%s.%N)
dc up -d --scale worker=3
coordinator=$(dc ps -q coordinator)
metrics="$work/runs/run/metrics.jsonl"
wait_lines() { # N: wait until metrics.jsonl has N lines
  for _ in $(seq 600); do
    [ -f "$metrics" ] && [ "$(wc -l < "$metrics")" -ge "$1" ] && return 0
    sleep 0.1
  done
  echo "FAIL: the cluster did not reach $1 generations" >&2; dc logs >&2; exit 1
}
wait_lines 1
first_generation=$(python3 -c "print(f'{$(date +%s.%N) - $started:.1f}')")
wait_lines 5
workers=($(dc ps -q worker))
[ "${#workers[@]}" -eq 3 ] || { echo "FAIL: expected 3 workers, found ${#workers[@]}" >&2; exit 1; }
network="${project}_default"
echo "== docker kill of a worker, network disconnect of another"
docker kill "${workers[0]}" >/dev/null
docker network disconnect "$network" "${workers[1]}"
sleep 6
docker network connect "$network" "${workers[1]}"

status=$(docker wait "$coordinator")
[ "$status" -eq 0 ] || { echo "FAIL: coordinator exited with $status" >&2; dc logs coordinator >&2; exit 1; }
dc logs --no-color coordinator > "$work/coordinator.log" 2>&1
for w in "${workers[@]:1}"; do docker wait "$w" >/dev/null; done

cmp "$work/reference/theta.f32" "$work/runs/run/theta.f32" \
  || { echo "FAIL: θ of the compose cluster differs from the embedded run" >&2; exit 1; }
echo "θ bit-identical to the embedded run"

python3 - "$work" "${workers[@]}" <<'PY'
import json, re, statistics, sys
work, workers = sys.argv[1], sys.argv[2:]
def gen_time(path):
    m = [json.loads(l) for l in open(path)][1:]
    return statistics.median(b["wall_secs"] - a["wall_secs"] for a, b in zip(m, m[1:]))
lines = [json.loads(l) for l in open(f"{work}/runs/run/metrics.jsonl")]
assert len(lines) == 40, f"{len(lines)} generations in metrics.jsonl: expected 40"
assert any(l["workers"] < 3 for l in lines), "no generation ran without the lost workers"
relayed = sum(l.get("theta_relayed", 0) for l in lines)
assert relayed > 0, "no worker fetched θ from another worker's relay"
print(f"θ fetched from relays {relayed} times, asked of the coordinator "
      f"{sum(l.get('theta_requested', 0) for l in lines)} times")
contributed = {}
for line in open(f"{work}/coordinator.log"):
    m = re.search(r"name=(\S+).*pairs_accepted=(\d+)", line)
    if m:
        host = m.group(1).split("/")[0]
        contributed[host] = contributed.get(host, 0) + int(m.group(2))
ids = [w[:12] for w in workers]
for w in ids:
    assert contributed.get(w, 0) > 0, f"worker container {w} contributed nothing: {contributed}"
print("pairs accepted per worker container:", {w: contributed[w] for w in ids})
print("evaluations repeated:", 2 * sum(l.get("reassigned", 0) for l in lines))
e, c = gen_time(f"{work}/reference/metrics.jsonl"), gen_time(f"{work}/runs/run/metrics.jsonl")
print(f"generation time: embedded {e:.3f} s, compose (3 workers x 1 thread) {c:.3f} s, ratio {c / e:.2f}")
PY
echo "start-up: first generation done ${first_generation} s after 'up'"

echo "== down"
dc down -v --remove-orphans
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project" | wc -l)
nets=$(docker network ls -q --filter "label=com.docker.compose.project=$project" | wc -l)
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$project" | wc -l)
[ "$left" -eq 0 ] && [ "$nets" -eq 0 ] && [ "$vols" -eq 0 ] \
  || { echo "FAIL: down left $left containers, $nets networks, $vols volumes" >&2; exit 1; }
[ -f "$work/runs/run/theta.f32" ] || { echo "FAIL: the run directory did not survive down" >&2; exit 1; }
echo "down left no containers, networks or volumes; the run directory stays"

echo "== compose with a hub: the root, 1 hub, 2 workers behind the hub"
hubs=(-f deploy/docker-compose.yml -f deploy/docker-compose.hubs.yml)
dh() { "${compose[@]}" "${hubs[@]}" "$@"; }
# The root waits for its one hub; the hub for its two workers, so both take part.
UNDERFLOW_RUN=hubs UNDERFLOW_WORKERS=1 UNDERFLOW_HUB_WORKERS=2 UNDERFLOW_HUB_THREADS=2 \
  dh up -d --scale hub=1 --scale worker=2
coordinator=$(dh ps -q coordinator)
status=$(docker wait "$coordinator")
dh logs --no-color coordinator > "$work/hubs-coordinator.log" 2>&1
dh logs --no-color hub > "$work/hubs-hub.log" 2>&1
[ "$status" -eq 0 ] || { echo "FAIL: the root exited with $status" >&2; cat "$work/hubs-coordinator.log" "$work/hubs-hub.log" >&2; exit 1; }
for c in $(dh ps -q hub worker); do
  s=$(docker wait "$c")
  [ "$s" -eq 0 ] || { echo "FAIL: container $c of the hub run exited with $s" >&2; dh logs >&2; exit 1; }
done
cmp "$work/reference/theta.f32" "$work/runs/hubs/theta.f32" \
  || { echo "FAIL: θ behind a hub differs from the embedded run" >&2; exit 1; }
echo "θ behind a hub bit-identical to the embedded run"
python3 - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
lines = [json.loads(l) for l in open(f"{work}/runs/hubs/metrics.jsonl")]
assert len(lines) == 40, f"{len(lines)} generations behind the hub: expected 40"
assert all(l["workers"] == 1 for l in lines), "the root served exactly its one hub"
behind = {}
for line in open(f"{work}/hubs-hub.log"):
    m = re.search(r"worker at the end of the run.* name=(\S+) pairs_accepted=(\d+)", line)
    if m:
        behind[m.group(1)] = behind.get(m.group(1), 0) + int(m.group(2))
assert len(behind) == 2 and all(n > 0 for n in behind.values()), f"pairs per worker behind the hub: {behind}"
print("pairs accepted per worker behind the hub:", behind)
PY
dh down -v --remove-orphans
echo "PASS"
