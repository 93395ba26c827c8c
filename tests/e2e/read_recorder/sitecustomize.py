"""Imported by every Python process started with this folder on PYTHONPATH (tests/e2e/test_scale.py): records
the most rows one read of a DiskArray gave and the most images one `load_images` call decoded into memory, and
at exit appends them, with the stage's name, as a JSON line to $SYNTHMED_READ_LOG. Nothing is imported or
patched until the process itself imports those modules (DVC's own process never does)."""

import atexit
import importlib.abc
import json
import os
import sys
from pathlib import Path

most = {"reads": 0, "disk_rows": 0, "loaded_images": 0}


def _disk_array(module) -> None:
    read = module.DiskArray.__getitem__

    def counted(self, index):
        out = read(self, index)
        most["reads"] += 1
        most["disk_rows"] = max(most["disk_rows"], len(out) if out.ndim == len(self.shape) else 1)
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
    if most["reads"] or most["loaded_images"]:
        with open(os.environ["SYNTHMED_READ_LOG"], "a") as f:
            f.write(json.dumps({"stage": Path(sys.argv[0]).stem, **most}) + "\n")


if os.environ.get("SYNTHMED_READ_LOG"):
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write)
