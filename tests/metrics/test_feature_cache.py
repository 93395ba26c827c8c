import torch
from torch import nn

from synthmed.metrics.feature_cache import FeatureCache


class Mean(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return x.flatten(1).mean(1, keepdim=True) * self.scale


def test_features_are_computed_once_per_image_and_forgotten_when_the_extractor_changes(tmp_path):
    images = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    cache = FeatureCache(tmp_path / "f.pt", Mean(1.0))
    first = cache(images)
    cache(images[[4, 0]])
    assert cache.computed == 5
    cache.save()
    again = FeatureCache(tmp_path / "f.pt", Mean(1.0))
    assert torch.equal(again(images), first) and again.computed == 0  # served from the file
    other = FeatureCache(tmp_path / "f.pt", Mean(2.0))  # new weights: old features must not be reused
    assert torch.allclose(other(images), 2 * first) and other.computed == 5
