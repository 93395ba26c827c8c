"""Test-wide settings: offline, no analytics, Prefect state in a temp dir."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="synthmed-tests-"))
os.environ.pop("SYNTHMED_STORE", None)  # each test repo keeps its own store
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    DVC_NO_ANALYTICS="1",
    PREFECT_HOME=str(_TMP / "prefect"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    PREFECT_LOGGING_LEVEL="INFO",
)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest worker per core (Makefile): one torch thread each, here and in every process a test starts,
    # so that two workers never oversubscribe the cores (OpenMP threads spin-wait for each other).
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
# Stages run as `python -m stages.x` in subprocesses: make sure that is this venv's python.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes 10-20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def pytest_collection_modifyitems(items):
    """Longest first, so that pytest-xdist's workers (handed tests in this order, one or two at a time) end
    together: the first test on the shared tiny DAG (it builds it), the other end-to-end tests, the slow
    process tests, the other tests on the DAG, then the unit tests."""
    first_on_dag = next((i for i in items if "dag" in getattr(i, "fixturenames", ())), None)

    def rank(item) -> int:
        if item is first_on_dag:
            return 0
        if "dag" in getattr(item, "fixturenames", ()):
            return 3
        return 1 if item.get_closest_marker("e2e") else 2 if item.get_closest_marker("slow") else 4

    items.sort(key=rank)  # stable: collection order within a rank
