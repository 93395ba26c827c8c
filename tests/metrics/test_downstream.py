import torch

from synthmed.metrics.downstream import ClassifierConfig, compare_real_vs_augmented


def blobs(n, g):
    """Class 0: bright top half; class 1: bright bottom half."""
    y = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    x[y == 0, :, :8] += 150
    x[y == 1, :, 8:] += 150
    return x, y


def test_classifier_learns_and_reports_gain():
    g = torch.Generator().manual_seed(0)
    (rx, ry), (sx, sy), (tx, ty) = blobs(40, g), blobs(40, g), blobs(40, g)
    out = compare_real_vs_augmented(rx, ry, sx, sy, tx, ty, 2, ClassifierConfig(8, 3e-3, 16), seeds=[0, 1])
    assert out["clf_real_acc"] > 0.9 and out["clf_aug_auc"] > 0.9
    assert abs(out["clf_gain_acc"] - (out["clf_aug_acc"] - out["clf_real_acc"])) < 1e-9
    assert out["clf_real_acc_std"] >= 0
