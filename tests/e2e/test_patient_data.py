"""End to end on a hospital-style DICOM export full of identifiers: patient names, record numbers and dates in
the folder and file names, in the tags and in a free-text report tag. The whole DAG runs (paraphrase through a
local OpenAI-compatible server) and no planted string, nor an unkeyed digest of one, is found in any output,
log, cache, DVC cache entry, request sent to the LLM or line printed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.data.test_dicom import write_dcm
from tests.e2e.harness import dvc, make_repo, tiny_params
from tests.test_ingest_stage import digests  # sha256, sha1 and md5 hex, whole and as 12/16-digit prefixes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

PATIENTS = [("Okonkwo", "Adaeze"), ("Lindqvist", "Birgitta"), ("Moreau", "Celestin"), ("Haddad", "Dalia"),
            ("Kowalczyk", "Emilian"), ("Tanaka", "Fumiko"), ("Brennan", "Gearoid"), ("Alvarez", "Hortensia"),
            ("Nakamura", "Isamu"), ("Fitzgerald", "Jolene"), ("Petrovic", "Kasimir"), ("Oyelaran", "Lerato"),
            ("Vasquez", "Maribel"), ("Thorsen", "Njal"), ("Abernathy", "Ottoline"), ("Quispe", "Pachacuti")]
HOSPITAL = "Saint Wendelin Infirmary"


def export(root: Path) -> list[str]:
    """16 patients x 4 CT slices (8 chest, 8 head: two labels), filed as a PACS export files them; returns every
    planted string (names, record numbers, dates, the hospital, the report, the path parts)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:40, :40]
    planted = [HOSPITAL, "Wendelin"]
    for i, (last, first) in enumerate(PATIENTS):
        mrn, dob, day = f"MRN{7340021 + 97 * i}", f"19{40 + i}0{1 + i % 9}1{i % 10}", f"2023-0{1 + i % 9}-1{i % 10}"
        part = ("CHEST", "HEAD")[i % 2]
        report = f"Seen by Dr. {last} on {day}; {first} {last}, {mrn}, history of cough"
        planted += [last, first, f"{last}^{first}", mrn, dob, day, report, f"{last}_{first}_{dob}"]
        for k in range(4):
            img = rng.normal(900, 60, (40, 40))
            cy, cx = rng.integers(12, 28, 2)
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2 < 40) if part == "CHEST" else (abs(yy - cy) < 6) & (abs(xx - cx) < 6)
            img[shape] += 1800
            rel = f"{HOSPITAL.replace(' ', '_')}/{last}_{first}_{dob}/{mrn}/{day}_CT/{last}_{first}_{k}.dcm"
            write_dcm(root / rel, pixels=img.clip(0, 4000).astype(np.uint16), PatientName=f"{last}^{first}",
                      PatientID=mrn, PatientBirthDate=dob, InstitutionName=HOSPITAL, BodyPartExamined=part,
                      ImageComments=report, StudyDescription=f"CT {part.lower()} for {last}")
    return planted


def readable(path: Path) -> str:
    """A file's bytes as text, parquet tables decoded (their strings are compressed)."""
    data = path.read_bytes()
    text = data.decode("utf-8", "replace")
    if data[:4] == b"PAR1":
        text += pd.read_parquet(io.BytesIO(data)).to_csv()
    return text


def test_a_dicom_export_full_of_identifiers_leaves_none_in_any_output(tmp_path: Path):
    from tests.text.fake_openai import FakeOpenAI
    from tests.text.test_llm import ENV, KEY, good

    raw = tmp_path / "export"
    planted = export(raw)
    files = {f"data/raw/export/{p.relative_to(raw).as_posix()}": p.read_bytes() for p in raw.rglob("*.dcm")}
    planted += sorted({part for rel in files for part in Path(rel).parts[3:]})  # folder and file names
    planted += [rel.removeprefix("data/raw/export/") for rel in files] + list(files)  # whole paths (their digests too)
    params = tiny_params()
    params["ingest"].update(source="dicom", path="data/raw/export", dicom={**params["ingest"]["dicom"], "label_field": "body_part"})
    params["paraphrase"].update(backend="openai")
    for trainer in ("train_vae", "train_ldm"):  # what is written matters here, not what is learnt
        params[trainer].update(steps=10, checkpoint_every=10)
    params["train_ldm"]["validate_every"] = 10
    with FakeOpenAI(good) as server:
        params["paraphrase"]["openai"].update(base_url=server.url, api_key_env=ENV, backoff_s=0.01)
        repo = make_repo(tmp_path / "repo", params, files)
        run = dvc(repo, "repro", "evaluate", env={**os.environ, ENV: KEY})  # ingest .. evaluate
    images = pd.read_parquet(repo / "data/ingest/manifest/images.parquet")
    assert len(images) == 64 and images["group"].nunique() == 16  # one group per patient, never cut
    assert images.groupby("group")["split"].nunique().max() == 1
    assert server.requests, "paraphrase never asked the local server"
    assert (repo / "metrics/all/evaluate.json").is_file()

    sources = [run.stdout, run.stderr, *(str(r["body"]) for r in server.requests)]
    looked = 0
    for path in repo.rglob("*"):
        rel = path.relative_to(repo).as_posix()
        if not path.is_file() or rel.startswith(("data/raw/", ".git/", "tests/")):  # the input, the project's own
            continue
        sources.append(rel + "\n" + readable(path))
        looked += 1
    assert looked > 100  # outputs, metrics, logs, the store's caches and DVC's cache entries
    text = "\n".join(sources)
    needles = set(planted) | {d for p in planted for d in digests(p)}
    found = sorted(n for n in needles if n in text)
    assert not found, f"identifiers in the outputs: {found[:10]}"
