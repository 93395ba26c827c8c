"""DICOM folders: every file under ``ingest.path``, one Sample per image frame.

Privacy comes first. Captions are built only from whitelisted, non-identifying
attributes; file names, groups and sources are pseudonyms; problems name a file
by its pseudonym, never by its path (real exports put patient names and record
numbers in paths). ``python -m synthmed.data.dicom FOLDER [ID] [--key-env NAME]``
maps pseudonyms back to paths on the machine that holds the data.

A path never determines a public name on its own. A file's name is, with the
secret in the environment variable ``ingest.dicom.group_salt_env`` names, a keyed
digest (HMAC-SHA256) of its relative path: stable across versions of the dataset,
and a guessed path cannot be confirmed without the secret. Without a secret it is
the SHA-256 of the file's bytes (nothing about the path; a file's bytes are not
guessable), and a file that cannot be read at all is named by its position in
the sorted listing, ``dicom_unreadable-0003``. A plain digest of the path would be
reversed by hashing candidate paths (names, record numbers, dates).

Groups are the leakage unit, the patient: a keyed digest (HMAC) of PatientID, so
that two series or studies of one patient never straddle a split. An unkeyed
digest of an ID from a small space (a 7-digit MRN) is reversed by hashing every
candidate, so the key is one no output holds: by default a digest of the bytes of
every file read (anyone who can recompute it holds the IDs anyway; a changed or
added file changes every pseudonym and so the deal of groups to splits), or the
same secret as above, for pseudonyms stable across versions of the dataset. Keep
that secret out of the repository: with it, a guessed ID or path can be
confirmed. Without PatientID a file is grouped by study, else series, else file,
and counted in the metrics and the card.

Burned-in text: a file flagged ``BurnedInAnnotation=YES`` is always refused; by
default (``ingest.dicom.burned_in: require_no``) so is one without an explicit NO,
since most exports leave the tag out; ``allow_missing`` keeps those once the user
has looked at the pixels. docs/deidentification.md compares all this with the
DICOM PS3.15 Basic Application Level Confidentiality Profile.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import math
import os
import re
import string
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from synthmed.data.decode import map_ordered, processes
from synthmed.data.problems import Problem, Problems
from synthmed.data.sample import Sample
from synthmed.data.spill import PixelSpill
from synthmed.data.transforms import prepare, to_uint8
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_bytes

FIELDS = ("modality", "body_part", "view", "laterality", "rows", "columns")
DEFAULT_TEMPLATE = "{modality} image of the {body_part}{view}"
PERCENTILES = (0.5, 99.5)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
LATERALITY = {"L": "left", "R": "right", "B": "bilateral"}
_CODE = re.compile(r"[A-Z0-9 _]{1,16}")  # the DICOM Code String alphabet
SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                         "YBR_PARTIAL_420"}  # pydicom hands the colour ones back as RGB
KNOWN_PHOTOMETRIC = SUPPORTED_PHOTOMETRIC | {"PALETTE COLOR", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK", "XYB"}
BURNED_IN = ("require_no", "allow_missing")  # what a file without BurnedInAnnotation=NO gets
_EXAMPLE = {"modality": "CT", "body_part": "chest", "view": "PA", "laterality": "left", "rows": 512, "columns": 512}


@dataclass
class DicomParams:
    window: str = "auto"  # auto | percentile | "<center>,<width>" e.g. "40,400"
    caption_template: str = DEFAULT_TEMPLATE  # str.format over FIELDS
    label_field: str = ""  # "" or one of FIELDS; the label takes the plain value ("chest", "PA")
    group_salt_env: str = ""  # "" or an environment variable holding the key of the file and patient pseudonyms
    burned_in: str = "require_no"  # require_no: keep only files flagged NO | allow_missing: a missing flag passes

    def __post_init__(self) -> None:
        parse_window(self.window)
        check_template(self.caption_template)
        if self.burned_in not in BURNED_IN:
            raise PipelineError(f"ingest.dicom.burned_in: unknown value {self.burned_in!r}; use require_no (keep only "
                                "files flagged BurnedInAnnotation=NO) or allow_missing (a file without the flag passes)")
        if self.label_field not in ("",) + FIELDS:
            raise PipelineError(
                f"ingest.dicom.label_field: unknown field '{self.label_field}'; use \"\" or one of {', '.join(FIELDS)}"
            )


def parse_window(text: str) -> str | tuple[float, float]:
    """Return "auto", "percentile" or the (low, high) range of "<center>,<width>"."""
    t = str(text).strip().lower()
    if t in ("auto", "percentile"):
        return t
    try:
        center, width = (float(x) for x in t.split(","))
    except ValueError:
        center, width = math.nan, math.nan
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise PipelineError(
            f"ingest.dicom.window: {text!r} is not valid; use auto, percentile or \"<center>,<width>\" "
            "with a positive width, e.g. \"40,400\""
        )
    return center - width / 2, center + width / 2


def check_template(template: str) -> None:
    """Only whitelisted fields may reach a caption: anything else stops before reading a file."""
    allowed = ", ".join(FIELDS)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise PipelineError(f"ingest.dicom.caption_template: malformed ({exc}); allowed fields: {allowed}") from None
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise PipelineError(
            f"ingest.dicom.caption_template: unknown field(s) {', '.join(repr(n) for n in unknown)}; "
            f"allowed fields: {allowed}"
        )
    try:  # format specs are checked on example values, e.g. "{rows:d}" is fine, "{modality:d}" is not
        text = template.format(**_render(_EXAMPLE))
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"ingest.dicom.caption_template: {exc}; allowed fields: {allowed}") from None
    if not text.strip():
        raise PipelineError(f"ingest.dicom.caption_template: gives an empty caption; "
                            f"use e.g. {DEFAULT_TEMPLATE!r}; allowed fields: {allowed}")


def _os_clutter(rel: Path) -> bool:
    """Hidden files and folders (.DS_Store, .git) and Thumbs.db are not part of an export."""
    return rel.name == "Thumbs.db" or any(part.startswith(".") for part in rel.parts)


def dicom_files(folder: Path) -> list[Path]:
    """The files read, sorted: read_dicom and the locator list the same ones, so positions agree."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.rglob("*") if f.is_file() and not _os_clutter(f.relative_to(folder)))


def secret_from_env(salt_env: str) -> str:
    """The key of the pseudonyms: "" when ``salt_env`` is ""; an unset or empty variable stops here."""
    secret = os.environ.get(salt_env, "") if salt_env else ""
    if salt_env and not secret:
        raise PipelineError(f"ingest.dicom.group_salt_env: the environment variable {salt_env} is unset or empty; "
                            "export the secret key, or set the param to \"\" to key by the files' bytes")
    return secret


def read_dicom(folder: str | Path, p: DicomParams, *, resolution: int, crop: str, channels: int,
               problems: Problems, workers: int = 0) -> list[Sample]:
    """Read every file under ``folder`` (recursively, sorted); bad files go to ``problems``.

    Files are decoded over ``workers`` processes (0: one per core; a few files: this one); the pseudonyms
    and the problems are dealt with here, in file order, so the result is the same whatever the number.
    """
    folder = Path(folder)
    window = parse_window(p.window)
    check_template(p.caption_template)
    paths = dicom_files(folder)
    if not paths:
        raise PipelineError("ingest.path: the DICOM folder is missing or has no files; "
                            "point it at a folder of DICOM files")
    pseudonyms = Pseudonyms(p.group_salt_env)  # an unset variable stops here, before any file is read
    n = processes(len(paths), workers)
    jobs = [(path, path.relative_to(folder).as_posix(), index, pseudonyms.secret, p, window, resolution, crop,
             channels, n == 1) for index, path in enumerate(paths)]
    samples: list[Sample] = []
    first_of: dict[str, str] = {}  # sha256 of a file's bytes -> the id of the first file with them
    spill = PixelSpill()
    with contextlib.closing(map_ordered(_read_job, jobs, n, desc="dicom")) as results:
        for (path, *_), got in zip(jobs, results):
            for item in got.problems:  # raises at the first one under on_error: fail
                problems.report(item.reason, item.message, file=item.file)
            if got.unit is None:
                continue
            digest = got.digest
            if digest in first_of:  # a copy adds nothing, and without a secret it would reuse the first's name
                problems.report("duplicate_file", f"{_ref(got.fid)}: a byte-identical copy of DICOM file "
                                f"{first_of[digest]}; remove one of the copies", file=got.fid)
                continue
            first_of[digest] = got.fid
            if got.data is None and not pseudonyms.secret:  # read in a worker: read again, not sent back
                got.data = _read_again(path, got.fid, got.stamp)
            group = pseudonyms.placeholder(got.unit, got.data)
            for s in got.samples:
                s.group, s.pixels = group, spill.put(s.pixels)
            samples += got.samples
    pseudonyms.apply(samples)
    return samples


class Pseudonyms:
    """Groups: keyed digests of each file's patient (else study, series, file); see the module docstring.

    The default key digests every file's bytes, so it is known only after the last file: files get a
    placeholder first, and ``apply`` swaps in the digests.
    """

    def __init__(self, salt_env: str = "") -> None:
        self.secret = secret_from_env(salt_env)
        self.content = hashlib.sha256()
        self.units: dict[tuple[str, str], str] = {}

    def placeholder(self, unit: tuple[str, str], data: bytes | None) -> str:
        """Called in file order with each usable file's unit and bytes (None only where a secret is the key)."""
        if data is not None:
            self.content.update(data)
        return self.units.setdefault(unit, f"pending-{len(self.units)}")

    def apply(self, samples: list[Sample]) -> None:
        key = self.secret.encode() if self.secret else self.content.digest()
        final = {token: f"{kind}-" + hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]
                 for (kind, value), token in self.units.items()}
        for s in samples:
            s.group = final[s.group]


def _unit(ds: pydicom.Dataset, rel: str) -> tuple[str, str]:
    """The leakage unit of a file: its patient, else (no PatientID) its study, series or the file itself."""
    for kind, keyword in (("patient", "PatientID"), ("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        value = str(_get(ds, keyword) or "").strip()
        if value:
            return kind, value
    return "file", rel


def without_patient_id(samples: list[Sample]) -> int:
    """Images grouped by study, series or file: two studies of their patient may straddle a split."""
    return sum(1 for s in samples if not s.group.startswith("patient-"))


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns about and logs malformed values verbatim, and those can be names: mute both."""
    log = logging.getLogger("pydicom")
    was_disabled, log.disabled = log.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.disabled = was_disabled


def file_id(rel: str, digest: str | None, secret: str = "", index: int = 0) -> str:
    """Public name of a file (see the module docstring): HMAC-SHA256 of its path relative to the DICOM folder
    under ``secret``; without one the SHA-256 ``digest`` of its bytes, or, unreadable (None), its ``index`` in
    the sorted listing. Never an unkeyed digest of the path."""
    if secret:  # "path:" keeps these apart from the groups' "file:<path>" under the same key
        return "dicom_" + hmac.new(secret.encode(), f"path:{rel}".encode(), hashlib.sha256).hexdigest()[:16]
    if digest is not None:
        return "dicom_" + digest[:16]
    return f"dicom_unreadable-{index:04d}"


def _ref(fid: str) -> str:
    return f"DICOM file {fid} (see its path with: python -m synthmed.data.dicom <ingest.path> {fid})"


@dataclass
class _Read:
    """One file's outcome, made where it is decoded (perhaps a worker) for read_dicom to take in file order."""
    samples: list[Sample] = field(default_factory=list)  # group still unset
    problems: list[Problem] = field(default_factory=list)
    unit: tuple[str, str] | None = None  # the leakage unit; None when the file gave no samples
    fid: str = ""  # the file's public name
    digest: str = ""  # sha256 of the file's bytes
    data: bytes | None = None  # the file's bytes, for the default key: kept only when read in read_dicom's process
    stamp: tuple[int, int] = (0, 0)  # size and mtime_ns as read


def _read_job(job: tuple) -> _Read:
    """Read one file with pydicom muted (in a worker too), its problems recorded for read_dicom to report."""
    path, rel, index, secret, p, window, resolution, crop, channels, keep_bytes = job
    problems = Problems("skip")
    with _quiet_pydicom():
        got = _read_file(path, rel, index, secret, p, window, resolution, crop, channels, problems)
    got.problems = problems.items
    if not keep_bytes:
        got.data = None  # sending every file's bytes back would cost more than reading them again
    return got


def _read_again(path: Path, fid: str, stamp: tuple[int, int]) -> bytes:
    """The bytes a worker decoded, for the default key; a file changed in between would key other bytes."""
    try:
        with path.open("rb") as f:
            st, data = os.fstat(f.fileno()), f.read()
        same = (st.st_size, st.st_mtime_ns) == stamp and len(data) == stamp[0]
    except OSError:
        same = False
    if not same:
        raise PipelineError(f"{_ref(fid)}: changed or removed while ingest read it; "
                            "rerun ingest once the export is complete")
    return data


def _read_file(path: Path, rel: str, index: int, secret: str, p: DicomParams, window: str | tuple[float, float],
               resolution: int, crop: str, channels: int, problems: Problems) -> _Read:
    try:
        with path.open("rb") as f:
            data, st = f.read(), os.fstat(f.fileno())
    except OSError as exc:  # str(exc) would quote the path
        fid = file_id(rel, None, secret, index)
        problems.report("unreadable_file", f"{_ref(fid)}: cannot read ({exc.strerror}); check its permissions",
                        file=fid)
        return _Read()
    digest = sha256_bytes(data)
    fid = file_id(rel, digest, secret, index)
    ref = _ref(fid)
    try:  # parse from memory so no pydicom message can quote the path
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception:  # InvalidDicomError, or any parse failure of a damaged header
        problems.report("not_dicom", f"{ref}: not a DICOM file (or its header is damaged); "
                        "remove it from the folder or re-export it as DICOM", file=fid)
        return _Read()
    if str(_get(ds.file_meta, "MediaStorageSOPClassUID")) == DICOMDIR_SOP_CLASS:
        return _Read()
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        problems.report("no_pixel_data", f"{ref}: DICOM without pixel data (a report, structured document or "
                        "presentation state?); remove it from the folder", file=fid)
        return _Read()
    burned_in = _code(ds, "BurnedInAnnotation")
    if burned_in == "YES":
        problems.report("burned_in_annotation", f"{ref}: flagged BurnedInAnnotation=YES, its pixels may show "
                        "patient details; remove it or export a de-identified copy", file=fid)
        return _Read()
    if burned_in != "NO" and p.burned_in == "require_no":  # most exports leave the flag out: unknown, not clean
        problems.report("burned_in_unknown", f"{ref}: no BurnedInAnnotation=NO, its pixels may show patient "
                        "details; check the pixels, then set ingest.dicom.burned_in: allow_missing", file=fid)
        return _Read()
    photometric = _code(ds, "PhotometricInterpretation")
    if photometric not in SUPPORTED_PHOTOMETRIC:
        shown = photometric if photometric in KNOWN_PHOTOMETRIC else "missing or unrecognised"  # never echo free text
        problems.report("unsupported_image", f"{ref}: PhotometricInterpretation {shown} is not supported; "
                        "convert it to MONOCHROME2 or RGB", file=fid)
        return _Read()
    try:
        frames = _frames(ds, photometric, window, channels)
    except Exception as exc:  # decoders raise many types; their text names the codec or a size
        syntax = _get(ds.file_meta, "TransferSyntaxUID")
        name = getattr(syntax, "name", "unknown transfer syntax")
        # one line, and quoted values dropped: a malformed element is quoted in conversion errors
        detail = re.sub(r"'[^']*'", "'...'", " ".join(str(exc).split()))
        problems.report("corrupt_image", f"{ref}: cannot decode its pixels ({name}: {detail}); "
                        "install a decoder for it (e.g. pylibjpeg) or re-export uncompressed", file=fid)
        return _Read()

    plain = _plain_fields(ds)
    caption = p.caption_template.format(**_render(plain)).strip()
    if not caption:  # e.g. a template of "{view}" on a file without a view
        problems.report("empty_caption", f"{ref}: ingest.dicom.caption_template gives an empty caption for it; "
                        "add a field it has, e.g. {modality}", file=fid)
        return _Read()
    out = []
    for k, frame in enumerate(frames, start=1):
        pixels = prepare(frame, resolution, crop)
        if channels == 3 and pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        suffix = f"_f{k:03d}" if len(frames) > 1 else ""  # 1-based, like DICOM frame numbers
        out.append(Sample(
            file_name=f"{fid}{suffix}.png",
            pixels=pixels,
            captions=[caption],
            group="",  # set by read_dicom: every frame, slice, series and study of a patient stays together
            label=str(plain[p.label_field]) if p.label_field else "",
            source="dicom:" + fid.removeprefix("dicom_"),
            source_sha256=digest,
        ))
    return _Read(out, unit=_unit(ds, rel), fid=fid, digest=digest, data=data, stamp=(st.st_size, st.st_mtime_ns))


def _frames(ds: pydicom.Dataset, photometric: str, window: str | tuple[float, float],
            channels: int) -> list[np.ndarray]:
    """Decoded frames as uint8 (H, W) or (H, W, 3), before squaring and resizing."""
    arr = ds.pixel_array  # YBR is converted to RGB here
    if _get(ds, "SamplesPerPixel") == 3:
        high = 255 if arr.dtype == np.uint8 else 2 ** int(ds.BitsStored) - 1
        rgb = to_uint8(arr, 0, high)  # colour has no modality LUT or window: just scale the bit depth
        frames = list(rgb) if rgb.ndim == 4 else [rgb]
        return frames if channels == 3 else [np.asarray(Image.fromarray(f).convert("L")) for f in frames]
    values = apply_modality_lut(arr, ds).astype(np.float64)
    low, high = _range(values, ds, window)
    grey = to_uint8(values, low, high)
    if photometric == "MONOCHROME1":  # low values are white there: invert so bright = dense everywhere
        grey = 255 - grey
    return list(grey) if grey.ndim == 3 else [grey]


def _range(values: np.ndarray, ds: pydicom.Dataset, window: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(window, tuple):
        return window
    if window == "auto":
        center, width = _first(_get(ds, "WindowCenter")), _first(_get(ds, "WindowWidth"))
        if center is not None and width is not None and width > 0:
            return center - width / 2, center + width / 2
    low, high = np.percentile(values, PERCENTILES)  # over all frames, so slices of one file match
    return float(low), float(high)


def _get(ds: pydicom.Dataset, keyword: str) -> object:
    """An element's value, or None when absent or malformed (conversion errors quote the raw value)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued DS element, or None."""
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _code(ds: pydicom.Dataset, *keywords: str) -> str:
    """First valid Code String among ``keywords``; anything else (e.g. a name typed into the tag) is dropped."""
    for kw in keywords:
        value = _get(ds, kw)
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0] if len(value) else ""
        text = str(value or "").strip().upper()
        if _CODE.fullmatch(text):
            return text
    return ""


def _plain_fields(ds: pydicom.Dataset) -> dict[str, object]:
    """The whitelisted fields as plain values; these are also the label values."""
    return {
        "modality": _code(ds, "Modality") or "unknown",
        "body_part": _code(ds, "BodyPartExamined").lower().replace("_", " ") or "unknown",
        "view": _code(ds, "ViewPosition") or "unknown",
        "laterality": LATERALITY.get(_code(ds, "ImageLaterality", "Laterality"), "unknown"),
        "rows": int(ds.Rows),  # binary US, always valid once the pixels decoded
        "columns": int(ds.Columns),
    }


def _render(plain: dict[str, object]) -> dict[str, object]:
    """Template values: view and laterality read naturally or vanish when unknown."""
    view, side = plain["view"], plain["laterality"]
    return {
        **plain,
        "body_part": "unknown body part" if plain["body_part"] == "unknown" else plain["body_part"],
        "view": f", {view} view" if view != "unknown" else "",
        "laterality": f"{side} " if side != "unknown" else "",
    }


def _default_key_env() -> str:
    """ingest.dicom.group_salt_env of ./params.yaml, so that the locator keys ids as ingest did."""
    try:
        import yaml

        return str(yaml.safe_load(Path("params.yaml").read_text())["ingest"]["dicom"].get("group_salt_env") or "")
    except (OSError, KeyError, TypeError, ValueError):
        return ""


def locate(folder: Path, wanted: str = "", key_env: str = "") -> list[tuple[str, str]]:
    """(id, relative path) of every file read_dicom reads, ids computed as read_dicom does; only ``wanted``'s
    when given (byte-identical copies share an id without a key)."""
    secret, out = secret_from_env(key_env), []
    for index, f in enumerate(dicom_files(folder)):
        rel = f.relative_to(folder).as_posix()
        try:
            digest = None if secret else sha256_bytes(f.read_bytes())
        except OSError:
            digest = None
        fid = file_id(rel, digest, secret, index)
        if not wanted or fid == wanted:
            out.append((fid, rel))
    return out


def main(argv: list[str] | None = None) -> int:
    """Local use only: prints real paths."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m synthmed.data.dicom",
                                     description="List 'id  relative/path' for the files of a DICOM folder.")
    parser.add_argument("folder", type=Path, help="the folder ingest.path names")
    parser.add_argument("id", nargs="?", default="", help="print only this id's file(s)")
    parser.add_argument("--key-env", default=None, metavar="NAME",
                        help="the environment variable with the secret key, as ingest.dicom.group_salt_env "
                             "(default: that param in ./params.yaml); \"\" for ids from the files' bytes")
    args = parser.parse_args(argv)
    key_env = _default_key_env() if args.key_env is None else args.key_env
    try:
        found = locate(args.folder, args.id, key_env)
    except PipelineError as exc:
        print(exc, file=sys.stderr)
        return 2
    for fid, rel in found:
        print(f"{fid}  {rel}")
    return 0 if found or not args.id else 1


if __name__ == "__main__":
    sys.exit(main())
