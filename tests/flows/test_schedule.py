"""A served deployment's schedule really fires against a real `prefect server start`.

An in-process flow run cannot show this: the scheduler is a server service, and a
broken one (e.g. SQLAlchemy 2.1 beside prefect 3.8: "Can't evaluate bulk DML statement") only
logs a traceback every loop while `--serve` looks healthy. So this uses a real server and starts
`python -m flows.pipeline --serve --interval ...` in subprocesses, on a throwaway DVC repo whose
`ingest` stage only touches a file, and waits for a flow run that the *schedule* created to complete.
The server is the session's (tests/conftest.py `prefect_api`), shared with the deployment and flow tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.flows.prefect_server import stop, tail, tiny_dvc_repo, wait_for_scheduled_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SCHEDULED_RUN_TIMEOUT = 180
INTERVAL_SECONDS = 30  # the first run is due at once; a long gap keeps runs from overlapping


def test_served_interval_schedule_fires(tmp_path: Path, prefect_api):
    client, env, server_log = prefect_api
    repo = tiny_dvc_repo(tmp_path / "repo", env)
    serve_log = tmp_path / "serve.log"
    with serve_log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline", "--serve", "--interval", str(INTERVAL_SECONDS),
             "--repo", str(repo), "--stages", "ingest"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def alive():
            assert serve.poll() is None, f"--serve exited ({serve.returncode}){logs()}"

        def logs():
            return f"\n--- server log ---\n{tail(server_log)}\n--- serve log ---\n{tail(serve_log)}"

        done = wait_for_scheduled_run(client, "synthmed-pipeline", SCHEDULED_RUN_TIMEOUT, alive, logs)
        deployment = client.get(f"/deployments/{done['deployment_id']}").json()
        assert deployment["name"] == "synthmed-pipeline"
        assert done["parameters"]["stages"] == ["ingest"]
        assert (repo / "ran.txt").exists(), "the DVC stage did not run"
    finally:
        stop(serve)
