"""pytest fixtures: a real ropekvd on a free loopback port, and a client of it.

The daemon binary comes from $ROPEKVD (ctest sets it), else the first of build*/ropekvd in the
repository. The `ropekv` package must be importable (ctest puts <build>/python on PYTHONPATH).
"""

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(path):
    with open(path) as f:
        return f.read()


def _ropekvd():
    path = os.environ.get("ROPEKVD")
    if path:
        return path
    found = sorted(glob.glob(os.path.join(REPO, "build*", "ropekvd")))
    if not found:
        pytest.exit("set ROPEKVD to the ropekvd binary (or build it into build*/ropekvd)", 2)
    return found[0]


@pytest.fixture(scope="session")
def daemon():
    """Starts ropekvd (256 MiB host tier) and yields its address; stops it at the end."""
    binary = _ropekvd()
    tmp = tempfile.mkdtemp(prefix="ropekv-pytest-")
    port_file = os.path.join(tmp, "port")
    log_path = os.path.join(tmp, "log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--data_dir", os.path.join(tmp, "data"),
             "--port_file", port_file, "--host_capacity", "256MiB"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and _read(port_file).strip()):
            if proc.poll() is not None:
                pytest.fail(f"ropekvd exited with {proc.returncode}: {_read(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"ropekvd wrote no port within 30 s: {_read(log_path)}")
            time.sleep(0.05)
        yield "127.0.0.1:" + _read(port_file).strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def client(daemon):
    import ropekv

    c = ropekv.Client(daemon, timeout=30)
    c.wait_ready(timeout=10)
    yield c
    c.close()


@pytest.fixture
def tenant():
    """A tenant of its own for each test: blocks never collide across tests."""
    return "t-" + uuid.uuid4().hex[:12]
