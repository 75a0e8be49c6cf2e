"""Schemathesis, every check, over every operation of Parley's served OpenAPI document.

Starts `parley dev` on a database of its own (limits raised, so that the fuzzer's thousands of requests
are not refused by the rate limit or the token budget), registers a user, and runs Schemathesis with
services/parley/tests/fuzz/schemathesis.toml, whose exceptions each carry their reason. Exits with
Schemathesis's status: non-zero on any failure. Usage: run.py --parley target/debug/parley
--schemathesis .tools/fuzz-venv/bin/schemathesis
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

DATABASE = "parley_fuzz"
PRIMARY = "postgres://postgres@127.0.0.1:5432"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "scripts"))
from testkit import free_port, wait_for  # noqa: E402


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parley", required=True)
    parser.add_argument("--schemathesis", required=True)
    parser.add_argument("--max-examples", default="25")
    # Fixed, so that a run is repeatable; another seed explores other cases.
    parser.add_argument("--seed", default="1")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="parley-fuzz-")
    subprocess.run(["psql", f"{PRIMARY}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"],
                   check=True, capture_output=True)
    http_port, fake_port = free_port(), free_port()
    config = os.path.join(work, "parley.toml")
    with open(config, "w") as f:
        f.write(f'[fake_llm]\naddr = "127.0.0.1:{fake_port}"\n\n'
                "[http]\nip_requests_per_minute = 1000000\n\n"
                "[tiers.free]\nrequests_per_minute = 1000000\ntokens_per_day = 1000000000000\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "DATABASE_", "OTEL_"))}
    env.update({
        "PARLEY_CONFIG": config,
        "DATABASE_URL": f"{PRIMARY}/{DATABASE}",
        "PARLEY_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "PARLEY_NATS_PREFIX": "parleyfuzz",
        "PARLEY_REDIS_PREFIX": "parleyfuzz",
        "PARLEY_LOG": "warn",
        # The fuzzer's account is an admin, so that the admin routes are reached too.
        "PARLEY_ADMIN_EMAILS": "fuzzer@example.com",
    })
    log_path = os.path.join(work, "parley.log")
    parley = subprocess.Popen([args.parley, "dev"], env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for("parley dev to be ready", lambda: urllib.request.urlopen(f"{base}/readyz", timeout=2).status == 200)
        token = post(f"{base}/v1/auth/register",
                     {"email": "fuzzer@example.com", "password": "correct horse battery"})["access_token"]
        command = [
            args.schemathesis, "--config-file", os.path.join(HERE, "schemathesis.toml"),
            "run", f"{base}/openapi.json",
            "--checks", "all",
            "--header", f"Authorization: Bearer {token}",
            "--max-examples", args.max_examples,
            # One worker: Hypothesis's describing of strategies is not safe across threads.
            "--workers", "1",
            "--seed", args.seed,
            "--suppress-health-check=too_slow",
        ]
        result = subprocess.run(command, env={**os.environ, "NO_COLOR": "1"})
        if result.returncode != 0:
            print(f"(the platform's log: {log_path})", file=sys.stderr)
        return result.returncode
    finally:
        parley.terminate()
        try:
            parley.wait(timeout=30)
        except subprocess.TimeoutExpired:
            parley.kill()


if __name__ == "__main__":
    sys.exit(main())
