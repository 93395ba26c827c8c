import pytest
import torch

import pandas as pd

from synthmed.metrics.privacy import audit, closest_pairs, gate, memorization_table, nearest, pixels


def _images(n, g):
    return (torch.rand(n, 1, 16, 16, generator=g) * 255).to(torch.uint8)


def test_a_copied_training_image_is_flagged_and_fresh_samples_mostly_are_not():
    g = torch.Generator().manual_seed(0)
    train, test, fresh = _images(60, g), _images(40, g), _images(19, g)
    synth = torch.cat([fresh, train[7:8]])  # the last synthetic image is training image 7
    table, summary = audit({"pixel": (pixels(synth), pixels(train), pixels(test))})
    assert table["flagged"].iloc[-1] and table["nn_train_index_pixel"].iloc[-1] == 7
    assert table["nn_distance_pixel"].iloc[-1] == pytest.approx(0, abs=1e-6)
    assert summary["mem_frac_below_p1_pixel"] >= 1 / 20
    assert table["flagged"].iloc[:-1].mean() < 0.2  # samples like the real test set: ~1 % expected


def test_nearest_neighbour_in_chunks_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(70, 5, generator=g), torch.randn(30, 5, generator=g)
    d, i = nearest(q, r, chunk=16)
    full = torch.cdist(q.double(), r.double())
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d, full.min(1).values)


def test_memorization_table_names_files_and_the_gate_reads_the_worst_space():
    g = torch.Generator().manual_seed(2)
    train, test, fresh = _images(30, g), _images(20, g), _images(9, g)
    synth = torch.cat([fresh, train[4:5]])
    rows = pd.DataFrame({"file_name": [f"s{i}.png" for i in range(10)], "text": "caption"})
    names = [f"t{i}.png" for i in range(30)]
    space = lambda x: {"pixel": pixels(x)}  # noqa: E731
    table, summary = memorization_table(space(synth), space(train), space(test), rows, names)
    assert table.loc[9, "nn_train_file_pixel"] == "t4.png" and table.loc[9, "file_name"] == "s9.png"
    assert summary["mem_flagged"] >= 1
    assert closest_pairs(table, names, n=1) == [(9, 4, pytest.approx(0, abs=1e-6))]
    assert gate(summary, limit=0.5) is None and "privacy gate: 10.0%" in gate(summary, limit=0.01)
