#!/usr/bin/env python3
"""Checks deploy/: every manifest is valid Kubernetes (kubernetes-validate,
strict, against a supported API version); the Helm chart, rendered by Helm's
own engine (helm-python-sdk), produces exactly the static manifests; the
PrometheusRule and the chart carry exactly deploy/prometheus's rules; the
Grafana dashboard is well formed; the agent's endpoints are private (token
auth, RBAC for the reviews and the scraper, a NetworkPolicy, the
ServiceMonitor's token) and no runtime socket is within its reach. Prints one line per check; exits 1 on any
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


def find(docs, kind, name=None):
    """The first object of `kind` (and `name`) among docs; {} when none, so a
    missing object fails its check instead of stopping the script."""
    return next((d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])), {})


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
custom = chart.render({"extraArgs": ["--pod-labels"], "k8sEvents": False, "serviceMonitor": {"enabled": False},
                       "auth": {"enabled": False}, "networkPolicy": {"enabled": False}},
                      name="connscope", namespace="connscope-system")
custom_docs = [d for t in custom.values() for d in yaml.safe_load_all(t) if d]
for d in custom_docs:
    validate(d, "chart (non-default values)")
ds = next(d for t in custom.values() for d in yaml.safe_load_all(t) if d and d["kind"] == "DaemonSet")
args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
check("--pod-labels" in args and "--k8s-events" not in args, "chart values: extraArgs and k8sEvents")
check(not any(d and d["kind"] == "ServiceMonitor" for t in custom.values() for d in yaml.safe_load_all(t)),
      "chart values: serviceMonitor.enabled=false")
check("--http-auth=none" in args and not any(d["metadata"]["name"].startswith("connscope-") and d["kind"] == "ClusterRole"
                                             for d in custom_docs)
      and not any("tokenreviews" in r.get("resources", []) for d in custom_docs if d["kind"] == "ClusterRole"
                  for r in d["rules"]),
      "chart values: auth.enabled=false serves without auth, no reader roles, no review rights")
check(not any(d["kind"] == "NetworkPolicy" for d in custom_docs), "chart values: networkPolicy.enabled=false")
# An operator's mesh profiles: a ConfigMap, mounted read-only, and the flag.
PROFILES = '[[profile]]\nname = "acme"\nextends = "istio"\nproxy_containers = ["acme-proxy"]\nproxy_uids = [4242]\n'
meshed = chart.render({"meshProfiles": PROFILES}, name="connscope", namespace="connscope-system")
meshed_docs = [d for t in meshed.values() for d in yaml.safe_load_all(t) if d]
for d in meshed_docs:
    validate(d, "chart (meshProfiles)")
cm = find(meshed_docs, "ConfigMap", "connscope-mesh-profiles")
mds = find(meshed_docs, "DaemonSet")
mc = mds["spec"]["template"]["spec"]["containers"][0]
check(cm.get("data", {}).get("profiles.toml") == PROFILES
      and "--mesh-profiles=/etc/connscope/mesh/profiles.toml" in mc["args"]
      and any(m["name"] == "mesh-profiles" and m["mountPath"] == "/etc/connscope/mesh" and m.get("readOnly")
              for m in mc["volumeMounts"])
      and any(v["name"] == "mesh-profiles" and v.get("configMap", {}).get("name") == "connscope-mesh-profiles"
              for v in mds["spec"]["template"]["spec"]["volumes"]),
      "chart values: meshProfiles renders a ConfigMap, mounts it read-only and passes --mesh-profiles")
check(not any(d["kind"] == "ConfigMap" for t in chart.render(name="connscope", namespace="connscope-system").values()
              for d in yaml.safe_load_all(t) if d),
      "chart defaults: no mesh profiles ConfigMap (nothing mounted that is not read)")
wider = chart.render({"networkPolicy": {"monitoringNamespaces": ["monitoring", "observability"],
                                        "extraIngressCIDRs": ["10.0.0.0/16"]},
                      "auth": {"metricsReaders": [{"name": "prom", "namespace": "observability"}]}},
                     name="connscope", namespace="connscope-system")
wider_docs = [d for t in wider.values() for d in yaml.safe_load_all(t) if d]
for d in wider_docs:
    validate(d, "chart (wider values)")
np_from = (find(wider_docs, "NetworkPolicy").get("spec", {}).get("ingress") or [{}])[0].get("from", [])
check(len(np_from) == 2 and np_from[0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring", "observability"]
      and np_from[1] == {"ipBlock": {"cidr": "10.0.0.0/16"}}, "chart values: networkPolicy namespaces and CIDRs")
check(find(wider_docs, "ClusterRoleBinding", "connscope-metrics-reader").get("subjects")
      == [{"kind": "ServiceAccount", "name": "prom", "namespace": "observability"}],
      "chart values: auth.metricsReaders")

rules = yaml.safe_load(open(os.path.join(DEPLOY, "prometheus", "connscope-rules.yaml")))
check(static[("PrometheusRule", "connscope")]["spec"] == rules, "PrometheusRule spec == deploy/prometheus rules")
check(yaml.safe_load(open(os.path.join(DEPLOY, "helm", "connscope", "files", "connscope-rules.yaml"))) == rules,
      "chart's rules == deploy/prometheus rules")
# Every alert's runbook_url is its own section of deploy/RUNBOOK.md (GitHub's
# heading anchors: lower case, spaces to '-', other punctuation dropped).
RUNBOOK_URL = "https://github.com/connscope/connscope/blob/main/deploy/RUNBOOK.md#"
runbook = open(os.path.join(DEPLOY, "RUNBOOK.md")).read()
anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" in r:
            a = r.get("annotations", {})
            check(all(a.get(k) for k in ("summary", "description", "runbook_url")),
                  f"alert {r['alert']}: summary, description, runbook_url")
            url = a.get("runbook_url", "")
            check(url == RUNBOOK_URL + r["alert"].lower() and r["alert"].lower() in anchors,
                  f"alert {r['alert']}: runbook_url is its section of deploy/RUNBOOK.md ({url})")
            section = runbook.split(f"## {r['alert']}\n", 1)[-1].split("\n## ", 1)[0] if r["alert"].lower() in anchors else ""
            check("connscope explain" in section and "PromQL" in section,
                  f"RUNBOOK.md section {r['alert']}: a connscope explain command and PromQL")

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

# Private endpoints: token auth on, probes on the open paths, the reviews
# allowed, a scraper role bound, the ServiceMonitor scraping with its token,
# ingress only from the monitoring namespace.
args = c["args"]
check("--http-auth=kubernetes" in args, "DaemonSet: /metrics and /events need a token (--http-auth=kubernetes)")
check(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz",
      "DaemonSet: probes on the open paths")
rules = static[("ClusterRole", "connscope")]["rules"]
check(any(r.get("apiGroups") == ["authentication.k8s.io"] and r["resources"] == ["tokenreviews"] and r["verbs"] == ["create"]
          for r in rules)
      and any(r.get("apiGroups") == ["authorization.k8s.io"] and r["resources"] == ["subjectaccessreviews"]
              and r["verbs"] == ["create"] for r in rules),
      "ClusterRole connscope: tokenreviews and subjectaccessreviews create")
check(static.get(("ClusterRole", "connscope-metrics-reader"), {}).get("rules") == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}],
      "ClusterRole connscope-metrics-reader: get /metrics only")
check(static.get(("ClusterRole", "connscope-events-reader"), {}).get("rules") == [{"nonResourceURLs": ["/metrics", "/events"], "verbs": ["get"]}],
      "ClusterRole connscope-events-reader: get /metrics and /events")
b = static.get(("ClusterRoleBinding", "connscope-metrics-reader"), {"roleRef": {}})
check(b["roleRef"].get("name") == "connscope-metrics-reader" and b.get("subjects")
      and all(s["kind"] == "ServiceAccount" for s in b["subjects"]), "the scraper's service account can get /metrics")
eps = static[("ServiceMonitor", "connscope")]["spec"]["endpoints"]
check(all(e.get("bearerTokenFile") == "/var/run/secrets/kubernetes.io/serviceaccount/token" for e in eps),
      "ServiceMonitor: scrapes with its service-account token")
np = static.get(("NetworkPolicy", "connscope"), {}).get("spec", {})
pod_labels = ds["spec"]["template"]["metadata"]["labels"]
check(np.get("policyTypes") == ["Ingress"]
      and all(pod_labels.get(k) == v for k, v in np.get("podSelector", {}).get("matchLabels", {"-": "-"}).items())
      and len(np.get("ingress", [])) == 1
      and all(set(f) == {"namespaceSelector"} for f in np["ingress"][0]["from"])
      and np["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"] ==
      [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}]
      and np["ingress"][0]["ports"] == [{"port": 9464, "protocol": "TCP"}],
      "NetworkPolicy: the agent's pods take ingress on 9464 from the monitoring namespace only")

# No runtime socket within reach: a read-only mount does not stop connect()
# on a Unix socket, so no hostPath may be a runtime socket or a directory
# above one (/var/run is /run).
SOCKETS = [
    "/run/containerd/containerd.sock", "/run/containerd/containerd.sock.ttrpc",
    "/run/containerd/s/0",  # shims' sockets
    "/run/k3s/containerd/containerd.sock", "/run/crio/crio.sock", "/run/crio/0/attach",
    "/run/docker.sock", "/run/dockershim.sock", "/run/cri-dockerd.sock", "/run/podman/podman.sock",
    "/run/buildkit/buildkitd.sock", "/run/containerd/containerd-debug.sock",
]


def host_path(p):
    p = os.path.normpath(p)
    return "/run" + p[len("/var/run"):] if p == "/var/run" or p.startswith("/var/run/") else p


for where, d in [("deploy/kubernetes", ds)] + [(f"chart {n}", x) for n, x in (("defaults", rendered[("DaemonSet", "connscope")]),
                                                                             ("non-default", find(custom_docs, "DaemonSet")))]:
    paths = [host_path(v["hostPath"]["path"]) for v in d["spec"]["template"]["spec"].get("volumes", []) if "hostPath" in v]
    near = [(p, s) for p in paths for s in SOCKETS if s == p or s.startswith(p.rstrip("/") + "/")]
    check(paths and not near, f"{where}: no runtime socket reachable through a hostPath ({near or paths})")
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
roots = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
check(mounts.get("containerd") == roots.get("--containerd-root", "?") + "/k8s.io" and mounts.get("crio") == roots.get("--crio-root"),
      "DaemonSet: the runtime mounts are exactly what --containerd-root/k8s.io and --crio-root read")
check("SETPCAP" in sc["capabilities"]["add"], "DaemonSet: SETPCAP to empty the bounding set and lock securebits")

dash = json.load(open(os.path.join(DEPLOY, "grafana", "connscope.json")))
names = {v["name"] for v in dash["templating"]["list"]}
check({"datasource", "mesh", "namespace", "workload"} <= names, "dashboard: datasource, mesh, namespace, workload variables")
# The pod-level metrics carry `mesh`: every query of a workload's series
# filters on the mesh variable too (the revisions have no mesh label).
for p in dash["panels"]:
    if p.get("type") == "row":
        continue
    check(bool(p.get("targets")) and all(t.get("expr") for t in p["targets"]), f"dashboard panel {p['title']!r} has queries")
    pod_level = [t["expr"] for t in p.get("targets", []) if 'workload=~"$workload"' in t.get("expr", "")
                 and "connscope_workload_revision_info" not in t["expr"]]
    if pod_level:
        check(all('mesh=~"$mesh"' in e for e in pod_level), f"dashboard panel {p['title']!r} filters on mesh")

print(f"{len(failures)} failed")
sys.exit(1 if failures else 0)
