"""Params profiles (profiles/*.yaml): overlays that become `-S` overrides, whose models build."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from synthmed.core.errors import PipelineError
from synthmed.profiles import merged, overrides, read_overlay
from tests.conftest import REPO_ROOT

PROFILE = REPO_ROOT / "profiles/gpu-256.yaml"


@pytest.mark.parametrize("profile", ["gpu-256.yaml", "lora-sd15-256.yaml"])
def test_the_gpu_profiles_are_valid_overlays_of_params_yaml(tmp_path, profile):
    """Applied as -S overrides each gives a params.yaml that every stage of its sections accepts."""
    from flows.pipeline import check_overrides
    from synthmed.core.config import load_params
    from stages.generate import GenerateParams
    from stages.ingest import IngestParams
    from stages.train_ldm import TrainLDMParams
    from stages.train_lora import TrainLoraParams
    from stages.train_vae import TrainVAEParams

    items = overrides(REPO_ROOT / "profiles" / profile, REPO_ROOT / "params.yaml")
    assert check_overrides(str(REPO_ROOT), items) == items
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for item in items:
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[leaf] = yaml.safe_load(value)  # as DVC's -S reads it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage, cls in [("ingest", IngestParams), ("train_vae", TrainVAEParams), ("train_ldm", TrainLDMParams),
                       ("train_lora", TrainLoraParams), ("generate", GenerateParams)]:
        load_params(stage, cls, tmp_path / "params.yaml")
    assert params["cpu"]["threads"] == "auto" and params["train_ldm"]["unet"]["attention_levels"] == [1, 2, 3]
    assert params == merged(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()),
                            read_overlay(REPO_ROOT / "profiles" / profile))


def test_a_profile_extends_another_and_its_own_keys_win(tmp_path):
    (tmp_path / "a.yaml").write_text("train_ldm:\n  steps: 5\n  lr: 0.1\ngenerate:\n  batch_size: 4\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\ntrain_ldm:\n  lr: 0.2\n")
    assert read_overlay(tmp_path / "b.yaml") == {"train_ldm": {"steps": 5, "lr": 0.2}, "generate": {"batch_size": 4}}
    lora = read_overlay(REPO_ROOT / "profiles/lora-sd15-256.yaml")
    assert lora["train_lora"]["rank"] == 16 and lora["train_ldm"] == read_overlay(PROFILE)["train_ldm"]


def test_a_profile_key_params_yaml_lacks_is_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("train_ldm:\n  stpes: 5\n")
    with pytest.raises(PipelineError, match="'train_ldm.stpes' is not a key"):
        overrides(tmp_path / "p.yaml", REPO_ROOT / "params.yaml")


def test_the_command_line_prints_dvc_overrides():
    out = subprocess.run([sys.executable, "-m", "synthmed.profiles", str(PROFILE)], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert "-S" in out and "train_ldm.unet.block_out_channels=[128,256,512,512]" in out and "cpu.threads=auto" in out
