import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import pandas as pd

from synthmed.metrics import privacy
from synthmed.metrics.privacy import (PixelSpace, PrivacyParams, audit, closest_pairs, copy_test, gate,
                                      memorization_table, nearest, threshold)


def _images(n, g):
    return (torch.rand(n, 1, 16, 16, generator=g) * 255).to(torch.uint8)


def test_a_copied_training_image_is_flagged_and_fresh_samples_mostly_are_not():
    g = torch.Generator().manual_seed(0)
    train, test, fresh = _images(60, g), _images(40, g), _images(19, g)
    synth = torch.cat([fresh, train[7:8]])  # the last synthetic image is training image 7
    table, summary = audit({"pixel": (PixelSpace(synth), PixelSpace(train), PixelSpace(test))})
    assert table["flagged"].iloc[-1] and table["nn_train_index_pixel"].iloc[-1] == 7
    assert table["nn_distance_pixel"].iloc[-1] == pytest.approx(0, abs=1e-6)
    assert summary["mem_frac_below_pixel"] >= 1 / 20 and summary["mem_n_reference"] == 40
    assert summary["mem_expected_rate_pixel"] == pytest.approx(2 / 41)  # k = floor(0.05 x 41) = 2
    assert summary["mem_frac_below_pixel_ci_low"] <= summary["mem_frac_below_pixel"] <= summary["mem_frac_below_pixel_ci_high"]
    assert table["flagged"].iloc[:-1].mean() < 0.2  # samples like the real held-out set: ~5 % expected


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
    assert gate(summary, level=1e-9) is None and gate(summary, level=0.5, max_excess=0.5) is None
    assert "privacy gate: 10.0% of synthetic images" in gate(summary, level=0.5)


def test_the_threshold_is_the_conformal_order_statistic_and_states_its_rate():
    d = np.arange(99, 0, -1.0)  # m = 99: k = floor(0.05 x 100) = 5, the 5th smallest
    assert threshold(d, 0.05) == (5.0, 5)
    assert threshold(d[:10], 0.05) == (90.0, 1)  # too few for alpha: the smallest, at rate 1 / 11 (stated)
    with pytest.raises(ValueError, match="held-out real images"):
        threshold(np.array([]), 0.05)
    with pytest.raises(ValueError, match="alpha and gate_level"):
        PrivacyParams(fail_on_violation=False, alpha=0.0, gate_level=0.01, max_excess=0.0, mirror=True,
                      pixel_resolution=0)


def test_honest_images_are_flagged_at_the_expected_rate_and_the_gate_holds_its_level():
    # many seeded "splits": train, reference and honest synthetic rows drawn from one law (a generator that
    # copies nothing); the share below must average k / (m + 1), and the exact gate fire at most at its level
    rng = np.random.default_rng(5)
    m, n, level, splits = 40, 60, 0.05, 300
    nn = lambda q, r: np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1)).min(1)  # noqa: E731
    counts = []
    for _ in range(splits):
        train, ref, fresh = (rng.standard_normal((k, 6)) for k in (80, m, n))
        cut, k = threshold(nn(ref, train), 0.05)
        counts.append(int((nn(fresh, train) < cut).sum()))
    x = np.array(counts)
    flagged = x / n
    exact = sum(copy_test(c, n, k, m) < level for c in np.unique(x) for _ in range((x == c).sum()))
    naive = int((stats.binom.sf(x - 1, n, k / (m + 1)) < level).sum())
    assert k / (m + 1) == pytest.approx(2 / 41)
    assert np.mean(flagged) == pytest.approx(2 / 41, abs=0.01)  # sd of the mean ~0.0017
    assert exact / splits <= level + 0.025
    assert naive > exact and naive / splits > level  # a binomial test at k / (m + 1) ignores the threshold's spread


def _smooth(n, g):
    return (F.interpolate(torch.rand(n, 1, 3, 3, generator=g), size=16, mode="bilinear", align_corners=False)
            * 255).round().to(torch.uint8)


def test_shifted_mirrored_noised_and_blurred_copies_fall_below_in_pixel_space_with_the_mirror_search():
    g = torch.Generator().manual_seed(6)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    u8 = lambda x: x.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    caught = {c: [] for c in ("shift", "mirror", "noise", "blur")}
    plain_mirror = []
    for _ in range(6):
        train, ref = _smooth(40, g), _smooth(40, g)
        x = train.float()
        copies = {"shift": u8(F.pad(x, (1, 0, 0, 0), mode="replicate")[..., :16]), "mirror": train.flip(-1),
                  "noise": u8(x + 8 * torch.randn(x.shape, generator=g)),
                  "blur": u8(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (kernel[:, None] * kernel).view(1, 1, 3, 3)))}
        synth = PixelSpace(torch.cat(list(copies.values())))
        table, _ = audit({"pixel": (synth, PixelSpace(train), PixelSpace(ref))},
                         mirrors={"pixel": (synth.mirrored(), PixelSpace(ref).mirrored())})
        plain, _ = audit({"pixel": (synth, PixelSpace(train), PixelSpace(ref))})
        for j, c in enumerate(caught):
            caught[c].append(table["below_pixel"].iloc[40 * j : 40 * (j + 1)].mean())
        plain_mirror.append(plain["below_pixel"].iloc[40:80].mean())
    assert {c: np.mean(v) >= 0.9 for c, v in caught.items()} == {c: True for c in caught}, caught
    assert np.mean(plain_mirror) < 0.5  # without the mirror search a flipped copy is not near its original
