"""End to end without captions (DiNO-Diffusion): labelled images only, no text column. Text conditioning is
refused in one line; `train_ldm.condition: image` runs the whole DAG, generating variants of each held-out
image and interpolations between two of one label and split, each mode scored on its own."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.e2e.harness import assert_declared_outputs, dvc, make_repo, sh, tiny_params
from tests.helpers import run_stage_here

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def uncaptioned_files(n: int = 48) -> dict[str, bytes]:
    """Bright discs or squares (the two labels) at random places on noise; metadata.csv has no text column."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    files, meta = {}, ["file_name,label"]
    for i in range(n):
        label = ("disc", "square")[i % 2]
        cy, cx = rng.integers(10, 22, 2)
        img = rng.normal(60, 10, (32, 32))
        shape = (yy - cy) ** 2 + (xx - cx) ** 2 < 36 if label == "disc" else (abs(yy - cy) < 6) & (abs(xx - cx) < 6)
        img[shape] = 200
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        files[f"data/raw/img{i:03d}.png"] = buf.getvalue()
        meta.append(f"img{i:03d}.png,{label}")
    files["data/raw/metadata.csv"] = ("\n".join(meta) + "\n").encode()
    return files


def test_image_conditioning_runs_the_whole_dag_on_images_without_captions(tmp_path: Path):
    params = tiny_params()
    params["ingest"].update(source="imagefolder", path="data/raw", image_level_splits=True)  # generated images, no patients: no group column
    params["evaluate"]["augmentation"]["fractions"] = [1.0]  # one regime per generation mode is enough here
    repo = make_repo(tmp_path / "repo", params, uncaptioned_files())

    dvc(repo, "repro", "paraphrase", "train_vae")  # what train_ldm reads
    refused = run_stage_here(repo, "train_ldm")  # in-process: the one line and the exit code are the contract
    assert refused.returncode == 2
    assert "have no caption" in refused.stderr and "train_ldm.condition: image" in refused.stderr

    params["train_ldm"]["condition"] = "image"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro")
    assert_declared_outputs(repo)

    real = pd.read_csv(repo / "data/ingest/dataset/metadata.csv", keep_default_na=False).set_index("file_name")
    assert (real["text"] == "").all()
    synth = pd.read_csv(repo / "data/generate/dataset/metadata.csv", keep_default_na=False, dtype=str)
    counts = synth["mode"].value_counts()
    assert counts["reconstruction"] == counts["interpolation"] == len(real)
    for row in synth.itertuples():  # every image keeps its source's label and split; a partner shares both
        src = real.loc[row.source_file_name]
        assert (row.label, row.split) == (src["label"], src["split"])
        if row.mode == "interpolation":
            partner = real.loc[row.partner_file_name]
            assert row.partner_file_name != row.source_file_name
            assert (partner["label"], partner["split"]) == (src["label"], src["split"])
            assert float(row.r) in (0.25, 0.5, 0.75)

    for mode in ("reconstruction", "interpolation"):  # remade alone from its row: source(s), r, seed
        name = synth.loc[synth["mode"] == mode, "file_name"].iloc[-1]
        assert "identical" in sh(repo, sys.executable, "-m", "synthmed.diffusion.regenerate", name,
                                 "--out", str(tmp_path / "again.png")).stdout

    m = json.loads((repo / "metrics/all/evaluate.json").read_text())
    assert m["fd_effnet"] > 0 and m["fd_effnet_interpolation"] > 0
    assert 0 <= m["mem_source_frac_below_pixel"] <= 1 and m["mem_source_median_pixel"] > 0
    assert "aug_gain_auc_100pct_1x" in m and "aug_gain_auc_100pct_1x_interpolation" in m
    memo = pd.read_csv(repo / "data/evaluate/memorization.csv")
    train = set(real.index[real["split"] == "train"])
    own = memo[memo["mode"] == "reconstruction"].merge(synth[["file_name", "source_file_name"]], on="file_name")
    own = own[own["source_file_name"].isin(train)]
    assert len(own) and (own["nn_train_file_pixel"] != own["source_file_name"]).all()  # the nearest *other*
    assert (own["source_distance_pixel"] > 0).all()
    assert "no captions" in (repo / "data/evaluate_vlp/report.md").read_text()
    assert json.loads((repo / "metrics/all/evaluate_vlp.json").read_text()) == {}
    segment = json.loads((repo / "metrics/all/segment.json").read_text())  # conditioned on each image's embedding
    assert segment["seg_segments_mean"] >= 1 and "seg_dice_mean" not in segment  # no masks: maps only
    assert len(list((repo / "data/segment/maps").iterdir())) == segment["n_images"]
