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


class Resized(Mean):
    """Same weights as Mean, other preprocessing: its features must not come from Mean's cache."""

    def __init__(self, scale: float, size: int):
        super().__init__(scale)
        self.size = size

    def forward(self, x):
        return super().forward(nn.functional.interpolate(x, size=self.size, mode="nearest"))


def test_a_change_of_preprocessing_or_its_settings_starts_the_cache_afresh(tmp_path):
    images = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    cache = FeatureCache(tmp_path / "f.pt", Mean(1.0))
    cache(images)
    cache.save()
    resized = FeatureCache(tmp_path / "f.pt", Resized(1.0, 4))  # same state_dict, other code
    resized(images)
    assert resized.computed == 4
    resized.save()
    other_size = FeatureCache(tmp_path / "f.pt", Resized(1.0, 2))  # same code and weights, other setting
    other_size(images)
    assert other_size.computed == 4
    same = FeatureCache(tmp_path / "f.pt", Resized(1.0, 4))
    same(images)
    assert same.computed == 0


def test_images_are_read_and_embedded_a_chunk_at_a_time(tmp_path, monkeypatch):
    from synthmed.data.disk_array import Rows, write_disk_array
    from synthmed.metrics import feature_cache
    from tests.data.test_disk_array import CountingArray

    monkeypatch.setattr(feature_cache, "CHUNK", 4)
    images = (torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    disk = write_disk_array(tmp_path / "x.u8", [images], "uint8")
    disk = CountingArray(disk.path, disk.shape, "uint8")
    CountingArray.most = 0
    cache = FeatureCache(tmp_path / "f.pt", Mean(1.0), batch_size=2)
    assert torch.equal(cache(Rows(disk).subset([9, *range(9)])), FeatureCache(tmp_path / "g.pt", Mean(1.0))(images[[9, *range(9)]]))
    assert CountingArray.most == 4 and cache.computed == 10
