"""Features extracted once per image, keyed by the sha256 of its pixels, shared by every metric.

The cache is one file per feature extractor and records a key of everything that shapes a
feature: the extractor's weights, the code of its modules (preprocessing included) and of the
extraction loop, and their plain settings (e.g. input size). Reruns (new synthetic sets, new params)
only embed images not seen before; a change to any of those starts the cache afresh.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch
from torch import nn

from synthmed.data.disk_array import as_rows
from synthmed.core.io import atomic_path, sha256_bytes
from synthmed.metrics.fidelity import extract_features
from synthmed.core.runtime import release_free_memory

CHUNK = 512  # images read (and hashed) at a time: a multiple of the extraction batch, so batches are as before


def pixel_keys(images_uint8: torch.Tensor) -> list[str]:
    return [sha256_bytes(str(tuple(x.shape)).encode() + x.numpy().tobytes()) for x in images_uint8]


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined where no source is kept
        return getattr(obj, "__qualname__", repr(obj))


def extractor_key(extractor: nn.Module) -> str:
    """Hash of the weights, module code and plain settings of ``extractor``, and of the extraction loop."""
    h = hashlib.sha256(_source(extract_features).encode())
    for name, tensor in extractor.state_dict().items():
        h.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    for name, module in extractor.named_modules():
        cls = type(module)
        own = not cls.__module__.startswith("torch.")
        settings = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, tuple))}
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__}:{sorted(settings.items())}".encode())
        if own:
            h.update(_source(cls).encode())
    return h.hexdigest()


class FeatureCache:
    def __init__(self, path: str | Path, extractor: nn.Module, batch_size: int = 16):
        # 16 per forward pass: at 224 px a quarter of 64's activation peak (0.7 against 1.5 GB of RSS), and
        # faster on a 2-core CPU; EfficientNet-Lite0's features here are the same bits at any batch size
        self.path, self.extractor, self.batch_size = Path(path), extractor, batch_size
        self.extractor_sha = extractor_key(extractor)
        saved = torch.load(self.path) if self.path.is_file() else {}
        # float32, the extractor's own precision (metrics compute in float64 from it: the same values, half the memory)
        self.store: dict[str, torch.Tensor] = {k: v.float() for k, v in saved["features"].items()} \
            if saved.get("extractor") == self.extractor_sha else {}
        self.computed = 0

    def __call__(self, images_uint8) -> torch.Tensor:
        """[N, D] float32 features of uint8 images [N, C, H, W] (a tensor, DiskArray or Rows, read ``CHUNK``
        rows at a time); new images are embedded once."""
        keys = []
        for chunk in as_rows(images_uint8).batches(CHUNK):
            chunk_keys = pixel_keys(chunk)
            missing = [i for i, k in enumerate(chunk_keys) if k not in self.store]
            if missing:
                # one float32 block per chunk, its rows the cache's entries: no small tensor between the
                # extractor's large activations (the heap would fragment and RSS creep with the set size)
                feats = extract_features(self.extractor, chunk[missing], self.batch_size).float()
                self.store.update(zip([chunk_keys[i] for i in missing], feats))
                release_free_memory()
                self.computed += len(missing)
            keys += chunk_keys
        return torch.stack([self.store[k] for k in keys]) if keys else torch.zeros(0)

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"extractor": self.extractor_sha, "features": self.store}, tmp)
