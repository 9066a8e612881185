#!/usr/bin/env python3
"""Writes the promtool unit tests for connscope-rules.yaml: each alert firing
and not firing. Expected annotations are the rule's own templates expanded
for the expected labels, so editing an annotation needs no test edit: run
`python3 deploy/prometheus/tests/gen.py` after changing the rules. It also
writes the rules' two copies (deploy/tests/check_deploy.py checks they
match): the PrometheusRule manifest and the Helm chart's file."""
import os
import re
import shutil

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
rules = yaml.safe_load(open(os.path.join(HERE, "..", "connscope-rules.yaml")))
alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


def revisions(revs):
    """The workload revisions an annotation's query names: (revision, proxy_version)."""
    return ", ".join(f"revision {r or 'unknown'} / proxy {p or 'unknown'}" for r, p in revs)


def running(revs):
    """ConnscopeStartupRace: the revisions running now."""
    return f"Running now: {revisions(revs)}." if revs else "No running revision of it is known."


def began(revs):
    """ConnscopeStartupRaceRegression: the revisions new since a week ago."""
    if revs:
        return (f"It began with {revisions(revs)}, new since a week ago: the app's rollout if the revision is new,"
                " the mesh if the proxy is.")
    return ("No revision or proxy version of it is new since a week ago: look at the mesh config (hold mode)"
            " and istiod latency.")


def exp(name, labels, query=None, value=None):
    """An alert as expected: its templates expanded for `labels` (and
    `{{ $value }}` for `value`); a trailing `{{ with query ... }}` block is
    expected to read `query`."""
    ann = {}
    for k, v in alerts[name]["annotations"].items():
        if "{{ with query" in v:
            assert query is not None, f"{name}.{k}: say what its query block reads"
            v = v[:v.index("{{ with query")] + query
        if "{{ $value }}" in v:
            assert value is not None, f"{name}.{k}: say what its value is"
            v = v.replace("{{ $value }}", value)
        ann[k] = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
    return {"exp_labels": {**labels, "severity": alerts[name]["labels"]["severity"]}, "exp_annotations": ann}


def s(name, labels, values):
    body = ",".join(f'{k}="{v}"' for k, v in {**labels, "instance": "n1", "job": "connscope"}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


SHOP = {"namespace": "shop"}
# The pod-level series carry the mesh (its profile's name); every alert is per
# mesh. Each test below has a second mesh: a workload that fires in it, and one
# that does not (some with the same name as a firing Istio workload, so an alert
# that dropped `mesh` from its `by` would merge or fail on them).
ISTIO, LINKERD, KUMA, CONSUL, AMBIENT = ({"mesh": m} for m in ("istio", "linkerd", "kuma", "consul", "istio-ambient"))
quick = [
    {"interval": "1m", "input_series": [
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "checkout", **ISTIO}, "0 0 1 1 1"),
        # A workload's first race: its series appears already at 1.
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "cart", **ISTIO}, "_ _ 1 1 1"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "orders", **ISTIO}, "0 0 1 1 1"),
        # Linkerd: ledger races now; checkout's Linkerd pods (the same
        # workload moving meshes) do not: no alert for them.
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "ledger", **LINKERD}, "0 0 1 1 1"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "checkout", **LINKERD}, "0x40"),
        # What runs: checkout's revision (two nodes), cart's proxy (no API: no
        # template hash), nothing known of orders.
        s("connscope_workload_revision_info",
          {**SHOP, "workload": "checkout", "revision": "7d9f8c6b5", "proxy_version": "1.22.3"}, "1x4"),
        {"series": 'connscope_workload_revision_info{namespace="shop",workload="checkout",revision="7d9f8c6b5",'
                   'proxy_version="1.22.3",instance="n2",job="connscope"}', "values": "1x4"},
        s("connscope_workload_revision_info", {**SHOP, "workload": "cart", "proxy_version": "1.23.0"}, "1x4"),
    ], "alert_rule_test": [
        {"eval_time": "1m", "alertname": "ConnscopeStartupRace", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "ConnscopeStartupRace", "exp_alerts": [
            exp("ConnscopeStartupRace", {**SHOP, "workload": "cart", **ISTIO}, running([("", "1.23.0")])),
            exp("ConnscopeStartupRace", {**SHOP, "workload": "checkout", **ISTIO}, running([("7d9f8c6b5", "1.22.3")])),
            exp("ConnscopeStartupRace", {**SHOP, "workload": "orders", **ISTIO}, running([])),
            exp("ConnscopeStartupRace", {**SHOP, "workload": "ledger", **LINKERD}, running([]))]},
        {"eval_time": "40m", "alertname": "ConnscopeStartupRace", "exp_alerts": []},
    ]},
    # Inbound races: orders' pods race at start-up (two pods), catalog's first
    # ever episode appears already at 1, payments races at shutdown only,
    # and billing's bind misconfiguration is never a race series. Kuma's
    # stock races at start-up, Consul's orders does not; Linkerd's ledger
    # races at shutdown.
    {"interval": "1m", "input_series": [
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "orders", "when": "startup", **ISTIO}, "0 0 2 2 2"),
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "catalog", "when": "startup", **ISTIO}, "_ _ 1 1 1"),
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "payments", "when": "shutdown", **ISTIO}, "0 0 1 1 1"),
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "payments", "when": "startup", **ISTIO}, "0x40"),
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "stock", "when": "startup", **KUMA}, "0 0 1 1 1"),
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "orders", "when": "startup", **CONSUL}, "0x40"),
        s("connscope_inbound_race_pods_total", {**SHOP, "workload": "ledger", "when": "shutdown", **LINKERD}, "0 0 1 1 1"),
        s("connscope_connect_failures_total", {**SHOP, "workload": "billing", "phase": "inbound_bind", **ISTIO},
          "0 0 9 18 27"),
    ], "alert_rule_test": [
        {"eval_time": "1m", "alertname": "ConnscopeInboundStartupRace", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "ConnscopeInboundStartupRace", "exp_alerts": [
            exp("ConnscopeInboundStartupRace", {**SHOP, "workload": "catalog", **ISTIO}),
            exp("ConnscopeInboundStartupRace", {**SHOP, "workload": "orders", **ISTIO}),
            exp("ConnscopeInboundStartupRace", {**SHOP, "workload": "stock", **KUMA})]},
        {"eval_time": "40m", "alertname": "ConnscopeInboundStartupRace", "exp_alerts": []},
        {"eval_time": "1m", "alertname": "ConnscopeInboundShutdownRace", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "ConnscopeInboundShutdownRace", "exp_alerts": [
            exp("ConnscopeInboundShutdownRace", {**SHOP, "workload": "ledger", **LINKERD}),
            exp("ConnscopeInboundShutdownRace", {**SHOP, "workload": "payments", **ISTIO})]},
        {"eval_time": "40m", "alertname": "ConnscopeInboundShutdownRace", "exp_alerts": []},
    ]},
    # Ambient enrollment: reviews has a pod out of the mesh for good (two on
    # a second node from 4m); ratings' pod is back within the 5 minutes.
    {"interval": "1m", "input_series": [
        s("connscope_ambient_unenrolled_pods", {**SHOP, "workload": "reviews", **AMBIENT}, "0 0 1x20"),
        {"series": 'connscope_ambient_unenrolled_pods{namespace="shop",workload="reviews",mesh="istio-ambient",'
                   'instance="n2",job="connscope"}', "values": "_x4 2x20"},
        s("connscope_ambient_unenrolled_pods", {**SHOP, "workload": "ratings", **AMBIENT}, "1x3 0x20"),
    ], "alert_rule_test": [
        {"eval_time": "5m", "alertname": "ConnscopeAmbientPodUnenrolled", "exp_alerts": []},
        {"eval_time": "8m", "alertname": "ConnscopeAmbientPodUnenrolled", "exp_alerts": [
            exp("ConnscopeAmbientPodUnenrolled", {**SHOP, "workload": "reviews", **AMBIENT}, value="3")]},
    ]},
    {"interval": "1m", "input_series": [
        {"series": 'connscope_events_lost_total{instance="n1",job="connscope"}', "values": "0 0 5 5"},
        {"series": 'connscope_events_lost_total{instance="n2",job="connscope"}', "values": "3x20"},
    ], "alert_rule_test": [
        {"eval_time": "1m", "alertname": "ConnscopeEventsLost", "exp_alerts": []},
        {"eval_time": "3m", "alertname": "ConnscopeEventsLost", "exp_alerts": [
            exp("ConnscopeEventsLost", {"instance": "n1", "job": "connscope"})]},
    ]},
    {"interval": "1m", "input_series": [
        {"series": 'up{instance="n1",job="connscope"}', "values": "1 1 0x10"},
        {"series": 'up{instance="n2",job="connscope"}', "values": "1x12"},
    ], "alert_rule_test": [
        {"eval_time": "4m", "alertname": "ConnscopeAgentDown", "exp_alerts": []},
        {"eval_time": "9m", "alertname": "ConnscopeAgentDown", "exp_alerts": [
            exp("ConnscopeAgentDown", {"instance": "n1", "job": "connscope"})]},
    ]},
    {"interval": "1m", "input_series": [
        s("connscope_probe_attached", {"probe": "tcp_receive_reset"}, "0x15"),
        s("connscope_probe_attached", {"probe": "inet_sock_set_state"}, "1x15"),
    ], "alert_rule_test": [
        {"eval_time": "5m", "alertname": "ConnscopeProbeNotAttached", "exp_alerts": []},
        {"eval_time": "12m", "alertname": "ConnscopeProbeNotAttached", "exp_alerts": [
            exp("ConnscopeProbeNotAttached", {"probe": "tcp_receive_reset", "instance": "n1", "job": "connscope"})]},
    ]},
]

W = 672  # 15-minute steps in a week
weekly = [
    # 8 injected pods started every hour. "cart" had no race a week ago and
    # races now; "steady" raced then and now; "few" races now but had too
    # few pods a week ago to judge. Under Linkerd, another "cart" races
    # steadily (no alert), and Kuma's "ledger" regresses as Istio's cart does.
    {"interval": "15m", "input_series": [
        s("connscope_pods_started_total", {**SHOP, "workload": "cart", "injected": "true", **ISTIO}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "cart", **ISTIO}, f"0x{W + 4} 1+1x35"),
        s("connscope_pods_started_total", {**SHOP, "workload": "steady", "injected": "true", **ISTIO}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "steady", **ISTIO}, f"0+1x{W + 40}"),
        s("connscope_pods_started_total", {**SHOP, "workload": "few", "injected": "true", **ISTIO}, f"0x{W + 4} 1+1x35"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "few", **ISTIO}, f"0x{W + 4} 1+1x35"),
        # "mesh" races now as cart does, with the same revision as a week ago.
        s("connscope_pods_started_total", {**SHOP, "workload": "mesh", "injected": "true", **ISTIO}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "mesh", **ISTIO}, f"0x{W + 4} 1+1x35"),
        s("connscope_pods_started_total", {**SHOP, "workload": "cart", "injected": "true", **LINKERD}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "cart", **LINKERD}, f"0+1x{W + 40}"),
        s("connscope_pods_started_total", {**SHOP, "workload": "ledger", "injected": "true", **KUMA}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "ledger", **KUMA}, f"0x{W + 4} 1+1x35"),
        # What ran: cart rolled out a new revision with a new proxy when its
        # races began; mesh's revision did not change.
        s("connscope_workload_revision_info",
          {**SHOP, "workload": "cart", "revision": "4a5b6c7d8", "proxy_version": "1.22.3"}, f"1x{W + 4}"),
        s("connscope_workload_revision_info",
          {**SHOP, "workload": "cart", "revision": "5f6d7c8b9", "proxy_version": "1.23.0"}, f"_x{W + 4} 1x35"),
        s("connscope_workload_revision_info",
          {**SHOP, "workload": "mesh", "revision": "6b7c8d9e0", "proxy_version": "1.22.3"}, f"1x{W + 40}"),
    ], "alert_rule_test": [
        {"eval_time": "167h", "alertname": "ConnscopeStartupRaceRegression", "exp_alerts": []},
        {"eval_time": "172h", "alertname": "ConnscopeStartupRaceRegression", "exp_alerts": [
            exp("ConnscopeStartupRaceRegression", {**SHOP, "workload": "cart", **ISTIO},
                began([("5f6d7c8b9", "1.23.0")])),
            exp("ConnscopeStartupRaceRegression", {**SHOP, "workload": "ledger", **KUMA}, began([])),
            exp("ConnscopeStartupRaceRegression", {**SHOP, "workload": "mesh", **ISTIO}, began([]))]},
    ]},
    # Sidecar readiness: every observation <= 0.5 s a week ago, ~5 s now;
    # Consul's "cart" stays <= 0.5 s (no alert), Linkerd's "ledger" slows too.
    {"interval": "15m", "input_series": [
        *(s("connscope_sidecar_ready_seconds_bucket", {**SHOP, "workload": w, "le": le, **m},
            f"0+1x{W} {W}x40" if le in ("0.5", "1") else f"0+1x{W} {W}+1x40")
          for w, m in (("cart", ISTIO), ("ledger", LINKERD)) for le in ("0.5", "1", "5", "+Inf")),
        *(s("connscope_sidecar_ready_seconds_bucket", {**SHOP, "workload": "cart", "le": le, **CONSUL}, f"0+1x{W + 40}")
          for le in ("0.5", "1", "5", "+Inf")),
    ], "alert_rule_test": [
        {"eval_time": "150h", "alertname": "ConnscopeSidecarReadySlow", "exp_alerts": []},
        {"eval_time": "172h", "alertname": "ConnscopeSidecarReadySlow", "exp_alerts": [
            exp("ConnscopeSidecarReadySlow", {**SHOP, "workload": "cart", **ISTIO}),
            exp("ConnscopeSidecarReadySlow", {**SHOP, "workload": "ledger", **LINKERD})]},
    ]},
]

for name, interval, tests in [("connscope-rules.test.yaml", "1m", quick),
                              ("connscope-rules-weekly.test.yaml", "15m", weekly)]:
    with open(os.path.join(HERE, name), "w") as f:
        f.write("# Generated by gen.py: promtool unit tests, each alert firing and not firing.\n")
        yaml.safe_dump({"rule_files": ["../connscope-rules.yaml"], "evaluation_interval": interval,
                        "tests": tests}, f, sort_keys=False, width=120)

# The copies: the chart's file is the rules file itself; the manifest wraps it.
DEPLOY = os.path.join(HERE, "..", "..")
RULES = os.path.join(HERE, "..", "connscope-rules.yaml")
shutil.copyfile(RULES, os.path.join(DEPLOY, "helm", "connscope", "files", "connscope-rules.yaml"))
with open(os.path.join(DEPLOY, "kubernetes", "prometheusrule.yaml"), "w") as f:
    f.write("# Generated from deploy/prometheus/connscope-rules.yaml (the test checks they match).\n")
    yaml.safe_dump({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                    "metadata": {"name": "connscope", "namespace": "connscope-system",
                                 "labels": {"app.kubernetes.io/name": "connscope"}},
                    "spec": rules}, f, sort_keys=False, width=120)
