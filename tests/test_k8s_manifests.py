"""Static checks of the Kubernetes manifests under k8s/ (no cluster needed).

What runs here, and the tool each check needs (.ci/install-k8s-tools.sh installs
them all; a check skips, naming the tool, only when it is missing):
- yamllint over every YAML file under k8s/                    (yamllint)
- kustomize builds every overlay (+ the optional Ingress)      (kubectl kustomize, or kustomize)
- built-in kinds, and the pod templates / Service embedded in
  the RayService, pass kubernetes-validate --strict (offline)  (kubernetes-validate)
- RayService, PodMonitor and PrometheusRule validate strictly
  (unknown fields rejected) against the vendored CRDs          (jsonschema)
- the deployment contract of docs/kubernetes.md: serveConfigV2 = serve-config
  file, GPU/CPU shape per overlay, non-root security context, probes, grace
  period, ports, NetworkPolicy, PDB and PodMonitor selectors, dashboards ConfigMap.
- k8s/base/serve-config.yaml applications = repo-root serve_config.yaml
  applications (skips only while serve_config.yaml does not exist); the
  gpu-production overlay's own serve-config.yaml differs from it only in
  GPU_MAY_DIFFER; every config validates against the app's typed args and the
  deployment options (replica bounds, CPUs/GPUs per replica, shutdown) are
  what the application builder really produces from it.
- graceful drain: every pod has a preStop hook, and its grace period covers the
  preStop, Ray's SIGTERM drain, which outlasts the Router's request deadline, and
  every deployment's graceful shutdown.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = K8S / "crds"
OVERLAYS = ["gpu-production", "cpu-tiny"]
# Kubernetes version the built-in kinds are validated against (kubectl 1.32 client).
K8S_VERSION = "1.32.0"
SERVE_PORT = 8000
RAY_ONLY_PORTS = {6379, 8265, 10001, 8080, 52365}
_ARGS = "applications.mistral.args."
GPU_MAY_DIFFER = {
    # dotted paths (list items by their `name`) that overlays/gpu-production/serve-config.yaml
    # may set differently from base/serve-config.yaml (= the repo-root serve_config.yaml):
    # model, engine size, prices, placement, autoscaling bounds and delays, health checks,
    # and the production admission limits.
    *(_ARGS + k for k in (
        "model", "dtype", "device", "max_num_seqs", "max_model_len", "kv_cache_memory_bytes",
        "gpu_price_usd_per_hour", "reference_price_usd_per_1m_output_tokens",
        "replicas.num_cpus", "replicas.num_gpus", "replicas.health_check_period_s",
        "replicas.health_check_timeout_s", "replicas.autoscaling.max_replicas",
        "replicas.autoscaling.downscale_delay_s", "router.num_replicas", "router.num_cpus",
        "admission.soft_max_context_tokens")),
}


# --------------------------------------------------------------------------- tools
@functools.lru_cache(maxsize=None)
def kustomize_cmd() -> tuple[str, ...] | None:
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return (kubectl, "kustomize")
    kustomize = shutil.which("kustomize")
    if kustomize:
        return (kustomize, "build")
    return None


def need_kustomize() -> tuple[str, ...]:
    cmd = kustomize_cmd()
    if cmd is None:
        pytest.skip("kubectl (with `kubectl kustomize`) or kustomize not installed: run .ci/install-k8s-tools.sh")
    return cmd


def need_module(name: str, tool: str):
    try:
        return __import__(name)
    except ImportError:
        pytest.skip(f"{tool} not installed (python module {name}): run .ci/install-k8s-tools.sh")


@functools.lru_cache(maxsize=None)
def _build(path: str) -> str:
    cmd = kustomize_cmd()
    assert cmd is not None
    proc = subprocess.run([*cmd, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize build {path} failed:\n{proc.stderr}"
    return proc.stdout


def build(overlay: str) -> list[dict]:
    need_kustomize()
    return [d for d in yaml.safe_load_all(_build(str(K8S / "overlays" / overlay))) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rayservice(overlay: str) -> dict:
    return one(build(overlay), "RayService")


def pod_templates(rs: dict) -> dict[str, dict]:
    cfg = rs["spec"]["rayClusterConfig"]
    out = {"head": cfg["headGroupSpec"]["template"]}
    for group in cfg["workerGroupSpecs"]:
        out[group["groupName"]] = group["template"]
    return out


def serve_config_file(overlay: str) -> Path:
    own = K8S / "overlays" / overlay / "serve-config.yaml"
    return own if own.exists() else K8S / "base" / "serve-config.yaml"


def effective_deployments(serve_cfg: dict) -> dict[str, dict]:
    """The options Serve deploys each deployment with: what the application builder
    (mistral_serve.serving.app.deployment_options) makes of `args`, overridden by the
    config's `deployments:` entries as Serve does."""
    from mistral_serve.serving.app import deployment_options
    from mistral_serve.serving.config import AppArgs

    (app,) = serve_cfg["applications"]
    llm, router = deployment_options(AppArgs.model_validate(app.get("args") or {}))
    out = {"LLMReplica": dict(llm), "Router": dict(router)}
    for override in app.get("deployments") or []:
        merged = out.setdefault(override["name"], {})
        merged.update({k: v for k, v in override.items() if k != "name"})
    return out


def deployment_cfg(serve_cfg: dict, name: str) -> dict:
    return effective_deployments(serve_cfg)[name]


# --------------------------------------------------------------------------- yamllint
def test_yamllint_all_k8s_yaml():
    need_module("yamllint", "yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(K8S / ".yamllint"))
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")
    assert len(files) > 15
    problems = []
    for path in files:
        rel = path.relative_to(K8S)
        if conf.is_file_ignored(str(rel)):
            continue
        for problem in linter.run(path.read_text(), conf, str(rel)):
            problems.append(f"{rel}:{problem.line}:{problem.column} {problem.level} {problem.desc} ({problem.rule})")
    assert not problems, "yamllint (warnings count too):\n" + "\n".join(problems)


# --------------------------------------------------------------------------- kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds(overlay):
    docs = build(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "PodDisruptionBudget", "PodDisruptionBudget", "PodMonitor",
         "PrometheusRule", "NetworkPolicy", "RayService"]
        + (["PersistentVolumeClaim"] if overlay == "gpu-production" else [])
    ), kinds
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "mistral-serve", d["metadata"]
    # The local-only ConfigMap that carries the Serve config must not be applied.
    assert not [d for d in docs if d["metadata"]["name"] == "mistral-serve-config"]


def test_base_builds():
    need_kustomize()
    docs = [d for d in yaml.safe_load_all(_build(str(K8S / "base"))) if d]
    assert one(docs, "RayService")["spec"]["serveConfigV2"].startswith("#")


def test_ingress_component_builds(tmp_path):
    """The optional Ingress component composes with the production overlay."""
    cmd = need_kustomize()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu-production", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "ingress", tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    serve_service = one(docs, "RayService")["spec"]["serveService"]
    assert backend == {"name": serve_service["metadata"]["name"], "port": {"number": SERVE_PORT}}
    need_module("kubernetes_validate", "kubernetes-validate")
    import kubernetes_validate

    kubernetes_validate.validate(ingress, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- built-in kinds
def _kv_validate(obj: dict, what: str) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{what}: {str(e).splitlines()[0]}"
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_strict(overlay):
    need_module("kubernetes_validate", "kubernetes-validate")
    errors = []
    for d in build(overlay):
        if d["apiVersion"].split("/")[0] in ("ray.io", "monitoring.coreos.com"):
            continue
        errors.append(_kv_validate(d, f"{d['kind']}/{d['metadata']['name']}"))
    # Core objects embedded in the RayService: validate them with the core schemas
    # too (they carry enums and types the CRD's controller-gen schema lacks).
    rs = rayservice(overlay)
    for group, template in pod_templates(rs).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        errors.append(_kv_validate(wrapped, f"RayService pod template {group}"))
    svc = copy.deepcopy(rs["spec"]["serveService"])
    svc.update(apiVersion="v1", kind="Service")
    errors.append(_kv_validate(svc, "RayService serveService"))
    errors = [e for e in errors if e]
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- CRDs (jsonschema)
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


def _to_strict_jsonschema(node):
    """CRD openAPIV3Schema -> Draft 4 JSON schema that rejects unknown fields."""
    if isinstance(node, list):
        return [_to_strict_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "nullable"):
            continue
        out[key] = _to_strict_jsonschema(value) if key not in ("enum", "required", "default", "example") else value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(group: str, kind: str, version: str):
    import jsonschema

    crd = yaml.safe_load((CRDS / CRD_FILES[(group, kind)]).read_text())
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _to_strict_jsonschema(ver["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    validator = crd_validator(group, obj["kind"], version)
    return [f"{obj['kind']} {'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_strict_against_crds(overlay):
    need_module("jsonschema", "jsonschema")
    docs = build(overlay)
    custom = [d for d in docs if d["apiVersion"].split("/")[0] in ("ray.io", "monitoring.coreos.com")]
    assert sorted(d["kind"] for d in custom) == ["PodMonitor", "PrometheusRule", "RayService"]
    errors = [e for d in custom for e in crd_errors(d)]
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_unknown_and_mistyped_fields():
    """Proves the strict conversion bites (a typo would otherwise pass silently)."""
    need_module("jsonschema", "jsonschema")
    rs = rayservice("gpu-production")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert any("readinessprobe" in e for e in crd_errors(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert any("maxReplicas" in e for e in crd_errors(bad))
    pm = one(build("gpu-production"), "PodMonitor")
    bad = copy.deepcopy(pm)
    bad["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert crd_errors(bad)


def test_vendored_crds_match_their_readme():
    readme = (CRDS / "README.md").read_text()
    listed = dict(re.findall(r"^([0-9a-f]{64})  (\S+\.yaml)$", readme, flags=re.M))
    listed = {name: digest for digest, name in listed.items()}
    assert set(listed) == set(CRD_FILES.values()) == {p.name for p in CRDS.glob("*.yaml")}
    for name, digest in listed.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, name
        assert re.search(rf"\| {re.escape(name)} \|.*\| [0-9a-f]{{40}} \|", readme), f"{name}: no source commit"


# --------------------------------------------------------------------------- Serve config
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_inlined_into_rayservice(overlay):
    inlined = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    assert inlined == yaml.safe_load(serve_config_file(overlay).read_text())
    (app,) = inlined["applications"]
    assert app["name"] == "mistral" and app["route_prefix"] == "/"
    assert app["import_path"] == "mistral_serve.serving:build_app"
    # No `deployments:` overrides: the builder's typed args are the one source (an
    # autoscaling_config override there would also drop the queue-depth policy).
    assert "deployments" not in app
    llm = deployment_cfg(inlined, "LLMReplica")
    assert llm["autoscaling_config"]["policy"]["policy_function"] == "mistral_serve.serving.autoscaling:QueueDepthPolicy"
    assert "num_replicas" not in llm
    assert inlined["http_options"]["port"] == SERVE_PORT


def test_serve_config_matches_repo_root():
    """k8s/base/serve-config.yaml (what gpu-production deploys) must carry the same
    `applications` as the repo-root serve_config.yaml."""
    root = REPO / "serve_config.yaml"
    if not root.exists():
        pytest.skip("repo-root serve_config.yaml does not exist yet")
    ours = yaml.safe_load((K8S / "base" / "serve-config.yaml").read_text())["applications"]
    theirs = yaml.safe_load(root.read_text())["applications"]
    assert ours == theirs, (
        "k8s/base/serve-config.yaml `applications` drifted from serve_config.yaml:\n"
        + "\n".join(map(str, sorted(set(_flatten(ours).items()) ^ set(_flatten(theirs).items()))))
    )


def _flatten(node, prefix=""):
    """Dotted paths -> leaf values; list items keyed by their `name` when they have one."""
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            key = v.get("name", i) if isinstance(v, dict) else i
            out.update(_flatten(v, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(node)
    return out


def test_gpu_production_serve_config_differs_only_in_model_and_size():
    base = _flatten(yaml.safe_load((K8S / "base" / "serve-config.yaml").read_text()))
    gpu = _flatten(yaml.safe_load((K8S / "overlays" / "gpu-production" / "serve-config.yaml").read_text()))
    changed = {k for k in base.keys() | gpu.keys() if base.get(k) != gpu.get(k)}
    assert changed <= GPU_MAY_DIFFER, sorted(changed - GPU_MAY_DIFFER)
    assert not (K8S / "overlays" / "cpu-tiny" / "serve-config.yaml").exists()  # cpu-tiny = base


# --------------------------------------------------------------------------- RayService shape
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_autoscaling_and_groups(overlay):
    rs = rayservice(overlay)
    cfg = rs["spec"]["rayClusterConfig"]
    assert rs["apiVersion"] == "ray.io/v1"
    assert cfg["enableInTreeAutoscaling"] is True
    assert cfg["rayVersion"] == "2.60.0"
    head = cfg["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in k for part in head_res.values() for k in part)
    (workers,) = cfg["workerGroupSpecs"]
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    llm = deployment_cfg(serve_cfg, "LLMReplica")
    # One LLMReplica per worker pod: the group's max matches Serve's max_replicas,
    # and the worker's logical CPUs are exactly what one LLMReplica reserves, so
    # Router replicas (on the head) cannot land on GPU workers.
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert workers["maxReplicas"] == llm["autoscaling_config"]["max_replicas"]
    assert workers["minReplicas"] >= llm["autoscaling_config"]["min_replicas"]
    assert float(workers["rayStartParams"]["num-cpus"]) == llm["ray_actor_options"]["num_cpus"]
    router = deployment_cfg(serve_cfg, "Router")
    assert router["num_replicas"] * router["ray_actor_options"]["num_cpus"] <= float(head["rayStartParams"]["num-cpus"])
    wspec = workers["template"]["spec"]
    wres = wspec["containers"][0]["resources"]
    if overlay == "gpu-production":
        assert wres["requests"]["nvidia.com/gpu"] == wres["limits"]["nvidia.com/gpu"] == "1"
        assert llm["ray_actor_options"]["num_gpus"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in wspec["tolerations"]
        assert wspec["nodeSelector"]
        assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 4)
        assert serve_cfg["applications"][0]["args"]["model"] == "mistralai/Mistral-7B-Instruct-v0.3"
        assert serve_cfg["applications"][0]["args"]["dtype"] == "bfloat16"
    else:
        assert not any("gpu" in k for part in wres.values() for k in part)
        assert llm["ray_actor_options"].get("num_gpus", 0) == 0
        assert "tolerations" not in wspec and "nodeSelector" not in wspec
        assert serve_cfg["applications"][0]["args"]["device"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_secure_and_resourced(overlay):
    rs = rayservice(overlay)
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    longest_shutdown = max(  # Serve's defaults: 20 s timeout, 2 s wait loop
        d.get("graceful_shutdown_timeout_s", 20) + d.get("graceful_shutdown_wait_loop_s", 2)
        for d in effective_deployments(serve_cfg).values()
    )
    assert longest_shutdown <= 62
    for group, template in pod_templates(rs).items():
        spec = template["spec"]
        assert spec["terminationGracePeriodSeconds"] >= max(90, longest_shutdown), group
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000, group
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, group
        (container,) = spec["containers"]
        assert container["image"] == "mistral-serve:0.1.0", group
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, group
        assert sc["allowPrivilegeEscalation"] is False, group
        assert sc["readOnlyRootFilesystem"] is True, group
        assert sc["capabilities"] == {"drop": ["ALL"]}, group
        res = container["resources"]
        for key in ("cpu", "memory"):
            assert key in res["requests"] and key in res["limits"], (group, key)
        # Read-only root: Ray needs writable /tmp/ray (session dir, logs, sockets,
        # spilling) and /tmp; KubeRay adds /dev/shm itself. ray-logs is the
        # volume name KubeRay shares with the autoscaler sidecar.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["/tmp/ray"] == "ray-logs" and "emptyDir" in volumes["ray-logs"], group
        assert "emptyDir" in volumes[mounts["/tmp"]], group
        cache = volumes[mounts["/models"]]
        if overlay == "gpu-production":
            assert cache["persistentVolumeClaim"]["claimName"] == "mistral-serve-model-cache", group
        else:
            assert "emptyDir" in cache, group
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
        assert env["HF_HOME"]["value"].startswith("/models/")
        assert env["HOME"]["value"] == "/tmp"
    auto = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert auto["securityContext"]["runAsNonRoot"] is True
    assert auto["securityContext"]["readOnlyRootFilesystem"] is True
    assert auto["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert auto["resources"]["requests"] and auto["resources"]["limits"]
    if overlay == "gpu-production":
        pvc = one(build(overlay), "PersistentVolumeClaim", "mistral-serve-model-cache")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
# After its drain Ray stops its processes (allow_graceful): time left for that before SIGKILL.
RAY_STOP_MARGIN_S = 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_drain_outlasts_the_request_deadline(overlay):
    """A removed pod finishes its in-flight requests (docs/kubernetes.md, "Drain"). The kubelet
    runs preStop (create the Routers' drain file, so new requests get 503 + Retry-After and /ready
    fails, then a short sleep, so endpoints and load balancers drop the pod first), then sends
    SIGTERM; `ray start --block` then drains its Ray node for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:
    Serve moves the node's replicas elsewhere and stops them gracefully, at the latest at the
    drain deadline minus their graceful_shutdown_timeout_s. So, per pod:
    drain > the Router's request deadline, every deployment's graceful shutdown <= drain
    (hence <= grace period - preStop), and grace period >= preStop + drain + stop margin."""
    need_module("jsonschema", "jsonschema")
    from mistral_serve.serving.config import AppArgs

    rs = rayservice(overlay)
    assert not crd_errors(rs), crd_errors(rs)
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    admission = AppArgs.model_validate(app["args"]).admission
    request_deadline, drain_file = admission.request_timeout_s, admission.drain_file
    assert drain_file and drain_file.startswith("/tmp/"), drain_file  # /tmp is a writable emptyDir
    shutdowns = {  # Serve's defaults: 20 s timeout, 2 s wait loop
        name: d.get("graceful_shutdown_timeout_s", 20) + d.get("graceful_shutdown_wait_loop_s", 2)
        for name, d in effective_deployments(serve_cfg).items()
    }
    templates = pod_templates(rs)
    assert set(templates) == {"head", "llm-workers"}
    for group, template in templates.items():
        spec = template["spec"]
        (container,) = spec["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["sh", "-c"] and len(command) == 3, (group, command)
        touch, sleep = (part.split() for part in command[2].split("&&"))
        # The drain file first (Routers then answer 503 + Retry-After and /ready fails), then the sleep.
        assert touch == ["touch", drain_file], (group, command)
        assert sleep[0] == "sleep", (group, command)
        pre_stop = int(sleep[1])
        drain = float({e["name"]: e.get("value") for e in container["env"]}[DRAIN_ENV])
        grace = spec["terminationGracePeriodSeconds"]
        assert 5 <= pre_stop <= 30, group
        assert drain > request_deadline, (group, drain, request_deadline)
        assert max(shutdowns.values()) <= drain, (group, shutdowns, drain)
        assert shutdowns["LLMReplica"] <= grace - pre_stop, group
        assert grace >= pre_stop + drain + RAY_STOP_MARGIN_S, (group, grace, pre_stop, drain)
        assert grace > request_deadline, group
    if overlay == "gpu-production":  # the GPU workers, whose requests are the long ones
        worker = templates["llm-workers"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and worker["lifecycle"]["preStop"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes(overlay):
    """KubeRay submits serveConfigV2 only after the head pod is Ready, so head probes
    must not depend on the Serve app (port 8000): a readiness probe on the router's
    /ready would never pass. Head: dashboard agent /api/healthz (raylet + GCS).
    Workers: readiness on the node's Serve proxy /-/healthz, liveness on the raylet."""
    templates = pod_templates(rayservice(overlay))
    head = templates.pop("head")["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert head[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}, probe
    assert head["livenessProbe"]["periodSeconds"] * head["livenessProbe"]["failureThreshold"] >= 300
    for group, template in templates.items():
        c = template["spec"]["containers"][0]
        assert c["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": SERVE_PORT}, group
        assert c["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}, group


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_serve_service(overlay):
    docs = build(overlay)
    rs = one(docs, "RayService")
    assert not [d for d in docs if d["kind"] == "Service"], "KubeRay creates the Serve Service from serveService"
    svc = rs["spec"]["serveService"]
    assert svc["metadata"]["name"] == "mistral-serve"
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("serve", SERVE_PORT)]
    assert svc["spec"]["type"] == "ClusterIP"
    cfg = rs["spec"]["rayClusterConfig"]
    for group, template in pod_templates(rs).items():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == SERVE_PORT and ports["metrics"] == 8080, group
    assert cfg["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    assert all(g["rayStartParams"]["metrics-export-port"] == "8080" for g in cfg["workerGroupSpecs"])


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_networkpolicy(overlay):
    docs = build(overlay)
    np = one(docs, "NetworkPolicy")
    templates = pod_templates(one(docs, "RayService"))
    assert all(_selects(np["spec"]["podSelector"], t["metadata"]["labels"]) for t in templates.values())
    assert np["spec"]["policyTypes"] == ["Ingress"]
    open_rules = [r for r in np["spec"]["ingress"] if "from" not in r]
    assert open_rules and all({p["port"] for p in r["ports"]} == {SERVE_PORT} for r in open_rules)
    # Every other rule names its peers; Ray ports are reachable from this RayService's
    # pods, 8080 from the monitoring namespace, 8265/52365 from the KubeRay operator.
    peers_by_port: dict[int | str, list[dict]] = {}
    for rule in np["spec"]["ingress"]:
        if "from" not in rule:
            continue
        for port in [p["port"] for p in rule.get("ports", [])] or ["*"]:
            peers_by_port.setdefault(port, []).extend(rule["from"])
    same_rs = peers_by_port["*"]
    assert same_rs == [{"podSelector": np["spec"]["podSelector"]}]
    assert peers_by_port[8080] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert set(peers_by_port) == {"*", 8080, 8265, 52365}
    for port in (8265, 52365):
        (peer,) = peers_by_port[port]
        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_select_pods(overlay):
    docs = build(overlay)
    templates = pod_templates(one(docs, "RayService"))
    pdbs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    workers = pdbs["mistral-serve-llm-workers"]
    assert workers["spec"]["maxUnavailable"] == 1
    assert _selects(workers["spec"]["selector"], templates["llm-workers"]["metadata"]["labels"])
    assert not _selects(workers["spec"]["selector"], templates["head"]["metadata"]["labels"])
    head = pdbs["mistral-serve-head"]
    assert head["spec"]["maxUnavailable"] == 0
    assert _selects(head["spec"]["selector"], templates["head"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_scrapes_head_and_workers(overlay):
    docs = build(overlay)
    pm = one(docs, "PodMonitor")
    templates = pod_templates(one(docs, "RayService"))
    assert all(_selects(pm["spec"]["selector"], t["metadata"]["labels"]) for t in templates.values())
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert targets["ray_io_cluster"] == ["__meta_kubernetes_pod_label_ray_io_cluster"]
    assert targets["ray_io_node_type"] == ["__meta_kubernetes_pod_label_ray_io_node_type"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboards_configmap(overlay):
    cm = one(build(overlay), "ConfigMap", "mistral-serve-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = {p.name: p.read_text() for p in (K8S / "dashboards").glob("*.json")}
    assert set(expected) == {"cost.json", "latency-capacity.json"}
    assert cm["data"] == expected
    assert len(json.dumps(cm)) < 256 * 1024, "too big for client-side kubectl apply's annotation"


def test_prometheusrule_in_build_is_the_rendered_file():
    pr = one(build("gpu-production"), "PrometheusRule")
    rendered = yaml.safe_load((K8S / "monitoring" / "prometheusrule.yaml").read_text())
    assert pr["spec"] == rendered["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_ports_never_on_a_load_balancer(overlay):
    """The only Service KubeRay exposes for traffic carries the Serve port alone, and the head's
    own Service (GCS, dashboard, client, metrics) stays ClusterIP without an Ingress."""
    docs = build(overlay)
    rs = one(docs, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    serve_ports = rs["spec"]["serveService"]["spec"]["ports"]
    assert not {p["port"] for p in serve_ports} & RAY_ONLY_PORTS
    assert not {p.get("targetPort", p["port"]) for p in serve_ports} & RAY_ONLY_PORTS
    for doc in docs:
        if doc["kind"] == "Service":
            assert not {p["port"] for p in doc["spec"]["ports"]} & RAY_ONLY_PORTS, doc["metadata"]["name"]
    np = one(docs, "NetworkPolicy")
    for rule in np["spec"]["ingress"]:
        if "from" not in rule:  # open to anyone: never a Ray port
            assert not {p["port"] for p in rule["ports"]} & RAY_ONLY_PORTS
