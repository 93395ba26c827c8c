import pytest
import torch

from synthmed.metrics.prdc import prdc
from synthmed.metrics.stats import mean_ci, paired_p


def test_prdc_on_points_on_a_line_matches_the_hand_computation():
    # real: 0, 1, 2, 3 -> k=1 radii 1, 1, 1, 1; fake: 0.5, 1.5, 10 -> radii 1, 1, 8.5
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [1.5], [10.0]])
    out = prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(2 / 3)  # 10 is outside every real ball
    assert out["recall"] == pytest.approx(1.0)  # every real point is inside a fake ball (10's ball has radius 8.5)
    # fake 0.5 is in the balls of 0 and 1, 1.5 in those of 1 and 2, 10 in none: (2 + 2 + 0) / (1 * 3)
    assert out["density"] == pytest.approx(4 / 3)
    assert out["coverage"] == pytest.approx(3 / 4)  # real 3's nearest fake (1.5) is 1.5 away, outside its ball


def test_prdc_coverage_counts_real_balls_with_a_fake_point():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [0.6], [10.0]])
    out = prdc(real, fake, k=1)
    assert out["coverage"] == pytest.approx(2 / 4)  # only the balls of 0 and 1 hold a fake point
    assert out["f1_pr"] == pytest.approx(2 * out["precision"] * out["recall"] / (out["precision"] + out["recall"]))


def test_prdc_of_a_set_with_itself_is_perfect_and_needs_more_than_k_points():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    out = prdc(x, x, k=5)
    assert [out["precision"], out["recall"], out["coverage"]] == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="more than 5"):
        prdc(x[:5], x, k=5)


def test_prdc_in_blocks_equals_the_dense_computation_and_large_sets_are_subsampled(monkeypatch):
    import synthmed.metrics.prdc as module

    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(90, 6, generator=g), torch.randn(70, 6, generator=g) + 0.3
    dense = prdc(real, fake, k=3)
    monkeypatch.setattr(module, "CHUNK", 16)  # 6 blocks of real rows, radii in 6 and 5 blocks
    assert prdc(real, fake, k=3) == pytest.approx(dense)
    assert prdc(real, fake, k=3, max_points=40) != pytest.approx(dense)  # 40 of each: another, smaller sample
    assert prdc(real, fake, k=3, max_points=40) == prdc(real, fake, k=3, max_points=40)  # seeded


def test_confidence_interval_and_paired_test_on_known_data():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)  # t(0.975, 2) = 4.3027
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641, two-sided p with 2 df = 0.0742
    assert paired_p([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(0.07418, abs=1e-4)
    assert paired_p([1.0, 2.0], [1.0, 2.0]) == pytest.approx(1.0)
    assert paired_p([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == pytest.approx(0.25)  # all three flips agree: exact sign-flip p
