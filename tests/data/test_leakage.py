"""The leakage audit: perceptual hashes, the banded near-duplicate search and the one-line stop without groups."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from synthmed.core.errors import PipelineError
from synthmed.data.leakage import (MAX_DISTANCE, _collisions, audit, check_max_distance, near_duplicates, phash,
                                   stop_without_groups)
from synthmed.data.sample import Sample


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A blurred random field: structure at the scale a 32x32 hash sees, unrelated from one seed to the next."""
    field = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 5)
    return ((field - field.min()) / (field.max() - field.min()) * 200 + 20).astype(np.uint8)


def flipped_noisy(image: np.ndarray, seed: int, sd: float = 6.0) -> np.ndarray:
    """A left-right mirrored copy with pixel noise: a re-export or augmentation of the same image."""
    noise = np.random.default_rng(seed).normal(0, sd, image.shape)
    return np.clip(image[:, ::-1].astype(float) + noise, 0, 255).astype(np.uint8)


def sample(name: str, pixels: np.ndarray, split: str) -> Sample:
    return Sample(file_name=name, pixels=pixels, captions=["an image"], group=name, split=split)


def unrelated(n: int) -> list[Sample]:
    return [sample(f"img{i:02d}.png", smooth_image(i), ("train", "val", "test")[i % 3]) for i in range(n)]


def test_a_flipped_noisy_copy_across_splits_is_found_and_unrelated_images_are_not():
    samples = unrelated(40)  # img00 train, img01 val
    samples.append(sample("copy_of_00.png", flipped_noisy(samples[0].pixels, 1), "test"))
    samples.append(sample("copy_of_01.png", flipped_noisy(samples[1].pixels, 2), "val"))  # same split as img01
    found = audit(samples, 4)
    assert found.pairs == 1
    (pair,) = found.listed
    assert (samples[pair.a].file_name, samples[pair.b].file_name) == ("img00.png", "copy_of_00.png")
    assert pair.mirrored and pair.distance <= 4
    samples[-1].split = "test"  # the other copy, once across splits, is found too
    assert [(samples[p.a].file_name, samples[p.b].file_name) for p in audit(samples, 4).listed] == [
        ("img00.png", "copy_of_00.png"), ("img01.png", "copy_of_01.png")]
    h = np.array([phash(s.pixels)[0] for s in unrelated(40)], dtype=np.uint64)
    distances = np.bitwise_count(h[:, None] ^ h[None, :])[np.triu_indices(40, 1)]
    assert distances.min() > 4  # what makes "not unrelated images" a claim, not luck of the threshold


def test_a_noisy_copy_of_a_near_symmetric_image_keeps_its_hash():
    """Symmetric anatomy puts half the DCT coefficients near zero: the threshold must not sit among them."""
    yy, xx = np.mgrid[:64, :64]
    head = (((yy - 32) / 26.0) ** 2 + ((xx - 31.5) / 20.0) ** 2 < 1) * (120 + 60 * np.cos((yy - 32) / 6.0))
    head = head.astype(np.uint8)
    assert np.array_equal(head, head[:, ::-1])
    noisy = np.clip(head + np.random.default_rng(0).normal(0, 3, head.shape), 0, 255).astype(np.uint8)
    assert bin(phash(head)[0] ^ phash(noisy)[0]).count("1") <= 2


def test_a_volume_is_hashed_by_its_central_axial_plane():
    base = np.stack([smooth_image(z, 32) for z in range(32)], axis=2)  # (x, y, z): RAS voxel order
    edited = base.copy()
    edited[:, :, :4] = 0  # far from the centre: still a near-duplicate
    other = base.copy()
    other[:, :, 16] = smooth_image(99, 32)  # the central axial plane itself
    samples = [Sample("a.npy", base, ["v"], "a", split="train"), Sample("b.npy", edited, ["v"], "b", split="test"),
               Sample("c.npy", other, ["v"], "c", split="val")]
    found = audit(samples, 4)
    assert found.pairs == 1 and (found.listed[0].a, found.listed[0].b, found.listed[0].distance) == (0, 1, 0)


def brute_force(h, m, splits, k):
    count, best = 0, {}
    for i, j in itertools.combinations(range(len(h)), 2):
        if splits[i] == splits[j]:
            continue
        d = min(bin(int(a ^ b)).count("1") for a, b in ((h[i], h[j]), (m[i], h[j]), (h[i], m[j])))
        if d <= k:
            count += 1
            for x, y in ((i, j), (j, i)):
                best[x] = min(best.get(x, (99, 0)), (d, y))
    return count, sorted({(min(x, y), max(x, y), d) for x, (d, y) in best.items()})


@pytest.mark.parametrize("k", [0, 2, 4, 7, MAX_DISTANCE])
def test_the_banded_search_finds_exactly_what_comparing_every_pair_finds(k):
    rng = np.random.default_rng(k)
    for _ in range(20):
        n = int(rng.integers(2, 50))
        centres = rng.integers(0, 2**63, size=5, dtype=np.uint64) << np.uint64(1)
        h = centres[rng.integers(0, 5, n)]  # clusters, so that many pairs are close
        for i in range(n):
            for bit in rng.integers(0, 64, int(rng.integers(0, 2 * k + 2))):
                h[i] ^= np.uint64(1) << np.uint64(int(bit))
        m = np.where(rng.random(n) < 0.5, h[rng.integers(0, n, n)], rng.integers(0, 2**63, n, dtype=np.uint64))
        splits = rng.choice(["train", "val", "test"], n).tolist()
        found = near_duplicates(h, m, splits, k, block=int(rng.integers(1, 40)))  # small blocks: chunking too
        count, listed = brute_force(h, m, splits, k)
        assert found.pairs == count
        assert [(p.a, p.b, p.distance) for p in found.listed] == listed


def test_candidates_come_in_bounded_blocks():
    keys = np.array([3, 1, 3, 2, 3, 1, 7], dtype=np.uint64)
    blocks = list(_collisions(keys, keys, block=4))
    assert all(len(q) <= 4 for q, _ in blocks) and len(blocks) > 1
    got = sorted((int(a), int(b)) for q, t in blocks for a, b in zip(q, t))
    assert got == sorted((a, b) for a in range(7) for b in range(7) if keys[a] == keys[b])


def test_many_unrelated_hashes_give_no_pairs_and_no_all_pairs_blowup():
    rng = np.random.default_rng(0)
    n = 50_000  # all pairs would be 1.25e9 comparisons
    h, m = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
    h[7], splits = h[47_000] ^ np.uint64(0b101), ["train"] * 45_000 + ["test"] * 5_000
    found = near_duplicates(h, m, splits, 4, block=1 << 16)
    assert found.pairs == 1 and [(p.a, p.b, p.distance) for p in found.listed] == [(7, 47_000, 2)]


@pytest.mark.parametrize("bits", [-1, MAX_DISTANCE + 1, 2.5, True])
def test_the_threshold_param_is_checked(bits):
    with pytest.raises(PipelineError, match=r"ingest.near_duplicate_bits must be an integer from 0 to 10"):
        check_max_distance(bits)


def test_without_groups_near_duplicates_stop_in_one_line():
    samples = unrelated(6)
    samples.append(sample("copy.png", flipped_noisy(samples[0].pixels, 3), "test"))
    found = audit(samples, 4)
    with pytest.raises(PipelineError) as err:
        stop_without_groups(found, samples, alone="each image", fix="add a `group` column (the patient ID) to x")
    message = str(err.value)
    assert "\n" not in message and "img00.png in train and copy.png in test" in message
    assert "add a `group` column (the patient ID)" in message and "ingest.image_level_splits: true" in message
    stop_without_groups(audit(unrelated(6), 4), unrelated(6), alone="each image", fix="-")  # none: no stop
