"""End to end on volumes: the 3-D demo (MNI152 sub-volumes) through the whole DAG with the invertible
backbone. Volumes are .npy files at every step; evaluate scores them slice-wise (the three central planes)
and voxel-wise (nearest real volume); the 2-D-only studies say why they did not run; regenerate remakes a
volume byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.e2e.harness import assert_declared_outputs, dvc, make_repo, tiny_params

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def volume_params() -> dict:
    params = tiny_params()
    params["ingest"].update(dims=3, resolution=16)
    params["ingest"]["demo3d"]["step_mm"] = 28  # 56 cubes, 8 of them test
    params["train_vae"]["model"].update(block_out_channels=[8, 16], mid_attention=False)
    params["train_vae"]["batch_size"] = 8
    # the 3-D recipe of `make run-3d` (docs/volumes.md)
    params["train_ldm"]["unet"].update(backbone="invertible", block_out_channels=[16, 32])
    params["train_ldm"].update(batch_size=8, prediction_type="v_prediction", sample_posterior=False)
    # One volume per sampler call, as regenerate makes it: 3-D convolutions are not bit-for-bit batch-invariant
    # at every thread count (one voxel level apart at one thread), so the byte check below must not rest on it.
    params["generate"]["batch_size"] = 1
    return params


def test_volumes_run_the_whole_dag_with_the_invertible_backbone(tmp_path: Path):
    repo = make_repo(tmp_path / "repo", volume_params())
    dvc(repo, "repro")
    assert_declared_outputs(repo)

    real = pd.read_csv(repo / "data/ingest/dataset/metadata.csv")
    assert real["file_name"].str.endswith(".npy").all()
    assert np.load(repo / "data/ingest/dataset" / real["file_name"].iloc[0]).shape == (16, 16, 16)
    unet = json.loads((repo / "data/train_ldm/model/unet/config.json").read_text())
    assert unet["_class_name"] == "ConditionalUNet" and unet["dims"] == 3 and unet["backbone"] == "invertible"
    assert json.loads((repo / "data/train_ldm/model/vae/config.json").read_text())["_class_name"] == "VolumeAutoencoderKL"

    assert 0 <= json.loads((repo / "metrics/all/train_vae.json").read_text())["posterior_noise_fraction"] <= 1
    synth = pd.read_csv(repo / "data/generate/dataset/metadata.csv")
    first = np.load(repo / "data/generate/dataset" / synth["file_name"].iloc[0])
    assert first.shape == (16, 16, 16) and first.dtype == np.uint8 and first.std() > 0

    evaluation = json.loads((repo / "metrics/all/evaluate.json").read_text())
    for key in ("fd_effnet", "fd_effnet_real_train_vs_test", "fd_effnet_axial", "fd_effnet_coronal",
                "fd_effnet_sagittal", "precision", "volume_psnr", "volume_ssim", "volume_ssim_real_test_vs_train",
                "mem_frac_below_pixel"):
        assert np.isfinite(evaluation[key]), key
    assert 0 < evaluation["volume_ssim_real_test_vs_train"] < 1
    assert not [k for k in evaluation if k.startswith(("aug_", "adherence_"))]  # the classifier is 2-D
    assert "Not run: the dataset holds volumes" in (repo / "data/evaluate_vlp/report.md").read_text()
    assert "nearest real test volume" in (repo / "data/report/report.md").read_text()
    segment = json.loads((repo / "metrics/all/segment.json").read_text())  # cross-attention only: a note, no maps
    assert list(segment) == ["n_images"] and not list((repo / "data/segment/maps").iterdir())

    name = synth["file_name"].iloc[1]
    again = subprocess.run([sys.executable, "-m", "synthmed.diffusion.regenerate", name, "--out",
                            str(tmp_path / "again.npy")], cwd=repo, capture_output=True, text=True)
    assert again.returncode == 0 and "identical" in again.stdout, again.stdout + again.stderr
    assert np.array_equal(np.load(tmp_path / "again.npy"), np.load(repo / "data/generate/dataset" / name))
