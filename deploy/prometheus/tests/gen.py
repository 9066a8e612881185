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


def exp(name, labels):
    ann = {
        k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
        for k, v in alerts[name]["annotations"].items()
    }
    return {"exp_labels": {**labels, "severity": alerts[name]["labels"]["severity"]}, "exp_annotations": ann}


def s(name, labels, values):
    body = ",".join(f'{k}="{v}"' for k, v in {**labels, "instance": "n1", "job": "connscope"}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


SHOP = {"namespace": "shop"}
quick = [
    {"interval": "1m", "input_series": [
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "checkout"}, "0 0 1 1 1"),
        # A workload's first race: its series appears already at 1.
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "cart"}, "_ _ 1 1 1"),
    ], "alert_rule_test": [
        {"eval_time": "1m", "alertname": "ConnscopeStartupRace", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "ConnscopeStartupRace", "exp_alerts": [
            exp("ConnscopeStartupRace", {**SHOP, "workload": "cart"}),
            exp("ConnscopeStartupRace", {**SHOP, "workload": "checkout"})]},
        {"eval_time": "40m", "alertname": "ConnscopeStartupRace", "exp_alerts": []},
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
    # few pods a week ago to judge.
    {"interval": "15m", "input_series": [
        s("connscope_pods_started_total", {**SHOP, "workload": "cart", "injected": "true"}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "cart"}, f"0x{W + 4} 1+1x35"),
        s("connscope_pods_started_total", {**SHOP, "workload": "steady", "injected": "true"}, f"0+2x{W + 40}"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "steady"}, f"0+1x{W + 40}"),
        s("connscope_pods_started_total", {**SHOP, "workload": "few", "injected": "true"}, f"0x{W + 4} 1+1x35"),
        s("connscope_startup_race_pods_total", {**SHOP, "workload": "few"}, f"0x{W + 4} 1+1x35"),
    ], "alert_rule_test": [
        {"eval_time": "167h", "alertname": "ConnscopeStartupRaceRegression", "exp_alerts": []},
        {"eval_time": "172h", "alertname": "ConnscopeStartupRaceRegression", "exp_alerts": [
            exp("ConnscopeStartupRaceRegression", {**SHOP, "workload": "cart"})]},
    ]},
    # Sidecar readiness: every observation <= 0.5 s a week ago, ~5 s now.
    {"interval": "15m", "input_series": [
        s("connscope_sidecar_ready_seconds_bucket", {**SHOP, "workload": "cart", "le": le},
          f"0+1x{W} {W}x40" if le in ("0.5", "1") else f"0+1x{W} {W}+1x40")
        for le in ("0.5", "1", "5", "+Inf")
    ], "alert_rule_test": [
        {"eval_time": "150h", "alertname": "ConnscopeSidecarReadySlow", "exp_alerts": []},
        {"eval_time": "172h", "alertname": "ConnscopeSidecarReadySlow", "exp_alerts": [
            exp("ConnscopeSidecarReadySlow", {**SHOP, "workload": "cart"})]},
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
