"""Images and latents on disk, read a batch at a time: what a trainer reads equals what it would have held in
memory, and it never reads more rows at once than a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from synthmed.data.dataset import split_stack, to_model_range
from synthmed.data.disk_array import DiskArray, Rows, open_disk_array, write_disk_array, write_in_shares
from synthmed.data.imagefolder import load_images
from synthmed.core.errors import PipelineError
from synthmed.models.autoencoder import (encode_batch_size, encode_posterior, posterior_sample_rows, reconstruct,
                                         reconstruction_metrics, train_autoencoder, validate)
from tests.helpers import tiny_vae, vae_train_config, write_imagefolder


class CountingArray(DiskArray):
    """A DiskArray that remembers the most rows one read asked for."""
    most = 0

    def __getitem__(self, index):
        out = super().__getitem__(index)
        CountingArray.most = max(CountingArray.most, len(out) if out.ndim == len(self.shape) else 1)
        return out


def test_rows_written_in_batches_read_back_by_any_index(tmp_path):
    data = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)
    a = write_disk_array(tmp_path / "x.f32", (data[i : i + 3] for i in range(0, 7, 3)), "float32")
    assert a.shape == (7, 2, 3) and len(a) == 7 and a.ndim == 3
    assert torch.equal(a[[4, 0, 4]], torch.from_numpy(data[[4, 0, 4]]))
    assert torch.equal(a[2:6], torch.from_numpy(data[2:6])) and torch.equal(a[-1], torch.from_numpy(data[-1]))
    assert torch.equal(a[torch.tensor([[1], [6]])], torch.from_numpy(data[[1, 6]]))
    mask = np.array([True, False, False, True, False, False, True])
    assert torch.equal(a[mask], torch.from_numpy(data[mask]))
    assert torch.equal(torch.cat(list(Rows(a).batches(4))), torch.from_numpy(data))
    with pytest.raises(IndexError, match="row 7 of a 7-row array"):
        a[[7]]
    assert open_disk_array(tmp_path / "x.f32").shape == a.shape
    (tmp_path / "x.f32").write_bytes(b"\0" * 5)  # truncated: not an array, rebuilt by its owner
    assert open_disk_array(tmp_path / "x.f32") is None and open_disk_array(tmp_path / "nothing") is None


def test_a_killed_writer_leaves_nothing(tmp_path):
    def rows():
        yield np.zeros((2, 3), np.uint8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_disk_array(tmp_path / "x.u8", rows(), "uint8")
    assert list(tmp_path.iterdir()) == []


def _write_shares(rank: int, world: int, folder: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for n in (5, 1):  # uneven shares; with one row, rank 0's share is empty
        produced, out = [], Path(folder) / str(n)

        def produce(start, stop):
            produced.append((start, stop))
            for i in range(start, stop, 2):  # row i holds i, and -i in the second array
                rows = torch.arange(i, min(i + 2, stop))
                yield rows.float()[:, None].expand(-1, 3), -rows

        a, b = write_in_shares({out / "a.f32": "float32", out / "b.i64": "int64"}, n, produce)
        (Path(folder) / f"{n}-rank{rank}.txt").write_text(f"{produced} {a[:][:, 0].tolist()} {b[:].tolist()}")
    dist.destroy_process_group()


def test_shares_written_by_each_process_join_into_one_array(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for n in (5, 1):
        (tmp_path / str(n)).mkdir()
    torch.multiprocessing.spawn(_write_shares, args=(2, str(tmp_path), port), nprocs=2)
    for n in (5, 1):
        for rank, share in enumerate([(0, n // 2), (n // 2, n)]):  # contiguous shares, each produced by its process
            assert (tmp_path / f"{n}-rank{rank}.txt").read_text() == (
                f"[{share}] {[float(i) for i in range(n)]} {[-i for i in range(n)]}")
        assert sorted(x.name for x in (tmp_path / str(n)).iterdir()) == ["a.f32", "a.f32.json", "b.i64",
                                                                        "b.i64.json"]  # the parts are gone


def test_a_split_is_decoded_once_into_the_store_and_reads_as_the_pngs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_imagefolder(tmp_path / "ds", [(f"{i}.png", f"c{i}") for i in range(5)], split=["train"] * 4 + ["val"])
    rows, stack = split_stack(folder, ["train"])
    assert stack.shape == (4, 1, 24, 24) and stack.path.is_relative_to(tmp_path / ".synthmed/cache/pixels")
    assert torch.equal(stack[:], torch.from_numpy(load_images(folder, rows["file_name"].tolist())))
    mtime = stack.path.stat().st_mtime_ns
    assert split_stack(folder, ["train"])[1].path.stat().st_mtime_ns == mtime  # the second stage reads, not decodes
    assert split_stack(folder, ["val"])[1].shape == (1, 1, 24, 24)


def test_images_of_another_size_name_the_file(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    folder = write_imagefolder(tmp_path / "ds", [("a.png", "x"), ("b.png", "y")], split=["train", "train"])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "b.png")
    with pytest.raises(PipelineError, match=r"ds/b.png: shape \(1, 10, 10\), but .*ds/a.png is \(1, 24, 24\); rerun ingest"):
        split_stack(folder, ["train"])
    assert not list((tmp_path / ".synthmed/cache/pixels").glob("*"))


def test_vae_training_on_disk_equals_training_in_memory_and_reads_a_batch_at_a_time(tmp_path):
    u8 = (torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    disk = write_disk_array(tmp_path / "x.u8", u8.split(5), "uint8")
    disk = CountingArray(disk.path, disk.shape, "uint8")
    CountingArray.most = 0
    cfg = vae_train_config(steps=4, batch_size=3)
    in_memory, streamed = tiny_vae(), tiny_vae()
    log_a = train_autoencoder(in_memory, to_model_range(u8), cfg, torch.Generator().manual_seed(1))
    log_b = train_autoencoder(streamed, disk, cfg, torch.Generator().manual_seed(1))
    assert log_a == log_b and CountingArray.most == 3
    assert all(torch.equal(a, b) for a, b in zip(in_memory.state_dict().values(), streamed.state_dict().values()))

    CountingArray.most = 0
    metrics, kept = validate(streamed, disk, keep=[0, 11])
    whole = reconstruct(streamed, to_model_range(u8))
    assert metrics == pytest.approx(reconstruction_metrics(to_model_range(u8), whole), rel=1e-6)
    assert torch.equal(kept, whole[[0, 11]]) and CountingArray.most <= encode_batch_size(disk.shape)
    mean, std = encode_posterior(streamed, disk, rows=[2, 5])
    assert torch.allclose(mean, encode_posterior(streamed, to_model_range(u8[[2, 5]]))[0], atol=1e-6)


def test_the_posterior_sample_is_fixed_in_size_and_seeded():
    assert posterior_sample_rows(5, 1000, seed=0) == [0, 1, 2, 3, 4]
    rows = posterior_sample_rows(50_000, 1000, seed=3)
    assert len(rows) == 1000 == len(set(rows)) and rows == sorted(rows) == posterior_sample_rows(50_000, 1000, seed=3)
    assert rows != posterior_sample_rows(50_000, 1000, seed=4)


def test_encoding_batches_shrink_with_the_image():
    assert encode_batch_size((9, 1, 64, 64)) == 64 and encode_batch_size((9, 1, 32, 32, 32)) == 64
    assert encode_batch_size((9, 3, 256, 256)) == 10 and encode_batch_size((9, 3, 2048, 2048)) == 1


def test_a_file_changed_after_ingest_is_an_error_naming_it_and_its_row(tmp_path, monkeypatch):
    from synthmed.core.io import manifest_hash, sha256_file

    monkeypatch.chdir(tmp_path)
    folder = write_imagefolder(tmp_path / "ds", [("a.png", "x"), ("b.png", "y"), ("b.png", "z")], split=["train"] * 3)
    meta = pd.read_csv(folder / "metadata.csv")
    meta["sha256"] = [sha256_file(folder / n) for n in meta["file_name"]]  # as ingest writes it
    meta.to_csv(folder / "metadata.csv", index=False)
    before = manifest_hash(folder)
    assert split_stack(folder, ["train"])[1].shape == (2, 1, 24, 24)
    data = bytearray((folder / "b.png").read_bytes())
    data[60] ^= 0xFF  # same size, other bytes
    (folder / "b.png").write_bytes(bytes(data))
    assert manifest_hash(folder) == before  # the manifest's hash reads no image...
    with pytest.raises(PipelineError, match=r"ds/b.png: its sha256 is not the one .*metadata.csv records for it "
                                            r"\(row 3\); .*rerun `dvc repro ingest`"):
        split_stack(folder, ["train"])  # ...the decoder checks every file once
    (folder / "a.png").unlink()
    with pytest.raises(PipelineError, match="ds/a.png: listed in .*metadata.csv but missing"):
        split_stack(folder, ["train"])
    assert manifest_hash(tmp_path) is None  # no manifest: the caller hashes the tree


def test_rows_select_and_join_lazily_and_read_only_what_is_indexed(tmp_path):
    from synthmed.data.disk_array import as_rows

    data = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)
    disk = write_disk_array(tmp_path / "x.f32", [data[:4], data[4:]], "float32")
    disk = CountingArray(disk.path, disk.shape, "float32")
    extra = torch.full((3, 2), -1.0)
    CountingArray.most = 0
    picked = Rows(disk).subset(np.array([True, False, True, True, False, True])) + as_rows(extra).subset([2, 0])
    assert CountingArray.most == 0 and len(picked) == 6 and picked.shape == (6, 2) and picked.ndim == 2  # nothing read
    whole = torch.cat([data[[0, 2, 3, 5]], extra[[2, 0]]])
    assert torch.equal(picked[:], whole) and torch.equal(picked[[5, 0, 4]], whole[[5, 0, 4]])
    assert torch.equal(picked[3], whole[3]) and torch.equal(torch.stack(list(picked)), whole)
    assert torch.equal(picked.subset(torch.tensor([4, 1]))[:], whole[[4, 1]])
    assert torch.equal(torch.cat(list(picked.batches(4))), whole) and CountingArray.most <= 4
    assert len(picked.subset([])) == 0 and picked.subset([])[:].shape == (0, 2)
    with pytest.raises(ValueError, match="cannot join rows of shape"):
        picked + as_rows(torch.zeros(2, 3))
