"""The repository's prefect.yaml, deployed as a Prefect user deploys it: `prefect deploy` against a real local
server, a `process` work pool, `prefect worker start`, and a run that the deployment's schedule started,
seen to complete. The worker gets the code with prefect.yaml's own pull step (a git clone of this
repository's committed `main`), and the run drives a throwaway DVC repo's `ingest` stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.flows.prefect_server import stop, tail, tiny_dvc_repo, wait_for_scheduled_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def prefect(env: dict, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "--verify", "-q", "main"], cwd=REPO_ROOT,
                                   capture_output=True).returncode != 0,
                    reason="the pull step clones this repository's `main` branch, which this checkout lacks")
def test_prefect_yaml_deploys_to_a_process_pool_and_its_schedule_runs_on_a_worker(tmp_path: Path, prefect_api):
    client, env, server_log = prefect_api
    env = {**env, "SYNTHMED_REPOSITORY": str(REPO_ROOT)}
    repo = tiny_dvc_repo(tmp_path / "repo", env)
    prefect(env, tmp_path, "work-pool", "create", "gpu", "--type", "process")
    params = {"repo": str(repo), "stages": ["ingest"], "params": [], "experiment": ""}
    prefect(env, REPO_ROOT, "--no-prompt", "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml"),
            "--name", "nightly-gpu", "--interval", "30", "--params", json.dumps(params))
    deployment = client.post("/deployments/filter", json={"deployments": {"name": {"any_": ["nightly-gpu"]}}}).json()
    assert len(deployment) == 1 and deployment[0]["work_pool_name"] == "gpu"
    # `{{ $SYNTHMED_REPOSITORY }}` is filled in when deploying
    assert deployment[0]["pull_steps"][0]["prefect.deployments.steps.git_clone"]["repository"] == str(REPO_ROOT)

    work = tmp_path / "worker"
    work.mkdir()
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"], cwd=work,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def alive():
            assert worker.poll() is None, f"the worker exited ({worker.returncode}){logs()}"

        def logs():
            return f"\n--- server log ---\n{tail(server_log)}\n--- worker log ---\n{tail(worker_log)}"

        done = wait_for_scheduled_run(client, "nightly-gpu", 300, alive, logs)
        assert done["parameters"]["stages"] == ["ingest"]
        assert (repo / "ran.txt").exists(), "the DVC stage did not run"
    finally:
        stop(worker)

    # A deployment to a work pool that does not exist stops in one line, and nothing is deployed.
    bad = prefect(env, REPO_ROOT, "--no-prompt", "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml"),
                  "--name", "nightly-gpu", "--pool", "no-such-pool", check=False)
    assert bad.returncode != 0 and "no-such-pool" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
