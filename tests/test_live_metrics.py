"""Every PromQL expression under k8s/ against a REAL Prometheus scraping the REAL app.

A Prometheus server (Debian package ``prometheus``, installed by .ci/install-k8s-tools.sh)
runs on 127.0.0.1 with a throwaway config: it scrapes Ray's metrics port of the session's
``live_server`` every second and loads k8s/monitoring/rules.yaml (the same rules, evaluated
every second instead of every 30 s so a short test sees them). The scrape target carries
``namespace`` and ``ray_io_cluster`` labels, as prometheus-operator and the PodMonitor's
relabeling add them in a cluster. After a short bounded load (real HTTP requests, including
two the router rejects), the test asserts:

- every rule (recording and alert) evaluates without error, and every recording rule
  returns data, except those listed in ``RECORDS_WITHOUT_DATA`` (with the reason);
- every dashboard panel query, with the template variables set to this run's values,
  returns data (non-NaN where it is a quantile or ratio), except those listed in
  ``PANELS_WITHOUT_DATA`` — for which the metric names are asserted to be in the scrape;
- every series in k8s/monitoring/allowed-metrics.yaml is in Ray's scrape with its type and
  the label names the rules and dashboards use.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
RULES = K8S / "monitoring" / "rules.yaml"
ALLOWED = K8S / "monitoring" / "allowed-metrics.yaml"
DASHBOARDS = sorted((K8S / "dashboards").glob("*.json"))

NAMESPACE = "mistral-serve-test"
CLUSTER = "local-ray"
# Grafana's $__rate_interval is max(4 x scrape interval, the panel's step); 5m here, so the
# load below stays in every window while the tests run. $__range: the dashboard's time range.
GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "5m", "__range": "10m"}

# Recording rules that may be empty after a short healthy run, and why.
RECORDS_WITHOUT_DATA = {
    # No request fails with a 5xx in a healthy run; the 4xx responses sent below do not count.
    "mistral_serve:http_5xx_requests:rate5m": "no 5xx responses in a healthy run",
}
# Dashboard targets ("<file> <panel title> <refId>") that may be empty, and why. Their
# metric names must still be in the scrape.
PANELS_WITHOUT_DATA: dict[str, str] = {}
# Targets the load below must move above zero (at least one series > 0): throughput, latency,
# spend, replicas. The others may legitimately read 0 in a healthy tiny run (queue depth, KV
# usage, preemptions, in-flight, rejection and error rates: a counter series that first
# appears at 1 shows no increase to rate()).
PANELS_NONZERO = {
    "cost.json Spend rate A", "cost.json Cost per 1M output tokens A", "cost.json Idle-GPU spend A",
    "cost.json GPU busy (1h) A", "cost.json Spend per tenant (attributed) A",
    "cost.json Spend per tenant over the time range A", "cost.json Tokens per tenant A",
    "cost.json Self-hosted spend vs reference API cost of the same tokens B",
    "cost.json Break-even utilization vs actual GPU busy A", "cost.json Break-even utilization vs actual GPU busy B",
    "cost.json Replicas and GPU price A", "cost.json Replicas and GPU price B",
    *(f"latency-capacity.json {panel} {q}" for panel in (
        "Time to first token", "Inter-token latency", "End-to-end request latency", "Queue time") for q in "ABC"),
    "latency-capacity.json Finished requests A", "latency-capacity.json Tokens per second A",
    "latency-capacity.json Tokens per second B", "latency-capacity.json Queue depth C",
    "latency-capacity.json Replicas: target vs running A", "latency-capacity.json Replicas: target vs running B",
    "latency-capacity.json Replicas: target vs running C", "latency-capacity.json Admitted and in-flight requests A",
    "latency-capacity.json HTTP requests and errors A", "latency-capacity.json Router request latency A",
}

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


# ---- helpers ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _query(base: str, expr: str) -> list[dict]:
    body = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def _panels(node: dict):
    for p in node.get("panels", []):
        yield p
        yield from _panels(p)


def dashboard_targets() -> list[tuple[str, str]]:
    """("<file> <panel title> <refId>", PromQL with this run's variable values)."""
    values = {"namespace": NAMESPACE, "cluster": CLUSTER, "application": "mistral", "tenant": ".*",
              **GRAFANA_VARS}
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board):
            for t in panel.get("targets", []):
                expr = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], t["expr"])
                out.append((f"{path.name} {panel['title']} {t['refId']}", expr))
    return out


def _metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (promql-parser when installed, else a regex)."""
    try:
        import promql_parser as pp
    except ImportError:
        text = re.sub(r'"[^"]*"|\{[^}]*\}|\bby\s*\([^)]*\)|\bon\s*\([^)]*\)', "", expr)
        return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text) if w.startswith(("ray_", "mistral_serve"))}
    out: set[str] = set()

    def walk(node):
        if isinstance(node, pp.VectorSelector):
            out.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (int, float, str)):
                walk(child)
        for child in getattr(node, "args", None) or []:
            walk(child)

    walk(pp.parse(re.sub(r"\$\{?__\w+\}?", "5m", expr)))
    return out


def _scrape(url: str) -> dict[str, dict]:
    """Ray's /metrics: family name -> {"type", "samples": {sample name: [label dicts]}}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    fams: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        entry = fams.setdefault(fam.name, {"type": fam.type, "samples": {}})
        for s in fam.samples:
            entry["samples"].setdefault(s.name, []).append(dict(s.labels))
    return fams


# ---- the Prometheus server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(live_server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package prometheus): run .ci/install-k8s-tools.sh")
    d = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group.pop("interval", None)  # the global 1 s evaluation interval instead of 30 s
    (d / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    target = urllib.parse.urlparse(live_server.metrics_url)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(d / "rules.yaml")],
        "scrape_configs": [{
            "job_name": "ray",
            "metrics_path": target.path,
            "static_configs": [{"targets": [target.netloc],
                                # what prometheus-operator and the PodMonitor relabeling add
                                "labels": {"namespace": NAMESPACE, "ray_io_cluster": CLUSTER}}],
        }],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(d / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (d / "prometheus.log").read_text()[-3000:]
            try:
                targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
                if targets and all(t["health"] == "up" for t in targets):
                    break
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            assert time.monotonic() < deadline, "prometheus did not scrape Ray's metrics port: " + (
                d / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _post(live, path: str, body: dict, key: str | None = None) -> int:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(live.base_url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def loaded(live_server, prometheus):
    """A short bounded load once Prometheus scrapes: 16 completions (streaming and not, two
    tenants), one prompt sent twice (a prefix-cache hit, whatever ran before on this server),
    one invalid request and one with an unknown key (router rejections, 4xx)."""
    model = live_server.model
    alpha = live_server.api_keys["alpha"]
    jobs = []
    for i in range(16):
        body = {"model": model, "prompt": f"Tell me about number {i}", "max_tokens": 24, "ignore_eos": True,
                "temperature": 0, "stream": i % 2 == 1}
        jobs.append(("/v1/completions", body, alpha if i % 4 == 0 else None))
    with cf.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda j: _post(live_server, *j), jobs))
    assert codes == [200] * len(jobs), codes
    repeated = {"model": model, "prompt": "A system prompt long enough to fill whole KV blocks. " * 8, "max_tokens": 4}
    assert [_post(live_server, "/v1/completions", repeated) for _ in range(2)] == [200, 200]
    assert _post(live_server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": -1}) == 400
    assert _post(live_server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 4},
                 key="sk-not-a-key") == 401
    return time.monotonic()


def _wait_until(check, timeout: float):
    """Repeats check() (which returns a list of problems) until it returns none or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        problems = check()
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(2)


# ---- tests -----------------------------------------------------------------------------------------


def test_rules_evaluate_and_recording_rules_have_data(prometheus, loaded):
    def check():
        problems = []
        groups = _get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        loaded_rules = [r for g in groups for r in g["rules"]]
        source = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        if len(loaded_rules) != len(source):
            problems.append(f"{len(loaded_rules)} rules loaded, rules.yaml has {len(source)}")
        for r in loaded_rules:
            if r["health"] != "ok" or r.get("lastError"):
                problems.append(f"{r['name']}: health {r['health']} {r.get('lastError')}")
        for name in sorted({r["record"] for r in source if "record" in r}):
            if name in RECORDS_WITHOUT_DATA:
                continue
            if not _query(prometheus, f'{name}{{namespace="{NAMESPACE}"}}'):
                problems.append(f"recording rule {name}: no data")
        return problems

    problems = _wait_until(check, 60)
    assert not problems, "\n".join(problems)


def test_every_dashboard_query_returns_data(prometheus, loaded, live_server):
    targets = dashboard_targets()
    assert len(targets) >= 40
    assert PANELS_NONZERO <= {w for w, _ in targets}, PANELS_NONZERO - {w for w, _ in targets}
    # The check can fail: a name nobody exports returns nothing.
    assert not _query(prometheus, f'ray_mistral_serve_no_such_metric{{namespace="{NAMESPACE}"}}')

    def check():
        problems = []
        for where, expr in targets:
            if where in PANELS_WITHOUT_DATA:
                continue
            result = _query(prometheus, expr)
            if not result:
                problems.append(f"{where}: no data\n    {expr}")
            elif all(math.isnan(v) for v in _values(result)):
                problems.append(f"{where}: only NaN\n    {expr}")
            elif where in PANELS_NONZERO and not any(v > 0 for v in _values(result)):
                problems.append(f"{where}: no value above 0 after the load: {_values(result)}\n    {expr}")
        return problems

    problems = _wait_until(check, 60)
    assert not problems, "\n".join(problems)
    # The exceptions: their metrics are at least exported.
    scraped = set(_scrape(live_server.metrics_url))
    for where, expr in targets:
        if where in PANELS_WITHOUT_DATA:
            for name in _metric_names(expr):
                base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                assert name in scraped or base in scraped or ":" in name, f"{where}: {name} not exported"


def test_template_variables_list_this_run(prometheus, loaded):
    """The dashboards' label_values() variables find this namespace/cluster/app/tenants."""
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            selector = re.sub(r'=~"\$\w+"', '=~".*"', m.group(1))
            series = _get_json(f"{prometheus}/api/v1/series?" + urllib.parse.urlencode({"match[]": selector}))["data"]
            found = {s.get(m.group(2)) for s in series} - {None}
            want = {"namespace": NAMESPACE, "ray_io_cluster": CLUSTER, "application": "mistral"}.get(m.group(2))
            if want is not None:
                assert want in found, (path.name, var["name"], found)
            else:  # tenant
                assert {"alpha", "anonymous"} <= found, (path.name, var["name"], found)


def test_every_queried_metric_is_exported(live_server, loaded):
    """Each metric name a rule or dashboard selects is in Ray's real scrape (or is one of
    our recording rules): nothing refers to a series the project does not export."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    exprs = [(f"rules.yaml {r.get('record') or r.get('alert')}", r["expr"]) for r in rules] + dashboard_targets()
    samples = {name for fam in _scrape(live_server.metrics_url).values() for name in fam["samples"]}
    missing = []
    count = 0
    for where, expr in exprs:
        for name in _metric_names(expr):
            count += 1
            if name not in samples and name not in recorded:
                missing.append(f"{where}: {name}")
    assert count > 100
    assert not missing, "\n".join(missing)


def test_allowed_metrics_are_in_the_live_scrape_with_their_labels(live_server, loaded):
    """k8s/monitoring/allowed-metrics.yaml against Ray's real /metrics: name, type, labels."""
    allowed = yaml.safe_load(ALLOWED.read_text())
    # Labels the rules/dashboards select or group by on the mistral_serve series.
    mistral_labels = {
        "ray_mistral_serve_request_success_total": {"finished_reason"},
        "ray_mistral_serve_router_requests_admitted_total": {"tenant"},
        "ray_mistral_serve_router_requests_rejected_total": {"tenant", "reason"},
        "ray_mistral_serve_tokens_total": {"tenant", "kind"},
        "ray_mistral_serve_cost_usd_total": {"tenant"},
        "ray_mistral_serve_router_request_latency_seconds": {"status_code"},
        "ray_mistral_serve_router_soft_context_exceeded_total": {"tenant", "policy"},
    }
    common = {"application", "deployment", "replica", "model_name"}
    problems = []
    deadline = time.monotonic() + 30
    while True:
        fams = _scrape(live_server.metrics_url)
        problems = []
        for entry in allowed["mistral_serve"] + allowed["ray_serve"]:
            name, kind = entry["name"], entry["type"]
            family = re.sub(r"_total$", "", name) if kind == "counter" else name
            fam = fams.get(family)
            if fam is None:
                problems.append(f"{name}: not in the scrape")
                continue
            if fam["type"] != kind:
                problems.append(f"{name}: type {fam['type']} in the scrape, {kind} in allowed-metrics.yaml")
            samples = fam["samples"].get(name + ("_bucket" if kind == "histogram" else ""), [])
            if not samples:
                problems.append(f"{name}: family present but no {name} samples")
                continue
            want = set(entry.get("labels") or []) if "labels" in entry else common | mistral_labels.get(name, set())
            have = set().union(*(s.keys() for s in samples))
            if not want <= have:
                problems.append(f"{name}: labels {sorted(want - have)} missing (has {sorted(have)})")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not problems, "\n".join(problems)


def test_gauges_stay_exported_while_idle(prometheus, loaded, live_server):
    """Ray 2.60 evicts a gauge that is not set again within a few export intervals (measured:
    the Router's in-flight gauge, set only on admit/release, was gone from the scrape 21 s
    after the last request until the Router re-set it on its status loop). After 25 s without
    requests every gauge of allowed-metrics.yaml must still be exported, and the in-flight
    panel must read 0 rather than "no data"."""
    allowed = yaml.safe_load(ALLOWED.read_text())
    gauges = [e["name"] for e in allowed["mistral_serve"] + allowed["ray_serve"] if e["type"] == "gauge"]
    assert len(gauges) >= 8
    assert _post(live_server, "/v1/completions", {"model": live_server.model, "prompt": "hi", "max_tokens": 4}) == 200
    time.sleep(25)
    fams = _scrape(live_server.metrics_url)
    assert not [g for g in gauges if g not in fams], [g for g in gauges if g not in fams]
    expr = dict(dashboard_targets())["latency-capacity.json Admitted and in-flight requests B"]
    assert _values(_query(prometheus, expr)) == [0.0]
