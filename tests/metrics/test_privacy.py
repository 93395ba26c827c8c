import pytest
import torch

import pandas as pd

from synthmed.metrics import privacy
from synthmed.metrics.privacy import PixelSpace, audit, closest_pairs, gate, memorization_table, nearest


def _images(n, g):
    return (torch.rand(n, 1, 16, 16, generator=g) * 255).to(torch.uint8)


def test_a_copied_training_image_is_flagged_and_fresh_samples_mostly_are_not():
    g = torch.Generator().manual_seed(0)
    train, test, fresh = _images(60, g), _images(40, g), _images(19, g)
    synth = torch.cat([fresh, train[7:8]])  # the last synthetic image is training image 7
    table, summary = audit({"pixel": (PixelSpace(synth), PixelSpace(train), PixelSpace(test))})
    assert table["flagged"].iloc[-1] and table["nn_train_index_pixel"].iloc[-1] == 7
    assert table["nn_distance_pixel"].iloc[-1] == pytest.approx(0, abs=1e-6)
    assert summary["mem_frac_below_p1_pixel"] >= 1 / 20
    assert table["flagged"].iloc[:-1].mean() < 0.2  # samples like the real test set: ~1 % expected


@pytest.mark.parametrize("reference_bytes", [1, privacy.REFERENCE_BYTES])  # blocks of 16 rows | all 30 at once
def test_nearest_neighbour_in_chunks_matches_brute_force(monkeypatch, reference_bytes):
    monkeypatch.setattr(privacy, "REFERENCE_BYTES", reference_bytes)
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(70, 5, generator=g), torch.randn(30, 5, generator=g)
    d, i = nearest(q, r, chunk=16)
    full = torch.cdist(q.double(), r.double())
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d.double(), full.min(1).values, atol=1e-5)
    # excluded rows in every chunk of the reference: the nearest of the rest
    exclude = torch.stack([full.argmin(1), (full.argmin(1) + 17) % 30], 1).numpy()
    masked = full.clone()
    masked[torch.arange(70)[:, None], torch.from_numpy(exclude)] = float("inf")
    d, i = nearest(q, r, chunk=16, exclude=exclude)
    assert torch.equal(i, masked.argmin(1)) and torch.allclose(d.double(), masked.min(1).values, atol=1e-5)


def test_the_search_holds_a_block_at_a_time_and_far_from_the_origin_stays_exact():
    g = torch.Generator().manual_seed(3)
    base = torch.full((1, 4096), 1e3)  # large norms: |q|^2 + |r|^2 - 2 q.r alone would lose a copy's 0
    r = base + torch.randn(50, 4096, generator=g)
    q = torch.cat([r[[3, 41]], base + torch.randn(8, 4096, generator=g)])
    seen = []
    sliced = type("Rows", (), {"__len__": lambda self: len(q), "__getitem__": lambda self, k: seen.append(k) or q[k]})()
    d, i = nearest(sliced, r, chunk=8)
    assert i[:2].tolist() == [3, 41] and d[:2].tolist() == [0.0, 0.0]
    assert all(len(q[k]) <= 8 for k in seen)  # never more than a chunk of the query at once


def test_a_reference_block_larger_than_a_chunk_is_read_a_chunk_at_a_time():
    g = torch.Generator().manual_seed(4)
    r, q = torch.randn(1100, 3, generator=g), torch.randn(5, 3, generator=g)
    seen = []
    sliced = type("Rows", (), {"__len__": lambda self: len(r), "__getitem__": lambda self, k: seen.append(k) or r[k]})()
    d, i = nearest(q, sliced)  # one block of all 1,100 reference rows, read in pieces of CHUNK
    assert torch.equal(i, torch.cdist(q, r).argmin(1))
    assert max(len(r[k]) for k in seen) == privacy.CHUNK


def test_pixel_space_is_area_averaged_down_to_its_resolution():
    images = torch.arange(4 * 4, dtype=torch.uint8).reshape(1, 1, 4, 4).repeat(3, 1, 1, 1) * 10
    space = PixelSpace(images, resolution=2)
    assert len(space) == 3 and space.side == 2 and space[[0, 2]].shape == (2, 4)
    assert torch.allclose(space[0:1][0], torch.tensor([25.0, 45.0, 105.0, 125.0]) / 255)
    assert torch.equal(PixelSpace(images)[1:2], images[1:2].flatten(1).float() / 255)
    assert PixelSpace(images, resolution=8).side == 4  # never up-sampled


def test_memorization_table_names_files_and_the_gate_reads_the_worst_space():
    g = torch.Generator().manual_seed(2)
    train, test, fresh = _images(30, g), _images(20, g), _images(9, g)
    synth = torch.cat([fresh, train[4:5]])
    rows = pd.DataFrame({"file_name": [f"s{i}.png" for i in range(10)], "text": "caption"})
    names = [f"t{i}.png" for i in range(30)]
    space = lambda x: {"pixel": PixelSpace(x)}  # noqa: E731
    table, summary = memorization_table(space(synth), space(train), space(test), rows, names)
    assert table.loc[9, "nn_train_file_pixel"] == "t4.png" and table.loc[9, "file_name"] == "s9.png"
    assert summary["mem_flagged"] >= 1
    assert closest_pairs(table, names, n=1) == [(9, 4, pytest.approx(0, abs=1e-6))]
    assert gate(summary, limit=0.5) is None and "privacy gate: 10.0%" in gate(summary, limit=0.01)
