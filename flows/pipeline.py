"""Prefect orchestration of the DVC pipeline: one task per stage, each `dvc repro <stage>`.

No ML here: DVC decides what is stale, the stages do the work. Run locally with
`python -m flows.pipeline`, or serve it on a GPU worker with `--serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

STAGES = ("ingest", "paraphrase", "train_vae", "train_ldm", "train_lora", "prompts", "generate", "evaluate", "evaluate_vlp",
          "report")
REPO_ROOT = Path(__file__).resolve().parent.parent
INPUT_ERROR_EXIT = 2  # stages exit 2 on bad params or inputs: retrying cannot help


_STAGE_EXIT = re.compile(r"exited with (\d+)")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, stage_exit: int | None, last_error: str):
        super().__init__(f"stage '{stage}' failed: {last_error or 'see its log above'}")
        self.stage, self.stage_exit = stage, stage_exit


def _worth_retrying(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and exc.stage_exit == INPUT_ERROR_EXIT)


def _stage_env() -> dict[str, str]:
    """The stages' `python` must be this interpreter (the project's venv)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@task(retries=2, retry_delay_seconds=30, retry_condition_fn=_worth_retrying, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, repo: str) -> None:
    """Bring one stage up to date; stream its output into the task log."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", stage], cwd=repo, env=_stage_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    errors = []
    for line in proc.stdout:
        line = line.rstrip()
        logger.info("[%s] %s", stage, line)
        if line.startswith(("error:", "ERROR:")):
            errors.append(line)
    if proc.wait() != 0:
        # DVC exits 255 whatever happened; the stage's own exit code is in its message.
        codes = [int(m.group(1)) for line in errors for m in [_STAGE_EXIT.search(line)] if m]
        raise StageFailed(stage, codes[-1] if codes else None, errors[0] if errors else "")


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
def pipeline(repo: str = str(REPO_ROOT), stages: list[str] = list(STAGES)) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    for stage in stages:
        repro_stage(stage, repo)
    if "report" in stages:
        publish_report(repo)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=str(REPO_ROOT), help="repository root (where dvc.yaml is)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--serve", action="store_true", help="serve as a deployment on this (GPU) machine")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--cron", default=None, help="with --serve: schedule, e.g. '0 2 * * *'")
    schedule.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                          help="with --serve: run every SECONDS seconds")
    args = parser.parse_args(argv)
    if args.serve:
        # pause_on_shutdown=False: a restarted service keeps its schedule instead of finding it paused.
        pipeline.serve(name="synthmed-pipeline", cron=args.cron, interval=args.interval,
                       parameters={"repo": args.repo, "stages": args.stages}, pause_on_shutdown=False)
    else:
        pipeline(repo=args.repo, stages=args.stages)


if __name__ == "__main__":
    main()
