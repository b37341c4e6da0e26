"""Suite-wide fixtures.

Tests marked `exclusive` measure wall-clock behaviour (a shaped link kept busy) and must not
share this 2-core box with another test: under pytest-xdist they take an exclusive file lock
that every other test takes shared, so the other worker pauses between tests while they run.
"""

import fcntl
import os
import tempfile
import time

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "exclusive: run with no other test running at the same time")


@pytest.fixture(autouse=True)
def _exclusive_when_marked(request):
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:          # not under xdist: nothing runs beside us anyway
        yield
        return
    path = os.path.join(tempfile.gettempdir(), f"jaxprfaas-tests-{run}.lock")
    pending = path + ".pending"
    exclusive = request.node.get_closest_marker("exclusive") is not None
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if exclusive:
            open(pending, "w").close()           # stop new shared holders from starving us
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            while os.path.exists(pending):
                time.sleep(0.05)
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if exclusive:
            try:
                os.unlink(pending)
            except FileNotFoundError:
                pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
