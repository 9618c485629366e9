#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: against the API schemas of Kubernetes 1.30
# (kubernetes-validate from PyPI, installed into target/k8s-venv, strict: unknown fields
# fail), then a structural check of what the cluster relies on (probes on the gRPC health
# service, resources, the persistent run directory with --auto-resume, the token secret, the
# Service name the workers dial, the metrics port served, published and annotated), and the
# same for the hubs overlay (deploy/k8s/hubs).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/k8s-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 PyYAML
fi
manifests=(deploy/k8s/namespace.yaml deploy/k8s/config.yaml deploy/k8s/coordinator.yaml deploy/k8s/worker.yaml)
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 "${manifests[@]}"
"$venv/bin/python" - "${manifests[@]}" <<'PY'
import sys, yaml
docs = [d for path in sys.argv[1:] for d in yaml.safe_load_all(open(path)) if d]
kustomization = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
listed = {f"deploy/k8s/{r}" for r in kustomization["resources"]}
assert listed == set(sys.argv[1:]), f"kustomization lists {sorted(listed)}"
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
def arg_value(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {args}")
service = by_kind["Service"][0]
port = service["spec"]["ports"][0]["port"]
coord = by_kind["StatefulSet"][0]["spec"]
c = coord["template"]["spec"]["containers"][0]
assert "--auto-resume" in c["args"], "a restarted coordinator must resume"
run_dir = arg_value(c["args"], "--run-dir")
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
claims = {t["metadata"]["name"] for t in coord["volumeClaimTemplates"]}
assert any(run_dir.startswith(mounts[n] + "/") for n in claims), "the run directory is on the persistent volume"
assert arg_value(c["args"], "--listen").endswith(f":{port}")
ports = {p["name"]: p for p in service["spec"]["ports"]}
http_port = int(arg_value(c["args"], "--http").rsplit(":", 1)[1])
assert ports["http"]["port"] == http_port and ports["http"]["targetPort"] == "http", "the Service publishes --http"
assert {"name": "http", "containerPort": http_port} in c["ports"], "the container names its --http port"
notes = coord["template"]["metadata"]["annotations"]
assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == str(http_port)
assert notes["prometheus.io/path"] == "/metrics"
for probe in ("readinessProbe", "livenessProbe"):
    assert c[probe]["grpc"]["port"] == port, f"{probe} asks the gRPC health service"
assert c["readinessProbe"]["grpc"]["service"] == "underflow.es.v1.Coordinator"
w = by_kind["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
assert arg_value(w["args"], "--connect") == f"{service['metadata']['name']}:{port}", "workers dial the Service"
secrets = {s["metadata"]["name"] for s in by_kind["Secret"]}
for container in (c, w):
    res = container["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], container["name"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e]
    assert refs and set(refs) <= secrets, f"{container['name']} reads the token from a Secret"
images = {i["name"] for i in kustomization["images"]}
assert {c["image"], w["image"]} <= images, "kustomization sets both images"
print(f"k8s manifests: {len(docs)} resources valid against Kubernetes 1.30; structure checked")
PY

# The hubs overlay (deploy/k8s/hubs): its own resources against the schemas, its patches
# against the base they change.
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.30.0 deploy/k8s/hubs/hub.yaml
"$venv/bin/python" - "${manifests[@]}" <<'PY'
import sys, yaml
load = lambda path: [d for d in yaml.safe_load_all(open(path)) if d]
base = {(d["kind"], d["metadata"]["name"]): d for path in sys.argv[1:] for d in load(path)}
hub_docs = {(d["kind"], d["metadata"]["name"]): d for d in load("deploy/k8s/hubs/hub.yaml")}
overlay = yaml.safe_load(open("deploy/k8s/hubs/kustomization.yaml"))
assert overlay["resources"] == ["..", "hub.yaml"], overlay["resources"]
patches = {p["path"]: yaml.safe_load(open(f"deploy/k8s/hubs/{p['path']}")) for p in overlay["patches"]}
def flags(args):
    return dict(a.split("=", 1) if "=" in a else (a, None) for a in args if not a.startswith("--mirror="))
def container(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]
root_service = base[("Service", "underflow-coordinator")]
root_port = root_service["spec"]["ports"][0]["port"]
hub_service = hub_docs[("Service", "underflow-hub")]
hub_port = hub_service["spec"]["ports"][0]["port"]
hub = hub_docs[("Deployment", "underflow-hub")]
h = container(hub)
hub_flags = flags(h["args"])
assert hub_flags["--hub"] == f"http://underflow-coordinator:{root_port}", "hubs dial the root's Service"
assert hub_flags["--listen"].endswith(f":{hub_port}"), "the hub Service publishes --listen"
assert h["readinessProbe"]["grpc"] == {"port": hub_port, "service": "underflow.es.v1.Coordinator"}
assert h["resources"]["requests"]["cpu"] and h["resources"]["limits"]["memory"]
token = [e["valueFrom"]["secretKeyRef"]["name"] for e in h["env"] if "valueFrom" in e]
assert token and ("Secret", token[0]) in base, "hubs read the base's token Secret"
relay_port = int(hub_flags["--relay-listen"].rsplit(":", 1)[1])
assert {"name": "relay", "containerPort": relay_port} in h["ports"]
# The root: the base's arguments, but for --workers (the hubs) and --relay-fanout.
root_patch = patches["coordinator-patch.yaml"]
assert root_patch["kind"] == "StatefulSet" and root_patch["metadata"]["name"] == "underflow-coordinator"
base_root = flags(container(base[("StatefulSet", "underflow-coordinator")])["args"])
root = flags(container(root_patch)["args"])
hubs = hub["spec"]["replicas"]
assert root["--workers"] == str(hubs), f"the root waits for the {hubs} hubs"
assert 1 <= int(root["--relay-fanout"]) <= hubs
assert {k: v for k, v in root.items() if k not in ("--workers", "--relay-fanout")} == \
    {k: v for k, v in base_root.items() if k != "--workers"}, "the root patch keeps the base's other arguments"
# The workers: the base's arguments, but dialing the hubs.
worker_patch = patches["worker-patch.yaml"]
assert worker_patch["kind"] == "Deployment" and worker_patch["metadata"]["name"] == "underflow-worker"
base_worker = container(base[("Deployment", "underflow-worker")])["args"]
workers = container(worker_patch)["args"]
assert flags(workers)["--connect"] == f"underflow-hub:{hub_port}", "workers dial the hub Service"
assert [a for a in workers if not a.startswith("--connect=")] == \
    [a for a in base_worker if not a.startswith("--connect=")], "the worker patch keeps the base's other arguments"
behind = worker_patch["spec"]["replicas"] * int(flags(workers)["--threads"]) // hubs
assert hub_flags["--hub-threads"] == str(behind), f"--hub-threads is the {behind} worker threads behind a hub"
base_images = {i["name"]: i for i in yaml.safe_load(open("deploy/k8s/kustomization.yaml"))["images"]}
assert all(base_images[i["name"]] == i for i in overlay["images"]) and h["image"] in base_images
print(f"k8s hubs overlay: {hubs} hubs for {worker_patch['spec']['replicas']} workers; "
      f"{len(hub_docs)} resources valid against Kubernetes 1.30; patches checked against the base")
PY
