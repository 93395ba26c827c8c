import numpy as np
import pytest
import torch

from synthmed.metrics.downstream import ClassifierConfig, predict, score_classifier, train_classifier


def blobs(n, g):
    """Class 0: bright top half; class 1: bright bottom half."""
    y = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    x[y == 0, :, :8] += 150
    x[y == 1, :, 8:] += 150
    return x, y


def test_classifier_learns_and_scores_accuracy_balanced_accuracy_and_auc():
    g = torch.Generator().manual_seed(0)
    (rx, ry), (tx, ty) = blobs(40, g), blobs(40, g)
    model = train_classifier(rx, ry, 2, ClassifierConfig(steps=30, lr=3e-3, batch_size=16), seed=0)
    out = score_classifier(model, tx, ty)
    assert out["acc"] > 0.9 and out["auc"] > 0.9
    # imbalanced test set: balanced accuracy is the mean of per-class recalls, not accuracy
    keep = torch.cat([torch.arange(0, 40, 2), torch.tensor([1])])  # 20 of class 0, 1 of class 1
    pred = predict(model, tx[keep]).argmax(1)
    recalls = [np.mean(pred[ty[keep].numpy() == c] == c) for c in (0, 1)]
    assert score_classifier(model, tx[keep], ty[keep])["bacc"] == np.mean(recalls)


def test_training_has_the_same_step_budget_whatever_the_set_size():
    from torch.nn.modules.module import register_module_forward_hook

    from synthmed.metrics.downstream import SmallCNN

    g = torch.Generator().manual_seed(0)
    x, y = blobs(6, g)
    batches = []
    hook = register_module_forward_hook(lambda m, i, o: batches.append(len(i[0])) if isinstance(m, SmallCNN) else None)
    try:
        train_classifier(x, y, 2, ClassifierConfig(steps=7, lr=1e-3, batch_size=16), seed=0)
        train_classifier(torch.cat([x] * 20), torch.cat([y] * 20), 2, ClassifierConfig(7, 1e-3, 16), seed=0)
    finally:
        hook.remove()
    assert batches == [16] * 14  # 6 images or 120: 7 steps of 16 (drawn with replacement)


def test_validation_keeps_the_best_scoring_weights_of_the_same_run():
    g = torch.Generator().manual_seed(0)
    (rx, ry), (vx, vy) = blobs(12, g), blobs(12, g)
    cfg = dict(steps=24, lr=3e-2, batch_size=8)
    last = train_classifier(rx, ry, 2, ClassifierConfig(**cfg, val_every=0), seed=1, val=(vx, vy))
    best = train_classifier(rx, ry, 2, ClassifierConfig(**cfg, val_every=4), seed=1, val=(vx, vy))
    s_last, s_best = score_classifier(last, vx, vy), score_classifier(best, vx, vy)
    # the same trajectory (validation draws no random numbers); the last step is one of the candidates
    assert (s_best["bacc"], -s_best["loss"]) >= (s_last["bacc"], -s_last["loss"])


def test_augmentation_shifts_and_jitters_within_range_and_is_seeded():
    from synthmed.metrics.downstream import _augment

    x = torch.rand(6, 1, 32, 32) * 2 - 1
    a = _augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)
    assert torch.equal(a, _augment(x, torch.Generator().manual_seed(3)))


def test_blur_is_a_gaussian_of_each_images_own_sigma():
    from synthmed.metrics.downstream import _blur

    x = torch.zeros(3, 1, 33, 33)
    x[:, :, 16, 16] = 1.0
    out = _blur(x, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(out[0], x[0])  # sigma 0: as it was
    for i, sigma in ((1, 1.0), (2, 2.0)):
        psf = out[i, 0]
        assert psf.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass kept
        d = torch.arange(33.0) - 16
        var = (psf.sum(0) * d**2).sum().item()  # the impulse response's variance along a row is sigma^2
        assert var == pytest.approx(sigma**2, rel=0.02)


def test_a_classifier_on_disk_trains_as_in_memory_and_reads_one_batch_a_step(tmp_path):
    from synthmed.data.disk_array import Rows, write_disk_array
    from tests.data.test_disk_array import CountingArray

    g = torch.Generator().manual_seed(0)
    (x, y), (tx, ty) = blobs(40, g), blobs(20, g)
    disk = write_disk_array(tmp_path / "x.u8", [x[:25], x[25:]], "uint8")
    disk = CountingArray(disk.path, disk.shape, "uint8")
    cfg = ClassifierConfig(steps=5, lr=3e-3, batch_size=8, val_every=2)
    CountingArray.most = 0
    streamed = train_classifier(Rows(disk).subset(torch.arange(1, 40)), y[1:], 2, cfg, seed=3, val=(tx, ty))
    assert CountingArray.most == 8  # a step's batch, never the training set
    in_memory = train_classifier(x[1:], y[1:], 2, cfg, seed=3, val=(tx, ty))
    assert all(torch.equal(a, b) for a, b in zip(in_memory.state_dict().values(), streamed.state_dict().values()))
    assert np.array_equal(predict(streamed, Rows(disk)), predict(in_memory, x))


def test_training_can_start_from_given_weights():
    g = torch.Generator().manual_seed(0)
    x, y = blobs(12, g)
    pretrained = train_classifier(x, y, 2, ClassifierConfig(steps=5, lr=1e-2, batch_size=8), seed=1).state_dict()
    frozen = ClassifierConfig(steps=2, lr=0.0, batch_size=8)  # no step moves a weight: what it started from stays
    tuned = train_classifier(x, y, 2, frozen, seed=2, init=pretrained).state_dict()
    fresh = train_classifier(x, y, 2, frozen, seed=2).state_dict()
    weights = [k for k in pretrained if k.endswith("weight")]
    assert all(torch.equal(tuned[k], pretrained[k]) for k in weights)
    assert not all(torch.equal(fresh[k], pretrained[k]) for k in weights)
