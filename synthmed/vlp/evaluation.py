"""Evaluating a pretrained dual encoder on real images: linear probe, zero-shot, retrieval (with its chance level).

Besides each score, every model's per-item results are kept (``ItemScores``): a 0/1 per test image (accuracy,
image->text recall) or per test caption (text->image recall), and the class scores behind an AUC, so that
arms can be compared item by item (synthmed.vlp.report)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from synthmed.data.dataset import to_model_range
from synthmed.data.disk_array import rows_per_batch
from synthmed.metrics.augmentation import regime_name, stratified_subset
from synthmed.core.provenance import derive_seed
from synthmed.core.runtime import device_of
from synthmed.vlp.corpus import ScoringSet
from synthmed.vlp.model import DualEncoder


@torch.no_grad()
def image_features(model: DualEncoder, images, projected: bool) -> torch.Tensor:
    """Backbone features (for probing, as in ConVIRT) or normalised joint-space embeddings."""
    out, batch_size, device = [], rows_per_batch(images.shape), device_of(model)
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i : i + batch_size].to(device))
        out.append((model.embed_images(x) if projected else model.image(x)).cpu())
    return torch.cat(out)


def _embed_texts(model: DualEncoder, pooled: torch.Tensor) -> torch.Tensor:
    return model.embed_texts(pooled.to(device_of(model))).cpu()


@dataclass
class ClassScores:
    """The per-item inputs of a macro AUC: class scores [items, classes] (a NaN column: a class the model does
    not score) and each item's class index."""

    scores: np.ndarray
    labels: np.ndarray


# metric -> per-item 0/1 results [items] (the metric is their mean) or the ClassScores of an AUC
ItemScores = dict[str, "np.ndarray | ClassScores"]


def _auc(y: np.ndarray, probs: np.ndarray, classes: np.ndarray) -> float:
    aucs = [roc_auc_score(y == c, probs[:, k]) for k, c in enumerate(classes) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                       n_classes: int | None = None) -> tuple[dict[str, float], ItemScores]:
    """Logistic regression on frozen, standardised features: accuracy and macro AUC on test, and per test image:
    correct (0/1) and the class probabilities over
    ``n_classes`` columns (labels are class indices; NaN columns for classes absent from train_y)."""
    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x.numpy()), train_y)
    probs = clf.predict_proba(scaler.transform(test_x.numpy()))
    classes = clf.classes_
    correct = (classes[probs.argmax(1)] == test_y).astype(float)
    full = np.full((len(probs), max(n_classes or 0, int(max(classes.max(), np.max(test_y))) + 1)), np.nan)
    full[:, classes] = probs
    return ({"acc": float(correct.mean()), "auc": _auc(test_y, probs, classes)},
            {"acc": correct, "auc": ClassScores(full, np.asarray(test_y))})


def zero_shot(image_emb: torch.Tensor, class_text_emb: torch.Tensor, test_y: np.ndarray
                    ) -> tuple[dict[str, float], ItemScores]:
    """Each image gets the class whose caption embedding is most similar (y indexes class_text_emb rows): accuracy
    and macro AUC, and per image: correct (0/1) and the softmax of its similarities to the classes."""
    sims = (image_emb @ class_text_emb.T).numpy()
    probs = torch.as_tensor(sims).softmax(-1).numpy()
    correct = (sims.argmax(1) == test_y).astype(float)
    return ({"acc": float(correct.mean()), "auc": _auc(test_y, probs, np.arange(sims.shape[1]))},
            {"acc": correct, "auc": ClassScores(probs, np.asarray(test_y))})


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, positives,
                     ks=(1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Image->text and text->image recall@K with every caption of an image a positive.

    text_emb rows are the distinct candidate captions; positives[i, j] (bool, dense or scipy-sparse) says caption
    j describes image i.
    Image->text: is any of image i's captions among its K most similar captions? Text->image: is any
    image that caption j describes among the K images most similar to it? Similarities are computed
    ``chunk`` queries at a time, keeping only each query's top max(K).
    """
    return {name: float(hit.mean()) for name, hit in retrieval_hits(image_emb, text_emb, positives, ks, chunk).items()}


def retrieval_hits(image_emb: torch.Tensor, text_emb: torch.Tensor, positives, ks=(1, 5, 10), chunk: int = 1024
                   ) -> dict[str, np.ndarray]:
    """``retrieval_recall`` per query: i2t_r<K> a 0/1 per image, t2i_r<K> a 0/1 per distinct caption."""
    i2t = _hits_at(image_emb, text_emb, positives, ks, chunk)
    t2i = _hits_at(text_emb, image_emb, _rows(positives.T), ks, chunk)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def _rows(positives):
    """Row-sliceable positives: a sparse matrix in CSR (its transpose comes as CSC)."""
    return positives.tocsr() if sparse.issparse(positives) else positives


def _dense(block) -> np.ndarray:
    return block.toarray() if sparse.issparse(block) else np.asarray(block)


def _hits_at(queries: torch.Tensor, keys: torch.Tensor, positives, ks, chunk: int) -> dict[int, np.ndarray]:
    found = {k: np.zeros(len(queries)) for k in ks}
    for i in range(0, len(queries), chunk):
        top = (queries[i : i + chunk] @ keys.T).topk(min(max(ks), len(keys)), dim=1).indices.numpy()
        hit = np.take_along_axis(_dense(positives[i : i + chunk]), top, axis=1)
        for k in ks:
            found[k][i : i + len(hit)] = hit[:, :k].any(axis=1)
    return found


def _hit_chance(n: int, hits: np.ndarray, k: int) -> float:
    """Mean chance that K random picks of n candidates include one of ``hits`` positives:
    1 - C(n - h, K) / C(n, K), the product form staying in floating point."""
    if k >= n:
        return 1.0
    t = np.arange(k)
    misses = np.prod((n - hits[:, None] - t) / (n - t), axis=1).clip(min=0)
    return float(np.mean(1 - misses))


def retrieval_chance(positives, ks=(1, 5, 10)) -> dict[str, float]:
    """What recall@K a random ranking scores on this test set (it grows with positives per query and
    shrinks with candidates), and the number of candidates, reported beside every recall."""
    n_img, n_cap = positives.shape
    out = {"i2t_candidates": n_cap, "t2i_candidates": n_img}
    for k in ks:
        out[f"i2t_r{k}_chance"] = _hit_chance(n_cap, np.asarray(positives.sum(1)).ravel(), k)
        out[f"t2i_r{k}_chance"] = _hit_chance(n_img, np.asarray(positives.sum(0)).ravel(), k)
    return out


def evaluate_model(model: DualEncoder, tower, data: ScoringSet, probe_fractions: list[float],
                   templates: dict[str, str], rep: int, seed: int) -> tuple[dict[str, float], ItemScores]:
    """Linear probe per share of labelled real train images (labelled data only), zero-shot over the labels
    with a caption, and retrieval over every caption of the real test images: the scores, and per metric the
    per-item results they average (or, for an AUC, its class scores)."""
    out, items = {}, {}
    if data.classes:
        feats_train = image_features(model, data.probe_x, projected=False)
        feats_test = image_features(model, data.test.images, projected=False)
        for f in probe_fractions:
            idx = stratified_subset(data.probe_y, f, np.random.default_rng(derive_seed(seed, "probe", f, rep)))
            scores, per_item = linear_probe(feats_train[idx], data.probe_y[idx], feats_test, data.test_y,
                                                  len(data.classes))
            out.update({f"probe_{k}_{regime_name(f)}": v for k, v in scores.items()})
            items.update({f"probe_{k}_{regime_name(f)}": v for k, v in per_item.items()})
    img_emb = image_features(model, data.test.images, projected=True)
    with torch.no_grad():
        if data.zs_labels:
            class_emb = _embed_texts(model, tower.pooled([templates[c] for c in data.zs_labels]))
            zs_code = {data.classes.index(c): i for i, c in enumerate(data.zs_labels)}
            mask = np.isin(data.test_y, list(zs_code))
            zs_y = np.array([zs_code[y] for y in data.test_y[mask]])
            scores, per_item = zero_shot(img_emb[mask], class_emb, zs_y)
            out.update({f"zeroshot_{k}": v for k, v in scores.items()})
            items.update({f"zeroshot_{k}": v for k, v in per_item.items()})
        cap_emb = _embed_texts(model, tower.pooled(data.candidates))
    items.update(retrieval_hits(img_emb, cap_emb, data.positives))
    out.update({name: float(hit.mean()) for name, hit in items.items() if name.startswith(("i2t_", "t2i_"))})
    return out, items
