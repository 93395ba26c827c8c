"""The real DAG on a generated set large enough that a stage holding a split in memory would show: every
stage reads images a batch or a chunk at a time (never a whole split), decodes no split into memory, and the
four stages that read the real train split share one decoded copy of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.scale import make_dataset, params_for
from synthmed.data.disk_array import open_disk_array
from tests.conftest import REPO_ROOT
from tests.e2e.harness import dvc, make_repo, tiny_params

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
N, TRAIN = 800, 640  # train: more rows than any chunk (synthmed.metrics.privacy.CHUNK, feature_cache.CHUNK)


def test_every_stage_reads_a_chunk_at_a_time(tmp_path):
    repo = make_repo(tmp_path / "repo")
    make_dataset(repo / "data/raw/scale", N, 32, 1, captions=1)
    params = params_for(Path("data/raw/scale"), 32, 1, base=tiny_params())
    params["ingest"]["split_fractions"] = {"train": 0.8, "val": 0.05, "test": 0.15}
    params["prompts"].update(source="heldout", splits=["val", "test"], file=tiny_params()["prompts"]["file"])  # 160
    params["evaluate"]["augmentation"]["fractions"] = [0.5]
    (repo / "params.yaml").write_text(json.dumps(params))
    log = tmp_path / "reads.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests/e2e/read_recorder"), "SYNTHMED_READ_LOG": str(log)}
    dvc(repo, "repro", env=env)

    reads = {r["stage"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert {"train_vae", "train_ldm", "evaluate", "evaluate_vlp"} <= set(reads), reads
    for stage, r in reads.items():
        assert r["disk_rows"] <= 512 < TRAIN, (stage, r)  # a batch or a chunk, never the split
        assert r["loaded_images"] <= 8, (stage, r)  # the report's tiles, never a split
    stacks = [open_disk_array(p) for p in (repo / ".synthmed/cache/pixels").glob("*.u8")]
    assert [len(s) for s in stacks].count(TRAIN) == 1  # decoded once, read by four stages
    metrics = json.loads((repo / "metrics/all/evaluate.json").read_text())
    assert metrics["n_real_train"] == TRAIN and metrics["n_synthetic"] == 160
