"""The VLP study's parts: InfoNCE, the learned temperature, retrieval recall and its chance level, every
caption of an image as a pair and a positive, arm bookkeeping and the report."""

import itertools
import math

import numpy as np
from scipy import sparse
import pytest
import torch

from synthmed.text.encoder import TextEncoder
from synthmed.vlp.corpus import scoring_set, split_pairs
from synthmed.vlp.evaluation import linear_probe, retrieval_chance, retrieval_recall, zero_shot
from synthmed.vlp.report import report, summarise
from synthmed.vlp.model import MAX_LOGIT_SCALE, info_nce
from synthmed.vlp.text import TextTower
from synthmed.vlp.train import VLPConfig, distinct_pairs, pretrain


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
    out = retrieval_recall(img, txt, np.eye(3, dtype=bool), ks=(1, 2, 3))
    # image 1 sees captions scored [0, 0.5, 0.9] -> its caption (1) ranks 2nd; image 2 sees [0, 0, 0.1] -> 1st
    assert out["i2t_r1"] == pytest.approx(2 / 3) and out["i2t_r2"] == 1.0
    # caption 0 scores images [1, 0, 0] -> image 0 first; caption 1 [0.9, 0.5, 0] -> image 1 second;
    # caption 2 [0, 0.9, 0.1] -> image 2 second
    assert out["t2i_r1"] == pytest.approx(1 / 3) and out["t2i_r2"] == 1.0 and out["t2i_r3"] == 1.0


def test_retrieval_in_chunks_ranks_as_a_full_sort_does():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(37, 8, generator=g), torch.randn(23, 8, generator=g)
    positives = torch.rand(37, 23, generator=g).numpy() < 0.1
    chunked = retrieval_recall(img, txt, positives, ks=(1, 5, 10), chunk=5)
    sims = img @ txt.T
    for k in (1, 5, 10):
        i2t = np.take_along_axis(positives, sims.argsort(1, descending=True)[:, :k].numpy(), 1).any(1).mean()
        t2i = np.take_along_axis(positives.T, sims.T.argsort(1, descending=True)[:, :k].numpy(), 1).any(1).mean()
        assert chunked[f"i2t_r{k}"] == pytest.approx(i2t) and chunked[f"t2i_r{k}"] == pytest.approx(t2i)
    assert retrieval_recall(img, txt, sparse.csr_matrix(positives), chunk=5) == retrieval_recall(img, txt, positives)


def test_every_caption_of_an_image_is_a_positive():
    # image 0 has captions 0 and 2; its most similar caption is 2, which the first-caption-only rule missed
    img = torch.eye(3)
    txt = torch.tensor([[0.2, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    positives = np.array([[True, False, True], [False, True, False], [False, False, False]])
    out = retrieval_recall(img, txt, positives, ks=(1,))
    assert out["i2t_r1"] == pytest.approx(2 / 3)  # images 0 and 1 hit; image 2 has no caption here
    assert out["t2i_r1"] == pytest.approx(1.0)  # caption 0 -> image 0, 1 -> 1, 2 -> 0


def test_retrieval_chance_matches_every_random_ranking():
    positives = np.array([[True, True, False, False, False], [False, False, True, False, False],
                          [False, False, False, True, True], [True, False, False, False, True]])
    out = retrieval_chance(positives, ks=(1, 2, 5))
    for k in (1, 2, 5):
        for name, pos in (("i2t", positives), ("t2i", positives.T)):
            n = pos.shape[1]
            rankings = list(itertools.permutations(range(n)))
            exact = np.mean([np.mean([row[list(r[:k])].any() for r in rankings]) for row in pos])
            assert out[f"{name}_r{k}_chance"] == pytest.approx(exact)
    assert out["i2t_candidates"] == 5 and out["t2i_candidates"] == 4 and out["i2t_r5_chance"] == 1.0
    assert retrieval_chance(sparse.csr_matrix(positives), ks=(1, 2, 5)) == out


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

    runs = pd.DataFrame({"arm": ["real"] * 3 + ["synth"] * 3, "rep": [2, 0, 1, 0, 1, 2], "pairs": 10,
                         "probe_auc_1pct": [0.8, 0.6, 0.7, 0.7, 0.9, 1.1],
                         "final_loss": [1.0, 1.1, 1.2, 0.1, 0.2, 0.3], "temperature": 0.07})
    table, flat = summarise(runs)
    # losses and temperatures of arms trained on different corpora are not outcomes: no gain, no p-value
    assert not [k for k in flat if "final_loss" in k or "temperature" in k]
    assert flat["vlp_probe_auc_1pct_real"] == pytest.approx(0.7)
    # paired by rep: synth - real = 0.1, 0.2, 0.3
    assert flat["vlp_gain_probe_auc_1pct_synth"] == pytest.approx(0.2)
    assert flat["vlp_gain_probe_auc_1pct_synth_p"] == pytest.approx(0.07418, abs=1e-4)
    assert flat["vlp_gain_probe_auc_1pct_synth_p_holm"] == pytest.approx(0.07418, abs=1e-4)  # a family of one
    assert "vlp_gain_probe_auc_1pct_real" not in flat


def test_report_without_labels_has_retrieval_only():
    import pandas as pd

    runs = pd.DataFrame({"arm": ["real", "real", "synth", "synth"], "rep": [0, 1, 0, 1], "pairs": 4,
                         "i2t_r10": [0.1, 0.2, 0.1, 0.1], "t2i_r10": [0.2, 0.2, 0.1, 0.3]})
    table, _ = summarise(runs)
    chance = {"i2t_candidates": 40, "t2i_candidates": 12, "i2t_r10_chance": 0.25, "t2i_r10_chance": 0.8333}
    text = report(table, ["real", "synth"], [0.1, 1.0], 2, 5, "test", chance, ["retrieval only: no labels"])
    assert "## Retrieval" in text and "Linear probe" not in text and "| synth | -0.050" in text
    assert "40 distinct test captions" in text and "| chance | 0.250 | 0.833 |" in text
    assert "- retrieval only: no labels" in text and "Holm" in text


def test_pairs_keep_every_caption_and_zero_shot_says_what_it_skips(tmp_path, capsys):
    from tests.helpers import write_imagefolder

    rows = [("a.png", "generic prompt"), ("a.png", "a left lesion"), ("b.png", "generic prompt"),
            ("b.png", "a right lesion"), ("c.png", "generic prompt"), ("c.png", "no lesion"),
            ("d.png", "generic prompt"), ("d.png", "two lesions")]
    folder = write_imagefolder(tmp_path / "ds", rows, split=["train"] * 4 + ["test"] * 4,
                               label=["x", "x", "y", "y", "x", "x", "y", "y"])
    train = split_pairs(str(folder), ["train"], "real")
    assert len(train) == 4 and len(train.images) == 2 and train.image_of.tolist() == [0, 0, 1, 1]
    data = scoring_set(str(folder), train, "test", {"x": "an x image"})
    assert data.candidates == ["generic prompt", "no lesion", "two lesions"]
    assert data.positives.toarray().tolist() == [[True, True, False], [True, False, True]]
    assert data.zs_labels == ["x"] and "no caption in evaluate_vlp.zero_shot_templates for: y" in data.notes[0]
    assert "zero-shot skipped" in scoring_set(str(folder), train, "test", {}).notes[0]


def test_a_batch_keeps_one_pair_per_caption_and_per_image():
    caption_ids, image_ids = torch.tensor([0, 1, 0, 2, 3, 4]), torch.tensor([0, 0, 1, 2, 2, 3])
    assert distinct_pairs(caption_ids, image_ids).tolist() == [0, 3, 5]  # 1: image 0 again; 2: caption 0; 4: image 2
