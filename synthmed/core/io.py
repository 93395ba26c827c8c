"""Atomic, durable writes, file locks and hashing: a killed stage never leaves a half-written output."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import resource
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from synthmed.core.errors import PipelineError

_CHUNK = 1 << 20
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
_HOLDER_BYTES = 200


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hash of every file's relative path and content under ``root``, order-independent."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


MANIFEST = "metadata.csv"


def manifest_hash(root: str | Path) -> str | None:
    """The hash of a folder whose metadata.csv records every file's sha256 (what ingest writes), from that
    manifest and each file's name and size, without reading the images again; None for another folder.
    The files are checked against the manifest where they are decoded (synthmed.data.pixels)."""
    root = Path(root)
    meta = root / MANIFEST
    if not meta.is_file():
        return None
    with meta.open(encoding="utf-8") as f:
        if "sha256" not in f.readline().strip().split(","):
            return None
    h = hashlib.sha256(b"manifest")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(sha256_file(path).encode() if path == meta else str(path.stat().st_size).encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``target``, durably, and ``target`` is at every moment
    the old or the new output, whole, never neither (not even after a crash or a power cut).

    On success everything written is fsynced before the rename (a crash cannot leave a renamed but empty file), then:
    a file replaces a file in one ``os.replace``; a folder is swapped in one RENAME_EXCHANGE where the kernel and file
    system have it, else the old one is renamed aside, the new one in, and the old one removed. The parent folder is
    fsynced last. On any exception the temporary path is removed and ``target`` is untouched.

    A killed writer's leftovers (``.<name>.<random>.tmp`` beside the target) are cleared by the next writer of the
    target, which puts back an old folder that was renamed aside when no new one took its place. Each writer holds a
    lock on its temporary folder, so a live one (in any process) is never cleared: concurrent writers of one target
    (a cache entry) only race to the last rename, and each rename leaves a whole file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    tmp, lock = _locked_tmp(target)
    work = tmp / target.name
    if is_dir:
        work.mkdir()
    # inside another writer's temporary folder (a shard's image) that writer fsyncs the whole folder before its rename
    durable = not any(_leftover_of(part) for part in target.parent.parts)
    try:
        try:
            yield work
        except Exception as exc:
            refused = None if isinstance(exc, OSError) else _refused(work)
            if refused:  # torch and safetensors report a failed write without its errno or path
                raise OSError(refused, os.strerror(refused), str(target)) from exc
            raise
        if durable:
            _fsync_tree(work)
        _swap_in(work, target, tmp / f"~{target.name}")
        if durable:
            _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _refused(work: Path) -> int | None:
    """ENOSPC when the file system under ``work`` has no block left for us, EFBIG when a file written there
    reached the process's file-size limit (ulimit -f), else None: the cause of a writer's error without an errno."""
    try:
        if os.statvfs(work.parent).f_bavail == 0:
            return errno.ENOSPC
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        files = [work] if work.is_file() else [f for f in work.rglob("*") if f.is_file()]
        if limit != resource.RLIM_INFINITY and any(f.stat().st_size >= limit for f in files):
            return errno.EFBIG
    except OSError:
        pass
    return None


def _leftover_of(name: str) -> str | None:
    """The target name of a temporary folder ``.<name>.<random>.tmp`` (the random part has no dot), else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    stem, dot, _ = name[1:-4].rpartition(".")
    return stem if dot else None


def _locked_tmp(target: Path) -> tuple[Path, int]:
    """A new temporary folder beside ``target`` and the descriptor that holds its lock."""
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(OSError):  # no flock on this file system: leftovers are then never cleared
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # another writer cleared it as a leftover in the instant before the lock: make another


def _clear_leftovers(target: Path) -> None:
    with os.scandir(target.parent) as entries:
        leftovers = [Path(e.path) for e in entries if _leftover_of(e.name) == target.name
                     and e.is_dir(follow_symlinks=False)]
    for tmp in leftovers:
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # cleared by another writer meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its writer is alive: not ours to touch
        try:
            aside = tmp / f"~{target.name}"
            if os.path.lexists(aside) and not os.path.lexists(target):  # killed between the two renames of a swap
                os.rename(aside, target)
                _fsync(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)


def _swap_in(new: Path, target: Path, aside: Path) -> None:
    """Put ``new`` at ``target``; the old target (if any) ends up at ``new`` or ``aside``, to be removed."""
    for _ in range(100):  # only another writer of the same folder, renaming in between, makes a second pass
        try:
            os.replace(new, target)  # a file over a file, or anything where nothing is
            return
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _exchange(new, target):
            return
        try:
            os.rename(target, aside)  # from here until the next rename the old folder is whole, at ``aside``
        except FileNotFoundError:
            continue
        try:
            os.rename(new, target)
            return
        except OSError:
            if not os.path.lexists(target):
                os.rename(aside, target)  # put the old one back: never neither
                raise
            shutil.rmtree(aside)  # another writer's folder took the place meanwhile: replace it in turn
    raise OSError(errno.EBUSY, "kept being replaced by another writer", str(target))


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):  # a file system without fsync (some FUSE)
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (itself included), folders after what they hold."""
    if path.is_symlink() or not path.exists():
        return
    if path.is_dir():
        for folder, dirs, files in os.walk(path, topdown=False):
            for name in files:
                if not os.path.islink(os.path.join(folder, name)):
                    _fsync(Path(folder, name))
            _fsync(Path(folder))
    else:
        _fsync(path)


class FileLock:
    """An advisory lock (flock) on the file ``path``, shared or exclusive, held until `release` or the end of the
    process: the OS drops it when the process exits or is killed (SIGKILL too), so no stale lock outlives a run. The
    holder writes who it is into the file, for the line another process prints when it finds the lock taken."""

    def __init__(self, path: str | Path):
        self.path, self.fd, self.shared = Path(path), None, False

    def acquire(self, *, shared: bool = False, wait: bool = False, who: str = "", create: bool = True) -> bool:
        """Take the lock (waiting for it with ``wait``); False when another process holds it, or when ``create`` is
        False and there is no lock file."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            except FileNotFoundError:
                if not create:
                    return False
                self.path.parent.mkdir(parents=True, exist_ok=True)  # its folder was cleared: make it again
                continue
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as exc:  # ENOLCK: e.g. an NFS mount without a lock daemon
                os.close(fd)
                raise PipelineError(f"{self.path}: file locks do not work here ({exc.strerror}); put the local store "
                                    "on a file system that has them (SYNTHMED_STORE=/local/disk/path)") from None
            try:  # the file may have been removed (its folder cleared) between the open and the lock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            if not create:
                return False
        self.fd, self.shared = fd, shared
        if not (shared and self._named_alive()):  # a shared lock keeps naming its first live holder
            line = f"pid {os.getpid()} on {socket.gethostname()}" + (f" ({who})" if who else "")
            os.pwrite(fd, line.encode()[:_HOLDER_BYTES].ljust(_HOLDER_BYTES), 0)  # one write: never half a line
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("another process" where the one named has exited)."""
        return self._line() if self._named_alive() is not False else "another process"

    def _line(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace").strip()
        except OSError:
            return ""

    def _named_alive(self) -> bool | None:
        """Whether the process the file names is alive (None: not known, e.g. on another host)."""
        words = self._line().split()
        if len(words) < 4 or words[0] != "pid" or not words[1].isdigit():
            return False
        if words[3] != socket.gethostname():
            return None
        try:
            os.kill(int(words[1]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_metrics(stage: str, metrics: dict, headline: list[str]) -> None:
    """``metrics/<stage>.json``: the headline figures, one `dvc exp show` column each;
    ``metrics/all/<stage>.json``: every figure (declared as an output, not as metrics, so that the
    experiment table stays a screen wide)."""
    write_json(Path("metrics/all") / f"{stage}.json", metrics)
    write_json(Path("metrics") / f"{stage}.json", {k: metrics[k] for k in headline if k in metrics})


def write_csv(path: str | Path, frame, float_format: str | None = "%.6g") -> None:
    """A table (a pandas DataFrame) as CSV, atomically, without the index; floats to 6 significant digits (the
    exact figures are in the metrics JSON)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)


def read_table(path: str | Path):
    """A CSV as text, cell for cell: no type guessing and no NaN for empty cells (captions, file names and 63-bit
    seeds stay as written)."""
    import pandas as pd  # here: the stages that never read a table start faster

    return pd.read_csv(path, dtype=str, keep_default_na=False)
