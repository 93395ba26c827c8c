"""Imported by every Python process started with this folder on PYTHONPATH (benchmarks/scale.py on a GPU): at
exit, a process that used CUDA appends its peak allocated and reserved GPU memory, with its stage's name, as a
JSON line to $SYNTHMED_GPU_PEAK."""

import atexit
import json
import os
import sys
from pathlib import Path


def _write() -> None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    with open(os.environ["SYNTHMED_GPU_PEAK"], "a") as f:
        f.write(json.dumps({"stage": Path(sys.argv[0]).stem,
                            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3)}) + "\n")


if os.environ.get("SYNTHMED_GPU_PEAK"):
    atexit.register(_write)
