import torch
from sklearn.datasets import load_sample_image

from synthmed.metrics.features import load_effnet_lite0


def test_effnet_lite0_weights_classify_a_real_photo():
    """The architecture matches the packaged ImageNet weights: a temple photo is a bell cote/palace."""
    model = load_effnet_lite0()
    photo = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1)[None].float() / 255
    top5 = model.logits(photo).topk(5).indices[0].tolist()
    assert top5[0] == 442  # ImageNet 'bell cote'
    assert {698, 832} & set(top5)  # 'palace', 'stupa'


def test_features_accept_greyscale_and_are_1280d():
    model = load_effnet_lite0()
    feats = model(torch.rand(3, 1, 32, 32))
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
