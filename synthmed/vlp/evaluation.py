"""Evaluating a pretrained dual encoder on real labelled images: linear probe, zero-shot, retrieval."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from synthmed.data.dataset import to_model_range
from synthmed.vlp.model import DualEncoder


@torch.no_grad()
def image_features(model: DualEncoder, images: torch.Tensor, projected: bool, batch_size: int = 256) -> torch.Tensor:
    """Backbone features (for probing, as in ConVIRT) or normalised joint-space embeddings."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i : i + batch_size])
        out.append(model.embed_images(x) if projected else model.image(x))
    return torch.cat(out)


def _auc(y: np.ndarray, probs: np.ndarray, classes: np.ndarray) -> float:
    aucs = [roc_auc_score(y == c, probs[:, k]) for k, c in enumerate(classes) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray
                 ) -> dict[str, float]:
    """Logistic regression on frozen, standardised features: accuracy and macro AUC on test."""
    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x.numpy()), train_y)
    probs = clf.predict_proba(scaler.transform(test_x.numpy()))
    classes = clf.classes_
    pred = classes[probs.argmax(1)]
    return {"acc": float((pred == test_y).mean()), "auc": _auc(test_y, probs, classes)}


def zero_shot(image_emb: torch.Tensor, class_text_emb: torch.Tensor, test_y: np.ndarray) -> dict[str, float]:
    """Each image gets the class whose caption embedding is most similar; y indexes class_text_emb rows."""
    sims = (image_emb @ class_text_emb.T).numpy()
    return {"acc": float((sims.argmax(1) == test_y).mean()),
            "auc": _auc(test_y, torch.as_tensor(sims).softmax(-1).numpy(), np.arange(sims.shape[1]))}


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, image_caption: np.ndarray,
                     ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@K.

    text_emb rows are the unique captions; image_caption[i] is the row of image i's caption.
    Image->text: is image i's caption among its K most similar captions? Text->image: is any
    image of caption j among the K images most similar to it?
    """
    sims = image_emb @ text_emb.T  # [images, captions]
    out = {}
    i2t = sims.argsort(dim=1, descending=True).numpy()
    t2i = sims.T.argsort(dim=1, descending=True).numpy()
    owners = [np.flatnonzero(image_caption == j) for j in range(len(text_emb))]
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean([image_caption[i] in i2t[i, :k] for i in range(len(i2t))]))
        out[f"t2i_r{k}"] = float(np.mean([np.isin(t2i[j, :k], owners[j]).any() for j in range(len(t2i))
                                          if len(owners[j])]))
    return out
