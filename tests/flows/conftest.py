"""One real `prefect server start` for every deployment test of the session (it takes 10-20 s to start)."""

from __future__ import annotations

import pytest

from tests.flows.prefect_server import prefect_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """(api client, env, server log) of a healthy server with a fast scheduler."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as running:
        yield running
