"""The real `ingest` stage on small datasets of each kind: outputs, skip reports, privacy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tests.conftest import REPO_ROOT
from tests.data.test_dicom import IDENTIFIERS, RAW, file_id, write_dcm
from tests.helpers import StageRun, run_stage_here, write_imagefolder


def run_ingest(workdir: Path, **ingest) -> StageRun:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["ingest"].update(ingest)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    return run_stage_here(workdir, "ingest")


def outputs_text(workdir: Path) -> str:
    """Everything ingest wrote, as text (parquet tables rendered in full)."""
    parts = []
    for path in sorted((workdir / "data/ingest").rglob("*")) + [workdir / "metrics/all/ingest.json"]:
        if path.suffix in {".csv", ".md", ".json"}:
            parts.append(path.read_text())
        elif path.suffix == ".parquet":
            parts.append(pd.read_parquet(path).to_csv())
        parts.append(str(path.relative_to(workdir)))
    return "\n".join(parts)


def test_imagefolder_skip_mode_writes_report_card_and_manifest(tmp_path):
    rows = [(f"p{i // 2}_{i}.png", f"caption {i}") for i in range(16)]
    root = write_imagefolder(tmp_path / "data/raw/ds", rows, label=[f"c{i % 2}" for i in range(16)],
                             group=[f"patient{i // 2}" for i in range(16)])
    (root / "p7_15.png").write_bytes(b"")  # corrupt
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text() + "p8_16.png,  ,c0,patient8\n")  # empty caption
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", on_error="skip", min_images=5,
                      resolution=16)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data/ingest"
    problems = pd.read_csv(out / "problems.csv")
    assert sorted(problems["reason"]) == ["corrupt_image", "empty_caption"]
    assert set(problems["row"]) == {17, 18}
    images = pd.read_parquet(out / "manifest/images.parquet")
    pairs = pd.read_parquet(out / "manifest/pairs.parquet")
    assert len(images) == 15 and len(pairs) == 15 and images["pixel_sha256"].str.len().eq(64).all()
    assert images.groupby("group")["split"].nunique().max() == 1
    metrics = json.loads((tmp_path / "metrics/all/ingest.json").read_text())
    assert metrics["rows_dropped"] == 2 and metrics["images"] == 15 and metrics["labels"] == 2
    card = (out / "card.md").read_text()
    assert "corrupt_image: 1, empty_caption: 1" in card and "| c0 |" in card
    assert (out / "samples.png").stat().st_size > 0

    first = images[["id", "split"]].copy()  # the split is a pure function of data and seed
    shutil.rmtree(tmp_path / "data/ingest")
    assert run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", on_error="skip", min_images=5,
                      resolution=16).returncode == 0
    assert pd.read_parquet(out / "manifest/images.parquet")[["id", "split"]].equals(first)


def test_fail_mode_writes_nothing(tmp_path):
    root = write_imagefolder(tmp_path / "data/raw/ds", [(f"{i}.png", "x") for i in range(6)])
    (root / "3.png").unlink()
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", min_images=1)
    assert proc.returncode == 2 and "row 5: image '3.png': file not found" in proc.stderr
    assert not (tmp_path / "data/ingest").exists() and not (tmp_path / "metrics").exists()


def test_dicom_ingest_leaks_no_identifier_into_any_output(tmp_path):
    export = tmp_path / "data/raw/export"
    for series in range(3):
        for k in range(3):
            pixels = np.roll(RAW, 3 * k + 11 * series, axis=1)  # distinct images: no duplicate-pixel leak
            write_dcm(export / "Doe_Jane" / f"s{series}" / f"img{k}.dcm", pixels=pixels,
                      SeriesInstanceUID=f"1.2.826.0.1.3680043.8.498.77{series}")
    proc = run_ingest(tmp_path, source="dicom", path="data/raw/export", min_images=5, resolution=16,
                      dicom={"window": "40,400", "caption_template": "{modality} image of the {body_part}{view}",
                             "label_field": ""})
    assert proc.returncode == 0, proc.stderr
    text = outputs_text(tmp_path).lower()
    assert "ct image of the chest, pa view" in text
    leaked = [ident for ident in IDENTIFIERS if ident.lower() in text]
    assert not leaked, f"identifiers in outputs: {leaked}"
    images = pd.read_parquet(tmp_path / "data/ingest/manifest/images.parquet")
    assert images["group"].nunique() == 1  # three series of one patient: one group


def test_dicom_ingest_keeps_a_patients_series_in_one_split(tmp_path):
    patients = {"PID-778899": "Doe_Jane", "PID-445566": "Roe_Richard"}
    files = {}
    for p, (patient_id, folder) in enumerate(patients.items()):
        for series in range(2):
            uid = f"1.2.826.0.1.3680043.8.498.8{p}{series}"
            for k in range(3):
                rel = f"{folder}/s{series}/img{k}.dcm"
                write_dcm(tmp_path / "data/raw/export" / rel, pixels=np.roll(RAW, 7 * k + 3 * series + 50 * p, axis=1),
                          PatientID=patient_id, SeriesInstanceUID=uid)
                files[file_id(rel) + ".png"] = patient_id
    proc = run_ingest(tmp_path, source="dicom", path="data/raw/export", min_images=5, resolution=16)
    assert proc.returncode == 0, proc.stderr
    images = pd.read_parquet(tmp_path / "data/ingest/manifest/images.parquet")
    images["patient"] = images["id"].map(files)
    assert images["patient"].notna().all() and images.groupby("patient")["group"].nunique().eq(1).all()
    assert images["group"].nunique() == 2 and images.groupby("patient")["split"].nunique().eq(1).all()
    assert json.loads((tmp_path / "metrics/all/ingest.json").read_text())["images_without_patient_id"] == 0
    text = (outputs_text(tmp_path) + proc.stdout + proc.stderr).lower()
    assert not [i for i in [*patients, *patients.values()] if i.lower() in text]  # IDs and patient folders


def test_demo_ingest_guards_the_split_and_reports_the_drop(tmp_path):
    proc = run_ingest(tmp_path, source="demo", resolution=16,
                      demo={"slice_step_mm": 4, "guard_mm": 6, "min_brain_fraction": 0.08})
    assert proc.returncode == 0, proc.stderr
    images = pd.read_parquet(tmp_path / "data/ingest/manifest/images.parquet")
    planes = images["id"].str.extract(r"^([a-z]+)_[xyz]([+-]\d+)\.png$")
    mm = planes[1].astype(float)
    images["plane"], images["mm"] = planes[0], mm.where(planes[0] != "sagittal", mm.abs())  # x, -x: one image
    for plane, rows in images.groupby("plane"):
        train, held = rows[rows["split"] == "train"]["mm"], rows[rows["split"] != "train"]["mm"]
        assert min(abs(h - t) for h in held for t in train) >= 6, plane
    metrics = json.loads((tmp_path / "metrics/all/ingest.json").read_text())
    assert metrics["guard_dropped"] > 0
    assert f"Guard: {metrics['guard_dropped']} train slices dropped" in (tmp_path / "data/ingest/card.md").read_text()


def test_a_dataset_missing_from_a_checkout_says_how_to_get_it(tmp_path):
    """A clone (a worker's, a queued experiment's) lacks what the user put under data/raw/: one line, nothing
    written; a dataset tracked with `dvc add` is pulled, an untracked one is added first."""
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds")
    assert proc.returncode == 2 and "does not exist in this checkout" in proc.stderr
    assert "`dvc add data/raw/ds`" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "data/raw/ds").mkdir(parents=True)
    (tmp_path / "data/raw/ds.dvc").write_text("outs:\n- path: ds\n")
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds")
    assert proc.returncode == 2 and "is empty in this checkout" in proc.stderr and "`dvc pull data/raw/ds.dvc`" in proc.stderr
    assert not (tmp_path / "data/ingest").exists()
