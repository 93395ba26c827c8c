"""Bad input, collected or raised: `ingest.on_error: fail | skip`.

Every problem names the file, the row (1-based line of the metadata file, the
header being line 1) and the fix. Under `fail` the first one stops the stage
before anything is written; under `skip` the row is dropped and the problem goes
to a report that is a DVC output.

Findings that drop nothing (near-duplicate images across splits) are ``note``d:
they go to the same report under either mode and are not counted as dropped rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path


@dataclass
class Problem:
    file: str
    row: int | None
    reason: str  # short code, e.g. missing_image, corrupt_image, empty_caption
    message: str


class Problems:
    def __init__(self, on_error: Literal["fail", "skip"] = "fail"):
        self.on_error = on_error
        self.items: list[Problem] = []  # dropped rows
        self.notes: list[Problem] = []  # findings that drop nothing

    def report(self, reason: str, message: str, *, file: str | Path, row: int | None = None) -> None:
        """Raise under `fail`; record under `skip` (the caller then drops the row)."""
        if self.on_error == "fail":
            raise PipelineError(message)
        self.items.append(Problem(str(file), row, reason, message))

    def note(self, reason: str, message: str, *, file: str | Path, row: int | None = None) -> None:
        """Record a finding under either mode: it is a report, not a bad row, so `fail` does not stop on it."""
        self.notes.append(Problem(str(file), row, reason, message))

    def counts(self) -> dict[str, int]:
        """Dropped rows by reason (notes are not dropped)."""
        out: dict[str, int] = {}
        for p in self.items:
            out[p.reason] = out.get(p.reason, 0) + 1
        return out

    def write(self, path: str | Path) -> None:
        frame = pd.DataFrame([asdict(p) for p in self.items + self.notes], columns=["file", "row", "reason", "message"])
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)


def where(file: str | Path, row: int | None = None) -> str:
    return f"{file}, row {row}" if row is not None else str(file)
