"""Paired comparisons over test items (synthmed.metrics.stats): per-item gains with a bootstrap interval and a
sign-flip p-value, the AUC's paired bootstrap, and the smallest detectable gain."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from synthmed.metrics.stats import (item_differences, macro_auc, min_detectable_gain, paired_auc_gain,
                                    paired_item_gain, sign_flip_p)


def correct_per_item(rng, items: int, seeds: int, shift: float, difficulty: np.ndarray) -> np.ndarray:
    """0/1 per (seed, item): an item's chance of being right depends on its difficulty (shared by the arms) and
    on the arm (``shift`` on the logit), as a probe's or a zero-shot classifier's hits do."""
    p = 1 / (1 + np.exp(-(difficulty + shift)))
    return (rng.random((seeds, items)) < p).astype(float)


def test_no_true_difference_gives_uniform_p_and_intervals_covering_zero():
    rng = np.random.default_rng(0)
    ps, covered = [], []
    for trial in range(300):
        difficulty = rng.normal(0, 1.5, 50)
        a, b = (correct_per_item(rng, 50, 2, 0.0, difficulty) for _ in range(2))
        res = paired_item_gain(a, b, draws=499, seed=trial)
        ps.append(res.p)
        covered.append(res.ci_low <= 0 <= res.ci_high)
    ps = np.array(ps)
    assert np.mean(ps < 0.05) <= 0.08  # the level holds (discrete data: a little conservative)
    assert 0.35 < np.mean(ps < 0.5) < 0.65 and 0.4 < ps.mean() < 0.6  # uniform-ish, not piled up at 1
    assert np.mean(covered) >= 0.9


def test_a_realistic_gain_on_46_items_is_significant():
    # the demo's test set: 46 images, 2 seeds; zero-shot accuracy ~0.36 -> ~0.53 was observed (a gain of 0.17)
    rng = np.random.default_rng(1)
    difficulty = rng.normal(-0.6, 1.5, 46)
    real, synth = correct_per_item(rng, 46, 2, 0.0, difficulty), correct_per_item(rng, 46, 2, 1.0, difficulty)
    res = paired_item_gain(synth, real, draws=2000, seed=0)
    assert res.gain == pytest.approx((synth.mean(1) - real.mean(1)).mean())  # the seed-mean of the score's gain
    assert res.items == 46 and res.gain > 0.1
    assert res.p < 0.05 and res.ci_low > 0 and res.p >= 1 / 2001


def test_detectable_gain_is_found_with_80_percent_power():
    rng = np.random.default_rng(2)
    n, sd = 50, 1.0
    gain = min_detectable_gain(sd / np.sqrt(n))
    assert gain == pytest.approx(2.8016 * sd / np.sqrt(n), rel=1e-4)
    hits = [paired_item_gain(rng.normal(gain, sd, n), np.zeros(n), draws=499, seed=t).p < 0.05 for t in range(200)]
    assert 0.7 < np.mean(hits) < 0.9


def test_resampling_is_seeded():
    rng = np.random.default_rng(3)
    a, b = rng.random((2, 40)), rng.random((2, 40))
    assert paired_item_gain(a, b, 1000, seed=7) == paired_item_gain(a, b, 1000, seed=7)
    assert paired_item_gain(a, b, 1000, seed=7).ci_low != paired_item_gain(a, b, 1000, seed=8).ci_low
    scores, labels = rng.random((2, 40, 3)), rng.integers(0, 3, 40)
    assert paired_auc_gain(scores, scores[::-1] ** 2, labels, 500, 4) == paired_auc_gain(scores, scores[::-1] ** 2,
                                                                                          labels, 500, 4)


def test_sign_flip_is_exact_for_few_items_and_bounded_below_by_the_draws():
    assert sign_flip_p([1.0, 1.0, 1.0], draws=2000, seed=0) == 0.25  # 2 of the 8 sign patterns are as extreme
    assert sign_flip_p([1.0, -1.0, 2.0], draws=2000, seed=0) == 0.75
    assert sign_flip_p(np.zeros(30), draws=100, seed=0) == 1.0  # no difference at all
    assert sign_flip_p(np.ones(60), draws=999, seed=0) == pytest.approx(1 / 1000)  # +1 correction: never 0
    # one seed or several: the items' seed-averaged differences are the replicates
    assert item_differences([[1, 0, 1], [1, 1, 0]], [[0, 0, 1], [0, 1, 1]]).tolist() == [1.0, 0.0, -0.5]
    with pytest.raises(ValueError):
        item_differences(np.zeros((2, 3)), np.zeros((1, 3)))


def test_weighted_macro_auc_matches_sklearn_on_the_resampled_items():
    rng = np.random.default_rng(4)
    scores, labels = rng.integers(0, 6, (40, 3)).astype(float), rng.integers(0, 3, 40)  # ties included
    expected = np.mean([roc_auc_score(labels == k, scores[:, k]) for k in range(3)])
    assert macro_auc(scores, labels)[0] == pytest.approx(expected)
    counts = rng.multinomial(40, np.full(40, 1 / 40), size=3)
    for row, w in zip(macro_auc(scores, labels, counts), counts):
        idx = np.repeat(np.arange(40), w)
        present = [k for k in range(3) if 0 < (labels[idx] == k).sum() < len(idx)]
        assert row == pytest.approx(np.mean([roc_auc_score(labels[idx] == k, scores[idx, k]) for k in present]))
    scores[:, 1] = np.nan  # a class this model does not score is left out
    assert macro_auc(scores, labels)[0] == pytest.approx(np.mean([roc_auc_score(labels == k, scores[:, k])
                                                                  for k in (0, 2)]))


def test_auc_gain_by_paired_bootstrap():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 46)
    onehot = np.eye(4)[labels]
    null_ps = []
    for trial in range(40):
        a, b = (onehot * 0.8 + rng.normal(0, 1, (2, 46, 4)) for _ in range(2))
        res = paired_auc_gain(a, b, labels, draws=300, seed=trial)
        null_ps.append(res.p)
    assert np.mean(np.array(null_ps) < 0.05) <= 0.15 and np.mean(null_ps) > 0.3
    base = rng.normal(0, 1, (2, 46, 4))
    weak, strong = onehot * 0.5 + base, onehot * 2.0 + base + rng.normal(0, 0.3, (2, 46, 4))
    res = paired_auc_gain(strong, weak, labels, draws=2000, seed=0)
    seed_mean = np.mean([macro_auc(strong[s], labels)[0] - macro_auc(weak[s], labels)[0] for s in range(2)])
    assert res.gain == pytest.approx(seed_mean) and res.items == 46
    assert res.p < 0.05 and 0 < res.ci_low < res.gain < res.ci_high and res.se > 0
    same = paired_auc_gain(weak, weak, labels, draws=200, seed=0)
    assert same.gain == 0 and same.p == 1.0
