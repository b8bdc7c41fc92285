"""Prometheus rules, alerts and Grafana dashboards under k8s/ (no Prometheus needed).

- `promtool check rules` on k8s/monitoring/rules.yaml and `promtool test rules` on
  k8s/monitoring/tests/*.yaml; every alert has a firing and a silent test case.
- k8s/monitoring/prometheusrule.yaml and docs/dashboards.md are current renders
  (`python k8s/tools/render.py`).
- Every PromQL expression (rules, alerts, dashboard panels, template variables)
  parses (promtool, through a throwaway rules file) and selects only metrics listed
  in k8s/monitoring/allowed-metrics.yaml, or recording rules from rules.yaml
  (promql-parser walks the expressions). allowed-metrics.yaml's mistral-serve part
  equals the tables of docs/metrics.md.
- Dashboards: template variables, panel layout, the panels the issue asks for.
Tools: promtool (Debian package prometheus), promql-parser (PyPI); a check skips,
naming the tool, only when it is missing (.ci/install-k8s-tools.sh installs both).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
MON = K8S / "monitoring"
RULES = MON / "rules.yaml"
DASHBOARDS = {p.name: p for p in (K8S / "dashboards").glob("*.json")}
REQUIRED_ALERTS = {
    "MistralServeQueueBacklogGrowing",  # queue backlog growing
    "MistralServeTTFTP95OverSLO",  # TTFT p95 over SLO
    "MistralServeKVCacheNearFull",  # KV cache near full
    "MistralServeReplicasAtMaxQueueGrowing",  # replicas at max while queue grows
    "MistralServeHighErrorRate",  # error rate
    "MistralServeHighRejectionRate",  # rejection rate
    "MistralServeReplicasBelowTarget",  # replica unhealthy
    "MistralServeNoHealthyReplicas",  # replica unhealthy (all)
    "MistralServeSpendOverBudget",  # spend rate over budget
}
REQUIRED_RECORDS = {
    "mistral_serve:spend_usd_per_hour",
    "mistral_serve:cost_usd_per_1m_output_tokens:rate5m",
    "mistral_serve:queue_depth_per_capacity",
    "mistral_serve:time_to_first_token_seconds:quantile_rate5m",
    "mistral_serve:inter_token_latency_seconds:quantile_rate5m",
}


def need_promtool() -> str:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus): run .ci/install-k8s-tools.sh")
    return promtool


def need_promql_parser():
    if importlib.util.find_spec("promql_parser") is None:
        pytest.skip("promql-parser not installed (PyPI promql-parser): run .ci/install-k8s-tools.sh")
    import promql_parser

    return promql_parser


def rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def all_rules() -> list[dict]:
    return [r for g in rules()["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


@functools.lru_cache(maxsize=None)
def allowed_metrics() -> frozenset[str]:
    data = yaml.safe_load((MON / "allowed-metrics.yaml").read_text())
    names = set()
    for entry in data["mistral_serve"] + data["ray_serve"]:
        names.add(entry["name"])
        if entry["type"] == "histogram":
            names |= {entry["name"] + s for s in ("_bucket", "_sum", "_count")}
    return frozenset(names)


def dashboard(name: str) -> dict:
    return json.loads(DASHBOARDS[name].read_text())


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables so the text is plain PromQL."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and template-variable query."""
    out = []
    for name in sorted(DASHBOARDS):
        board = dashboard(name)
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{name} panel {panel['title']!r} {t['refId']}", grafana_to_promql(t["expr"])))
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert m, f"{name} variable {var['name']}: only label_values(selector, label) is used"
            out.append((f"{name} variable ${var['name']}", grafana_to_promql(m.group(1))))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"rules.yaml {r.get('record') or r.get('alert')}", r["expr"]) for r in all_rules()]


# --------------------------------------------------------------------------- promtool
def test_promtool_check_rules():
    promtool = need_promtool()
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in proc.stdout + proc.stderr


def test_promtool_test_rules():
    promtool = need_promtool()
    files = sorted(str(p.relative_to(MON)) for p in (MON / "tests").glob("*.yaml"))
    assert files
    proc = subprocess.run([promtool, "test", "rules", *files], cwd=MON, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAILED" not in out and out.count("SUCCESS") == len(files), out


def test_every_alert_has_firing_and_silent_unit_tests():
    fires, silent = set(), set()
    for path in (MON / "tests").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../rules.yaml"], path.name
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    assert alerts - fires == set(), "alerts without a test where they fire"
    assert alerts - silent == set(), "alerts without a test where they stay silent"


# --------------------------------------------------------------------------- rule content
def test_required_alerts_and_records_exist_with_runbooks():
    alerts = {r["alert"]: r for r in all_rules() if "alert" in r}
    assert REQUIRED_ALERTS <= set(alerts), REQUIRED_ALERTS - set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        for key in ("summary", "description", "runbook"):
            assert len(rule["annotations"].get(key, "")) > 20, (name, key)
        assert rule.get("for"), f"{name}: alerts need a `for` to ride out blips"
    assert REQUIRED_RECORDS <= recorded_names(), REQUIRED_RECORDS - recorded_names()
    quantiles = {
        (r["record"], r["labels"]["quantile"]) for r in all_rules() if r.get("record", "").endswith(":quantile_rate5m")
    }
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert (f"mistral_serve:{metric}:quantile_rate5m", q) in quantiles


def _render_module():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "tools" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_current():
    render = _render_module()
    stale = [str(p.relative_to(REPO)) for p in render.stale_outputs()]
    assert not stale, f"stale generated files {stale}: run `python k8s/tools/render.py`"


def test_prometheusrule_carries_the_same_groups_as_rules_yaml():
    cr = yaml.safe_load((MON / "prometheusrule.yaml").read_text())
    assert cr["apiVersion"] == "monitoring.coreos.com/v1" and cr["kind"] == "PrometheusRule"
    assert cr["spec"]["groups"] == rules()["groups"]


# --------------------------------------------------------------------------- metric names
def _docs_metrics() -> dict[str, str]:
    rows = {}
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"\|\s*`(ray_mistral_serve_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_allowed_metrics_match_docs_metrics_md():
    data = yaml.safe_load((MON / "allowed-metrics.yaml").read_text())
    ours = {e["name"]: e["type"] for e in data["mistral_serve"]}
    docs = _docs_metrics()
    assert docs, "no metric table found in docs/metrics.md"
    assert ours == docs
    for entry in data["ray_serve"]:
        assert entry["name"].startswith("ray_serve_"), entry
        assert entry["source"].startswith("ray/serve/"), entry


def test_allowed_ray_serve_metrics_exist_in_installed_ray():
    """Each Ray Serve series name is defined in the installed ray package (2.60)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray not installed")
    ray_dir = Path(spec.origin).parent
    data = yaml.safe_load((MON / "allowed-metrics.yaml").read_text())
    for entry in data["ray_serve"]:
        path = ray_dir.parent / entry["source"].split(" ")[0]
        base = re.sub(r"^ray_", "", entry["name"])
        base = re.sub(r"_total$", "", base) if entry["type"] == "counter" else base
        text = path.read_text()
        # request_ingress_metrics builds names as f"serve_num_{protocol_name}_requests".
        pattern = re.escape(base).replace("http", r"(http|\{protocol_name\})")
        assert re.search(rf"[\"']{pattern}[\"']", text), f"{entry['name']}: {base!r} not in {path}"


def _selectors(node, out):
    import promql_parser as pp

    if isinstance(node, pp.VectorSelector):
        out.append(node.name)
        return
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, float, str)):
            _selectors(child, out)
    for child in getattr(node, "args", None) or []:
        _selectors(child, out)


def test_every_expression_selects_only_allowed_metrics():
    pp = need_promql_parser()
    allowed = allowed_metrics() | recorded_names()
    problems = []
    count = 0
    for where, expr in rule_exprs() + dashboard_exprs():
        try:
            tree = pp.parse(expr)
        except Exception as e:  # noqa: BLE001 - report every bad expression
            problems.append(f"{where}: does not parse: {e}")
            continue
        names: list = []
        _selectors(tree, names)
        if not names:
            problems.append(f"{where}: selects no metric")
        for name in names:
            count += 1
            if not name:
                problems.append(f"{where}: selector without a literal metric name")
            elif name not in allowed:
                problems.append(f"{where}: {name} is neither in allowed-metrics.yaml nor a recording rule")
    assert not problems, "\n".join(problems)
    assert count > 100


def test_every_expression_parses_with_promtool(tmp_path):
    """Prometheus' own parser (2.42) via a throwaway rules file: each dashboard
    query becomes a recording rule."""
    promtool = need_promtool()
    exprs = dashboard_exprs() + rule_exprs()
    doc = {"groups": [{"name": "syntax", "rules": [
        {"record": f"syntax_check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)
    ]}]}
    path = tmp_path / "syntax.yaml"
    path.write_text(yaml.safe_dump(doc, width=10_000))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        bad = [f"{exprs[int(i)][0]}: {line}" for line in out.splitlines() for i in re.findall(r"expr_(\d+)", line)]
        pytest.fail("\n".join(bad) or out)


# --------------------------------------------------------------------------- dashboards
@pytest.mark.parametrize("name", ["cost.json", "latency-capacity.json"])
def test_dashboard_structure(name):
    board = dashboard(name)
    assert board["uid"].startswith("mistral-serve-") and board["title"].startswith("mistral-serve / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in ("namespace", "cluster", "application", "tenant"):
        assert variables[var]["type"] == "query", var
        assert variables[var]["includeAll"] and variables[var]["allValue"] == ".*", var
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            # Every query follows the namespace / cluster / application selection.
            for var in ("$namespace", "$cluster", "$application"):
                assert var in t["expr"], (panel["title"], var)


def _panels(name: str) -> dict[str, str]:
    return {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dashboard(name)["panels"]}


def test_cost_dashboard_has_required_panels():
    panels = _panels("cost.json")
    joined = "\n".join(panels.values())
    assert "mistral_serve:spend_usd_per_hour" in panels["Spend rate"]
    assert "* 1e6" in panels["Cost per 1M output tokens"]
    assert "tenant" in panels["Spend per tenant (attributed)"]
    assert "idle" in panels["Idle-GPU spend"]
    assert "ray_mistral_serve_reference_price_usd_per_1m_tokens" in joined
    assert "mistral_serve:reference_spend_usd_per_hour:rate5m" in joined
    assert "mistral_serve:break_even_utilization:rate1h" in panels["Break-even utilization vs actual GPU busy"]
    assert '$tenant' in panels["Spend per tenant (attributed)"]


def test_latency_capacity_dashboard_has_required_panels():
    panels = _panels("latency-capacity.json")
    for title, metric in [
        ("Time to first token", "ray_mistral_serve_time_to_first_token_seconds_bucket"),
        ("Inter-token latency", "ray_mistral_serve_inter_token_latency_seconds_bucket"),
        ("End-to-end request latency", "ray_mistral_serve_e2e_request_latency_seconds_bucket"),
        ("Queue time", "ray_mistral_serve_request_queue_time_seconds_bucket"),
    ]:
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({metric}" in panels[title], (title, q)
    assert "ray_mistral_serve_generation_tokens_total" in panels["Tokens per second"]
    assert "ray_mistral_serve_request_success_total" in panels["Finished requests"]
    assert "ray_mistral_serve_num_requests_waiting" in panels["Queue depth"]
    assert "ray_mistral_serve_kv_cache_usage_perc" in panels["KV cache usage"]
    replicas = panels["Replicas: target vs running"]
    assert "ray_serve_autoscaling_target_replicas" in replicas and "ray_serve_deployment_replica_healthy" in replicas
    assert "sum by (reason)" in panels["Rejections by reason"]


def test_docs_dashboards_md_lists_every_query():
    text = (REPO / "docs" / "dashboards.md").read_text()
    for name in DASHBOARDS:
        for panel in dashboard(name)["panels"]:
            assert panel["title"].replace("|", "\\|") in text, panel["title"]
            for t in panel.get("targets", []):
                assert t["expr"].replace("|", "\\|") in text, (panel["title"], t["expr"])
