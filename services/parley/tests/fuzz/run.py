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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..", "scripts"))
from testkit import parley_dev  # noqa: E402


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


# Limits raised, so that the fuzzer's thousands of requests are not refused by the rate limit or the
# token budget.
SETTINGS = ("\n[http]\nip_requests_per_minute = 1000000\n\n"
            "[tiers.free]\nrequests_per_minute = 1000000\ntokens_per_day = 1000000000000\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parley", required=True)
    parser.add_argument("--schemathesis", required=True)
    parser.add_argument("--max-examples", default="25")
    # Fixed, so that a run is repeatable; another seed explores other cases.
    parser.add_argument("--seed", default="1")
    args = parser.parse_args()
    # The fuzzer's account is an admin, so that the admin routes are reached too.
    env = {"PARLEY_ADMIN_EMAILS": "fuzzer@example.com"}
    with parley_dev(args.parley, "parley_fuzz", SETTINGS, env) as (base, log_path):
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


if __name__ == "__main__":
    sys.exit(main())
