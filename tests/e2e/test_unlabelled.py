"""End to end on data without labels: an ImageCLEF-style set with several prompts per image, one of
them the same generic prompt for every image. Every stage runs; the classifier study says why it is
empty, and retrieval ranks every caption of the test images against its chance level."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.e2e.harness import assert_declared_outputs, dvc, make_repo, tiny_params

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
REGIONS = ["upper-left", "upper-right", "lower-left", "lower-right", "centre"]


def imageclef_files(n: int = 40) -> dict[str, bytes]:
    """Bright discs (polyp stand-ins) at a named region, 1-3 of them, on a textured background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    centres = {"upper-left": (12, 12), "upper-right": (12, 36), "lower-left": (36, 12), "lower-right": (36, 36),
               "centre": (24, 24)}
    files, prompts = {}, ["Filename;Prompt"]
    for i in range(n):
        region, count = REGIONS[i % len(REGIONS)], 1 + i % 3
        img = rng.normal(70, 12, (48, 48))
        cy, cx = centres[region]
        for k in range(count):
            img[(yy - cy - 3 * k) ** 2 + (xx - cx) ** 2 < 20] = 200
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        files[f"data/raw/images/img{i:03d}.png"] = buf.getvalue()
        noun = "polyp" if count == 1 else "polyps"
        prompts += [f"img{i:03d};generate an endoscopy image",  # the same for every image
                    f"img{i:03d};an endoscopy image with {count} {noun} in the {region} region",
                    f"img{i:03d};{count} {noun} seen in the {region} of the frame"]
    files["data/raw/prompt-gt.csv"] = ("\n".join(prompts) + "\n").encode()
    return files


def test_unlabelled_imageclef_data_runs_the_whole_dag(tmp_path: Path):
    params = tiny_params()
    params["ingest"].update(source="imageclef", path="data/raw", image_level_splits=True)  # generated images, no patients: no group column
    repo = make_repo(tmp_path / "repo", params, imageclef_files())
    dvc(repo, "repro")
    assert_declared_outputs(repo)
    evaluation = json.loads((repo / "metrics/all/evaluate.json").read_text())
    assert evaluation["fd_effnet"] > 0 and "precision" in evaluation
    assert not [k for k in evaluation if k.startswith(("aug_", "adherence_"))]
    assert pd.read_csv(repo / "data/evaluate/augmentation_runs.csv").empty
    assert pd.read_csv(repo / "data/evaluate/adherence.csv").empty
    vlp = json.loads((repo / "metrics/all/evaluate_vlp.json").read_text())
    test_captions = pd.read_csv(repo / "data/ingest/dataset/metadata.csv").query("split == 'test'")["text"].nunique()
    assert vlp["vlp_i2t_candidates"] == test_captions > 2  # every caption, not just the generic first one
    assert 0 < vlp["vlp_i2t_r5_chance"] < 1 and "vlp_i2t_r5_real" in vlp
    report = (repo / "data/evaluate_vlp/report.md").read_text()
    assert "retrieval only" in report and "| chance |" in report
