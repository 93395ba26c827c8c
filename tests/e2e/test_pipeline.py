"""End to end: the real DVC DAG and the real Prefect flow on the demo, tiny profile.

The DAG is built once per session (tests/e2e/conftest.py: a fresh git repo of the working tree, `dvc repro`);
each test below checks one thing on it, on a private copy where it changes anything: every declared output
and metric; that a second repro runs nothing and that a forced rerun of the training and sampling stages
reproduces their artifacts byte for byte (no resume state outlives a finished run); that a queued experiment
changing evaluation params reuses every model and shows up in `dvc exp show`, and that going back to the
baseline after applying it needs no rerun; that a remote carries the results to another clone; that the
Prefect flow drives the same DAG; and that a killed LLM paraphrase run never re-buys a reply under `dvc repro`
or `dvc exp run`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.pipeline import queue_status, start_queue
from tests.browser import CHROMIUM, visit
from tests.e2e.harness import STAGES, assert_declared_outputs, dvc, sh
from tests.helpers import run_stage_here
from tests.test_report import check_self_contained

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def lock_hashes(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o["md5"] for o in lock.get("outs", [])}


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def wait_for_queue(repo: Path, name: str, timeout: float = 600) -> str:
    """Wait until the queued experiment ``name`` has finished; return its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = queue_status(str(repo))
        line = next((row for row in status.splitlines() if name in row), "")
        if "Success" in line or "Failed" in line:
            log = dvc(repo, "queue", "logs", name).stdout
            assert "Success" in line, f"{status}\n{log}"
            return log
        time.sleep(2)
    raise AssertionError(f"queued experiment {name} did not finish:\n{status}")


def experiment(repo: Path, name: str) -> dict:
    table = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    found = [r for commit in table for e in (commit.get("experiments") or []) for r in e.get("revs", [])
             if r.get("name") == name]
    assert found, table
    return found[0]["data"]


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_every_stage_writes_its_declared_outputs_and_metrics(dag: Path):
    assert_declared_outputs(dag)
    report = (dag / "data/report/report.html").read_text()
    check_self_contained(report)  # every figure inlined, no script: it opens offline
    for title in ("Dataset", "Autoencoder", "Diffusion training", "Synthetic samples", "Fidelity", "Privacy",
                  "classifier", "Vision-language", "Zero-shot segmentation"):
        assert title in report
    if CHROMIUM:
        seen = visit((dag / "data/report/report.html").as_uri())
        assert len(seen.images) >= 9 and all(i["ok"] for i in seen.images), seen.images
        assert seen.errors == []
    metrics, headline = {}, {}
    for stage in STAGES:
        if stage == "report":
            continue
        metrics.update({f"{stage}.{k}": v for k, v in json.loads((dag / f"metrics/all/{stage}.json").read_text()).items()})
        headline.update({f"{stage}.{k}": v for k, v in json.loads((dag / f"metrics/{stage}.json").read_text()).items()})
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()), metrics
    assert headline.items() <= metrics.items() and len(headline) <= 34, sorted(headline)  # `dvc exp show` fits
    assert "evaluate.aug_gain_auc_50pct_1x" in headline and "evaluate.kid_effnet_ci_high" in headline
    evaluation = json.loads((dag / "metrics/all/evaluate.json").read_text())
    for key in ("fd_effnet", "fd_effnet_real_train_vs_test", "fd_effnet_inf", "fd_reliable", "kid_effnet",
                "kid_effnet_ci_low", "precision_ci_high", "recall_real_train_vs_test_ci_low", "precision", "recall", "density",
                "coverage", "f1_pr", "precision_real_train_vs_test", "mem_frac_below_feature",
                "mem_frac_below_pixel", "mem_expected_rate_pixel", "val_kid_effnet", "val_adherence_acc", "aug_auc_50pct_real", "aug_gain_auc_50pct_1x", "aug_gain_auc_50pct_1x_p",
                "aug_gain_auc_50pct_1x_p_holm", "adherence_chance",
                "aug_bacc_50pct_synth", "adherence_acc", "adherence_real_test_acc", "adherence_real_test_blurred_acc",
                "grid_excess_db",
                "grid_excess_db_real_ci_high"):
        assert key in evaluation
    assert evaluation["fd_effnet"] > 0 and -1e-9 <= evaluation["aug_acc_50pct_real"] <= 1 + 1e-9
    assert evaluation["kid_effnet_ci_low"] <= evaluation["kid_effnet_ci_high"] and evaluation["kid_effnet_std"] > 0
    assert evaluation["kid_subset_size"] <= evaluation["n_synthetic_fidelity"] // 2 and evaluation["fd_reliable"] == 0
    confusion = pd.read_csv(dag / "data/evaluate/adherence.csv")  # the labels synthetic images are taken for
    confusion = confusion[confusion["split"] == "test"]  # the reported figure; val's is val_adherence_acc
    hits = (confusion["prompt_label"] == confusion["predicted_label"]).mean()
    assert evaluation["adherence_acc_ci_low"] <= evaluation["adherence_acc"] <= evaluation["adherence_acc_ci_high"]
    assert abs(hits - evaluation["adherence_acc"]) < 1e-9 and set(confusion["prompt_label"]) <= set(
        pd.read_csv(dag / "data/ingest/dataset/metadata.csv")["label"])
    synth = (dag / "data/generate/dataset/metadata.csv").read_text().splitlines()
    header = synth[0].split(",")
    assert header[:2] == ["file_name", "text"]
    for column in ("label", "seed", "scheduler", "num_inference_steps", "guidance_scale", "model_sha256", "sha256"):
        assert column in header
    assert evaluation["n_synthetic"] == len(synth) - 1
    assert not list((dag / ".synthmed/runs").glob("*/*")), "resume state outlived a finished run"
    segment = json.loads((dag / "metrics/all/segment.json").read_text())  # the demo's tissue masks
    for prefix in ("seg", "seg_otsu", "seg_kmeans"):
        assert 0 <= segment[f"{prefix}_dice_mean_ci_low"] <= segment[f"{prefix}_dice_mean"] <= segment[
            f"{prefix}_dice_mean_ci_high"] <= 1 and 0 <= segment[f"{prefix}_dice_foreground"] <= 1
    assert segment["seg_otsu_dice_foreground"] > 0.9  # the brain against a black background
    per_image = pd.read_csv(dag / "data/segment/per_image.csv")
    assert len(per_image) == 3 * segment["n_images"] and {"dice_grey_matter", "dice_csf"} <= set(per_image.columns)


def test_nothing_reruns_and_a_forced_rerun_gives_the_same_bytes(copy_of):
    repo = copy_of()
    again = dvc(repo, "repro").stdout
    assert "Running stage" not in again, again
    assert "up to date" in dvc(repo, "status").stdout

    # Same params and seed, same artifacts: force the training and sampling stages again. A finished run
    # leaves no resume state behind (so nothing needs deleting first), and the outputs are byte-identical.
    before = {s: lock_hashes(repo, s) for s in ("train_vae", "train_ldm", "generate")}
    dvc(repo, "repro", "--force", "--single-item", *before)
    assert {s: lock_hashes(repo, s) for s in before} == before
    # Sharded generation: two workers (here in-process), then the merge, write the dataset a single run wrote,
    # byte for byte. (The Prefect flow test runs shard workers as processes of a Dask cluster.)
    for spec in ("2/2", "1/2"):
        shard = run_stage_here(repo, "generate", "--shard", spec)
        assert shard.returncode == 0 and "images rendered" in shard.stdout, shard.stderr
    merged = dvc(repo, "repro", "--force", "--single-item", "generate").stdout
    assert "(0 rendered" in merged, merged
    assert lock_hashes(repo, "generate") == before["generate"]
    bad = run_stage_here(repo, "generate", "--shard", "3/2")
    assert bad.returncode == 2 and "--shard 3/2: give i/N with 1 <= i <= N" in bad.stderr


def test_an_evaluation_experiment_reuses_every_model_and_the_baseline_comes_back(copy_of):
    # A queued experiment that changes only evaluation params reuses every model (only evaluate and the
    # report run, in DVC's temporary workspace) and appears in `dvc exp show` with its metrics.
    repo = copy_of()
    commit(repo, "baseline")
    dvc(repo, "exp", "run", "--queue", "-n", "eval-steps", "-S", "evaluate.classifier.steps=6")
    start_queue(str(repo), 1)  # not through a pipe: the daemonized worker would hold it open
    log = wait_for_queue(repo, "eval-steps")
    assert "Running stage 'evaluate'" in log and "Running stage 'report'" in log  # and nothing upstream
    assert log.count("Running stage") == 2, log
    data = experiment(repo, "eval-steps")
    assert data["params"]["params.yaml"]["data"]["evaluate"]["classifier"]["steps"] == 6
    assert "aug_gain_auc_50pct_1x" in data["metrics"]["metrics/evaluate.json"]["data"]
    # Its results into the workspace, then back to the baseline: the cache restores everything, nothing is stale.
    dvc(repo, "exp", "apply", "eval-steps")
    assert yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["classifier"]["steps"] == 6
    sh(repo, "git", "checkout", "--", ".")
    dvc(repo, "checkout")
    assert "up to date" in dvc(repo, "status").stdout
    assert "Running stage" not in dvc(repo, "repro", "--dry").stdout

    # An edit of the prompt file that heldout prompts never read reruns the cheap plan stage only.
    with open(repo / "prompts/generate_example.txt", "a") as f:
        f.write("An extra prompt nobody asked for\n")
    rerun = dvc(repo, "repro").stdout
    assert "Running stage 'prompts'" in rerun and "Running stage 'generate'" not in rerun, rerun


def test_a_remote_brings_the_results_to_another_clone(copy_of):
    # Workstation <-> GPU worker through a DVC remote (a local directory here): push from this clone,
    # pull into another clone of the same commit, and nothing there is stale.
    repo = copy_of()
    dvc(repo, "remote", "add", "-d", "shared", str(repo.parent / "dvc-remote"))
    commit(repo, "a shared remote")
    dvc(repo, "push")
    other = repo.parent / "worker-clone"
    sh(repo.parent, "git", "clone", "-q", str(repo), str(other))
    dvc(other, "pull")
    assert "up to date" in dvc(other, "status").stdout
    assert "Running stage" not in dvc(other, "repro").stdout
    assert (other / "data/report/report.html").read_bytes() == (repo / "data/report/report.html").read_bytes()


def test_the_prefect_flow_runs_experiments_and_sweeps(copy_of, prefect_harness):
    from flows.pipeline import pipeline, sweep

    repo = copy_of()
    commit(repo, "baseline")
    # A flow run with params overrides is a DVC experiment of its own; a sweep queues a grid of them.
    # (Both vary the cheapest study, evaluate_vlp; the evaluate experiment above shows a whole stage's reuse.)
    pipeline(repo=str(repo), stages=["evaluate_vlp"], params=["evaluate_vlp.steps=5"], experiment="flow-exp")
    assert experiment(repo, "flow-exp")["params"]["params.yaml"]["data"]["evaluate_vlp"]["steps"] == 5
    sh(repo, "git", "checkout", "--", ".")
    dvc(repo, "checkout")
    # steps=5 was just run: its queued twin is restored from DVC's run cache, only steps=6 trains
    rows = sweep(repo=str(repo), grid={"evaluate_vlp.steps": [5, 6]}, jobs=1)
    swept = {r["evaluate_vlp.steps"]: r for r in rows}
    assert {5, 6} <= set(swept) and all(swept[k]["state"] == "success" for k in (5, 6)), rows
    assert all("evaluate.kid_effnet" in swept[k] and "evaluate_vlp.vlp_gain_probe_auc_50pct_real_synth" in swept[k] for k in (5, 6)), rows
    assert swept[5]["evaluate_vlp.vlp_gain_probe_auc_50pct_real_synth"] == pytest.approx(
        experiment(repo, "flow-exp")["metrics"]["metrics/evaluate_vlp.json"]["data"]["vlp_gain_probe_auc_50pct_real_synth"])
    assert "up to date" in dvc(repo, "status").stdout  # the workspace was never touched


def test_the_prefect_flow_reruns_what_a_change_touches_and_fails_in_one_line(copy_of, prefect_harness):
    from flows.pipeline import StageFailed, pipeline

    repo = copy_of()
    # A changed generate param reruns generate and what reads it.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["generate"]["guidance_scale"] = 2.0
    write_params(repo, params)
    grid_before = lock_hashes(repo, "generate")
    # generate fanned out over a local Dask cluster of 2 shard workers; the merge renders nothing itself
    from flows.generate_shards import generate_shards

    generate_shards(repo=str(repo), shards=2)
    assert json.loads((repo / "logs/generate.json").read_text())["rendered"] == 0
    with pytest.raises(ConnectionError, match="Dask scheduler tcp://127.0.0.1:9 does not answer"):
        generate_shards(repo=str(repo), shards=2, address="tcp://127.0.0.1:9")
    pipeline(repo=str(repo))
    assert lock_hashes(repo, "generate") != grid_before
    artifacts = {a.key: a for a in asyncio.run(_artifacts())}  # the report, readable in the Prefect UI
    assert "## Fidelity" in artifacts["synthmed-report"].data
    assert any(row["metric"] == "kid_effnet" for row in json.loads(artifacts["synthmed-metrics"].data))
    assert "classifier-cells-progress" in artifacts  # moved along by evaluate's progress lines
    assert "up to date" in dvc(repo, "status").stdout

    # A stage with bad params fails the flow once (no retries), naming the stage.
    params["ingest"]["source"] = "dicomm"
    write_params(repo, params)
    state = pipeline(repo=str(repo), stages=["ingest"], return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="stage 'ingest' failed: error: params.yaml: ingest.source = 'dicomm'"):
        state.result()
    runs = asyncio.run(_task_runs("dvc repro ingest"))
    assert [r.run_count for r in runs if r.state.is_failed()] == [1]

    # Bad flow input fails the run with one line: an unknown params key, an unreachable remote.
    with pytest.raises(ValueError, match="'train_ldm.stepz=3': no such key in params.yaml"):
        pipeline(repo=str(repo), stages=["report"], params=["train_ldm.stepz=3"])
    dvc(repo, "remote", "add", "-f", "-d", "shared", "http://127.0.0.1:9/nowhere")  # nothing listens on port 9
    state = pipeline(repo=str(repo), stages=[], push=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="stage 'dvc push' failed: ERROR"):
        state.result()


def test_the_armed_privacy_gate_stops_evaluate_on_a_synthetic_set_of_training_copies(copy_of):
    """Every synthetic image replaced by a training image: all of them fall below the audit's thresholds, where a
    generator that copies nothing puts about alpha of its images, and the armed gate stops the stage."""
    repo = copy_of()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["privacy"].update(fail_on_violation=True)
    write_params(repo, params)
    real = pd.read_csv(repo / "data/ingest/dataset/metadata.csv", dtype=str, keep_default_na=False)
    train = real[real["split"] == "train"]["file_name"].tolist()
    folder = repo / "data/generate/dataset"
    synth = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    for i, name in enumerate(synth["file_name"].drop_duplicates()):
        (folder / name).unlink()  # not written through: the file may be a link into the DVC cache
        shutil.copyfile(repo / "data/ingest/dataset" / train[i % len(train)], folder / name)
    synth["sha256"] = [hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in synth["file_name"]]
    (folder / "metadata.csv").unlink()
    synth.to_csv(folder / "metadata.csv", index=False)
    failed = dvc(repo, "repro", "--single-item", "evaluate", check=False)
    assert failed.returncode != 0 and "privacy gate" in failed.stderr + failed.stdout, failed.stderr[-2000:]


async def _artifacts():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_artifacts()


async def _task_runs(name: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [r for r in await client.read_task_runs() if r.name == name]


def cached_replies(repo: Path) -> dict[str, str]:
    """LLM replies in the local store: cache file -> the caption it answers (the fake server echoes it)."""
    from synthmed.text.llm import parse_reply

    found = {}
    for path in (repo / ".synthmed/cache/llm").rglob("*.json"):
        if path.parent.name.endswith(".tmp"):  # a reply being written (io.atomic_path's temporary folder)
            continue
        paraphrases, _ = parse_reply(json.loads(path.read_text())["content"])
        found[path.name] = paraphrases[0].removeprefix("Image: ")
    return found


@pytest.mark.parametrize("command", [("repro", "paraphrase"), ("exp", "run", "paraphrase")])
def test_a_killed_llm_run_never_rebuys_a_reply(copy_of, command):
    """`dvc exp run` restores outputs before reproducing: paid replies must live outside them."""
    from tests.text.fake_openai import FakeOpenAI
    from tests.text.test_llm import ENV, KEY, caption_of, good

    repo = copy_of()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["paraphrase"]["backend"] = "openai"
    params["paraphrase"]["openai"].update(api_key_env=ENV, backoff_s=0.01, max_concurrency=2,
                                          model=f"model-for-{command[0]}")  # a cache of its own
    env = {**os.environ, ENV: KEY}

    def slow(body, n):
        time.sleep(0.2)
        return good(body, n)

    with FakeOpenAI(slow) as server:
        params["paraphrase"]["openai"]["base_url"] = server.url
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        before = cached_replies(repo)
        new = lambda: {c for name, c in cached_replies(repo).items() if name not in before}  # noqa: E731
        log = repo.parent / f"killed-{command[0]}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "dvc", *command], cwd=repo, env=env,
                                    start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while len(new()) < 4 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # mid-run, replies paid for and stored
            proc.wait()
        paid = new()
        first_run = -1
        while first_run != len(server.requests):  # requests the killed run had sent may still be arriving
            first_run = len(server.requests)
            time.sleep(0.5)
        assert len(paid) >= 4 and proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{log.read_text()}"
        again = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=repo, env=env, capture_output=True,
                               text=True)
        assert again.returncode == 0, again.stdout + again.stderr
        rebought = {caption_of(r["body"]) for r in server.requests[first_run:]} & paid
    assert not rebought, f"{len(rebought)} paid replies requested again after the kill"
    stats = json.loads((repo / "metrics/all/paraphrase.json").read_text())
    assert stats["llm"] == 1 and stats["cache_hits"] >= len(paid)
    assert stats["requests"] == len(server.requests) - first_run
