"""A stage's facts come from dvc.yaml: its inputs (templated ones filled from params.yaml), its outputs, the
stage order; asking for an input that is missing or undeclared, or writing an undeclared output, is one line; a stage
holds its run folder in the local store while it runs."""

from __future__ import annotations

import pytest
import yaml

from synthmed.core.errors import PipelineError
from synthmed.core.stage import Stage, stage_names
from tests.conftest import REPO_ROOT

DVC_YAML = """stages:
  first:
    cmd: python -m stages.first
    deps:
      - stages/first.py
      - synthmed/lib
      - ${first.path}
    outs:
      - data/first/table.csv
  second:
    cmd: python -m stages.second
    deps:
      - data/first/table.csv
      - ${second.extra}
    outs:
      - data/second/model
    plots:
      - data/second/loss.csv
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 7, "first": {"path": "raw/x"}, "second": {"extra": ""}}))
    return tmp_path


def test_inputs_and_outputs_are_dvc_yamls_with_templates_filled(project):
    first, second = Stage.load("first", None), Stage.load("second", None)
    assert first.inputs == ["raw/x"] and first.outputs == ["data/first/table.csv"] and first.seed == 7
    assert second.inputs == ["data/first/table.csv"]  # an empty template is no input
    assert second.outputs == ["data/second/model", "data/second/loss.csv"]
    assert stage_names() == ["first", "second"]


def test_a_missing_or_undeclared_input_or_output_is_one_line(project):
    second = Stage.load("second", None)
    with pytest.raises(PipelineError, match=r"data/first/table.csv: missing upstream artifact; run `dvc repro second`"):
        second.dep("first/table.csv")
    (project / "data/first").mkdir(parents=True)
    (project / "data/first/table.csv").write_text("a\n")
    assert second.dep("first/table.csv") == "data/first/table.csv"
    with pytest.raises(PipelineError, match="stage second does not list data/first/other.csv in its deps"):
        second.dep("first/other.csv")
    assert second.out_path("model/unet/config.json") == "data/second/model/unet/config.json"
    with pytest.raises(PipelineError, match="stage second does not declare data/second/extra.png as an output"):
        second.out_path("extra.png")


def test_the_repository_stages_run_in_dvc_yaml_order():
    names = stage_names(REPO_ROOT / "dvc.yaml")
    assert names[0] == "ingest" and names[-1] == "report" and names.index("train_vae") < names.index("train_ldm")


def test_a_stage_holds_its_run_folder_while_it_runs_and_lets_go_at_its_end(project, monkeypatch, capsys):
    from synthmed.core import store
    from synthmed.core.io import FileLock
    from synthmed.core.stage import run_stage

    monkeypatch.setenv(store.ENV, str(project / "store"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "cpu": {"mode": "native", "threads": 1}}))
    (project / "data/first").mkdir(parents=True)
    (project / "data/first/table.csv").write_text("a\n")
    held = []

    def main(stage):
        folder = stage.run_dir(stage.fingerprint())
        assert stage.run_dir(stage.fingerprint()) == folder  # asked again: the same folder, still held
        held.append(FileLock(folder / store.LOCK).acquire())  # what another process would find: taken
        assert (folder / store.RECORD).is_file()  # the fingerprint's components, to name what changed later

    assert run_stage(main, None, [], name="second") == 0
    folder = store.run_dir("second", Stage.load("second", None).fingerprint())
    assert held == [False] and FileLock(folder / store.LOCK).acquire()  # free once the stage ended
