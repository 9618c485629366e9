#!/usr/bin/env bash
# The benchmark report: ONE table from one run of this script (about 5–8 minutes on 2 cores).
#
#  1. trained-like parameters: 100 generations of the first release's default run (about 1
#     minute), cached
#     in runs/bench-trained/ and reused afterwards (delete it to train again);
#  2. es-bench: forward samples/s per core for ftz and seed at B = 32, 100, 1000 (init and
#     trained parameters), matrixmultiply's sgemm on the same shapes, the other kernels,
#     the update's GB/s against a plain parallel memory read;
#  3. a whole generation at P = 256, B = 100: embedded (2 threads) and a coordinator with 2
#     local worker processes of 1 thread, with pairs that perturb all of θ (the first
#     release's settings); and both again with the recommended recipe's kind of pairs (each
#     perturbs one group of one layer's neurons) at the same P and B;
#  4. the coordinator at P = 10,000 with 1, 32, 256 and 1,000 fake workers (one `worker
#     --fake-fitness --connections N --threads 2` process, so chunks are sized as for real
#     2-core workers; real gRPC on loopback; audits off since the fitnesses are fake, and the
#     per-stream results rate limit raised): time per generation, its update, the
#     coordinator's CPU time, and (LOCAL_UPDATE_WORKERS: with 32 of them again with
#     --local-update, the whole update on the coordinator, side by side with the spread
#     update, in which the fake workers answer the noise sums with fake values too), and
#     the overhead against the generation time 32 real workers of this machine (2 cores
#     each) would need, derived from the embedded run's evaluations per second per core;
#  5. the same with relaying fake workers (RELAY_WORKERS: `worker --relay-listen
#     127.0.0.1:0`, each connection its own listener; the coordinator's default
#     --relay-fanout 8): the coordinator sends θ to 8 workers per generation, the rest fetch
#     it from each other. On one machine the fake workers' process still moves every copy
#     of θ on the same 2 cores, so the coordinator's CPU time is the number to read there;
#  6. the same fake workers behind hubs (HUB_WORKERS, HUBS: `coordinator --hub`, each with
#     its share of the workers, in one fake-worker process per hub): the root serves HUBS
#     streams and sends θ to HUB_RELAY_FANOUT of them, the others fetch it from those
#     (`--relay-listen`); its CPU time is the number to read. Run twice: with every process
#     sharing all cores, and with the root alone on core 0 and the hubs and fake workers on
#     the others (`taskset`; HUB_PINNED=0 skips it), the nearest this one machine comes to
#     a root with a machine of its own. (In session 22 it was no cheaper: with the rest on
#     one core the generation stretches and the hubs' messages arrive one by one.)
#
# Environment: UNDERFLOW_DATA (MNIST), FAKE_WORKERS ("1 32 256 1000"), LOCAL_UPDATE_WORKERS
# ("32"; empty: none), RELAY_WORKERS ("32 256 1000"; empty: none), HUB_WORKERS ("1000";
# empty: none), HUBS (8), HUB_RELAY_FANOUT (2), HUB_PINNED (1), LOAD_GENERATIONS (6),
# LOAD_POPULATION (10000), GENERATIONS (30, for step 3), REPORT_JSON (also keep the raw
# numbers there).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export UNDERFLOW_DATA="${UNDERFLOW_DATA:-$root/../shared/data/mnist}"
fake_workers="${FAKE_WORKERS:-1 32 256 1000}"
local_update_workers="${LOCAL_UPDATE_WORKERS-32}"
relay_workers="${RELAY_WORKERS-32 256 1000}"
hub_workers="${HUB_WORKERS-1000}"
hubs="${HUBS:-8}"
hub_relay_fanout="${HUB_RELAY_FANOUT:-2}"
hub_pinned="${HUB_PINNED:-1}"
load_generations="${LOAD_GENERATIONS:-6}"
load_population="${LOAD_POPULATION:-10000}"
generations="${GENERATIONS:-30}"

cargo build --release --locked -p es-bench -p es-coordinator -p es-worker --bins >&2
bin="$root/target/release"
out="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT
# The first release's settings (an empty config file: every key takes its first-release
# value): P pairs each perturbing all of θ, constant B 100, no augmentation, no averaging.
# The kernel, cluster and load rows keep measuring this heaviest kind of pair, comparable
# across sessions; the recipe row below measures what `coordinator` trains by default.
first_release="$out/first-release.toml"
: >"$first_release"
# What every timed run sets beside its settings: no test evaluations, checkpoints or downloads.
quiet=(--eval-every 0 --checkpoint-every 0 --mirror none --data "$UNDERFLOW_DATA")
common=(--config "$first_release" "${quiet[@]}")
# The recommended recipe (no --config) scaled to P = 256 at a constant B = 100: 16, 160 and
# 80 pairs perturbing one of 16, 32 and 10 groups of layer 1's, 2's and 3's neurons (each
# group count divides its layer's pairs), the recipe's 1 : 10 : 5 split.
recipe256=(--population 256 --layer-populations 16,160,80 --neuron-groups 16,32,10 --batch 100
  --batch-schedule constant "${quiet[@]}")
log() { echo "bench-report: $*" >&2; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

trained="runs/bench-trained"
if [[ ! -f "$trained/theta.f32" ]]; then
  log "training trained-like parameters (100 generations) into $trained"
  rm -rf "$trained"
  "$bin/coordinator" --generations 100 "${common[@]}" --run-dir "$trained" >/dev/null 2>"$out/trained.log"
fi

log "es-bench (kernels, gemm, update, memory)"
"$bin/es-bench" --trained "$trained/theta.f32" --batches 32,100,1000 --json "$out/bench.json" \
  >"$out/bench.txt"

log "embedded generation, $generations generations"
"$bin/coordinator" --generations "$generations" "${common[@]}" --run-dir "$out/embedded" \
  >/dev/null 2>"$out/embedded.log"
log "embedded generation of the recipe at P=256, $generations generations"
"$bin/coordinator" --generations "$generations" "${recipe256[@]}" --run-dir "$out/recipe256" \
  >/dev/null 2>"$out/recipe256.log"

cluster() { # name workers population generations coordinator-args -- worker-args...
  local name=$1 workers=$2 population=$3 gens=$4
  shift 4
  local extra=()
  while [[ $1 != -- ]]; do extra+=("$1"); shift; done
  shift
  local port
  port=$(free_port)
  # Fake workers answer at once, so one stream sends results far faster than a real worker
  # could: the per-stream rate limit is raised for the test, as are the worker and
  # connection caps. A run that loses its workers would wait for them for good: the
  # time limit ends it. The fake workers' one process receives and checks every copy of θ
  # (2.7 MB per worker per generation) on the coordinator's own 2 cores: with 1,000 of them
  # it falls seconds behind, so heartbeats are 10 s apart here (a stream is dropped after
  # three silent intervals) instead of 2 s.
  timeout 900 "$bin/coordinator" --workers "$workers" --listen "127.0.0.1:$port" \
    --generations "$gens" --population "$population" "${common[@]}" \
    --max-workers "$workers" --max-connections $((workers + 16)) --audit-every 0 \
    --max-results-per-sec 1000000 --heartbeat 10 "${extra[@]}" \
    --run-dir "$out/$name" >/dev/null 2>"$out/$name.log" &
  local coordinator=$!
  "$@" --connect "127.0.0.1:$port" --data "$UNDERFLOW_DATA" 2>"$out/$name.workers.log" &
  local workers_pid=$!
  wait "$coordinator" || log "$name: the coordinator failed (see its log below)"
  # A connection dropped near the end may still be rejoining the stopped coordinator:
  # --give-up-after ends it.
  wait "$workers_pid" || log "$name: some fake workers ended with an error (see $name.workers.log)"
  tail -3 "$out/$name.log" >&2
}

local2() { # name coordinator-args...: a coordinator and 2 local worker processes of 1 thread
  local name=$1 port
  shift
  port=$(free_port)
  # Audits stay on here: real workers pass them.
  "$bin/coordinator" --workers 2 --listen "127.0.0.1:$port" --generations "$generations" \
    "$@" --run-dir "$out/$name" >/dev/null 2>"$out/$name.log" &
  local coordinator=$!
  "$bin/worker" --connect "127.0.0.1:$port" --threads 1 --data "$UNDERFLOW_DATA" 2>>"$out/$name.workers.log" &
  "$bin/worker" --connect "127.0.0.1:$port" --threads 1 --data "$UNDERFLOW_DATA" 2>>"$out/$name.workers.log" &
  wait "$coordinator"
  wait
}
log "2 local worker processes, $generations generations"
local2 local2 "${common[@]}"
log "2 local worker processes, the recipe at P=256, $generations generations"
local2 local2recipe "${recipe256[@]}"

for n in $fake_workers; do
  log "coordinator with $n fake workers, P=$load_population, $load_generations generations"
  cluster "fake$n" "$n" "$load_population" "$load_generations" -- \
    "$bin/worker" --fake-fitness --connections "$n" --threads 2 --give-up-after 30
done
for n in $local_update_workers; do
  log "coordinator with $n fake workers and --local-update, P=$load_population"
  cluster "local$n" "$n" "$load_population" "$load_generations" --local-update -- \
    "$bin/worker" --fake-fitness --connections "$n" --threads 2 --give-up-after 30
done
for n in $relay_workers; do
  log "coordinator with $n relaying fake workers, P=$load_population"
  cluster "relay$n" "$n" "$load_population" "$load_generations" -- \
    "$bin/worker" --fake-fitness --connections "$n" --threads 2 --give-up-after 30 \
    --relay-listen 127.0.0.1:0
done

hub_cluster() { # name workers hubs population generations [pinned]
  local name=$1 workers=$2 hubs=$3 population=$4 gens=$5 pinned=${6:-0}
  local port per_hub=$(( (workers + hubs - 1) / hubs ))
  # Pinned: the root alone on core 0, the hubs and fake workers on the other cores.
  local root_cpus=() rest_cpus=()
  if [[ $pinned == 1 ]]; then
    root_cpus=(taskset -c 0)
    rest_cpus=(taskset -c "1-$(($(nproc) - 1))")
  fi
  port=$(free_port)
  # The load test's settings of cluster() above, at the root and at each hub. Each hub
  # waits for all its fake workers (--workers) before it joins the root's generations, so
  # every generation has all of them; --max-workers leaves a margin of 8 places (before
  # join keys, a Join that timed out under load and was tried again held a second place for
  # JOIN_TTL; now it replaces its first). The hubs' relays listen on another loopback
  # address:
  # a relay's port 0 cannot then take the port free_port picked for a hub that has not
  # bound it yet.
  local load=(--audit-every 0 --max-results-per-sec 1000000 --heartbeat 10)
  timeout 900 "${root_cpus[@]}" "$bin/coordinator" --workers "$hubs" --listen "127.0.0.1:$port" \
    --generations "$gens" --population "$population" "${common[@]}" "${load[@]}" \
    --max-workers "$hubs" --max-connections $((hubs + 16)) --relay-fanout "$hub_relay_fanout" \
    --run-dir "$out/$name" >/dev/null 2>"$out/$name.log" &
  local coordinator=$! pids=() i hub_port
  for ((i = 0; i < hubs; i++)); do
    hub_port=$(free_port)
    "${rest_cpus[@]}" "$bin/coordinator" --hub "http://127.0.0.1:$port" --hub-threads $((2 * per_hub)) \
      --listen "127.0.0.1:$hub_port" "${load[@]}" --max-workers $((per_hub + 8)) \
      --max-connections $((per_hub + 16)) --workers "$per_hub" --threads 1 --http off --mirror none \
      --relay-listen 127.0.0.2:0 --relay-host 127.0.0.2 --data "$UNDERFLOW_DATA" \
      2>>"$out/$name.hubs.log" &
    pids+=($!)
    "${rest_cpus[@]}" "$bin/worker" --fake-fitness --connections "$per_hub" --threads 2 --give-up-after 30 \
      --connect "127.0.0.1:$hub_port" --data "$UNDERFLOW_DATA" 2>>"$out/$name.workers.log" &
    pids+=($!)
  done
  wait "$coordinator" || log "$name: the coordinator failed (see its log below)"
  for pid in "${pids[@]}"; do
    wait "$pid" || log "$name: a hub or its fake workers ended with an error (see $name.hubs.log, $name.workers.log)"
  done
  tail -3 "$out/$name.log" >&2
}

for n in $hub_workers; do
  log "coordinator with $n fake workers behind $hubs hubs (θ to $hub_relay_fanout, relayed to the rest), P=$load_population"
  hub_cluster "hub$n" "$n" "$hubs" "$load_population" "$load_generations"
  if [[ $hub_pinned == 1 && $(nproc) -ge 2 ]]; then
    log "the same, with the root alone on core 0 and the hubs and fake workers on the others"
    hub_cluster "pinned$n" "$n" "$hubs" "$load_population" "$load_generations" 1
  fi
done

python3 - "$out" "$trained" "$fake_workers" "$load_population" "${REPORT_JSON:-}" "$local_update_workers" "$relay_workers" "$hub_workers" "$hubs" "$hub_pinned" <<'PY'
import json, os, statistics, sys

out, trained, fakes, population, keep = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4]), sys.argv[5]
locals_ = sys.argv[6].split()
relays = sys.argv[7].split()
hub_runs, hub_count = sys.argv[8].split(), sys.argv[9]
pinned_runs = hub_runs if sys.argv[10] == "1" and (os.cpu_count() or 1) >= 2 else []
bench = json.load(open(f"{out}/bench.json"))
rows = []  # (section, case, value, unit, ratio, note)

def add(section, case, value, unit, ratio="", note=""):
    rows.append((section, case, value, unit, ratio, note))

def metrics(name):
    return [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]

def gen_times(m):
    # Generation times from wall-clock differences; the first generation (start-up) is dropped.
    return [b["wall_secs"] - a["wall_secs"] for a, b in zip(m, m[1:])]

def fmt(v, unit):
    if isinstance(v, str):
        return v
    if unit in ("samples/s/core",):
        return f"{v:,.0f}"
    return f"{v:.4g}"

header = bench["header"]
b = {r["case"]: r for r in bench["rows"]}
gemm = {int(c.split("B=")[1]): r["value"] for c, r in b.items() if c.startswith("matrixmultiply")}
for case, r in b.items():
    if r["section"] == "forward" and r.get("value") is not None:
        batch = int(case.split("B=")[1].split()[0])
        add("kernel", case, r["value"], r["unit"], f"{r['value'] / gemm[batch]:.2f}× sgemm",
            f"L1/L2/L3 nonzero {r['metrics'].get('density_l1', 0):.0%}/{r['metrics'].get('density_l2', 0):.0%}/{r['metrics'].get('density_l3', 0):.0%}; batch acc {r['metrics'].get('batch_accuracy', 0):.0%}")
for batch, v in sorted(gemm.items()):
    add("gemm", f"matrixmultiply::sgemm B={batch}", v, "samples/s/core", "", "dense, 1 thread, FMA where the CPU has it")
read = next(r for c, r in b.items() if r["section"] == "memory")
add("memory", read["case"], read["value"], read["unit"], "", "plain parallel read-sum")
for c, r in b.items():
    if r["section"] == "update":
        gbps = r["metrics"]["effective_gbps"]
        add("update", c, gbps, "GB/s", f"{gbps / read['value']:.0%} of read bw", f"{r['value']:.1f} ms per update")

emb = metrics("embedded")
emb_gen = statistics.median(gen_times(emb))
emb_eps = statistics.median(x["evals_per_sec"] for x in emb[1:])
threads = emb[-1]["workers"]
loc = metrics("local2")
loc_gen = statistics.median(gen_times(loc))
add("generation", f"embedded P=256 B=100, {threads} threads", emb_gen, "s/generation", "", f"{emb_eps:.0f} evaluations/s ({emb_eps / threads:.0f} per core); every pair perturbs all of θ")
rec = metrics("recipe256")
rec_gen = statistics.median(gen_times(rec))
add("generation", f"embedded recipe P=256 B=100, {threads} threads", rec_gen, "s/generation", f"{emb_gen / rec_gen:.1f}× faster",
    "layer populations 16,160,80, neuron groups 16,32,10: a pair perturbs one group of one layer")
add("generation", "2 local workers × 1 thread, P=256 B=100", loc_gen, "s/generation", f"{loc_gen / emb_gen:.2f}× embedded", "audits on")
loc_rec_gen = statistics.median(gen_times(metrics("local2recipe")))
add("generation", "2 local workers × 1 thread, recipe P=256 B=100", loc_rec_gen, "s/generation", f"{loc_rec_gen / rec_gen:.2f}× embedded", "against the embedded recipe; audits on")

# 32 real workers of this machine's speed (2 cores each) at the load test's population.
per_core = emb_eps / threads
real32 = 2 * population / (32 * 2 * per_core)
add("cluster", f"32 real workers × 2 cores, P={population:,} (derived)", real32, "s/generation", "", f"2P evaluations at {per_core:.0f} per core per s")
# The noise the update reads: P windows of D parameters (the default network).
dim = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
runs = [(f"fake{n}", int(n), "") for n in fakes]
runs += [(f"local{n}", int(n), ", --local-update") for n in locals_]
runs += [(f"relay{n}", int(n), ", relaying") for n in relays]
runs += [(f"hub{n}", int(n), f" behind {hub_count} hubs") for n in hub_runs]
runs += [(f"pinned{n}", int(n), f" behind {hub_count} hubs, root on its own core") for n in pinned_runs]
for name, n, how in runs:
    m = metrics(name)[1:]
    if not m:
        add("cluster", f"{n} fake workers{how}, P={population:,}", "no generation", "")
        continue
    gen = statistics.median(gen_times(metrics(name)))
    upd = statistics.median(x["update_secs"] for x in m)
    col = statistics.median(x["collect_secs"] for x in m)
    cpu = statistics.median(x["cpu_secs"] for x in m)
    sent = statistics.median(x["wire_bytes_sent"] for x in m)
    note = f"collect {col:.3f} s, update {upd:.3f} s, coordinator CPU {cpu:.2f} s ({cpu / real32:.1%} of 32 real); sent {sent / 1e6:.0f} MB; workers {min(x['workers'] for x in m)}–{max(x['workers'] for x in m)}"
    if "theta_relayed" in m[-1]:
        relayed = statistics.median(x["theta_relayed"] for x in m)
        requested = statistics.median(x["theta_requested"] for x in m)
        if relayed or requested:
            note += f"; θ fetched from relays by {relayed:.0f}, asked of the coordinator by {requested:.0f}"
    if "sums_delivered" in m[-1]:
        delivered = statistics.median(x["sums_delivered"] for x in m)
        local = statistics.median(x["sums_local"] for x in m)
        # What each real worker would add for its share of the sums, at this machine's read
        # bandwidth (its 2 cores): the fake workers answer with fake sums at once.
        # The ranges as the coordinator plans them (sums.rs): the busiest worker's share.
        length = min(1 << 16, -(-(-(-dim // n)) // 4096) * 4096)
        ranges = -(-dim // length)
        share = population * length * 4 * -(-ranges // n) / (read["value"] * 1e9)
        note += f"; ranges summed by workers {delivered:.0f}, by the coordinator {local:.0f}; a real worker's share {share:.3f} s"
    add("cluster", f"coordinator, {n} fake workers{how}, P={population:,}", gen, "s/generation",
        f"{gen / real32:.0%} of 32 real", note)

print("# Underflow benchmark report")
for k in ("cpu", "kernel", "threads", "load at start", "build", "trained"):
    if k in header:
        print(f"{k:<14} {header[k]}")
print(f"trained run    {trained}: 100 generations of the first release's default config")
print()
w = [12, max(52, 2 + max(len(r[1]) for r in rows)), 12, 15, 20]
print(f"{'section':<{w[0]}}{'case':<{w[1]}}{'value':>{w[2]}}  {'unit':<{w[3]}}{'vs':<{w[4]}}notes")
print("-" * 170)
for s, c, v, u, r, n in rows:
    print(f"{s:<{w[0]}}{c:<{w[1]}}{fmt(v, u):>{w[2]}}  {u:<{w[3]}}{r:<{w[4]}}{n}")
print()
print("kernel/gemm: median of 7 timed rounds on one thread. generation: median over generations 2.. of the")
print("run (wall clock). cluster: fake workers answer instantly, so the generation time is the coordinator's")
print("own (broadcast of θ, chunking, collection, update) plus loopback latency; the fake workers' process")
print("shares the same 2 cores. 'of 32 real' = that time over the derived generation time of 32 real workers.")
if keep:
    json.dump({"rows": rows, "header": header}, open(keep, "w"), indent=1)
PY
