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

# The official OpenAI Python SDK, which the tests run against the gateway's OpenAI-compatible API.
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
stamp="$venv/.requirements"
if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
  echo "installing the OpenAI Python SDK into .tools/venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi
