# Parley's two commands: `make run` and `make test` (and `make bench`, the load tests). All bring up
# PostgreSQL, Redis and NATS first.
SHELL := /bin/bash
export PATH := $(CURDIR)/.tools/bin:$(HOME)/.cargo/bin:$(PATH)
export CARGO_TERM_COLOR ?= never

.PHONY: run test lint unit chart fuzz browser topology services replica tools build bench web

## Build and start the whole platform locally (parley dev, gateway and web client on http://127.0.0.1:8080).
run: services web
	cargo build --bin parley
	./target/debug/parley dev

## Every test: lint, unit, integration and end to end, the API fuzzer, the browser tests, then the Helm chart, alert rules and dashboards,
## then the topology test (the rendered chart run as one process per replica).
test: services replica tools lint web
	cargo nextest run --workspace --no-fail-fast
	$(MAKE) --no-print-directory fuzz
	$(MAKE) --no-print-directory browser
	$(MAKE) --no-print-directory chart
	$(MAKE) --no-print-directory topology

## The chart (helm lint, kubernetes-validate, invariants), promtool on the alert rules, and every
## dashboard query against a real Prometheus scraping `parley dev`.
chart: services replica tools
	cargo build --bin parley
	charts/tests/check-chart.sh
	.tools/venv/bin/python charts/tests/check-dashboards.py

## Schemathesis, every check, over every operation of the served OpenAPI document (`parley dev` on a
## database of its own); the exceptions and their reasons are in services/parley/tests/fuzz/schemathesis.toml.
fuzz: services tools
	cargo build --bin parley
	python3 services/parley/tests/fuzz/run.py --parley target/debug/parley \
		--schemathesis .tools/fuzz-venv/bin/schemathesis

## The web client end to end in Debian's Chromium (Playwright), desktop and phone sizes, against
## `parley dev` on a database of its own (web/tests/run.py).
browser: services tools web
	cargo build --bin parley
	python3 web/tests/run.py --parley target/debug/parley

## The web client (web/, Vite) built into web/dist, which the gateway serves at / and /status.
web:
	@scripts/build-web.sh

## The chart rendered with `helm template` and every Deployment run as local processes, two gateways,
## chat and agents: the public journey, balancing, restarts and degraded modes (charts/tests/topology.py).
topology: services tools
	cargo build --bin parley
	.tools/venv/bin/python charts/tests/topology.py

## Formatting and clippy, warnings denied.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

build:
	cargo build --workspace

## Load tests against a release build (wrk and loadtests/streams): throughput, latency, CPU and memory,
## time to first token, concurrent streams. Results in loadtests/results/. See loadtests/bench.sh.
bench: services
	loadtests/bench.sh

services:
	@scripts/ensure-services.sh

## A streaming replica of the local PostgreSQL on port 5433, for the read-replica tests.
replica: services
	@scripts/test-replica.sh start

tools:
	@scripts/install-tools.sh
