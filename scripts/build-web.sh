#!/usr/bin/env bash
# Builds the web client (web/ -> web/dist, served by the gateway at / and /status): installs its npm
# packages exactly as web/package-lock.json pins them when that file changed, then runs Vite.
set -euo pipefail
web="$(cd "$(dirname "$0")/../web" && pwd)"
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "error: Node.js and npm are needed; install with: sudo apt-get install -y nodejs npm" >&2
    exit 1
  fi
fi
if ! cmp -s "$web/package-lock.json" "$web/node_modules/.parley-lock" 2>/dev/null; then
  echo "installing the web client's packages (web/package-lock.json)"
  (cd "$web" && npm ci --no-audit --no-fund --silent)
  cp "$web/package-lock.json" "$web/node_modules/.parley-lock"
fi
(cd "$web" && npx --no-install vite build --logLevel warn)
