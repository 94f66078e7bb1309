"""Monitoring, offline: the alert rules parse and pass their unit tests with the real
Prometheus tooling (promtool), the PrometheusRule of the monitoring overlay holds exactly the
plain rules, the Grafana dashboard is well formed and its queries parse as PromQL, and every
metric and label the rules and the dashboard name is one the servers export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.common import metrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "components" / "monitoring"
RULES = MONITORING / "crossrec-alerts.rules.yaml"
RULE_TESTS = MONITORING / "crossrec-alerts.test.yaml"
DASHBOARD = MONITORING / "crossrec-dashboard.json"
OVERLAY = REPO / "k8s" / "overlays" / "monitoring"
# The series names prometheus_client exposes for each kind of metric.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created")}
# Labels Prometheus' own functions add or keep: histogram buckets.
BUILTIN_LABELS = {"le"}


def _promtool(*args: str, cwd: Path = MONITORING) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make "
                    "system-deps` installs it)")
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_queries() -> list[str]:
    # Grafana's $__rate_interval is at least four scrape intervals; any range parses the same.
    return [t["expr"].replace("$__rate_interval", "5m")
            for p in _dashboard()["panels"] for t in p.get("targets", ())]


def _exported() -> dict[str, set[str]]:
    """{series name the servers expose: its label names}, from services/common/metrics.py."""
    series = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            for suffix in SUFFIXES[family.type]:
                series[family.name + suffix] = set(metric._labelnames)
    return series


def test_alert_rules_pass_promtool_check():
    assert "SUCCESS" in _promtool("check", "rules", RULES.name)


def test_alert_rules_pass_their_promtool_unit_tests():
    _promtool("test", "rules", RULE_TESTS.name)


def test_alert_rules_cover_errors_latency_overload_health_and_ingest_lag():
    names = {r["alert"] for r in _rules()}
    assert {"CrossrecHighErrorRatio", "CrossrecHighLatencyP99", "CrossrecResourceExhausted",
            "CrossrecNotServing", "CrossrecIngestLag"} <= names
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_monitoring_overlay_holds_the_plain_rules_as_a_prometheusrule():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: it renders k8s/overlays (see test_manifests.py)")
    proc = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert len(rules) == 1 and rules[0]["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules[0]["spec"] == yaml.safe_load(RULES.read_text())
    boards = [o for o in objects if o["kind"] == "ConfigMap"
              and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert [json.loads(b["data"][DASHBOARD.name]) for b in boards] == [_dashboard()]
    for obj in rules + boards:
        assert obj["metadata"]["namespace"] == "crossrec"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "crossrec"


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable():
    board = _dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    assert [v["name"] for v in board["templating"]["list"] if v["type"] == "datasource"] == \
        ["datasource"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("requests", "errors", "latency", "stage", "queue", "batch size",
                  "ingest lag", "catalogue"):
        assert topic in titles, topic


def test_dashboard_queries_parse_as_promql(tmp_path):
    # promtool has no offline query parser; recording rules go through the same one.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{n}", "expr": q}
        for n, q in enumerate(_dashboard_queries())]}]}
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in _promtool("check", "rules", "dashboard.rules.yaml", cwd=tmp_path)


def test_every_metric_and_label_the_rules_and_dashboard_name_is_exported():
    exported = _exported()
    known_labels = set().union(*exported.values()) | BUILTIN_LABELS
    queries = [r["expr"] for r in _rules()] + _dashboard_queries()
    templates = " ".join(v for r in _rules() for v in r["annotations"].values())
    named = {m for q in queries for m in re.findall(r"\bcrossrec_[a-z0-9_]+", q)}
    assert named, "no crossrec metric found in the queries"
    assert named <= set(exported), f"not exported: {sorted(named - set(exported))}"
    labels = {label for q in queries
              for group in re.findall(r"\bby \(([^)]*)\)", q) for label in
              re.findall(r"\w+", group)}
    labels |= {key for q in queries for selector in re.findall(r"\{([^}]*)\}", q)
               for key in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector)}
    labels |= set(re.findall(r"\$labels\.(\w+)", templates))
    assert labels <= known_labels, f"no metric has the labels {sorted(labels - known_labels)}"
