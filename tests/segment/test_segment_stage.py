"""The segment stage on a tiny saved model and a dataset with masks: what it writes, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.helpers import run_stage_here as run_stage
from tests.test_stage_errors import assert_one_line_error, set_param


def save_model(folder: Path, **unet) -> None:
    from synthmed.diffusion.pipeline import SynthMedPipeline
    from synthmed.diffusion.schedulers import default_sampler, make_noise_scheduler
    from synthmed.models.unet import build_unet
    from tests.helpers import tiny_vae

    model = build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                       cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8, dropout=0.0, **unet)
    SynthMedPipeline(model, tiny_vae(), default_sampler(make_noise_scheduler(1000, "flow")),
                     text_max_length=8).save_pretrained(folder)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    data = tmp_path / "data/ingest/dataset"
    (data / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        labels = np.zeros((16, 16), np.uint8)
        labels[2:14, 2:14], labels[4:12, 4 + i % 2 : 12], labels[6:10, 6:10] = 1, 2, 3
        Image.fromarray((np.array([0, 60, 140, 230])[labels] + rng.integers(0, 8, labels.shape)).astype(np.uint8)).save(data / f"{i}.png")
        Image.fromarray(labels).save(data / f"masks/{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"slice {i}", "label": "a", "group": str(i),
                     "split": "test", "masks": f"masks/{i}.png"})
    pd.DataFrame(rows).to_csv(data / "metadata.csv", index=False)
    save_model(tmp_path / "data/train_lora/model")
    set_param(tmp_path, "segment", batch_size=2, resamples=50, figure_images=3)
    return tmp_path


def test_segment_scores_attention_and_baselines_against_the_masks(workdir):
    proc = run_stage(workdir, "segment")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((workdir / "metrics/all/segment.json").read_text())
    for prefix in ("seg", "seg_otsu", "seg_kmeans"):
        assert 0 <= metrics[f"{prefix}_dice_mean_ci_low"] <= metrics[f"{prefix}_dice_mean"] <= metrics[f"{prefix}_dice_mean_ci_high"] <= 1
        assert f"{prefix}_dice_white_matter" in metrics and f"{prefix}_dice_foreground" in metrics
    assert metrics["seg_kmeans_dice_foreground"] > 0.9  # four clean intensity levels
    table = pd.read_csv(workdir / "data/segment/per_image.csv")
    assert len(table) == 15 and set(table["method"]) == {"attention", "otsu", "kmeans"}
    assert sorted(p.name for p in (workdir / "data/segment/maps").iterdir()) == [f"{i}.png" for i in range(5)]
    assert np.asarray(Image.open(workdir / "data/segment/maps/0.png")).shape == (16, 16)
    assert Image.open(workdir / "data/segment/overlays.png").size[0] > 300
    headline = json.loads((workdir / "metrics/segment.json").read_text())
    assert set(headline) == {"seg_dice_mean", "seg_dice_csf", "seg_dice_grey_matter", "seg_dice_white_matter",
                             "seg_otsu_dice_mean", "seg_kmeans_dice_mean"}


def test_a_mask_class_without_a_name_stops_in_one_line_and_writes_nothing(workdir):
    set_param(workdir, "segment", classes=["background", "csf"])
    assert_one_line_error(run_stage(workdir, "segment"), "masks/0.png", "class index 3",
                          "segment.classes names 2", "add the missing class names")
    assert not (workdir / "data/segment").exists()


def test_blocks_without_self_attention_stop_in_one_line(workdir):
    shutil.rmtree(workdir / "data/train_lora/model")
    save_model(workdir / "data/train_lora/model", attention_levels=[])  # the middle block's attention only
    set_param(workdir, "segment", blocks=["down", "up"])
    assert_one_line_error(run_stage(workdir, "segment"), "segment.blocks", "no self-attention in its down/up blocks")
    assert not (workdir / "data/segment").exists()
    set_param(workdir, "segment", blocks=["mid"], timestep=1000)
    assert_one_line_error(run_stage(workdir, "segment"), "segment.timestep 1000", "use 0..999")


def test_a_unet_with_cross_attention_only_gets_a_note_and_the_dag_runs_on(workdir):
    shutil.rmtree(workdir / "data/train_lora/model")
    save_model(workdir / "data/train_lora/model", backbone="invertible")
    proc = run_stage(workdir, "segment")
    assert proc.returncode == 0, proc.stderr
    assert "invertible-backbone UNet has cross-attention only" in proc.stdout
    assert json.loads((workdir / "metrics/all/segment.json").read_text()) == {"n_images": 5}
    assert not list((workdir / "data/segment/maps").iterdir())


def test_the_null_condition_segments_too(workdir):
    set_param(workdir, "segment", condition="unconditional", figure_images=0)
    proc = run_stage(workdir, "segment")
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(workdir / "data/segment/per_image.csv")) == 15
