"""Imported by every Python process started with this folder on PYTHONPATH (tests/e2e/test_scale.py): records
the most rows one read of a DiskArray gave and the most images one `load_images` call decoded into memory, and
at exit appends them, with the stage's name, as a JSON line to $SYNTHMED_READ_LOG; with $SYNTHMED_READ_ROWS,
also every row list read from a DiskArray, in order, with the process's RANK (tests/e2e/test_data_parallel.py).
Nothing is imported or patched until the process itself imports those modules (DVC's own process never does)."""

import atexit
import importlib.abc
import json
import os
import sys
from pathlib import Path

most = {"reads": 0, "disk_rows": 0, "loaded_images": 0}
rows_read: list = []


def _disk_array(module) -> None:
    read = module.DiskArray.__getitem__

    def counted(self, index):
        out = read(self, index)
        most["reads"] += 1
        most["disk_rows"] = max(most["disk_rows"], len(out) if out.ndim == len(self.shape) else 1)
        if os.environ.get("SYNTHMED_READ_ROWS") and out.ndim == len(self.shape):  # (an int index reads a list)
            rows = list(range(*index.indices(len(self)))) if isinstance(index, slice) else (
                index.tolist() if hasattr(index, "tolist") else list(index))
            rows_read.append([Path(self.path).name, rows])
        return out

    module.DiskArray.__getitem__ = counted


def _imagefolder(module) -> None:
    load = module.load_images

    def counted(folder, file_names):
        most["loaded_images"] = max(most["loaded_images"], len(file_names))
        return load(folder, file_names)

    module.load_images = counted


PATCHES = {"synthmed.data.disk_array": _disk_array, "synthmed.data.imagefolder": _imagefolder}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s), None)
        if spec is not None:
            run = spec.loader.exec_module
            spec.loader.exec_module = lambda module: (run(module), PATCHES[name](module))
        return spec


def _write() -> None:
    if (most["reads"] or most["loaded_images"]) and os.environ.get("SYNTHMED_READ_LOG"):
        with open(os.environ["SYNTHMED_READ_LOG"], "a") as f:
            f.write(json.dumps({"stage": Path(sys.argv[0]).stem, **most}) + "\n")
    if rows_read and os.environ.get("SYNTHMED_READ_ROWS"):
        with open(os.environ["SYNTHMED_READ_ROWS"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "reads": rows_read}) + "\n")


if os.environ.get("SYNTHMED_READ_LOG") or os.environ.get("SYNTHMED_READ_ROWS"):
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write)
