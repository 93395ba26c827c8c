"""Arrays too large for memory, on disk, read back a few rows at a time.

A `DiskArray` is one raw file of fixed-shape rows (images, latents, caption states). Indexing it with rows
reads only those rows (`os.pread`, so nothing stays mapped: a process's memory holds the batch, never the
array), and gives a torch tensor, so a trainer indexes it as it would a tensor. `write_disk_array` streams
rows into one, atomically.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from synthmed.core.io import atomic_path


def rows_per_batch(shape, elements: int = 2**21, most: int = 256) -> int:
    """Rows of ``shape[1:]`` per no-grad forward batch: input elements, not the row count, bound the activation
    memory (2**21: 256 images at 64 px, 10 at 256 px RGB)."""
    return max(1, min(most, elements // math.prod(shape[1:])))


class DiskArray:
    """Rows of ``shape[1:]`` and ``dtype`` in a raw file (row-major); ``a[rows]`` -> torch tensor."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: str = "uint8"):
        self.path, self.shape, self.dtype = Path(path).resolve(), tuple(int(x) for x in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        size = self.path.stat().st_size
        if size != self.row_bytes * self.shape[0]:
            raise ValueError(f"{self.path}: {size} bytes, expected {self.shape[0]} rows of {self.row_bytes}; "
                             "delete it (a cache, rebuilt on the next run)")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        if isinstance(index, slice) and index.step in (None, 1):  # consecutive rows: one read
            start, stop, _ = index.indices(len(self))
            return self._read_run(start, max(stop - start, 0))
        if isinstance(index, slice):
            rows = list(range(*index.indices(len(self))))
        else:
            index = torch.as_tensor(index)
            rows = (index.nonzero().reshape(-1) if index.dtype == torch.bool else index.reshape(-1)).tolist()
        n = len(self)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not rows:
            return torch.from_numpy(out)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            for k, i in enumerate(rows):
                if not -n <= i < n:
                    raise IndexError(f"row {i} of a {n}-row array ({self.path})")
                flat[k] = np.frombuffer(os.pread(fd, self.row_bytes, (i % n) * self.row_bytes), dtype=np.uint8)
        return torch.from_numpy(out)

    def _read_run(self, start: int, count: int) -> torch.Tensor:
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), count * self.row_bytes, start * self.row_bytes)
        return torch.from_numpy(np.frombuffer(bytearray(data), dtype=self.dtype).reshape(count, *self.shape[1:]))

class DiskArrayWriter:
    """Rows appended a batch at a time to a file written beside ``path`` and renamed on a clean exit (a killed
    writer leaves nothing); its shape and dtype go to ``path``.json. ``array`` is the result."""

    def __init__(self, path: str | Path, dtype: str):
        self.path, self.dtype, self.rows, self.row_shape, self.array = Path(path), np.dtype(dtype), 0, None, None

    def __enter__(self) -> "DiskArrayWriter":
        meta_path(self.path).unlink(missing_ok=True)  # an older array's shape never describes these rows
        self._stack = ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(self._tmp, "wb"))
        return self

    def append(self, batch) -> None:
        a = np.ascontiguousarray(batch.detach().cpu().numpy() if torch.is_tensor(batch) else batch, dtype=self.dtype)
        if self.row_shape is None:
            self.row_shape = a.shape[1:]
        elif a.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {a.shape[1:]} after rows of shape {self.row_shape}")
        self._file.write(a.tobytes())
        self.rows += len(a)

    def __exit__(self, *exc) -> bool:
        self._stack.__exit__(*exc)  # closes the file, then renames it into place (or removes it)
        if exc[0] is None:
            shape = (self.rows, *(self.row_shape or ()))
            with atomic_path(meta_path(self.path)) as tmp:
                tmp.write_text(json.dumps({"shape": list(shape), "dtype": str(self.dtype)}))
            self.array = DiskArray(self.path, shape, self.dtype)
        return False


def write_disk_array(path: str | Path, batches: Iterable, dtype: str) -> DiskArray:
    """Stream ``batches`` (tensors or arrays with equal row shapes) into a DiskArray at ``path``."""
    with DiskArrayWriter(path, dtype) as w:
        for batch in batches:
            w.append(batch)
    return w.array


def write_in_shares(paths: dict[str, Path], n: int, produce: Callable[[int, int], Iterable[tuple]]) -> list[DiskArray]:
    """DiskArrays of rows 0..n-1 at ``paths`` (path -> dtype), one per element of the tuples that
    ``produce(start, stop)`` yields for rows start..stop-1. In a data-parallel run (torch.distributed) each
    process produces a contiguous share into its own part files, and the main process joins the parts: no
    process encodes, or holds, another's rows."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0

    def write(where: list[Path], batches: Iterable[tuple]) -> list[DiskArray]:
        with ExitStack() as stack:
            writers = [stack.enter_context(DiskArrayWriter(w, dtype)) for w, dtype in zip(where, paths.values())]
            for batch in batches:
                for w, rows in zip(writers, batch):
                    w.append(rows)
        return [w.array for w in writers]

    if world == 1:
        return write(list(paths), produce(0, n))
    part = [path.with_name(f"{path.name}.part{rank}") for path in paths]
    write(part, produce(n * rank // world, n * (rank + 1) // world))
    dist.barrier()
    if rank == 0:
        shares = [[open_disk_array(path.with_name(f"{path.name}.part{r}")) for path in paths] for r in range(world)]
        step = rows_per_batch(max((a.shape for a in shares[0]), key=math.prod), elements=2**24, most=2**16)
        write(list(paths), (tuple(a[i:i + step] for a in arrays) for arrays in shares
                            for i in range(0, len(arrays[0]), step)))
        for arrays in shares:
            for a in arrays:
                a.path.unlink()
                meta_path(a.path).unlink()
    dist.barrier()
    return [open_disk_array(path) for path in paths]


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def open_disk_array(path: str | Path) -> DiskArray | None:
    """The DiskArray written at ``path``, or None when there is none (or only half of one)."""
    path = Path(path)
    if not (path.is_file() and meta_path(path).is_file()):
        return None
    meta = json.loads(meta_path(path).read_text())
    try:
        return DiskArray(path, meta["shape"], meta["dtype"])
    except ValueError:
        return None


class Rows:
    """A lazy selection of rows from one or more sources (DiskArrays or tensors) laid end to end.

    ``subset`` narrows it and ``+`` joins two, without reading anything; indexing (int, slice, index list or
    bool mask) reads just those rows and gives a tensor. Metrics and classifiers hold a `Rows` of a dataset's
    images where they would hold the images: memory holds the batch being read, never the set.
    """

    def __init__(self, *parts, index=None):
        """``parts`` laid end to end; ``index``: the positions selected (default all)."""
        if not parts or any(isinstance(p, Rows) for p in parts):
            raise TypeError("Rows(...) takes one or more DiskArrays or tensors; join Rows with +")
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        self.index = np.arange(self.offsets[-1]) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _positions(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return self.index[index]
        index = index.numpy() if torch.is_tensor(index) else np.asarray(index)
        return self.index[index.astype(bool) if index.dtype == bool else index.astype(np.int64)]

    def subset(self, index) -> "Rows":
        """The rows at ``index`` (positions or a bool mask), as a Rows: nothing is read."""
        return Rows(*self.parts, index=self._positions(index).reshape(-1))

    def __add__(self, other: "Rows") -> "Rows":
        if self.shape[1:] != other.shape[1:]:
            raise ValueError(f"cannot join rows of shape {self.shape[1:]} and {other.shape[1:]}")
        return Rows(*self.parts, *other.parts, index=np.concatenate([self.index, other.index + self.offsets[-1]]))

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = self._positions(index).reshape(-1)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        if len(np.unique(part)) <= 1:  # one source (the usual case): one read in the order asked
            k = int(part[0]) if len(part) else 0
            return self._read(k, rows - self.offsets[k])
        out = None
        for k in np.unique(part):
            at = np.flatnonzero(part == k)
            block = self._read(int(k), rows[at] - self.offsets[k])
            out = block.new_empty((len(rows), *block.shape[1:])) if out is None else out
            out[torch.from_numpy(at)] = block
        return out

    def _read(self, k: int, rows: np.ndarray) -> torch.Tensor:
        src = self.parts[k]
        if len(rows) and (np.diff(rows) == 1).all():  # consecutive rows: a slice (one read from disk)
            return src[int(rows[0]) : int(rows[-1]) + 1]
        return src[torch.from_numpy(rows)] if torch.is_tensor(src) else src[rows.tolist()]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The rows in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches(256):
            yield from batch


def as_rows(x) -> Rows:
    """``x`` (a tensor, a DiskArray or a Rows) as a Rows."""
    return x if isinstance(x, Rows) else Rows(x)
