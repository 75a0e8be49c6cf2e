"""What the Python test drivers share (charts/tests/*.py, services/parley/tests/fuzz/run.py): a free local
port, and waiting on a condition with a deadline."""

import http.client
import socket
import time
import urllib.error


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
