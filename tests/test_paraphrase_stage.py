"""The real `paraphrase` stage with the openai backend against a local server, and its fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import StageRun, run_stage_here
from tests.text.fake_openai import FakeOpenAI
from tests.text.test_llm import ENV, KEY, good

CAPTIONS = ["one polyp in the upper-left", "two polyps in the lower-right", "no polyp; green box in the lower-left"]


def setup(workdir: Path, url: str, **openai) -> None:
    shutil.copytree(REPO_ROOT / "prompts", workdir / "prompts")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["paraphrase"].update(backend="openai")
    params["paraphrase"]["openai"].update(base_url=url, api_key_env=ENV, backoff_s=0.01, **openai)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    ds = workdir / "data/ingest/dataset"
    ds.mkdir(parents=True)
    rows = ["file_name,text,label,group,split"] + [f'{i}.png,"{c}",x,{i},train' for i, c in enumerate(CAPTIONS)]
    (ds / "metadata.csv").write_text("\n".join(rows + ['9.png,"held out",x,9,test']) + "\n")


def run(workdir: Path, with_key: bool) -> StageRun:
    return run_stage_here(workdir, "paraphrase", env={ENV: KEY if with_key else None})


def test_llm_stage_caches_reproduces_and_never_writes_the_key(tmp_path):
    with FakeOpenAI(good) as server:
        setup(tmp_path, server.url)
        first = run(tmp_path, with_key=True)
        assert first.returncode == 0, first.stderr
        pairs_first = (tmp_path / "data/paraphrase/pairs.csv").read_bytes()
        metrics = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
        second = run(tmp_path, with_key=True)
        assert second.returncode == 0, second.stderr
    assert len(server.requests) == 3  # unique train captions only, once each
    assert metrics["llm"] == 1 and metrics["requests"] == 3 and metrics["cache_hits"] == 0
    assert metrics["rule_declined"] == 0
    assert metrics["unique_captions_after"] == 4 + 6 and metrics["tokens"] == 150
    again = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
    assert again["requests"] == 0 and again["cache_hits"] == 3
    assert (tmp_path / "data/paraphrase/pairs.csv").read_bytes() == pairs_first
    assert b",llm," in pairs_first and b"held out,original" in pairs_first
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"API key written to {path}"
    for proc in (first, second):
        assert KEY not in proc.stdout + proc.stderr


def test_without_a_key_the_stage_stops_and_names_the_variable(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1")
    proc = run(tmp_path, with_key=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and ENV in error, error
    assert f"export {ENV}" in error and "paraphrase.openai.fallback: rule" in error
    assert not (tmp_path / "data/paraphrase/pairs.csv").exists()


def test_an_explicit_rule_fallback_labels_and_records_the_backend_that_ran(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1", fallback="rule")
    proc = run(tmp_path, with_key=False)
    assert proc.returncode == 0, proc.stderr
    assert f"${ENV} is not set" in proc.stdout and "backend=rule" in proc.stdout
    pairs = pd.read_csv(tmp_path / "data/paraphrase/pairs.csv")
    assert set(pairs["caption_source"]) == {"original", "rule"}
    metrics = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
    assert metrics["llm"] == 0 and metrics["requests"] == 0
    assert metrics["paraphrases_per_caption"] > 0
    # "no polyp; ..." is a negation the rule backend declines, and says so
    assert metrics["rule_declined"] == 1 and "the rule backend declined 1 of 3 captions" in proc.stdout
    assert set(pairs.loc[pairs["file_name"] == "2.png", "caption_source"]) == {"original"}
    provenance = json.loads((tmp_path / "data/paraphrase/provenance.json").read_text())
    assert provenance["params"]["backend"] == "openai" and provenance["params"]["backend_used"] == "rule"


def test_fallback_is_a_checked_choice(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1", fallback="rules")
    proc = run(tmp_path, with_key=False)
    assert proc.returncode == 2 and "paraphrase.openai.fallback = 'rules' is not supported" in proc.stderr
