#!/usr/bin/env python3
"""Checks deploy/: every manifest is valid Kubernetes (kubernetes-validate,
strict, against a supported API version); the Helm chart, rendered by Helm's
own engine (helm-python-sdk), produces exactly the static manifests; the
PrometheusRule and the chart carry exactly deploy/prometheus's rules; the
Grafana dashboard is well formed. Prints one line per check; exits 1 on any
failure."""
import glob
import json
import re
import os
import sys

import kubernetes_validate
import yaml
from helm_python import Chart

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S_VERSION = "1.33.0"
# CRDs of the Prometheus Operator: not in the core schemas; checked by shape.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def validate(doc, where):
    kind = doc.get("kind")
    if kind in CRD_KINDS:
        meta = doc.get("metadata", {})
        check(doc.get("apiVersion") == "monitoring.coreos.com/v1" and meta.get("name") and meta.get("namespace")
              and isinstance(doc.get("spec"), dict), f"{where}: {kind} shape")
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        check(True, f"{where}: {kind}/{doc['metadata']['name']} valid for Kubernetes {K8S_VERSION}")
    except kubernetes_validate.ValidationError as e:
        check(False, f"{where}: {kind}: {e.message} at {list(e.path)}")
    except Exception as e:  # SchemaNotFoundError and the like
        check(False, f"{where}: {kind}: {e}")


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


static = {}
for path in sorted(glob.glob(os.path.join(DEPLOY, "kubernetes", "*.yaml"))):
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            validate(doc, os.path.relpath(path, DEPLOY))
            static[key(doc)] = doc

chart = Chart.load(os.path.join(DEPLOY, "helm", "connscope"))
rendered = {}
for name, text in chart.render(name="connscope", namespace="connscope-system").items():
    for doc in yaml.safe_load_all(text):
        if doc:
            validate(doc, name)
            rendered[key(doc)] = doc
check(set(rendered) == set(static), f"chart renders the same objects: {sorted(set(rendered) ^ set(static)) or 'yes'}")
for k in sorted(set(rendered) & set(static)):
    check(rendered[k] == static[k], f"chart renders {k[0]}/{k[1]} exactly as deploy/kubernetes")

# Non-default values render too, and change what they should.
custom = chart.render({"extraArgs": ["--pod-labels"], "k8sEvents": False, "serviceMonitor": {"enabled": False}},
                      name="connscope", namespace="connscope-system")
ds = next(d for t in custom.values() for d in yaml.safe_load_all(t) if d and d["kind"] == "DaemonSet")
args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
check("--pod-labels" in args and "--k8s-events" not in args, "chart values: extraArgs and k8sEvents")
check(not any(d and d["kind"] == "ServiceMonitor" for t in custom.values() for d in yaml.safe_load_all(t)),
      "chart values: serviceMonitor.enabled=false")

rules = yaml.safe_load(open(os.path.join(DEPLOY, "prometheus", "connscope-rules.yaml")))
check(static[("PrometheusRule", "connscope")]["spec"] == rules, "PrometheusRule spec == deploy/prometheus rules")
check(yaml.safe_load(open(os.path.join(DEPLOY, "helm", "connscope", "files", "connscope-rules.yaml"))) == rules,
      "chart's rules == deploy/prometheus rules")
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" in r:
            a = r.get("annotations", {})
            check(all(a.get(k) for k in ("summary", "description", "runbook")), f"alert {r['alert']}: summary, description, runbook")

# A rule reading a recorded series must follow its recording rule in the same group: groups are
# evaluated independently, so across groups it may read the previous evaluation's sample, or none.
recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
for g in rules["groups"]:
    seen = set()
    for r in g["rules"]:
        used = {m for m in recorded if re.search(re.escape(m) + r"(?![\w:])", r["expr"])}
        name = r.get("alert") or r.get("record")
        check(used <= seen, f"rule {name}: recorded series it reads are recorded earlier in its group "
              f"({sorted(used - seen) or 'yes'})")
        if "record" in r:
            seen.add(r["record"])

ds = static[("DaemonSet", "connscope")]
c = ds["spec"]["template"]["spec"]["containers"][0]
sc = c["securityContext"]
check(not sc.get("privileged") and sc["capabilities"]["drop"] == ["ALL"]
      and "SYS_ADMIN" not in sc["capabilities"]["add"], "DaemonSet: not privileged, drops ALL, no SYS_ADMIN")
check(all(m.get("readOnly") for m in c["volumeMounts"]), "DaemonSet: host mounts read-only")
check(any(e["name"] == "NODE_NAME" and e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" for e in c["env"]),
      "DaemonSet: NODE_NAME from the downward API")

dash = json.load(open(os.path.join(DEPLOY, "grafana", "connscope.json")))
names = {v["name"] for v in dash["templating"]["list"]}
check({"datasource", "namespace", "workload"} <= names, "dashboard: datasource, namespace, workload variables")
for p in dash["panels"]:
    if p.get("type") == "row":
        continue
    check(bool(p.get("targets")) and all(t.get("expr") for t in p["targets"]), f"dashboard panel {p['title']!r} has queries")

print(f"{len(failures)} failed")
sys.exit(1 if failures else 0)
