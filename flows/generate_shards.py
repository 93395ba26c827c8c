"""The `generate` stage fanned out: N shard workers (`python -m stages.generate --shard i/N`) as mapped Prefect
tasks on a Dask cluster (prefect-dask's DaskTaskRunner: a LocalCluster by default, or a running scheduler's
address), then `dvc repro generate`, which finds every shard finished and publishes the dataset a single run
writes. The workers share the checkout's resume store (`.synthmed/`): processes on one machine, or machines
that mount the same checkout. Each shard is claimed by the worker that renders it (synthmed.diffusion.shards), so a
retried task or a second flow on the same plan never renders a shard twice.

    python -m flows.generate_shards --shards 2                          # a local cluster of 2 workers
    python -m flows.generate_shards --shards 8 --address tcp://scheduler:8786
"""

from __future__ import annotations

import argparse
import socket
import sys
from urllib.parse import urlparse

from prefect import flow, task

from flows.pipeline import REPO_ROOT, repro_stage, run_logged


@task(task_run_name="generate shard {i}/{n}")
def render_shard(repo: str, i: int, n: int) -> None:
    run_logged([sys.executable, "-m", "stages.generate", "--shard", f"{i}/{n}"], repo, f"generate --shard {i}/{n}")


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, at once, when the Dask scheduler does not answer (Dask itself waits and retries)."""
    url = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        with socket.create_connection((url.hostname, url.port or 8786), timeout=timeout):
            return
    except (OSError, TypeError) as exc:
        raise ConnectionError(f"Dask scheduler {address} does not answer ({exc}); start one (`dask scheduler`) "
                              "or leave the address empty for a local cluster") from None


def dask_runner(shards: int, address: str):
    from prefect_dask import DaskTaskRunner

    if address:
        check_scheduler(address)
        return DaskTaskRunner(address=address)
    # one process per shard, one thread each: the stage's torch threads do the rest
    return DaskTaskRunner(cluster_kwargs={"n_workers": shards, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@flow(name="synthmed-generate-fan-out")
def fan_out(repo: str, shards: int) -> None:
    futures = render_shard.map(repo, list(range(1, shards + 1)), shards)
    for f in futures:
        f.result()


@flow(name="synthmed-generate-shards", log_prints=True)
def generate_shards(repo: str = str(REPO_ROOT), shards: int = 2, address: str = "") -> None:
    """Render the generation plan in ``shards`` parallel workers on Dask, then merge with `dvc repro generate`."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    fan_out.with_options(task_runner=dask_runner(shards, address))(repo, shards)
    repro_stage(stage="generate", repo=repo)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(REPO_ROOT))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--address", default="", help="a running Dask scheduler, e.g. tcp://host:8786 (default: local)")
    args = ap.parse_args(argv)
    generate_shards(repo=args.repo, shards=args.shards, address=args.address)


if __name__ == "__main__":
    main()
