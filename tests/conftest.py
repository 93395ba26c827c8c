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
def prefect_api(tmp_path_factory):
    """(api client, env for subprocesses, server log) of one real `prefect server start` per test process, with a
    fast scheduler: the flow tests report to it and the deployment tests deploy to it (a start costs 15-20 s)."""
    from tests.flows.prefect_server import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running


@pytest.fixture(scope="session")
def prefect_harness(prefect_api):
    """Flows run in this process report to the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api[1]["PREFECT_API_URL"]}):
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
