import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless

from synthmed.data.dicom import DicomParams, read_dicom, without_patient_id
from synthmed.data.problems import Problems
from synthmed.core.errors import PipelineError

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"
INSTANCE_ROOT = "1.2.826.0.1.3680043.8.498.2"
IDENTIFIERS = ["Doe", "Jane", "PID-778899", "19700101", "20240102", "101530", "St Example", "Example Road",
               "ACC123", "STUDY-77", "Smith", "Operator", "Chest pain", STUDY_UID, SERIES_UID, INSTANCE_ROOT]

SLOPE, INTERCEPT = 2.0, -1024.0
RAW = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 3) % 4000
RAW[10, 20] = 1262  # rescaled: 2 * 1262 - 1024 = 1500 HU
PAD = 4  # 32 rows padded to 40: 4 zero rows on top


def write_dcm(path: Path, pixels: np.ndarray | None = RAW, photometric: str = "MONOCHROME2",
              sop_class: str = CTImageStorage, **attrs) -> Path:
    """A small CT file full of identifiers; attrs override (None deletes) any element."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    instance = INSTANCE_ROOT + str(int(hashlib.sha256(path.name.encode()).hexdigest()[:4], 16))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = instance
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-778899", "19700101"
    ds.StudyDate, ds.SeriesDate, ds.StudyTime = "20240102", "20240102", "101530"
    ds.InstitutionName, ds.InstitutionAddress = "St Example Hospital", "1 Example Road"
    ds.ReferringPhysicianName, ds.OperatorsName = "Smith^John", "Operator^Olga"
    ds.AccessionNumber, ds.StudyID = "ACC123", "STUDY-77"
    ds.StudyDescription, ds.SeriesDescription = "Chest pain Jane Doe", "Doe PA chest"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CT", "CHEST", "PA"
    ds.BurnedInAnnotation = "NO"  # the default policy keeps only files flagged NO
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, 8 * pixels.dtype.itemsize)
    ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def read(folder, on_error="fail", resolution=40, channels=1, crop="pad", workers=1, **params):
    problems = Problems(on_error)
    samples = read_dicom(folder, DicomParams(**{"window": "1000,4000", **params}), resolution=resolution,
                         crop=crop, channels=channels, problems=problems, workers=workers)
    return samples, problems


def file_id(path: Path) -> str:
    """A file's name without a secret: from its bytes, never its path."""
    return "dicom_" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def image(sample) -> np.ndarray:
    """The 32x40 image area of a 40 px padded sample."""
    return sample.array()[PAD : PAD + 32]


def test_shape_dtype_names_and_hashes(tmp_path):
    path = write_dcm(tmp_path / "Doe_Jane" / "scan1.dcm")
    (grey,), _ = read(tmp_path, resolution=16)
    (rgb,), _ = read(tmp_path, resolution=16, channels=3)
    assert grey.array().shape == (16, 16) and grey.array().dtype == np.uint8
    assert rgb.array().shape == (16, 16, 3) and (rgb.array() == grey.array()[..., None]).all()
    assert grey.file_name == file_id(path) + ".png"
    assert grey.source == "dicom:" + file_id(path).removeprefix("dicom_")
    assert grey.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rescale_and_explicit_window(tmp_path):
    write_dcm(tmp_path / "a.dcm")
    (s,), _ = read(tmp_path, window="1000,4000")  # [-1000, 3000] HU
    hu = RAW.astype(float) * SLOPE + INTERCEPT
    expected = np.clip(np.rint((hu + 1000.0) / 4000.0 * 255.0), 0, 255)
    assert s.array()[PAD + 10, 20] == 159  # 1500 HU: 2500 / 4000 * 255 = 159.4
    assert np.array_equal(image(s), expected.astype(np.uint8))
    assert (s.array()[:PAD] == 0).all() and (s.array()[PAD + 32 :] == 0).all()  # padding stays black


def test_monochrome1_is_inverted(tmp_path):
    write_dcm(tmp_path / "m2" / "a.dcm")
    write_dcm(tmp_path / "m1" / "a.dcm", photometric="MONOCHROME1")
    (m2,), _ = read(tmp_path / "m2")
    (m1,), _ = read(tmp_path / "m1")
    assert np.array_equal(image(m1), 255 - image(m2))


def test_auto_uses_the_files_window_else_percentiles(tmp_path):
    write_dcm(tmp_path / "win" / "a.dcm", WindowCenter=[1000, 40], WindowWidth=[4000, 400])
    write_dcm(tmp_path / "nowin" / "a.dcm")
    auto, explicit, pct = (read(tmp_path / "win", window=w)[0][0] for w in ("auto", "1000,4000", "percentile"))
    assert np.array_equal(auto.array(), explicit.array())
    assert not np.array_equal(auto.array(), pct.array())
    no_window = read(tmp_path / "nowin", window="auto")[0][0]
    assert np.array_equal(no_window.array(), pct.array())
    assert image(pct).min() == 0 and image(pct).max() == 255  # 0.5-99.5 percentiles span the range


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # writing the mis-filed body part
def test_captions_and_labels_from_whitelisted_fields(tmp_path):
    write_dcm(tmp_path / "full" / "a.dcm", ImageLaterality="L")
    write_dcm(tmp_path / "sparse" / "a.dcm", BodyPartExamined=None, ViewPosition=None)
    write_dcm(tmp_path / "misfiled" / "a.dcm", BodyPartExamined="Doe^Jane")
    assert read(tmp_path / "full")[0][0].captions == ["CT image of the chest, PA view"]
    assert read(tmp_path / "sparse")[0][0].captions == ["CT image of the unknown body part"]
    assert read(tmp_path / "misfiled")[0][0].captions == ["CT image of the unknown body part, PA view"]
    (s,), _ = read(tmp_path / "full", caption_template="{laterality}{body_part} {modality} {rows}x{columns}",
                   label_field="view")
    assert s.captions == ["left chest CT 32x40"] and s.label == "PA"
    assert read(tmp_path / "full", label_field="body_part")[0][0].label == "chest"
    assert read(tmp_path / "sparse", label_field="body_part")[0][0].label == "unknown"
    assert read(tmp_path / "full")[0][0].label == ""


def patch(path: Path, old: bytes, new: bytes) -> None:
    """Put a malformed value into a written file (pydicom refuses to write most of them)."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def malformed(path: Path) -> None:
    # Conversion warnings and errors quote such values verbatim.
    write_dcm(path, WindowCenter="1111", WindowWidth="4000", SeriesInstanceUID="9.9.9.99")
    patch(path, b"1111", b"Doe ")
    patch(path, b"9.9.9.99", b"Doe^Jane")


def test_no_identifier_reaches_samples_messages_warnings_or_logs(tmp_path, caplog):
    patient = tmp_path / "Doe_Jane"
    write_dcm(patient / "Jane_Doe_1.dcm")
    write_dcm(patient / "Jane_Doe_2.dcm", pixels=np.stack([RAW, RAW // 2]))
    malformed(patient / "Jane_Doe_3.dcm")
    bad = {
        "Jane_Doe_notes.txt": lambda p: p.write_text("Doe^Jane PID-778899"),
        "Jane_Doe_sr.dcm": lambda p: write_dcm(p, pixels=None),
        "Jane_Doe_cut.dcm": lambda p: write_dcm(p, PixelData=b"\0" * 10),
        "Jane_Doe_burned.dcm": lambda p: write_dcm(p, BurnedInAnnotation="YES"),
        "Jane_Doe_frames.dcm": lambda p: (write_dcm(p, NumberOfFrames="7777"), patch(p, b"7777", b"Jane")),
        "Jane_Doe_pi.dcm": lambda p: (write_dcm(p), patch(p, b"MONOCHROME2 ", b"DOE JANE    ")),
    }
    for name, make in bad.items():
        make(patient / name)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples, problems = read(tmp_path, on_error="skip", window="auto")
        messages = []
        for name in bad:  # under fail, each broken file alone stops the read
            solo = tmp_path / "solo" / "Doe_Jane"
            shutil.rmtree(tmp_path / "solo", ignore_errors=True)
            solo.mkdir(parents=True)
            shutil.copy(patient / name, solo / name)
            with pytest.raises(PipelineError) as err:
                read(tmp_path / "solo")
            messages.append(str(err.value))
    assert len(samples) == 4 and len(problems.items) == len(bad)
    assert [p.reason for p in problems.items] == ["burned_in_annotation", "corrupt_image", "corrupt_image",
                                                  "not_dicom", "unsupported_image", "no_pixel_data"]
    text = repr([(s.captions, s.file_name, s.group, s.label, s.split, s.source, s.source_sha256)
                 for s in samples]) + repr([vars(p) for p in problems.items]) + repr(messages)
    text += repr([str(w.message) for w in caught]) + caplog.text
    leaked = [i for i in IDENTIFIERS if i.lower() in text.lower()]
    assert leaked == [], leaked
    assert all(file_id(patient / n) in m for n, m in zip(bad, messages))


def test_groups_are_patients_else_study_series_or_file(tmp_path):
    write_dcm(tmp_path / "p1" / "s1.dcm")
    write_dcm(tmp_path / "p1" / "s2.dcm", SeriesInstanceUID="1.2.826.0.1.3680043.8.498.5")  # second series
    write_dcm(tmp_path / "p1" / "multi.dcm", pixels=np.stack([RAW, RAW // 2, RAW // 3]))
    write_dcm(tmp_path / "p2" / "s1.dcm", PatientID="PID-112233")
    write_dcm(tmp_path / "p3" / "s1.dcm", PatientID=None, StudyInstanceUID="1.2.826.0.1.3680043.8.498.4")
    write_dcm(tmp_path / "p4" / "s1.dcm", PatientID=None, StudyInstanceUID=None)
    write_dcm(tmp_path / "p5" / "s1.dcm", PatientID=" ", StudyInstanceUID=None, SeriesInstanceUID=None)
    samples, _ = read(tmp_path)
    group = {s.file_name: s.group for s in samples}
    p1 = {group[file_id(tmp_path / f"p1/{n}.dcm") + ".png"] for n in ("s1", "s2")}
    p1 |= {group[file_id(tmp_path / "p1/multi.dcm") + f"_f{k:03d}.png"] for k in (1, 2, 3)}
    assert len(samples) == 9 and len(p1) == 1 and re.fullmatch(r"patient-[0-9a-f]{16}", p1.pop())
    kinds = [group[file_id(tmp_path / f"p{i}/s1.dcm") + ".png"].split("-")[0] for i in (2, 3, 4, 5)]
    assert kinds == ["patient", "study", "series", "file"] and len(set(group.values())) == 5
    assert without_patient_id(samples) == 3


def test_patient_pseudonyms_are_keyed(tmp_path, monkeypatch):
    write_dcm(tmp_path / "a" / "s1.dcm")
    (default,), _ = read(tmp_path)
    plain = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in ("PID-778899", "patient:PID-778899")]
    assert default.group.removeprefix("patient-") not in plain  # an unkeyed digest is reversed by brute force
    monkeypatch.setenv("GROUP_KEY", "secret one")
    (one,), _ = read(tmp_path, group_salt_env="GROUP_KEY")
    write_dcm(tmp_path / "b" / "s1.dcm", PatientID="PID-112233")
    with_b, _ = read(tmp_path, group_salt_env="GROUP_KEY")
    assert one.group != default.group and one.group in {s.group for s in with_b}  # stable as the data grows
    assert default.group not in {s.group for s in read(tmp_path)[0]}  # the default key is the files' bytes
    monkeypatch.setenv("GROUP_KEY", "secret two")
    assert one.group not in {s.group for s in read(tmp_path, group_salt_env="GROUP_KEY")[0]}
    monkeypatch.delenv("GROUP_KEY")
    with pytest.raises(PipelineError, match="ingest.dicom.group_salt_env: the environment variable GROUP_KEY"):
        read(tmp_path, group_salt_env="GROUP_KEY")


def test_non_dicom_file_fails_or_is_skipped(tmp_path):
    write_dcm(tmp_path / "a.dcm")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    with pytest.raises(PipelineError, match=file_id(tmp_path / "notes/readme.txt")) as err:
        read(tmp_path)
    assert "not a DICOM file" in str(err.value)
    samples, problems = read(tmp_path, on_error="skip")
    assert [s.file_name for s in samples] == [file_id(tmp_path / "a.dcm") + ".png"]
    assert problems.counts() == {"not_dicom": 1} and problems.items[0].file == file_id(tmp_path / "notes/readme.txt")


@pytest.mark.parametrize(
    "make, reason, params",
    [
        (lambda p: write_dcm(p, pixels=None), "no_pixel_data", {}),
        (lambda p: write_dcm(p, PixelData=b"\0" * 10), "corrupt_image", {}),
        (lambda p: p.write_bytes(write_dcm(p).read_bytes()[:2000]), "corrupt_image", {}),  # truncated in its pixels
        (lambda p: write_dcm(p, BurnedInAnnotation="YES"), "burned_in_annotation", {}),
        (lambda p: write_dcm(p, PhotometricInterpretation="PALETTE COLOR"), "unsupported_image", {}),
        (lambda p: write_dcm(p, ViewPosition=None), "empty_caption", {"caption_template": "{view}"}),
    ],
)
def test_unusable_dicom_is_reported(tmp_path, make, reason, params):
    write_dcm(tmp_path / "ok.dcm")
    make(tmp_path / "bad.dcm")
    samples, problems = read(tmp_path, on_error="skip", **params)
    assert len(samples) == 1 and problems.counts() == {reason: 1}
    assert problems.items[0].file == file_id(tmp_path / "bad.dcm")


def test_compressed_without_decoder_is_corrupt_image(tmp_path):
    path = write_dcm(tmp_path / "jls.dcm")
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"not really jpeg-ls"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PipelineError, match=r"cannot decode its pixels \(JPEG-LS Lossless") as err:
        read(tmp_path)
    assert "\n" not in str(err.value)


def test_dicomdir_is_ignored_and_empty_folder_fails(tmp_path):
    write_dcm(tmp_path / "DICOMDIR", pixels=None, sop_class="1.2.840.10008.1.3.10")
    samples, problems = read(tmp_path, on_error="skip")
    assert samples == [] and problems.items == []
    with pytest.raises(PipelineError, match="ingest.path"):
        read(tmp_path / "missing")


def test_rgb_kept_or_converted(tmp_path):
    red = np.zeros((32, 40, 3), np.uint8)
    red[..., 0] = 255
    write_dcm(tmp_path / "rgb.dcm", pixels=red, photometric="RGB")
    (colour,), _ = read(tmp_path, channels=3)
    (grey,), _ = read(tmp_path, channels=1)
    assert (image(colour) == [255, 0, 0]).all()
    assert image(grey).shape == (32, 40) and (image(grey) == 76).all()  # ITU-R 601 luma of pure red


@pytest.mark.parametrize(
    "params, name",
    [
        ({"caption_template": "{modality} of {PatientName}"}, "ingest.dicom.caption_template"),
        ({"caption_template": "{modality"}, "ingest.dicom.caption_template"),
        ({"caption_template": "{modality:d}"}, "ingest.dicom.caption_template"),
        ({"caption_template": "{modality.__class__}"}, "ingest.dicom.caption_template"),
        ({"caption_template": "  "}, "ingest.dicom.caption_template"),
        ({"window": "40"}, "ingest.dicom.window"),
        ({"window": "40,-400"}, "ingest.dicom.window"),
        ({"window": "level,width"}, "ingest.dicom.window"),
        ({"label_field": "PatientID"}, "ingest.dicom.label_field"),
        ({"burned_in": "ignore"}, "ingest.dicom.burned_in"),
    ],
)
def test_bad_params_name_the_key(params, name):
    with pytest.raises(PipelineError, match=re.escape(name)) as err:
        DicomParams(**params)
    if "caption_template" in name:
        assert "modality, body_part, view, laterality, rows, columns" in str(err.value)


def test_pydicom_sample_files(tmp_path):
    from pydicom.data import get_testdata_file

    names = ["CT_small.dcm", "MR_small.dcm"]
    paths = [get_testdata_file(n, download=False) for n in names]
    if None in paths:
        pytest.skip("pydicom test files not installed")
    for name, path in zip(names, paths):
        shutil.copy(path, tmp_path / name)
    with pytest.raises(PipelineError, match="burned_in: allow_missing"):  # neither file carries the flag
        read(tmp_path, window="auto", resolution=32)
    samples, _ = read(tmp_path, window="auto", resolution=32, burned_in="allow_missing")
    assert [s.captions for s in samples] == [[f"{m} image of the unknown body part"] for m in ("CT", "MR")]
    assert all(s.array().shape == (32, 32) and s.array().std() > 10 for s in samples)
    text = repr([(s.captions, s.file_name, s.group, s.source) for s in samples]).lower()
    assert not any(i in text for i in ("compressedsamples", "1ct1", "4mr1", "jfk", "toshiba", "ct_small", "mr_small"))


def test_os_clutter_is_ignored(tmp_path):
    from synthmed.data.dicom import _os_clutter

    assert _os_clutter(Path(".DS_Store")) and _os_clutter(Path("a/.hidden/x.dcm")) and _os_clutter(Path("Thumbs.db"))
    assert not _os_clutter(Path("Doe_Jane/scan1.dcm"))


def mixed_folder(root: Path) -> None:
    """Patients, a multi-frame file, groups by study/series/file, bad files and a malformed one, in one folder."""
    write_dcm(root / "p1" / "a.dcm")
    write_dcm(root / "p1" / "b.dcm", pixels=np.stack([RAW, RAW // 2, RAW // 3]))
    write_dcm(root / "p2" / "a.dcm", PatientID="PID-112233", pixels=RAW // 2)
    write_dcm(root / "p3" / "a.dcm", PatientID=None, StudyInstanceUID="1.2.826.0.1.3680043.8.498.4")
    write_dcm(root / "p4" / "a.dcm", PatientID=None, StudyInstanceUID=None)
    write_dcm(root / "p4" / "b.dcm", PatientID=None, StudyInstanceUID=None, SeriesInstanceUID=None)
    malformed(root / "p5" / "a.dcm")
    write_dcm(root / "p1" / "burned.dcm", BurnedInAnnotation="YES")
    write_dcm(root / "p2" / "sr.dcm", pixels=None)
    (root / "p3" / "notes.txt").write_text("Doe^Jane PID-778899")
    write_dcm(root / "p4" / "cut.dcm", PixelData=b"\0" * 10)
    write_dcm(root / "p5" / "frames.dcm", NumberOfFrames="7777")
    patch(root / "p5" / "frames.dcm", b"7777", b"Jane")  # pydicom warns and logs the value


@pytest.mark.parametrize("key", ["", "GROUP_KEY"])
def test_parallel_read_equals_serial(tmp_path, monkeypatch, capfd, key):
    """Workers decode, read_dicom keeps the pseudonyms and problems: same samples, groups and problems, in order."""
    import synthmed.data.decode as decode
    import synthmed.data.dicom as dicom

    monkeypatch.setenv("GROUP_KEY", "secret")
    mixed_folder(tmp_path / "ds")
    pools = []

    def spy(fn, jobs, n_processes, **kw):
        pools.append(n_processes)
        return decode.map_ordered(fn, jobs, n_processes, **kw)

    monkeypatch.setattr(dicom, "map_ordered", spy)
    monkeypatch.setattr(decode, "MIN_POOL_FILES", 2)  # the real threshold (64) would keep 10 files serial
    loud = logging.StreamHandler(sys.stderr)  # pydicom's warnings and logs would reach stderr, a worker's too
    logging.getLogger("pydicom").addHandler(loud)
    monkeypatch.setattr(logging.getLogger("pydicom"), "level", logging.DEBUG)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: print(message, file=sys.stderr))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            runs = [read(tmp_path / "ds", on_error="skip", window="auto", group_salt_env=key, workers=w)
                    for w in (1, 2)]
    finally:
        logging.getLogger("pydicom").removeHandler(loud)
    assert pools == [1, 2]
    (serial, serial_problems), (parallel, parallel_problems) = runs
    assert len(serial) == 9 and len({s.group for s in serial}) == 5 and len(serial_problems.items) == 5
    assert [vars(p) for p in parallel_problems.items] == [vars(p) for p in serial_problems.items]
    fields = [(s.file_name, s.captions, s.group, s.label, s.split, s.source, s.source_sha256) for s in serial]
    assert [(s.file_name, s.captions, s.group, s.label, s.split, s.source, s.source_sha256)
            for s in parallel] == fields
    assert all(a.array().dtype == b.array().dtype and np.array_equal(a.array(), b.array())
               for a, b in zip(serial, parallel))
    with pytest.raises(PipelineError) as serial_error:  # under fail, the first bad file in path order stops both
        read(tmp_path / "ds", window="auto", workers=1)
    with pytest.raises(PipelineError) as parallel_error:
        read(tmp_path / "ds", window="auto", workers=2)
    assert str(parallel_error.value) == str(serial_error.value) and "burned" not in str(serial_error.value)
    out, err = capfd.readouterr()  # the workers' pydicom is muted too
    leaked = [i for i in IDENTIFIERS if i.lower() in (out + err).lower()]
    assert leaked == [], leaked


def test_a_file_changed_between_worker_and_key_stops_the_read(tmp_path):
    from synthmed.data.dicom import _read_again

    path = write_dcm(tmp_path / "Doe_Jane" / "a.dcm")
    st = path.stat()
    fid = file_id(path)
    assert _read_again(path, fid, (st.st_size, st.st_mtime_ns)) == path.read_bytes()
    with pytest.raises(PipelineError, match=f"DICOM file {fid} .*changed or removed") as err:
        _read_again(path, fid, (st.st_size + 1, st.st_mtime_ns))
    assert "Doe" not in str(err.value).split("<ingest.path>")[1]
    path.unlink()
    with pytest.raises(PipelineError, match="changed or removed"):
        _read_again(path, fid, (st.st_size, st.st_mtime_ns))


def unkeyed_path_digests(rel: str) -> set[str]:
    """What an unkeyed file name from a path would be: sha256 hex prefixes of the path and its parts."""
    texts = [rel, *rel.split("/"), f"path:{rel}"]
    return {hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts}


def test_file_names_are_keyed_by_the_secret_else_the_bytes_never_the_path(tmp_path, monkeypatch):
    rel = "Doe_Jane/MRN-4455667/scan1.dcm"
    path = write_dcm(tmp_path / rel)
    (plain,), _ = read(tmp_path)
    monkeypatch.setenv("FILE_KEY", "secret one")
    (one,), _ = read(tmp_path, group_salt_env="FILE_KEY")
    monkeypatch.setenv("FILE_KEY", "secret two")
    (two,), _ = read(tmp_path, group_salt_env="FILE_KEY")
    names = [s.file_name.removeprefix("dicom_").removesuffix(".png") for s in (plain, one, two)]
    assert len(set(names)) == 3 and not set(names) & unkeyed_path_digests(rel)
    assert plain.file_name == file_id(path) + ".png"  # without a secret: the bytes
    moved = tmp_path / "elsewhere" / "x.dcm"  # the same bytes under another path: the same name
    moved.parent.mkdir()
    path.rename(moved)
    assert read(tmp_path)[0][0].file_name == plain.file_name
    assert read(tmp_path, group_salt_env="FILE_KEY")[0][0].file_name != two.file_name  # keyed by the path
    moved.rename(path)
    write_dcm(path, ViewPosition="AP")  # changed bytes, same path: the keyed name stays
    assert read(tmp_path, group_salt_env="FILE_KEY")[0][0].file_name == two.file_name
    assert read(tmp_path)[0][0].file_name != plain.file_name
    assert all(s.source == "dicom:" + s.file_name.removeprefix("dicom_").removesuffix(".png") for s in (one, two))


def test_an_unreadable_file_is_named_by_its_position(tmp_path, monkeypatch):
    write_dcm(tmp_path / "Doe_Jane" / "a.dcm")
    (tmp_path / "Doe_Jane").joinpath("b_MRN4455667.dcm").symlink_to("/proc/self/mem")  # read() fails with EIO
    samples, problems = read(tmp_path, on_error="skip")
    assert len(samples) == 1 and problems.counts() == {"unreadable_file": 1}
    assert problems.items[0].file == "dicom_unreadable-0001"  # second in sorted order; nothing of its path
    assert "MRN4455667" not in problems.items[0].message and "cannot read" in problems.items[0].message
    monkeypatch.setenv("FILE_KEY", "k")
    keyed = read(tmp_path, on_error="skip", group_salt_env="FILE_KEY")[1].items[0].file
    assert re.fullmatch(r"dicom_[0-9a-f]{16}", keyed) and keyed.removeprefix("dicom_") not in unkeyed_path_digests(
        "Doe_Jane/b_MRN4455667.dcm")


def test_byte_identical_copies_are_reported_once(tmp_path):
    first = write_dcm(tmp_path / "a" / "x.dcm")
    (tmp_path / "b").mkdir()
    shutil.copy(first, tmp_path / "b" / "x.dcm")
    samples, problems = read(tmp_path, on_error="skip")
    assert [s.file_name for s in samples] == [file_id(first) + ".png"]
    assert problems.counts() == {"duplicate_file": 1} and "remove one of the copies" in problems.items[0].message
    with pytest.raises(PipelineError, match="byte-identical copy"):
        read(tmp_path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # writing the garbled flag
def test_burned_in_annotation_must_be_no_unless_missing_is_allowed(tmp_path):
    write_dcm(tmp_path / "no.dcm")
    missing = write_dcm(tmp_path / "missing.dcm", BurnedInAnnotation=None, pixels=RAW // 2)
    write_dcm(tmp_path / "garbled.dcm", BurnedInAnnotation="Doe^Jane", pixels=RAW // 3)  # not a Code String
    write_dcm(tmp_path / "yes.dcm", BurnedInAnnotation="YES", pixels=RAW // 4)
    samples, problems = read(tmp_path, on_error="skip")
    assert len(samples) == 1 and problems.counts() == {"burned_in_unknown": 2, "burned_in_annotation": 1}
    with pytest.raises(PipelineError) as err:  # the default stops at the first file without the flag
        read(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "ingest.dicom.burned_in: allow_missing" in message
    assert re.search(r"DICOM file dicom_[0-9a-f]{16}\b", message) and "Doe" not in message.split("<ingest.path>")[1]
    kept, problems = read(tmp_path, on_error="skip", burned_in="allow_missing")
    assert len(kept) == 3 and problems.counts() == {"burned_in_annotation": 1}  # YES is refused either way
    assert file_id(missing) + ".png" in {s.file_name for s in kept}


def test_locator_keys_ids_as_ingest_does(tmp_path):
    patient = tmp_path / "Doe_Jane"
    write_dcm(patient / "scan1.dcm")
    write_dcm(patient / "scan2.dcm", pixels=RAW // 2)
    (patient / ".DS_Store").write_bytes(b"clutter")  # not read, so not listed
    samples, _ = read(tmp_path)

    def locate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "synthmed.data.dicom", str(tmp_path), *args],
                              capture_output=True, text=True, cwd=Path(__file__).parents[2],
                              env={**os.environ, **(env or {})})

    listing = locate("--key-env", "").stdout.splitlines()
    assert sorted(line.split("  ")[0] + ".png" for line in listing) == sorted(s.file_name for s in samples)
    fid = samples[0].file_name.removesuffix(".png")
    assert locate(fid, "--key-env", "").stdout.strip() == f"{fid}  Doe_Jane/scan1.dcm"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FILE_KEY", "s3cret")
        keyed = read(tmp_path, group_salt_env="FILE_KEY")[0][0].file_name.removesuffix(".png")
    out = locate(keyed, "--key-env", "FILE_KEY", env={"FILE_KEY": "s3cret"})
    assert out.returncode == 0 and out.stdout.strip() == f"{keyed}  Doe_Jane/scan1.dcm"
    assert locate(keyed, "--key-env", "").returncode == 1  # another key: not found
    unset = locate("--key-env", "NOT_SET_ANYWHERE")
    assert unset.returncode == 2 and "NOT_SET_ANYWHERE is unset" in unset.stderr
