"""The optional Inception FID/IS path, kept alive with randomly initialised weights."""

import pytest
import torch

from synthmed.core.errors import PipelineError
from synthmed.metrics.feature_cache import FeatureCache
from synthmed.metrics.fidelity import frechet_distance
from synthmed.metrics.inception import FIDInceptionV3, PoolAndLogits, inception_score, load_fid_inception


def test_fid_inception_loads_a_state_dict_strictly_and_gives_fid_and_is(tmp_path):
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "inception.pth")
    net = load_fid_inception(tmp_path / "inception.pth")
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 1, 32, 32, generator=g) * 255).to(torch.uint8)
    cache = FeatureCache(tmp_path / "cache.pt", PoolAndLogits(net))
    feats = cache(images)
    assert feats.shape == (6, 2048 + 1008) and cache.computed == 6
    cache(images[:3])
    assert cache.computed == 6  # cached by pixel hash: nothing embedded twice
    assert frechet_distance(feats[:3, :2048], feats[:3, :2048]) == pytest.approx(0, abs=1e-3)
    score, _ = inception_score(feats[:, 2048:], splits=2)
    assert 1.0 - 1e-9 <= score <= 1008 + 1e-9  # IS >= 1 in reals; rounding may land just below

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(PipelineError, match="not an FID Inception-v3 state dict"):
        load_fid_inception(tmp_path / "other.pth")
    with pytest.raises(PipelineError, match="weights not found"):
        load_fid_inception(tmp_path / "missing.pth")


def test_inception_score_is_the_number_of_equally_likely_confident_classes():
    logits = torch.full((40, 1008), -50.0)
    logits[torch.arange(40), torch.arange(40) % 4] = 50.0  # 4 classes, each predicted with certainty
    score, std = inception_score(logits, splits=1)
    assert score == pytest.approx(4.0, rel=1e-6) and std == 0
