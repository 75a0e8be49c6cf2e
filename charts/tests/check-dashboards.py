"""Every Grafana dashboard query, evaluated by a real Prometheus against a real Parley.

Starts `parley dev` (against the local PostgreSQL with its streaming replica on 5433, Redis and
NATS), drives some traffic through the public API (register, conversations, messages, a rating, a cached
reply, an OpenAI-compatible completion, usage), has Prometheus (Debian's package) scrape the
gateway's /metrics every second, then runs each query of charts/parley/dashboards/*.json through
Prometheus' HTTP API. A query that errors or returns no data fails the check.

    python check-dashboards.py [--parley target/debug/parley]
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from testkit import free_port, parley_dev, wait_for  # noqa: E402
DATABASE = "parley_dashboards"
REPLICA = "postgres://postgres@127.0.0.1:5433"


def call(method, url, body=None, token=None, expect=None):
    request = urllib.request.Request(url, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(request, data, timeout=30) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    if expect is not None and status != expect:
        raise SystemExit(f"{method} {url}: expected {expect}, got {status}: {text[:300]!r}")
    return json.loads(text) if text else None


def traffic(base, round_number):
    email = f"dash{round_number}-{int(time.time() * 1000)}@example.com"
    session = call("POST", f"{base}/v1/auth/register", {"email": email, "password": "correct horse battery"}, expect=201)
    token = session["access_token"]
    conversation = call("POST", f"{base}/v1/conversations", {"title": "dashboards"}, token, expect=201)["id"]
    for content in ("Hello there", "Tell me about dashboards"):
        exchange = call("POST", f"{base}/v1/conversations/{conversation}/messages", {"content": content}, token, expect=200)
    # A rating of the last reply: the satisfaction panel's series.
    reply = exchange["assistant_message"]["id"]
    call("PUT", f"{base}/v1/messages/{reply}/feedback", {"rating": "up"}, token, expect=200)
    # The same deterministic prompt twice: the second answer comes from the response cache.
    for _ in range(2):
        call("POST", f"{base}/v1/chat/completions",
             {"model": "parley-fake", "temperature": 0, "messages": [{"role": "user", "content": "cached question"}]},
             token, expect=200)
    call("GET", f"{base}/v1/conversations", token=token, expect=200)
    call("GET", f"{base}/v1/conversations/{conversation}/messages", token=token, expect=200)
    call("GET", f"{base}/v1/usage", token=token, expect=200)
    call("GET", f"{base}/v1/no-such-route", token=token, expect=404)


def queries():
    for path in sorted(glob.glob(os.path.join(ROOT, "charts/parley/dashboards/*.json"))):
        dashboard = json.load(open(path))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield os.path.basename(path), panel["title"], target["expr"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parley", default=os.path.join(ROOT, "target/debug/parley"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="parley-dashboards-")
    settings = "\n[database]\nreplica_check_interval_ms = 200\n"
    replicas = {"DATABASE_REPLICA_URLS": f"{REPLICA}/{DATABASE}"}
    prometheus_process = None
    with parley_dev(args.parley, DATABASE, settings, replicas) as (base, log_path):
        http_port, prometheus_port = base.rsplit(":", 1)[1], free_port()
        try:
            scrape = os.path.join(work, "prometheus.yml")
            with open(scrape, "w") as f:
                f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                        "scrape_configs:\n  - job_name: parley\n    static_configs:\n"
                        f"      - targets: ['127.0.0.1:{http_port}']\n")
            prometheus_process = subprocess.Popen(
                ["prometheus", f"--config.file={scrape}", f"--storage.tsdb.path={work}/tsdb",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w"))
            prometheus = f"http://127.0.0.1:{prometheus_port}"

            def query(expr):
                url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        return json.load(response)
                except urllib.error.HTTPError as error:
                    return json.load(error)

            def scrapes():
                result = query('count_over_time(up{job="parley"}[10m])')["data"]["result"]
                return int(result[0]["value"][1]) if result else 0

            wait_for("Prometheus to scrape Parley", lambda: scrapes() > 0)
            # Traffic while Prometheus watches, each round in a scrape of its own, so rates and quantiles
            # have increases to work on.
            for round_number in range(3):
                traffic(base, round_number)
                seen = scrapes()
                wait_for("the next scrape", lambda: scrapes() > seen)

            def evaluate():
                failures = []
                for dashboard, title, expr in queries():
                    answer = query(expr)
                    if answer.get("status") != "success":
                        failures.append(f"{dashboard} / {title}: {answer.get('error')}\n    {expr}")
                        continue
                    values = [sample["value"][1] for sample in answer["data"]["result"]]
                    if not values or all(value == "NaN" for value in values):
                        failures.append(f"{dashboard} / {title}: no data\n    {expr}")
                return failures

            # Gauges sampled every few seconds (replica lag, JetStream backlogs) may need a moment more:
            # every query must answer with data within the deadline.
            failures = evaluate()
            deadline = time.monotonic() + 30
            while failures and time.monotonic() < deadline:
                seen = scrapes()
                wait_for("the next scrape", lambda: scrapes() > seen)
                failures = evaluate()
            count = len(list(queries()))
            for failure in failures:
                print(f"  dashboard query failed: {failure}")
            print(f"{count} dashboard queries evaluated, {len(failures)} failed")
            if failures:
                print(f"(logs: {log_path}, {work})")
                sys.exit(1)
        finally:
            if prometheus_process:
                prometheus_process.terminate()
                prometheus_process.wait(timeout=15)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
