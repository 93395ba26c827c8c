"""Bad params or inputs stop a stage with one line naming the key/file, exit 2, and no outputs.

The stages run in this process (run_stage with argv, as `python -m stages.X` runs them but without a fresh
interpreter's imports); one test per contract runs the real command in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import StageRun, write_imagefolder
from tests.helpers import run_stage_here as run_stage


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def set_param(workdir: Path, stage: str, **values) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[stage].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_source(workdir):
    set_param(workdir, "ingest", source="dicomm")
    assert_one_line_error(run_stage(workdir, "ingest"), "ingest.source = 'dicomm'", "demo, imagefolder")
    assert not (workdir / "data").exists()


def test_the_command_line_exits_2_with_one_line_and_writes_nothing(workdir):
    """The contract of every stage's `python -m stages.X`, once in a real subprocess."""
    set_param(workdir, "ingest", source="dicomm")
    proc = subprocess.run([sys.executable, "-m", "stages.ingest"], cwd=workdir, capture_output=True, text=True)
    assert_one_line_error(proc, "ingest.source = 'dicomm'", "demo, imagefolder")
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


def test_missing_key(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    del params["train_vae"]["lr"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_line_error(run_stage(workdir, "train_vae"), "train_vae.lr' is missing")


def test_missing_upstream_artifact(workdir):
    assert_one_line_error(run_stage(workdir, "train_vae"), "data/ingest/dataset", "dvc repro train_vae")


def test_empty_dataset(workdir):
    folder = workdir / "raw"
    folder.mkdir()
    (folder / "metadata.csv").write_text("file_name,text\n")
    set_param(workdir, "ingest", source="imagefolder", path="raw")
    assert_one_line_error(run_stage(workdir, "ingest"), "raw/metadata.csv", "empty")
    assert not (workdir / "data").exists()


def test_too_few_images(workdir):
    write_imagefolder(workdir / "raw", [("a.png", "x"), ("b.png", "y")])
    set_param(workdir, "ingest", source="imagefolder", path="raw", min_images=5)
    assert_one_line_error(run_stage(workdir, "ingest"), "found 2 usable images", "ingest.min_images=5")
    assert not (workdir / "data").exists()


def test_prompts_names_a_bad_prompt_file_and_row(workdir):
    set_param(workdir, "prompts", source="file", file="missing.txt")
    assert_one_line_error(run_stage(workdir, "prompts"), "missing.txt: prompt file not found")
    (workdir / "prompts.csv").write_text("text,label\nan axial slice,a\n\n,b\n")
    set_param(workdir, "prompts", file="prompts.csv")
    assert_one_line_error(run_stage(workdir, "prompts"), "prompts.csv, row 4: empty prompt")  # blank line 3 skipped
    set_param(workdir, "prompts", source="heldout")
    assert_one_line_error(run_stage(workdir, "prompts"), "data/ingest/dataset/metadata.csv", "dvc repro prompts")
    assert not (workdir / "data").exists()


def test_generate_needs_the_plan_before_loading_any_model(workdir):
    assert_one_line_error(run_stage(workdir, "generate"), "data/prompts/plan.csv", "dvc repro generate")


def test_a_sampler_the_model_cannot_use_is_one_line_and_nothing_written(workdir):
    from synthmed.diffusion.pipeline import SynthMedPipeline
    from synthmed.diffusion.schedulers import default_sampler, make_noise_scheduler
    from tests.helpers import tiny_unet, tiny_vae

    (workdir / "data/prompts").mkdir(parents=True)
    (workdir / "data/prompts/plan.csv").write_text("prompt_index,sample_index,text,label,split,source_file_name,seed\n"
                                                    "0,0,an axial slice,a,test,x.png,7\n")
    flow = default_sampler(make_noise_scheduler(1000, "flow"))
    SynthMedPipeline(tiny_unet(), tiny_vae(), flow, text_max_length=8).save_pretrained(workdir / "data/train_lora/model")
    set_param(workdir, "generate", scheduler="ddim")
    assert_one_line_error(run_stage(workdir, "generate"), "generate.scheduler", "cannot sample a rectified-flow model",
                          "euler, dpmpp")
    assert not (workdir / "data/generate").exists()


@pytest.mark.parametrize("stage, key, value, fragment", [
    ("evaluate_vlp", "synthetic_splits", ["test"], "synthetic_splits must not contain evaluate_vlp.test_split"),
])
def test_evaluation_refuses_synthetic_images_from_test_captions_in_training(workdir, stage, key, value, fragment):
    set_param(workdir, stage, **{key: value})
    assert_one_line_error(run_stage(workdir, stage), fragment)


def test_counts_that_must_be_positive_are_checked_when_params_load(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    set_param(workdir, "evaluate", augmentation={**params["evaluate"]["augmentation"], "seeds": 0})
    assert_one_line_error(run_stage(workdir, "evaluate"), "seeds must be at least 1")
    set_param(workdir, "generate", shard_size=0)
    assert_one_line_error(run_stage(workdir, "generate"), "shard_size must be at least 1")


@pytest.mark.parametrize("stage", ["ingest", "paraphrase", "train_vae", "train_ldm", "train_lora", "prompts",
                                   "generate", "evaluate", "segment", "evaluate_vlp"])
def test_help_describes_the_stage_and_touches_nothing(workdir, stage):
    shutil.copy(REPO_ROOT / "dvc.yaml", workdir / "dvc.yaml")
    proc = run_stage(workdir, stage, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"DVC stage `{stage}`" in proc.stdout and f"`{stage}:` section" in proc.stdout
    assert f"metrics/{stage}.json" in proc.stdout  # what it writes, from dvc.yaml
    assert sorted(p.name for p in workdir.iterdir()) == ["dvc.yaml", "params.yaml"]


def test_help_on_the_command_line(workdir):
    shutil.copy(REPO_ROOT / "dvc.yaml", workdir / "dvc.yaml")
    proc = subprocess.run([sys.executable, "-m", "stages.generate", "--help"], cwd=workdir, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "DVC stage `generate`" in proc.stdout, proc.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["dvc.yaml", "params.yaml"]


@pytest.mark.parametrize("stage, values, fragment", [
    ("train_ldm", {"steps": -5}, "steps must be at least 1, got -5"),
    ("train_vae", {"steps": -5}, "steps must be at least 1, got -5"),
    ("train_vae", {"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ("train_ldm", {"ema_decay": 1.5}, "ema_decay must be in [0, 1), got 1.5"),
])
def test_training_params_out_of_range_stop_before_anything_is_touched(workdir, stage, values, fragment):
    set_param(workdir, stage, **values)
    (workdir / "data" / stage / "progress").mkdir(parents=True)  # outputs of an earlier run stay as they were
    assert_one_line_error(run_stage(workdir, stage), f"{stage}: {fragment}")
    assert (workdir / "data" / stage / "progress").is_dir() and not (workdir / ".synthmed").exists()


def test_a_full_disk_is_one_line_and_exit_2_not_a_retried_traceback(tmp_path, monkeypatch, capsys):
    from synthmed.core.stage import run_stage as run

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)

    def main(stage):  # a stage whose output lands on a full disk (/dev/full: ENOSPC)
        open("/dev/full", "w").write("x" * 65536)

    code = run(main, None, [], name="full_disk")
    proc = StageRun(code, *capsys.readouterr())
    assert_one_line_error(proc, "No space left on device", "free disk space", "dvc repro full_disk")


@pytest.mark.parametrize("stage, key, new", [("train_ldm", "block_out_channels", "train_ldm.unet.block_out_channels"),
                                            ("train_vae", "latent_channels", "train_vae.model.latent_channels")])
def test_a_model_key_from_before_the_grouping_names_its_new_place(workdir, stage, key, new):
    set_param(workdir, stage, **{key: 4})  # what `dvc exp run -S` with the old name leaves in params.yaml
    assert_one_line_error(run_stage(workdir, stage), f"'{stage}.{key}' is now '{new}'")


def test_cpu_settings_are_checked_like_any_param(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["cpu"] = {"mode": "fastest", "threads": 2}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_line_error(run_stage(workdir, "train_vae"), "cpu.mode = 'fastest' is not supported", "strict, native")
    del params["cpu"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_line_error(run_stage(workdir, "train_vae"), "section 'cpu:' is missing")


def test_a_volume_grid_the_unet_stride_does_not_divide_names_the_valid_resolutions(workdir):
    """24^3 volumes: the volume VAE halves them and latent_patch 2 packs 2^3 blocks, a 6-wide grid; the UNet's
    three levels need a multiple of 4."""
    import numpy as np
    import pandas as pd

    from tests.helpers import tiny_volume_vae

    dataset = workdir / "data/ingest/dataset"
    dataset.mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train"] * 3 + ["val"] * 2):
        np.save(dataset / f"v{i}.npy", np.full((24, 24, 24), 40 * i, dtype=np.uint8))
        rows.append({"file_name": f"v{i}.npy", "text": f"volume {i}", "caption_source": "original", "split": split,
                     "label": "", "group": str(i)})
    pd.DataFrame(rows).to_csv(dataset / "metadata.csv", index=False)
    (workdir / "data/paraphrase").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(workdir / "data/paraphrase/pairs.csv", index=False)
    tiny_volume_vae().save_pretrained(workdir / "data/train_vae/vae")
    set_param(workdir, "train_ldm", unet={**yaml.safe_load((workdir / "params.yaml").read_text())["train_ldm"]["unet"],
                                          "latent_patch": 2, "block_out_channels": [32, 64, 128]})
    assert_one_line_error(run_stage(workdir, "train_ldm"), "ingest.resolution=24", "6-wide grid",
                          "nearest valid ingest.resolution: 16 or 32")
    assert not (workdir / "data/train_ldm").exists()
