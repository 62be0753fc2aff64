"""pytest fixtures: a real ropekvd on a free loopback port, and a client of it.

The daemon binary comes from $ROPEKVD (ctest sets it), else the first of build*/ropekvd in the
repository. The `ropekv` package must be importable (ctest puts <build>/python on PYTHONPATH).
"""

import glob
import os
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    import ropekv

    try:
        # Select on the CPU on GPU hosts too: test_retrieval checks against fp64 at the CPU
        # path's tolerances (tests/gpu/retrieval_gpu_test.cc checks the GPU path equals it).
        d = ropekv.LocalDaemon(_ropekvd(), "--host_capacity", "256MiB", "--retrieval_device",
                               "cpu", timeout=30, stop_timeout=10, prefix="ropekv-pytest-")
    except ropekv.Error as e:
        pytest.fail(str(e))
    with d:
        yield d.address


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
