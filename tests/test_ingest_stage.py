"""The real `ingest` stage on small datasets of each kind: outputs, skip reports, privacy."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

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
    assert "Group (the unit no split cuts): the metadata's `group` column" in card
    assert "Near-duplicates across splits: none found (64-bit perceptual hashes at most 4 bits apart" in card
    assert metrics["near_duplicates_across_splits"] == 0
    assert (out / "samples.png").stat().st_size > 0

    first = images[["id", "split"]].copy()  # the split is a pure function of data and seed
    shutil.rmtree(tmp_path / "data/ingest")
    assert run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", on_error="skip", min_images=5,
                      resolution=16).returncode == 0
    assert pd.read_parquet(out / "manifest/images.parquet")[["id", "split"]].equals(first)


@pytest.mark.parametrize("scrub", [True, False])
def test_ingest_scrubs_identifiers_out_of_the_captions_the_generator_trains_on(tmp_path, scrub):
    planted = ("MRN 4471203", "03/04/2021", "Dr. Jane Roe", "[** Hospital 12 **]")
    rows = [(f"{i}.png", f"Axial slice {i}") for i in range(12)]
    rows[3] = ("3.png", f"Axial slice 3, {planted[0]}, seen {planted[1]} by {planted[2]} at {planted[3]}")
    write_imagefolder(tmp_path / "data/raw/ds", rows, group=[f"patient{i}" for i in range(12)])
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", min_images=1, resolution=16,
                      scrub_captions=scrub)
    assert proc.returncode == 0, proc.stderr
    text, metrics = outputs_text(tmp_path), json.loads((tmp_path / "metrics/all/ingest.json").read_text())
    if scrub:
        assert not [p for p in planted if p in text]
        assert metrics["scrubbed_captions"] == 1 and metrics["scrubbed_ids"] >= 1 and metrics["scrubbed_dates"] == 1
        assert "Axial slice 3" in pd.read_csv(tmp_path / "data/ingest/dataset/metadata.csv")["text"].str.cat()
    else:
        assert all(p in text for p in planted) and "scrubbed_captions" not in metrics


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
                path = write_dcm(tmp_path / "data/raw/export" / rel, PatientID=patient_id, SeriesInstanceUID=uid,
                                 pixels=np.roll(RAW, 7 * k + 3 * series + 50 * p, axis=1))
                files[file_id(path) + ".png"] = patient_id
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
    card = (tmp_path / "data/ingest/card.md").read_text()
    assert f"Guard: {metrics['guard_dropped']} train slices dropped" in card
    # neighbouring val and test slices (and far lateral slices) look alike: reported, never a stop
    near = metrics["near_duplicates_across_splits"]
    assert near > 0 and f"Near-duplicates across splits: {near} pairs" in card
    assert "slice position in the one MNI152 template brain" in card and "not subjects" in card
    problems = pd.read_csv(tmp_path / "data/ingest/problems.csv")
    assert set(problems["reason"]) == {"near_duplicate_across_splits"} and metrics["rows_dropped"] == 0
    assert problems["file"].isin(images["id"]).all()


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


def near_duplicate_folder(root: Path, group: bool) -> Path:
    """Six unrelated images and a mirrored, noisy copy of a.png, placed (split column) in test while a.png is in
    train; ``group``: patients of two images each, the copy with a patient of its own."""
    from tests.data.test_leakage import flipped_noisy, smooth_image

    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "copy.png"]
    root.mkdir(parents=True)
    for i, name in enumerate(names[:-1]):
        Image.fromarray(smooth_image(i)).save(root / name)
    Image.fromarray(flipped_noisy(smooth_image(0), 1)).save(root / "copy.png")
    meta = pd.DataFrame({"file_name": names, "text": [f"image {i}" for i in range(7)],
                         "split": ["train", "train", "train", "val", "val", "test", "test"]})
    if group:
        meta["group"] = ["p1", "p1", "p2", "p3", "p3", "p4", "p5"]
    meta.to_csv(root / "metadata.csv", index=False)
    return root


def test_near_duplicates_across_an_image_level_split_stop_ingest_in_one_line(tmp_path):
    near_duplicate_folder(tmp_path / "data/raw/ds", group=False)
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", min_images=5, resolution=64)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "a.png in train and copy.png in test" in proc.stderr and "add a `group` column" in proc.stderr
    assert "ingest.image_level_splits: true" in proc.stderr
    assert not (tmp_path / "data/ingest").exists()

    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", min_images=5, resolution=64,
                      image_level_splits=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data/ingest"
    problems = pd.read_csv(out / "problems.csv")
    assert problems[["file", "reason"]].values.tolist() == [["a.png", "near_duplicate_across_splits"]]
    assert "copy.png (test)" in problems["message"][0] and "one mirrored" in problems["message"][0]
    metrics = json.loads((tmp_path / "metrics/all/ingest.json").read_text())
    assert metrics["near_duplicates_across_splits"] == 1 and metrics["rows_dropped"] == 0  # a report, not a drop
    card = (out / "card.md").read_text()
    assert "none: each image is its own group — image-level split" in card and "image_level_splits: true" in card
    assert "Near-duplicates across splits: 1 pairs" in card and "splits never cut a group" not in card


def test_near_duplicates_with_groups_are_reported_not_stopped(tmp_path):
    near_duplicate_folder(tmp_path / "data/raw/ds", group=True)
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", min_images=5, resolution=64)  # on_error: fail
    assert proc.returncode == 0, proc.stderr
    assert "1 near-duplicate pairs across splits" in proc.stdout
    card = (tmp_path / "data/ingest/card.md").read_text()
    assert "Group (the unit no split cuts): the metadata's `group` column (e.g. patient)" in card
    assert "Near-duplicates across splits: 1 pairs" in card


PLANTED = ["Doe_Jane", "Jane_Doe", "MRN4455667", "19700101", "2024-01-02", "StMaryHospital"]


def planted_tree(root: Path) -> list[str]:
    """An export with names, record numbers and dates in its paths; returns every relative path."""
    folder = "StMaryHospital/Doe_Jane_19700101/MRN4455667"
    files = {f"{folder}/2024-01-02_CT/Jane_Doe_{k}.dcm": dict(pixels=np.roll(RAW, 9 * k, axis=1)) for k in range(6)}
    files[f"{folder}/2024-01-02_CT/Jane_Doe_nolabel.dcm"] = dict(pixels=np.roll(RAW, 77, axis=1),
                                                                 BurnedInAnnotation=None)
    for rel, attrs in files.items():
        write_dcm(root / rel, **attrs)
    (root / folder / "Jane_Doe_MRN4455667_notes.txt").write_text("report")
    (root / folder / "Doe_Jane_copy.dcm").write_bytes((root / next(iter(files))).read_bytes())
    # (an unreadable file: tests/data/test_dicom.py; the stage's provenance, like DVC, must read every file)
    return [*files, f"{folder}/Jane_Doe_MRN4455667_notes.txt", f"{folder}/Doe_Jane_copy.dcm"]


def digests(text: str) -> set[str]:
    """Unkeyed digests a careless pseudonym would show: sha256, sha1 and md5 in hex, whole and 16-digit prefixes."""
    out = set()
    for algo in ("sha256", "sha1", "md5"):
        hexed = hashlib.new(algo, text.encode()).hexdigest()
        out |= {hexed, hexed[:16], hexed[:12]}
    return out


@pytest.mark.parametrize("secret", ["", "hospital-key"])
def test_planted_names_in_paths_never_reach_any_ingest_output(tmp_path, secret):
    rels = planted_tree(tmp_path / "data/raw/export")
    env = {"SYNTHMED_TEST_KEY": secret} if secret else None
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["ingest"].update(source="dicom", path="data/raw/export", min_images=5, resolution=16, on_error="skip")
    params["ingest"]["dicom"].update(window="40,400", group_salt_env="SYNTHMED_TEST_KEY" if secret else "")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage_here(tmp_path, "ingest", env=env)
    assert proc.returncode == 0, proc.stderr
    problems = pd.read_csv(tmp_path / "data/ingest/problems.csv")
    assert sorted(problems["reason"]) == ["burned_in_unknown", "duplicate_file", "not_dicom"]
    assert len(pd.read_parquet(tmp_path / "data/ingest/manifest/images.parquet")) == 6
    forbidden = {s.lower() for s in PLANTED}
    for text in PLANTED + rels + [part for rel in rels for part in rel.split("/")]:
        forbidden |= digests(text)
    outputs = [p for p in sorted((tmp_path / "data/ingest").rglob("*")) if p.is_file()]
    outputs += sorted((tmp_path / "metrics").rglob("*.json"))
    assert len(outputs) > 10

    def readable(path: Path) -> bytes:  # parquet compresses its strings: scan them decoded too
        extra = pd.read_parquet(path).to_csv().encode() if path.suffix == ".parquet" else b""
        return (path.read_bytes() + extra).lower()

    scanned = {str(p.relative_to(tmp_path)): readable(p) for p in outputs}
    scanned["stdout/stderr"] = (proc.stdout + proc.stderr).lower().encode()
    assert b"ct image of the chest" in scanned["data/ingest/manifest/pairs.parquet"]  # the scan sees contents
    assert [(where, s) for where, data in scanned.items() for s in forbidden if s.encode() in data] == []
