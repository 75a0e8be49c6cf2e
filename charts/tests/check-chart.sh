#!/usr/bin/env bash
# The chart's tests (part of `make test`): helm lint --strict; helm template with each ci/*.yaml,
# validated against the Kubernetes schemas (kubernetes-validate, strict) and the invariants in
# invariants.py; values.schema.json rejecting unknown keys and wrong types; the alert rules through
# promtool check and promtool test.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
export PATH="$root/.tools/bin:$PATH"
python="$root/.tools/venv/bin/python"
chart="$root/charts/parley"
parley="${PARLEY_BIN:-$root/target/debug/parley}"
kubernetes_version="1.30.0"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

[ -x "$parley" ] || cargo build --quiet --bin parley

echo "== helm lint --strict"
helm lint --strict "$chart" -f "$chart/ci/dev-values.yaml" >/dev/null
for values in "$chart"/ci/*.yaml; do
  helm lint --strict "$chart" -f "$values" >/dev/null
done

for values in "$chart"/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  echo "== $name: helm template, kubernetes-validate, invariants"
  # As on a cluster with the Prometheus operator and KEDA installed, so their objects render too.
  helm template parley "$chart" -f "$values" --namespace parley \
    --api-versions monitoring.coreos.com/v1 --api-versions keda.sh/v1alpha1 >"$work/$name.yaml"
  "$python" - "$work/$name.yaml" "$work/$name-core.yaml" <<'PY'
import sys, yaml
objects = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o]
# Kubernetes' own kinds go to kubernetes-validate; CRDs (ServiceMonitor, PrometheusRule, ScaledObject)
# are checked by invariants.py.
core = [o for o in objects if not o["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/"))]
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
PY
  "$root/.tools/venv/bin/kubernetes-validate" --strict --quiet -k "$kubernetes_version" "$work/$name-core.yaml"
  "$python" "$root/charts/tests/invariants.py" "$work/$name.yaml" --values "$values" --parley "$parley"
done

echo "== without the Prometheus operator, no ServiceMonitor or PrometheusRule is rendered"
helm template parley "$chart" -f "$chart/ci/dev-values.yaml" >"$work/plain.yaml"
if grep -Eq '^kind: (ServiceMonitor|PrometheusRule|ScaledObject)$' "$work/plain.yaml"; then
  echo "error: operator objects rendered on a cluster that does not serve their API" >&2
  exit 1
fi

echo "== values.schema.json rejects unknown keys and wrong types"
expect_rejected() {
  if helm template parley "$chart" -f "$chart/ci/dev-values.yaml" "$@" >/dev/null 2>"$work/err"; then
    echo "error: helm accepted $*" >&2
    exit 1
  fi
}
expect_rejected --set gateway.replicass=2
expect_rejected --set gateway.replicas=two
expect_rejected --set-string agent.keda.enabled=yes
expect_rejected --set config.logFormat=xml
expect_rejected --set unknownTopLevel=1
echo "== a database URL is required"
if helm template parley "$chart" >/dev/null 2>"$work/err"; then
  echo "error: rendered without database.url" >&2
  exit 1
fi
grep -q "database.url" "$work/err"

echo "== k8s/ example manifests (Kubernetes kinds; CloudNativePG's Cluster is a CRD)"
"$python" - "$root"/k8s/*.yaml "$work/k8s-core.yaml" <<'PY'
import sys, yaml
objects = []
for path in sys.argv[1:-1]:
    objects += [o for o in yaml.safe_load_all(open(path)) if o and "apiVersion" in o and "kind" in o]
core = [o for o in objects if not o["apiVersion"].startswith("postgresql.cnpg.io/")]
yaml.safe_dump_all(core, open(sys.argv[-1], "w"))
PY
"$root/.tools/venv/bin/kubernetes-validate" --strict --quiet -k "$kubernetes_version" "$work/k8s-core.yaml"

echo "== metric names (dashboards and alerts against the declarations)"
"$python" "$root/charts/tests/check-metric-names.py"

echo "== promtool"
promtool check rules "$chart/rules/parley-alerts.yaml"
(cd "$chart/rules" && promtool test rules parley-alerts.test.yaml)
echo "chart checks passed"
