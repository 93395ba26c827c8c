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
import yaml

from benchmarks.scale import make_dataset

from tests.conftest import REPO_ROOT
from tests.flows.prefect_server import stop, tail, tiny_dvc_repo, wait_for_flow_run, wait_for_scheduled_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def prefect(env: dict, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


needs_main = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse", "--verify", "-q", "main"], cwd=REPO_ROOT, capture_output=True).returncode != 0,
    reason="the pull step clones this repository's `main` branch, which this checkout lacks")


def start_worker(env: dict, tmp_path: Path, pool: str) -> tuple[subprocess.Popen, Path]:
    work, log = tmp_path / "worker", tmp_path / "worker.log"
    work.mkdir()
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], cwd=work,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return worker, log


def watch(worker: subprocess.Popen, server_log: Path, worker_log: Path):
    """(alive, logs) for the waits: a check that the worker still runs, and the server's and worker's logs."""
    def logs() -> str:
        return f"\n--- server log ---\n{tail(server_log)}\n--- worker log ---\n{tail(worker_log)}"

    def alive() -> None:
        assert worker.poll() is None, f"the worker exited ({worker.returncode}){logs()}"

    return alive, logs


@needs_main
def test_prefect_yaml_deploys_to_a_process_pool_and_its_schedule_runs_on_a_worker(tmp_path: Path, prefect_api):
    client, env, server_log = prefect_api
    env = {**env, "SYNTHMED_REPOSITORY": str(REPO_ROOT)}
    repo = tiny_dvc_repo(tmp_path / "repo", env)
    prefect(env, tmp_path, "work-pool", "create", "gpu", "--type", "process")
    params = {"repo": str(repo), "stages": ["ingest"], "params": [], "experiment": "", "push": False}
    prefect(env, REPO_ROOT, "--no-prompt", "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml"),
            "--name", "nightly-gpu", "--interval", "30", "--params", json.dumps(params))
    deployment = client.post("/deployments/filter", json={"deployments": {"name": {"any_": ["nightly-gpu"]}}}).json()
    assert len(deployment) == 1 and deployment[0]["work_pool_name"] == "gpu"
    # `{{ $SYNTHMED_REPOSITORY }}` is filled in when deploying
    assert deployment[0]["pull_steps"][0]["prefect.deployments.steps.git_clone"]["repository"] == str(REPO_ROOT)

    worker, worker_log = start_worker(env, tmp_path, "gpu")
    alive, logs = watch(worker, server_log, worker_log)
    try:
        done = wait_for_scheduled_run(client, "nightly-gpu", 300, alive, logs)
        assert done["parameters"]["stages"] == ["ingest"]
        assert (repo / "ran.txt").exists(), "the DVC stage did not run"
    finally:
        stop(worker)

    # A deployment to a work pool that does not exist stops in one line, and nothing is deployed.
    bad = prefect(env, REPO_ROOT, "--no-prompt", "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml"),
                  "--name", "nightly-gpu", "--pool", "no-such-pool", check=False)
    assert bad.returncode != 0 and "no-such-pool" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@needs_main
def test_nightly_on_a_worker_comes_back_to_the_workstation(tmp_path: Path, prefect_api):
    """The user's path end to end: a workstation repository (this one's `main`) with its own ImageFolder added
    with `dvc add` and pushed, a bare git remote and a local DVC remote; the real `nightly-gpu` deployment (its
    pull step, its experiment and push parameters; only the stages cut to the data ones) run by a worker; and
    `dvc exp pull` on the workstation bringing the night's metrics into `dvc exp show`."""
    client, env, server_log = prefect_api
    git_id = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    env = {**env, **git_id}
    origin, storage, ws = tmp_path / "origin.git", tmp_path / "dvc-remote", tmp_path / "workstation"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    run(["git", "clone", "-q", "-b", "main", str(REPO_ROOT), str(ws)], tmp_path, env)
    dvc = [sys.executable, "-m", "dvc"]
    make_dataset(ws / "data/raw/mine", 24, 32, 1, 2)  # the user's own data, where the README says to put it
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["ingest"].update(source="imagefolder", path="data/raw/mine", resolution=32, min_images=10)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([*dvc, "remote", "add", "-d", "storage", str(storage)], ws, env)
    run([*dvc, "add", "-q", "data/raw/mine"], ws, env)
    run([*dvc, "push", "-q", "data/raw/mine.dvc"], ws, env)
    run(["git", "add", "params.yaml", ".dvc/config", "data/raw/mine.dvc"], ws, env)
    run(["git", "commit", "-q", "-m", "my dataset, a DVC remote"], ws, env)
    run(["git", "remote", "set-url", "origin", str(origin)], ws, env)
    run(["git", "push", "-q", "origin", "main"], ws, env)

    env = {**env, "SYNTHMED_REPOSITORY": str(origin)}
    prefect(env, tmp_path, "work-pool", "create", "gpu-nightly", "--type", "process")
    nightly = next(d for d in yaml.safe_load((ws / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly-gpu")
    assert nightly["parameters"]["experiment"] and nightly["parameters"]["push"] is True
    params = {**nightly["parameters"], "stages": ["ingest", "paraphrase"]}  # the rest as deployed
    prefect(env, ws, "--no-prompt", "deploy", "--prefect-file", str(ws / "prefect.yaml"), "--name", "nightly-gpu",
            "--pool", "gpu-nightly", "--params", json.dumps(params))
    deployment = [d for d in client.post("/deployments/filter", json={
        "deployments": {"name": {"any_": ["nightly-gpu"]}}}).json() if d["work_pool_name"] == "gpu-nightly"]
    assert len(deployment) == 1 and deployment[0]["parameters"]["stages"] == ["ingest", "paraphrase"]
    created = client.post(f"/deployments/{deployment[0]['id']}/create_flow_run", json={})
    assert created.status_code == 201, f"{created.status_code}: {created.text}\n{tail(server_log)}"
    run_id = created.json()["id"]
    worker, worker_log = start_worker(env, tmp_path, "gpu-nightly")
    alive, logs = watch(worker, server_log, worker_log)
    try:
        done = wait_for_flow_run(client, run_id, 600, alive, logs)
        assert done["parameters"]["push"] is True
    finally:
        stop(worker)

    names = run([*dvc, "exp", "list", "--name-only", "origin"], ws, env).split()
    assert len(names) == 1 and names[0].startswith(f"{nightly['parameters']['experiment']}-"), names
    run([*dvc, "exp", "pull", "-q", "origin", names[0]], ws, env)
    shown = json.loads(run([*dvc, "exp", "show", "--json"], ws, env))
    exps = [e for commit in shown for e in commit.get("experiments") or [] if e.get("name") == names[0]]
    metrics = exps[0]["revs"][0]["data"]["metrics"]
    assert metrics["metrics/ingest.json"]["data"]["images"] == 24
    assert metrics["metrics/paraphrase.json"]["data"]["unique_captions_after"] > 0
    # its outputs came with it: the night's dataset, checked out from the DVC remote
    run([*dvc, "exp", "branch", names[0], "night"], ws, env)
    run(["git", "checkout", "-q", "night"], ws, env)
    run([*dvc, "checkout", "-q", "ingest"], ws, env)
    assert len(list((ws / "data/ingest/dataset").glob("*.png"))) == 24
