"""What is generated and what it may be used for: the prompts stage's plan, prompt-file splits, the
split rules of evaluation, and which paraphrases train the diffusion model."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from synthmed.diffusion.latents import select_caption_sources
from synthmed.data.dataset import split_mask
from synthmed.diffusion.prompts import file_prompts
from synthmed.core.errors import PipelineError
from tests.conftest import REPO_ROOT
from tests.helpers import run_stage_here

METADATA = """file_name,text,label,group,split,sha256
a.png,axial slice one,ax,g1,train,0
a.png,axial slice one again,ax,g1,train,0
b.png,coronal slice,co,g2,val,0
c.png,sagittal slice,sa,g3,test,0
"""


def test_heldout_prompts_come_from_ingest_metadata_whatever_the_paraphrase_strategy(tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["prompts"].update(source="heldout", splits=["train", "val", "test"], images_per_prompt=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data/ingest/dataset").mkdir(parents=True)
    (tmp_path / "data/ingest/dataset/metadata.csv").write_text(METADATA)
    (tmp_path / "data/paraphrase").mkdir(parents=True)  # replace_all: no original train caption is left
    (tmp_path / "data/paraphrase/pairs.csv").write_text(
        "file_name,text,caption_source,split,label,group\na.png,an axial slice,rule,train,ax,g1\n")
    proc = run_stage_here(tmp_path, "prompts")
    assert proc.returncode == 0, proc.stderr
    plan = pd.read_csv(tmp_path / "data/prompts/plan.csv", dtype=str, keep_default_na=False)
    assert plan["text"].tolist() == ["axial slice one", "axial slice one again", "coronal slice", "sagittal slice"]
    assert plan["split"].tolist() == ["train", "train", "val", "test"]
    assert plan["source_file_name"].tolist() == ["a.png", "a.png", "b.png", "c.png"]


def test_prompt_files_may_name_the_split_of_each_prompt(tmp_path):
    (tmp_path / "p.csv").write_text("Prompt;label;split\nan axial slice;ax;test\na coronal slice;co;\n")
    rows = file_prompts(tmp_path / "p.csv")
    assert rows["split"].tolist() == ["test", ""]
    (tmp_path / "p.txt").write_text("x\n")
    assert file_prompts(tmp_path / "p.txt")["split"].tolist() == [""]
    (tmp_path / "bad.csv").write_text("text,split\nx,train\ny,testing\n")
    with pytest.raises(PipelineError, match=r"bad.csv, row 3: split 'testing' is not one of train, val, test"):
        file_prompts(tmp_path / "bad.csv")


def test_images_without_a_split_serve_fidelity_but_never_train_a_downstream_model():
    rows = pd.DataFrame({"split": ["train", "val", "test", ""]})
    assert split_mask(rows, ["test"], unsplit=True).tolist() == [False, False, True, True]
    assert split_mask(rows, ["train", "val"]).tolist() == [True, True, False, False]


def test_default_caption_sources_train_on_whatever_the_paraphrase_stage_produced():
    default = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train_ldm"]["caption_sources"]
    pairs = pd.DataFrame({"text": ["a", "a llm", "b", "b llm"], "caption_source": ["original", "llm"] * 2})
    assert select_caption_sources(pairs, default, "pairs.csv")["text"].tolist() == ["a", "a llm", "b", "b llm"]
    assert select_caption_sources(pairs, ["original"], "pairs.csv")["text"].tolist() == ["a", "b"]
    with pytest.raises(PipelineError, match="lists 'rule' but the paraphrase stage produced no 'rule' rows"):
        select_caption_sources(pairs, ["original", "rule"], "pairs.csv")
