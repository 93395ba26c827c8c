"""A served deployment's schedule really fires against a real `prefect server start`.

The session's `prefect_test_harness` cannot show this: the scheduler is a server service, and a
broken one (e.g. SQLAlchemy 2.1 beside prefect 3.8: "Can't evaluate bulk DML statement") only
logs a traceback every loop while `--serve` looks healthy. So this starts its own server and
`python -m flows.pipeline --serve --interval ...` in subprocesses (own PREFECT_HOME, own env; the
pytest process's environment is left alone), on a throwaway DVC repo whose `ingest` stage only
touches a file, and waits for a flow run that the *schedule* created to complete.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SERVER_START_TIMEOUT = 180
SCHEDULED_RUN_TIMEOUT = 180
INTERVAL_SECONDS = 30  # the first run is due at once; a long gap keeps runs from overlapping


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_bytes().replace(b"\0", b"").decode(errors="replace")[-n:] if path.exists() else ""


def _stop(proc: subprocess.Popen | None) -> None:
    """Terminate a child started in its own session, with whatever it spawned (flow-run processes)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tiny_dvc_repo(root: Path, env: dict[str, str]) -> Path:
    """A DVC repo (no git) whose only stage carries a pipeline stage name and appends to ran.txt."""
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=root, env=env, check=True)
    (root / "dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: python -c \"open('ran.txt', 'a').write('run\\n')\"\n"
    )
    return root


def test_served_interval_schedule_fires(tmp_path: Path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        PREFECT_LOGGING_LEVEL="INFO",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        PYTHONUNBUFFERED="1",
    )
    repo = _tiny_dvc_repo(tmp_path / "repo", env)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = serve = None

    def logs() -> str:
        return f"\n--- server log ---\n{_tail(server_log)}\n--- serve log ---\n{_tail(serve_log)}"

    try:
        with server_log.open("wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        with httpx.Client(base_url=api, timeout=10) as client:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while True:
                assert server.poll() is None, f"prefect server exited ({server.returncode}){logs()}"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"prefect server not healthy in {SERVER_START_TIMEOUT} s{logs()}"
                time.sleep(1)

            with serve_log.open("wb") as out:
                serve = subprocess.Popen(
                    [sys.executable, "-m", "flows.pipeline", "--serve", "--interval", str(INTERVAL_SECONDS),
                     "--repo", str(repo), "--stages", "ingest"],
                    cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )

            deadline = time.monotonic() + SCHEDULED_RUN_TIMEOUT
            done = None
            while done is None:
                assert serve.poll() is None, f"--serve exited ({serve.returncode}){logs()}"
                assert time.monotonic() < deadline, (
                    f"no scheduled flow run completed in {SCHEDULED_RUN_TIMEOUT} s{logs()}")
                time.sleep(2)
                resp = client.post("/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": 50})
                resp.raise_for_status()
                runs = resp.json()
                # auto_scheduled and created_by.type == "SCHEDULE" are set only on runs the server's
                # scheduler made; `prefect deployment run` / run_deployment leave both unset.
                scheduled = [r for r in runs if r["auto_scheduled"] and r["deployment_id"]
                             and (r.get("created_by") or {}).get("type") == "SCHEDULE"]
                failed = [r for r in scheduled if r["state_type"] in ("FAILED", "CRASHED")]
                assert not failed, f"scheduled run {failed[0]['name']} ended {failed[0]['state_name']}{logs()}"
                done = next((r for r in scheduled if r["state_type"] == "COMPLETED"), None)

            deployment = client.get(f"/deployments/{done['deployment_id']}").json()
            assert deployment["name"] == "synthmed-pipeline"
            assert done["parameters"]["stages"] == ["ingest"]
            assert (repo / "ran.txt").exists(), "the DVC stage did not run"
    finally:
        _stop(serve)
        _stop(server)
