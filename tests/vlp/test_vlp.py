"""The VLP study's parts: InfoNCE, the learned temperature, retrieval recall and arm bookkeeping."""

import math

import numpy as np
import pytest
import torch

from synthmed.text.encoder import TextEncoder
from synthmed.vlp.evaluation import linear_probe, retrieval_recall, zero_shot
from synthmed.vlp.model import MAX_LOGIT_SCALE, info_nce
from synthmed.vlp.text import TextTower
from synthmed.vlp.train import VLPConfig, pretrain


def test_info_nce_matches_a_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(math.log(2.0))  # logits = 2 * cosine
    # logits [[2, 1.2], [0, 1.6]]; image->text rows, text->image columns
    l_i = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    l_t = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert info_nce(img, txt, scale).item() == pytest.approx((l_i + l_t) / 2, rel=1e-6)


def test_retrieval_recall_on_a_constructed_case():
    # 3 images, 3 captions; image 0 -> caption 0 is top-1, image 1's caption ranks 2nd, image 2's 3rd
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.0, 0.9, 0.1]])
    out = retrieval_recall(img, txt, np.array([0, 1, 2]), ks=(1, 2, 3))
    # image 1 sees captions scored [0, 0.5, 0.9] -> its caption (1) ranks 2nd; image 2 sees [0, 0, 0.1] -> 1st
    assert out["i2t_r1"] == pytest.approx(2 / 3) and out["i2t_r2"] == 1.0
    # caption 0 scores images [1, 0, 0] -> image 0 first; caption 1 [0.9, 0.5, 0] -> image 1 second;
    # caption 2 [0, 0.9, 0.1] -> image 2 second
    assert out["t2i_r1"] == pytest.approx(1 / 3) and out["t2i_r2"] == 1.0 and out["t2i_r3"] == 1.0


def test_zero_shot_and_linear_probe_score_known_answers():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    out = zero_shot(emb, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1, 1]))
    assert out["acc"] == pytest.approx(2 / 3)
    g = np.random.default_rng(0)
    x = torch.as_tensor(np.concatenate([g.normal(0, 1, (20, 4)), g.normal(4, 1, (20, 4))]))
    y = np.repeat([0, 1], 20)
    assert linear_probe(x, y, x, y) == {"acc": 1.0, "auc": 1.0}


@pytest.fixture(scope="module")
def tower():
    return TextTower(TextEncoder(max_length=8), trainable_layers=0)


def toy_corpus(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 16, 16, generator=g) * 255).to(torch.uint8), [f"caption {i}" for i in range(n)]


def test_temperature_is_learned_and_stays_bounded(tower):
    x, texts = toy_corpus(12, 0)
    cfg = VLPConfig(steps=15, batch_size=8, lr=0.5, width=4, depth=1, embed_dim=8, text_trainable_layers=0)
    model, _, log = pretrain(x, texts, tower, cfg, seed=0)
    assert model.logit_scale.item() != pytest.approx(math.log(1 / 0.07))  # it moved
    assert 0.0 <= model.logit_scale.item() <= MAX_LOGIT_SCALE  # a huge lr cannot push it past 1/0.01
    assert all(math.isfinite(v) for v in log)


def test_arms_use_the_same_initialisation_and_step_count(tower):
    (xa, ta), (xb, tb) = toy_corpus(10, 1), toy_corpus(30, 2)
    none = VLPConfig(steps=0, batch_size=8, lr=1e-3, width=4, depth=1, embed_dim=8, text_trainable_layers=0)
    a, _, _ = pretrain(xa, ta, tower, none, seed=5)
    b, _, _ = pretrain(xb, tb, tower, none, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    cfg = VLPConfig(steps=4, batch_size=8, lr=1e-3, width=4, depth=1, embed_dim=8, text_trainable_layers=0)
    assert len(pretrain(xa, ta, tower, cfg, seed=5)[2]) == len(pretrain(xb, tb, tower, cfg, seed=5)[2]) == 4


def test_tuning_text_layers_leaves_the_shared_tower_untouched():
    tower = TextTower(TextEncoder(max_length=8), trainable_layers=1)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    x, texts = toy_corpus(8, 3)
    cfg = VLPConfig(steps=2, batch_size=8, lr=1e-2, width=4, depth=1, embed_dim=8, text_trainable_layers=1)
    _, tuned, _ = pretrain(x, texts, tower, cfg, seed=0)
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())  # the next arm starts the same
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("layer.5" in k for k in changed)  # only the last of MiniLM's 6 layers was tuned


def test_vlp_summary_pairs_arms_with_real_by_seed():
    import pandas as pd

    from stages.evaluate_vlp import summarise

    runs = pd.DataFrame({"arm": ["real"] * 3 + ["synth"] * 3, "rep": [2, 0, 1, 0, 1, 2], "pairs": 10,
                         "probe_auc_1pct": [0.8, 0.6, 0.7, 0.7, 0.9, 1.1]})
    table, flat = summarise(runs)
    assert flat["vlp_probe_auc_1pct_real"] == pytest.approx(0.7)
    # paired by rep: synth - real = 0.1, 0.2, 0.3
    assert flat["vlp_gain_probe_auc_1pct_synth"] == pytest.approx(0.2)
    assert flat["vlp_gain_probe_auc_1pct_synth_p"] == pytest.approx(0.07418, abs=1e-4)
    assert "vlp_gain_probe_auc_1pct_real" not in flat


def test_report_without_labels_has_retrieval_only():
    import pandas as pd

    from stages.evaluate_vlp import report, summarise

    runs = pd.DataFrame({"arm": ["real", "real", "synth", "synth"], "rep": [0, 1, 0, 1], "pairs": 4,
                         "i2t_r10": [0.1, 0.2, 0.1, 0.1], "t2i_r10": [0.2, 0.2, 0.1, 0.3]})
    table, _ = summarise(runs)
    p = type("P", (), {"probe_fractions": [0.1, 1.0], "seeds": 2, "steps": 5, "test_split": "test",
                       "arms": ["real", "synth"]})()
    text = report(table, p)
    assert "## Retrieval" in text and "Linear probe" not in text and "| synth | -0.050" in text
