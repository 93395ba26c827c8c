"""Prefect orchestration of the DVC pipeline: one task per stage, each `dvc repro <stage>`; or, with params
overrides or an experiment name, one `dvc exp run`; and a sweep flow over a params grid.

No ML here: DVC decides what is stale, the stages do the work. Run locally with
`python -m flows.pipeline`, serve it on one machine with `--serve`, or deploy it to work pools with
`prefect deploy` (prefect.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from prefect import flow, get_run_logger, task

from synthmed.core.stage import stage_names

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = tuple(stage_names(REPO_ROOT / "dvc.yaml"))  # dvc.yaml's order
INPUT_ERROR_EXIT = 2  # stages exit 2 on bad params or inputs: retrying cannot help


_STAGE_EXIT = re.compile(r"exited with (\d+)")
_PROGRESS = re.compile(r"^(\w[\w ]*): \w+ (\d+)/(\d+) \(")  # the stages' plain progress lines (synthmed.core.progress)
TAIL_LINES = 30


class StageFailed(RuntimeError):
    def __init__(self, stage: str, stage_exit: int | None, last_error: str, tail: str = ""):
        super().__init__(f"stage '{stage}' failed: {last_error or 'see its log above'}"
                         + (f"\n--- last lines of its log ---\n{tail}" if tail else ""))
        self.stage, self.stage_exit = stage, stage_exit


def _worth_retrying(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and exc.stage_exit == INPUT_ERROR_EXIT)


def _stage_env() -> dict[str, str]:
    """The stages' `python` must be this interpreter (the project's venv); unbuffered, so that their
    progress reaches the task log as it happens."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class _Progress:
    """One Prefect progress artifact per loop that reports progress (training steps, generated images,
    classifier cells, ...), moved along by its progress lines."""

    def __init__(self):
        self.ids: dict[str, object] = {}

    def update(self, line: str) -> None:
        m = _PROGRESS.match(line)
        if not m:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        name, done, total = m.group(1), int(m.group(2)), int(m.group(3))
        percent = 100.0 * done / max(total, 1)
        if name not in self.ids:
            key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + "-progress"
            self.ids[name] = create_progress_artifact(percent, key=key, description=f"{name}: share done")
        else:
            update_progress_artifact(self.ids[name], percent)


def run_logged(cmd: list[str], repo: str, label: str) -> None:
    """``cmd`` in ``repo``, its output streamed line by line into the task log; a failure raises StageFailed
    with the stage's one-line error and the tail of its log."""
    logger, progress = get_run_logger(), _Progress()
    proc = subprocess.Popen(cmd, cwd=repo, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    errors, tail, stage = [], deque(maxlen=TAIL_LINES), label
    for line in proc.stdout:
        line = line.rstrip()
        logger.info("[%s] %s", label, line)
        tail.append(line)
        progress.update(line)
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
        if line.startswith(("error:", "ERROR:")):
            errors.append(line)
    if proc.wait() != 0:
        # DVC exits 255 whatever happened; the stage's own exit code is in its message.
        codes = [int(m.group(1)) for line in errors for m in [_STAGE_EXIT.search(line)] if m]
        raise StageFailed(stage, codes[-1] if codes else None, errors[0] if errors else "", "\n".join(tail))


def run_dvc(args: list[str], repo: str, label: str) -> None:
    run_logged([sys.executable, "-m", "dvc", *args], repo, label)


@task(retries=2, retry_delay_seconds=30, retry_condition_fn=_worth_retrying, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, repo: str) -> None:
    """Bring one stage up to date. A training stage on a worker with several GPUs trains on all of them by
    itself (synthmed.core.runtime.launch_ranks)."""
    run_dvc(["repro", stage], repo, stage)


def check_overrides(repo: str, overrides: list[str]) -> list[str]:
    """``key=value`` overrides of params.yaml keys that exist (a typo would otherwise add a key that no
    stage reads, and the run would silently use the default)."""
    import yaml

    if not overrides:
        return []
    params = yaml.safe_load((Path(repo) / "params.yaml").read_text())
    for item in overrides:
        key, sep, _ = item.partition("=")
        node = params
        for part in key.split("."):
            if not sep or not isinstance(node, dict) or part not in node:
                raise ValueError(f"params override {item!r}: {'no such key in params.yaml' if sep else 'not key=value'}"
                                 " (e.g. train_ldm.steps=5000)")
            node = node[part]
    return list(overrides)


@task(task_run_name="dvc exp run {name}")
def experiment_run(repo: str, name: str, overrides: list[str], targets: list[str]) -> None:
    """The DAG (or ``targets``) as one DVC experiment: it lands in `dvc exp show` under ``name``."""
    args = ["exp", "run", *(["-n", name] if name else [])]
    for item in overrides:
        args += ["-S", item]
    run_dvc(args + targets, repo, f"exp {name or '(unnamed)'}")


@task(task_run_name="publish the report")
def publish_report(repo: str) -> None:
    """The run report as Prefect artifacts, readable in the UI: the report's markdown (figures linked to the
    files of this run's `data/report/figures/`) and the headline metrics as a table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    root = Path(repo).resolve()
    text = (root / "data/report/report.md").read_text()
    text = re.sub(r"\]\(figures/", f"]({(root / 'data/report/figures').as_uri()}/", text)
    create_markdown_artifact(markdown=text, key="synthmed-report", description=f"report of {root}")
    rows = [{"stage": f.stem, "metric": k, "value": v}
            for f in sorted((root / "metrics").glob("*.json")) for k, v in json.loads(f.read_text()).items()]
    create_table_artifact(table=rows, key="synthmed-metrics", description="headline metrics (dvc exp show columns)")


@flow(name="synthmed-pipeline", log_prints=True)
def pipeline(repo: str = str(REPO_ROOT), stages: list[str] = list(STAGES), params: list[str] | None = None,
             experiment: str = "", push: bool = False, profile: str = "") -> None:
    """Bring ``stages`` up to date, one task each (`dvc repro`); with ``params`` overrides (``key=value``) or
    an ``experiment`` name, as one `dvc exp run` instead, so that the run is an experiment of its own.
    ``profile``: a params overlay in the repository (e.g. profiles/gpu-256.yaml), applied as overrides before
    ``params``.

    With ``push`` the results go where a workstation gets them: an experiment to the git remote `origin`
    (`dvc exp push`, its data to the default DVC remote; `dvc exp pull origin <name>` brings it back), named
    ``<experiment>-<UTC date and time>`` so that every night is a row of its own; a plain run's outputs to the
    DVC remote (`dvc push`). Both remotes are checked before anything runs."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    from synthmed.profiles import overrides as profile_overrides

    extra = profile_overrides(Path(repo) / profile, Path(repo) / "params.yaml") if profile else []
    overrides = check_overrides(repo, extra + list(params or []))
    is_experiment = bool(overrides or experiment)
    if push:
        check_remotes(repo, git=is_experiment)
        if experiment:
            experiment = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    pull_datasets(repo)
    if is_experiment:
        experiment_run(repo, experiment, overrides, [] if set(stages) == set(STAGES) else list(stages))
    else:
        for stage in stages:
            repro_stage(stage, repo)
    if "report" in stages:
        publish_report(repo)
    if push:
        push_results(repo, experiment if is_experiment else None)


@task(task_run_name="dvc pull the datasets")
def pull_datasets(repo: str) -> None:
    """Datasets tracked with `dvc add` (their .dvc files are in git), fetched from the DVC remote where this
    checkout lacks them: a worker's fresh clone has the pointers, not the data. (`dvc repro --pull` does not
    fetch a .dvc file's output that a stage depends on.)"""
    listed = subprocess.run(["git", "ls-files", "--", "*.dvc"], cwd=repo, capture_output=True, text=True).stdout
    pointers = [f for f in listed.split() if not (Path(repo) / f).with_suffix("").exists()]
    if pointers:
        run_dvc(["pull", *pointers], repo, "dvc pull")


def check_remotes(repo: str, git: bool) -> None:
    """push: true needs a DVC remote (and, for an experiment, the git remote `origin`): say so before hours of
    training rather than after."""
    dvc = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=repo, env=_stage_env(),
                         capture_output=True, text=True)
    if dvc.returncode != 0 or not dvc.stdout.strip():
        raise ValueError(f"push: {repo} has no default DVC remote; add one (`dvc remote add -d storage <url>`) and "
                         "commit .dvc/config, or run with push: false")
    if git and subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True).returncode:
        raise ValueError(f"push: {repo} has no git remote `origin` to push the experiment to; the deployment's "
                         "pull step sets it (a clone of SYNTHMED_REPOSITORY), or `git remote add origin <url>`")


@task(task_run_name="push the results")
def push_results(repo: str, experiment: str | None) -> None:
    """An experiment: its git ref to `origin` and its data to the DVC remote; otherwise the outputs only.
    An unnamed experiment (overrides alone) is pushed with every experiment of this commit: in the worker's
    fresh clone, the one just run."""
    if experiment is None:
        run_dvc(["push"], repo, "dvc push")
    else:
        run_dvc(["exp", "push", "origin", *([experiment] if experiment else ["--rev", "HEAD"])], repo, "dvc exp push")


@flow(name="synthmed-sweep", log_prints=True)
def sweep(repo: str = str(REPO_ROOT), grid: dict[str, list] | None = None, jobs: int = 1) -> list[dict]:
    """Every combination of ``grid`` (params key -> values) as a queued DVC experiment, run by `dvc queue start
    -j jobs` (each in a temporary workspace of its own, so DVC's repo lock is never contended), then the
    table of their metrics, also published as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    grid = grid or {}
    check_overrides(repo, [f"{k}={v[0]}" for k, v in grid.items() if v])
    args = ["exp", "run", "--queue"]
    for key, values in grid.items():
        args += ["-S", f"{key}={','.join(str(v) for v in values)}"]
    run_dvc(args, repo, "queue")
    start_queue(repo, jobs)
    wait_for_queue(repo)
    rows = experiment_rows(repo, list(grid))
    create_table_artifact(table=rows, key="synthmed-sweep", description=f"sweep over {', '.join(grid)}")
    failed = [r["name"] for r in rows if r["state"] != "success"]
    if failed:
        raise RuntimeError(f"sweep: {len(failed)} experiment(s) failed: {', '.join(failed)}; `dvc queue logs <name>`")
    return rows


def start_queue(repo: str, jobs: int) -> None:
    """`dvc queue start -j jobs`. Its workers are daemons that inherit its output: read through a pipe, the call
    would last as long as the last worker does (an idle one can linger), so the output goes to a file, read only
    when the start fails; wait_for_queue follows the experiments."""
    with tempfile.TemporaryFile(mode="w+") as out:
        code = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=repo,
                              env=_stage_env(), stdout=out, stderr=subprocess.STDOUT).returncode
        if code:
            out.seek(0)
            raise RuntimeError(f"dvc queue start failed ({code}): {out.read().strip()}")


def queue_status(repo: str, tries: int = 5) -> str:
    """`dvc queue status`'s table. DVC reads each running executor's info file while the executor may be rewriting
    it (treeverse/dvc#8014: "unexpected error - Expecting value"), so a failed read is tried again."""
    for attempt in range(tries):
        proc = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], cwd=repo, env=_stage_env(),
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout
        time.sleep(1 + attempt)
    raise RuntimeError(f"dvc queue status failed {tries} times ({proc.returncode}): {proc.stderr.strip()}")


def wait_for_queue(repo: str, poll_s: float = 5.0) -> None:
    while re.search(r"\b(Queued|Running)\b", queue_status(repo)):
        time.sleep(poll_s)


def experiment_rows(repo: str, keys: list[str]) -> list[dict]:
    """One row per experiment of the workspace's commit: its name, state, swept params and headline metrics."""
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo,
                                      env=_stage_env(), capture_output=True, text=True, check=True).stdout)
    rows = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            # queued | running | failed | success; a finished experiment run in the workspace has no executor
            state = (exp.get("executor") or {}).get("state", "success")
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = (data.get("params", {}).get("params.yaml", {}) or {}).get("data", {})
                row = {"name": rev.get("name") or rev.get("rev", "")[:7], "state": state}
                for key in keys:
                    node = params
                    for part in key.split("."):
                        node = node.get(part, {}) if isinstance(node, dict) else {}
                    row[key] = node
                for file, metrics in (data.get("metrics") or {}).items():
                    row.update({f"{Path(file).stem}.{k}": v for k, v in (metrics.get("data") or {}).items()})
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=str(REPO_ROOT), help="repository root (where dvc.yaml is)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("-S", "--set-param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override; the run becomes a DVC experiment (repeatable)")
    parser.add_argument("--experiment", default="", help="run as the DVC experiment of this name")
    parser.add_argument("--profile", default="", help="a params overlay, e.g. profiles/gpu-256.yaml (-S overrides win)")
    parser.add_argument("--serve", action="store_true", help="serve as a deployment on this (GPU) machine")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--cron", default=None, help="with --serve: schedule, e.g. '0 2 * * *'")
    schedule.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                          help="with --serve: run every SECONDS seconds")
    args = parser.parse_args(argv)
    if args.serve:
        # pause_on_shutdown=False: a restarted service keeps its schedule instead of finding it paused.
        pipeline.serve(name="synthmed-pipeline", cron=args.cron, interval=args.interval,
                       parameters={"repo": args.repo, "stages": args.stages, "params": args.params,
                                   "experiment": args.experiment, "profile": args.profile}, pause_on_shutdown=False)
    else:
        pipeline(repo=args.repo, stages=args.stages, params=args.params, experiment=args.experiment,
                 profile=args.profile)


if __name__ == "__main__":
    main()
