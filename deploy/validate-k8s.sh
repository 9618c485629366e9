#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: against the API schemas of Kubernetes 1.30
# (kubernetes-validate from PyPI, installed into target/k8s-venv, strict: unknown fields
# fail), then a structural check of what the cluster relies on (probes on the gRPC health
# service, resources, the persistent run directory with --auto-resume, the token secret, the
# Service name the workers dial, the metrics port served, published and annotated).
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
