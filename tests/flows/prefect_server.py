"""A real `prefect server start` in a subprocess for the deployment tests, with its own PREFECT_HOME and port;
the pytest process's environment is left alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

SERVER_START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_bytes().replace(b"\0", b"").decode(errors="replace")[-n:] if path.exists() else ""


def stop(proc: subprocess.Popen | None) -> None:
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


def tiny_dvc_repo(root: Path, env: dict[str, str]) -> Path:
    """A DVC repo (no git) whose only stage carries a pipeline stage name and appends to ran.txt."""
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=root, env=env, check=True)
    (root / "dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: python -c \"open('ran.txt', 'a').write('run\\n')\"\n"
    )
    return root



def prefect_env(tmp_path: Path, api: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_LOGGING_LEVEL="INFO",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def prefect_server(tmp_path: Path):
    """(api client, env, log) of a healthy server; stopped afterwards."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env, log = prefect_env(tmp_path, api), tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=api, timeout=10) as client:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while True:
                assert server.poll() is None, f"prefect server exited ({server.returncode})\n{tail(log)}"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"prefect server not healthy in {SERVER_START_TIMEOUT} s\n{tail(log)}"
                time.sleep(1)
            yield client, env, log
    finally:
        stop(server)


def wait_for_scheduled_run(client: httpx.Client, deployment: str, timeout: float, alive, logs) -> dict:
    """The first flow run of ``deployment`` (a name) that the server's *scheduler* created (auto_scheduled,
    created by SCHEDULE; a `prefect deployment run` leaves both unset) once it completes; fails on a failed one."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        assert time.monotonic() < deadline, f"no scheduled flow run completed in {timeout} s{logs()}"
        time.sleep(2)
        resp = client.post("/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": 50,
                                                      "deployments": {"name": {"any_": [deployment]}}})
        resp.raise_for_status()
        scheduled = [r for r in resp.json() if r["auto_scheduled"] and r["deployment_id"]
                     and (r.get("created_by") or {}).get("type") == "SCHEDULE"]
        failed = [r for r in scheduled if r["state_type"] in ("FAILED", "CRASHED")]
        assert not failed, f"scheduled run {failed[0]['name']} ended {failed[0]['state_name']}{logs()}"
        done = next((r for r in scheduled if r["state_type"] == "COMPLETED"), None)
        if done:
            return done


def wait_for_flow_run(client: httpx.Client, run_id: str, timeout: float, alive, logs) -> dict:
    """Flow run ``run_id`` once it completes; fails when it fails or crashes."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        assert time.monotonic() < deadline, f"flow run {run_id} did not complete in {timeout} s{logs()}"
        time.sleep(2)
        resp = client.get(f"/flow_runs/{run_id}")
        resp.raise_for_status()
        run = resp.json()
        assert run["state_type"] not in ("FAILED", "CRASHED"), f"the run ended {run['state_name']}{logs()}"
        if run["state_type"] == "COMPLETED":
            return run
