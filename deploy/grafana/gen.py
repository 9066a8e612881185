#!/usr/bin/env python3
"""Writes connscope.json, the Grafana dashboard (run after editing panels)."""
import json
import os

# The pod-level series carry `mesh` (the profile's name: istio, linkerd, kuma,
# consul, an operator's own, or none); the workload revisions do not.
SEL_W = 'namespace=~"$namespace", workload=~"$workload"'
SEL = f'mesh=~"$mesh", {SEL_W}'
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, kind, exprs, x, y, w=12, h=8, unit=None, legend="{{namespace}}/{{workload}} ({{mesh}})", fmt=None):
    targets = []
    for i, e in enumerate(exprs):
        expr, leg = e if isinstance(e, tuple) else (e, legend)
        t = {"refId": chr(65 + i), "datasource": DS, "expr": expr, "legendFormat": leg}
        if fmt:
            t["format"] = fmt
        targets.append(t)
    p = {"id": pid, "title": title, "type": kind, "datasource": DS, "targets": targets,
         "gridPos": {"x": x, "y": y, "w": w, "h": h}}
    if unit:
        p["fieldConfig"] = {"defaults": {"unit": unit}, "overrides": []}
    return p


panels = [
    panel(1, "Pods that raced the sidecar at start-up", "timeseries",
          [f"sum by (namespace, workload, mesh) (increase(connscope_startup_race_pods_total{{{SEL}}}[$__rate_interval]))"], 0, 0),
    panel(2, "Startup race ratio (race pods / injected pods started, 1h)", "timeseries",
          [f"sum by (namespace, workload, mesh) (increase(connscope_startup_race_pods_total{{{SEL}}}[1h]))"
           f" / clamp_min(sum by (namespace, workload, mesh) (increase(connscope_pods_started_total{{{SEL}, injected=\"true\"}}[1h])), 1)"],
          12, 0, unit="percentunit"),
    panel(3, "Refused and failed connects by phase", "timeseries",
          [(f"sum by (mesh, phase) (rate(connscope_connect_failures_total{{{SEL}}}[$__rate_interval]))", "{{phase}} ({{mesh}})")],
          0, 8, unit="ops"),
    panel(4, "Sidecar ready latency (pod start -> outbound capture port listening)", "heatmap",
          [(f"sum by (le) (increase(connscope_sidecar_ready_seconds_bucket{{{SEL}}}[$__rate_interval]))", "{{le}}")],
          12, 8, fmt="heatmap"),
    panel(5, "Sidecar ready latency p50 / p95", "timeseries",
          [(f"histogram_quantile(0.5, sum by (le) (rate(connscope_sidecar_ready_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p50"),
           (f"histogram_quantile(0.95, sum by (le) (rate(connscope_sidecar_ready_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p95")],
          0, 16, unit="s"),
    panel(6, "Startup race window p95 (first refusal -> sidecar ready)", "timeseries",
          [f"histogram_quantile(0.95, sum by (namespace, workload, mesh, le) (rate(connscope_startup_race_window_seconds_bucket{{{SEL}}}[$__rate_interval])))"],
          12, 16, unit="s"),
    panel(7, "Top workloads by race pods (24h)", "table",
          [f"topk(10, sum by (namespace, workload, mesh) (increase(connscope_startup_race_pods_total{{{SEL}}}[24h])))"],
          0, 24, fmt="table"),
    panel(8, "Shutdown race pods", "timeseries",
          [f"sum by (namespace, workload, mesh) (increase(connscope_shutdown_race_pods_total{{{SEL}}}[$__rate_interval]))"], 12, 24),
    panel(9, "Agent: kernel events lost", "timeseries",
          [("sum by (instance) (increase(connscope_events_lost_total[$__rate_interval]))", "{{instance}}")], 0, 32, w=8),
    panel(10, "Agent: probes attached", "stat",
          [("min by (probe) (connscope_probe_attached)", "{{probe}}")], 8, 32, w=8),
    panel(11, "Agent: events read and pods tracked", "timeseries",
          [("sum by (instance) (rate(connscope_events_total[$__rate_interval]))", "events/s {{instance}}"),
           ("sum by (instance) (connscope_pods_tracked)", "pods {{instance}}")], 16, 32, w=8),
    panel(12, "Workload revisions running (pod-template-hash / proxy version)", "table",
          [f"count by (namespace, workload, revision, proxy_version) (connscope_workload_revision_info{{{SEL_W}}})"],
          0, 40, w=24, fmt="table"),
    # The inbound race: the proxy refused by its own app (Envoy 503 UF), at start-up or shutdown.
    panel(13, "Inbound race pods by workload and when", "timeseries",
          [(f"sum by (namespace, workload, mesh, when) (increase(connscope_inbound_race_pods_total{{{SEL}}}[$__rate_interval]))",
            "{{namespace}}/{{workload}} ({{mesh}}) {{when}}")], 0, 48),
    panel(14, "Top workloads by inbound race pods (24h)", "table",
          [f"topk(10, sum by (namespace, workload, mesh, when) (increase(connscope_inbound_race_pods_total{{{SEL}}}[24h])))"],
          12, 48, fmt="table"),
    panel(15, "App listen latency p50 / p95 (pod start -> app listening)", "timeseries",
          [(f"histogram_quantile(0.5, sum by (le) (rate(connscope_app_listen_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p50"),
           (f"histogram_quantile(0.95, sum by (le) (rate(connscope_app_listen_seconds_bucket{{{SEL}}}[$__rate_interval])))", "p95")],
          0, 56, unit="s"),
    panel(16, "Proxy refused by its own app, by phase (probes apart)", "timeseries",
          [(f"sum by (mesh, phase) (rate(connscope_connect_failures_total{{{SEL}, phase=~\"inbound_.*|probe\"}}[$__rate_interval]))",
            "{{phase}} ({{mesh}})")], 12, 56, unit="ops"),
    # Istio ambient: pods marked ambient without ztunnel's HBONE listener in
    # their network namespace, and their enrollment changes (mesh
    # istio-ambient).
    panel(17, "Ambient pods out of the mesh (no ztunnel HBONE listener), by workload", "timeseries",
          [(f"sum by (namespace, workload) (connscope_ambient_unenrolled_pods{{{SEL}}})", "{{namespace}}/{{workload}}")], 0, 64),
    panel(18, "Ambient enrollment events (enrolled, lost, never)", "timeseries",
          [(f"sum by (namespace, workload, state) (increase(connscope_ambient_enrollments_total{{{SEL}}}[$__rate_interval]))",
            "{{namespace}}/{{workload}} {{state}}")], 12, 64),
]

# A rollout: a workload revision (template hash, proxy version) that did not
# run 5 minutes before. Marks the panels' time axis with what changed.
REVISION = "count by (namespace, workload, revision, proxy_version) (connscope_workload_revision_info{%s}%s)"
annotations = [
    {"name": "Rollouts (revision / proxy version)", "datasource": DS, "enable": True, "iconColor": "#8AB8FF",
     "expr": f"{REVISION % (SEL_W, '')} unless {REVISION % (SEL_W, ' offset 5m')}",
     "step": "1m", "titleFormat": "{{namespace}}/{{workload}} rolled out",
     "textFormat": "revision {{revision}} / proxy {{proxy_version}}", "tagKeys": "namespace,workload"},
]

var = lambda name, q: {
    "name": name, "label": name, "type": "query", "datasource": DS, "query": {"query": q, "refId": name},
    "definition": q, "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
    "current": {"selected": True, "text": "All", "value": "$__all"}}
dash = {
    "title": "connscope: sidecar mesh races (outbound and inbound)",
    "uid": "connscope",
    "schemaVersion": 39,
    "version": 1,
    "tags": ["connscope", "istio", "linkerd", "kuma", "consul"],
    "time": {"from": "now-6h", "to": "now"},
    "refresh": "1m",
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        var("mesh", "label_values(connscope_pods_started_total, mesh)"),
        var("namespace", 'label_values(connscope_pods_started_total{mesh=~"$mesh"}, namespace)'),
        var("workload", 'label_values(connscope_pods_started_total{mesh=~"$mesh", namespace=~"$namespace"}, workload)'),
    ]},
    "annotations": {"list": annotations},
    "panels": panels,
}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "connscope.json"), "w") as f:
    json.dump(dash, f, indent=2)
    f.write("\n")
