"""The web client's end-to-end tests: starts `parley dev` on a database of its own, serving the built
client (web/dist), with the fake model streaming at a human pace so that a reply can be watched and
stopped, then runs Playwright in Debian's Chromium against it. Exits with Playwright's status.
Usage: run.py --parley target/debug/parley [playwright arguments]
"""

import argparse
import os
import subprocess
import sys

WEB = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(WEB, "..", "scripts"))
from testkit import parley_dev  # noqa: E402

# 25 tokens a second: a reply takes a second or two, long enough to watch it grow and to stop it. Limits
# raised so that the tests' many accounts and requests from one address are not refused.
SETTINGS = ("tokens_per_second = 25.0\n\n"
            "[http]\nip_requests_per_minute = 100000\n\n"
            "[tiers.free]\nrequests_per_minute = 100000\ntokens_per_day = 50000000\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parley", required=True)
    args, playwright_args = parser.parse_known_args()
    env = {"PARLEY_WEB_DIR": os.path.join(WEB, "dist")}
    with parley_dev(args.parley, "parley_browser", SETTINGS, env) as (base, log_path):
        playwright = os.path.join(WEB, "node_modules", ".bin", "playwright")
        result = subprocess.run([playwright, "test", *playwright_args], cwd=WEB, env={**os.environ, "PARLEY_URL": base})
        if result.returncode != 0:
            print(f"(the platform's log: {log_path})", file=sys.stderr)
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
