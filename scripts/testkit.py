"""What the Python test drivers share (charts/tests/*.py, services/parley/tests/fuzz/run.py,
web/tests/run.py): a free local port, waiting on a condition with a deadline, and a `parley dev` of a
test's own."""

import contextlib
import http.client
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

PRIMARY = "postgres://postgres@127.0.0.1:5432"


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=60.0, every=0.2):
    """Polls `check` until it returns something true (returned), or fails after `timeout` seconds. A
    check that raises as a service does while it starts (a refused connection, an HTTP error, a body
    that is not yet JSON) counts as not yet."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError, KeyError) as error:
            last_error = error
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


@contextlib.contextmanager
def parley_dev(parley, name, settings="", env=None):
    """Runs `parley dev` on a database, NATS and Redis prefixes of its own (all named `name`, the
    database made afresh), with the fake model on a free port and `settings` (TOML) added to its
    configuration; yields (base URL, log path) once it is ready; afterwards stops it and drops its
    database."""
    work = tempfile.mkdtemp(prefix=f"{name}-")
    subprocess.run(["psql", f"{PRIMARY}/postgres", "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                   check=True, capture_output=True)
    http_port, fake_port = free_port(), free_port()
    config = os.path.join(work, "parley.toml")
    with open(config, "w") as f:
        f.write(f'[fake_llm]\naddr = "127.0.0.1:{fake_port}"\n{settings}')
    process_env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "DATABASE_", "OTEL_"))}
    process_env.update({
        "PARLEY_CONFIG": config,
        "DATABASE_URL": f"{PRIMARY}/{name}",
        "PARLEY_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "PARLEY_NATS_PREFIX": name.replace("_", ""),
        "PARLEY_REDIS_PREFIX": name.replace("_", ""),
        "PARLEY_LOG": "warn",
        **(env or {}),
    })
    log_path = os.path.join(work, "parley.log")
    process = subprocess.Popen([os.path.abspath(parley), "dev"], env=process_env, stdout=open(log_path, "w"),
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for("parley dev to be ready", lambda: urllib.request.urlopen(f"{base}/readyz", timeout=2).status == 200)
        yield base, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        subprocess.run(["psql", f"{PRIMARY}/postgres", "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                       capture_output=True)
