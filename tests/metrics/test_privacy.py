import pytest
import torch

from synthmed.metrics.privacy import audit, nearest, pixels


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
