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
from synthmed.metrics.stats import macro_auc
from synthmed.vlp.evaluation import (ClassScores, linear_probe, retrieval_chance, retrieval_hits,
                                     retrieval_recall, zero_shot)
from synthmed.vlp.report import headline, report, summarise
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
    out = zero_shot(emb, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1, 1]))[0]
    assert out["acc"] == pytest.approx(2 / 3)
    g = np.random.default_rng(0)
    x = torch.as_tensor(np.concatenate([g.normal(0, 1, (20, 4)), g.normal(4, 1, (20, 4))]))
    y = np.repeat([0, 1], 20)
    assert linear_probe(x, y, x, y)[0] == {"acc": 1.0, "auc": 1.0}


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


def test_per_item_results_average_to_the_scores():
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    positives = torch.rand(30, 20, generator=g).numpy() < 0.15
    hits = retrieval_hits(img, txt, positives, chunk=7)
    assert hits["i2t_r5"].shape == (30,) and hits["t2i_r5"].shape == (20,)  # one per image, one per caption
    assert {k: float(v.mean()) for k, v in hits.items()} == pytest.approx(retrieval_recall(img, txt, positives))
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(0, 1, (60, 4)) + np.repeat(np.eye(3, 4), 20, 0) * 1.5)
    y = np.repeat([0, 1, 2], 20)
    scores, items = linear_probe(x[::2], y[::2], x, y, n_classes=4)
    assert scores == linear_probe(x[::2], y[::2], x, y)[0]
    assert items["acc"].mean() == pytest.approx(scores["acc"])
    assert items["auc"].scores.shape == (60, 4) and np.isnan(items["auc"].scores[:, 3]).all()  # class 3 unseen
    assert macro_auc(items["auc"].scores, items["auc"].labels)[0] == pytest.approx(scores["auc"])
    scores, items = zero_shot(x[:, :3], torch.eye(3, dtype=x.dtype), y)
    assert items["acc"].mean() == pytest.approx(scores["acc"])
    assert macro_auc(items["auc"].scores, items["auc"].labels)[0] == pytest.approx(scores["auc"])


def study(n_items=46, seeds=2):
    """Runs and per-item results of three arms: real_synth clearly better than real on accuracy, synth the same."""
    import pandas as pd

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n_items)
    difficulty = rng.normal(0, 1.5, n_items)
    rows, items = [], {}
    for arm, shift in (("real", 0.0), ("real_synth", 1.2), ("synth", 0.0)):
        for rep in range(seeds):
            correct = (rng.random(n_items) < 1 / (1 + np.exp(-(difficulty + shift)))).astype(float)
            recall = (rng.random(n_items) < 0.5).astype(float)
            probs = np.eye(3)[labels] * (1 + shift) + rng.normal(0, 1, (n_items, 3))
            items[(arm, rep)] = {"probe_acc_1pct": correct, "probe_auc_1pct": ClassScores(probs, labels),
                                 "i2t_r10": recall}
            rows.append({"arm": arm, "rep": rep, "pairs": 10, "probe_acc_1pct": correct.mean(),
                         "probe_auc_1pct": macro_auc(probs, labels)[0], "i2t_r10": recall.mean(),
                         "final_loss": 1.0, "temperature": 0.07})
    return pd.DataFrame(rows), items


def test_vlp_gains_are_tested_over_the_test_items():
    runs, items = study()
    table, flat = summarise(runs, items, draws=2000, seed=0)
    for m in ("probe_acc_1pct", "probe_auc_1pct", "i2t_r10"):
        for col in ("", "_ci_low", "_ci_high", "_p", "_p_holm", "_p_seeds", "_ci95_seeds", "_items",
                    "_min_detectable"):
            assert f"gain_{m}{col}" in table.columns, (m, col)
        assert f"gain_{m}_ci95" not in table.columns  # the seed interval is the _seeds one now
        for arm in ("real_synth", "synth"):
            for key in ("", "_ci_low", "_ci_high", "_p", "_p_holm", "_p_seeds"):
                assert f"vlp_gain_{m}_{arm}{key}" in flat
            assert flat[f"vlp_min_detectable_gain_{m}_{arm}"] > 0
            # the gain is the seed mean of the score's gain, whatever the test
            gain = runs[runs["arm"] == arm][m].mean() - runs[runs["arm"] == "real"][m].mean()
            assert flat[f"vlp_gain_{m}_{arm}"] == pytest.approx(gain)
    row = table.set_index("arm").loc["real_synth"]
    assert row["gain_probe_acc_1pct_items"] == 46
    # two seeds: the t-test cannot reach 0.05 on this gain; the items can, and Holm over the two arms keeps it
    assert flat["vlp_gain_probe_acc_1pct_real_synth_p_seeds"] > 0.05
    assert flat["vlp_gain_probe_acc_1pct_real_synth_p_holm"] < 0.05
    assert flat["vlp_gain_probe_auc_1pct_real_synth_p_holm"] < 0.05
    # Holm over the family of two gains: the smaller p doubled, the larger kept (running maximum)
    assert flat["vlp_gain_probe_acc_1pct_real_synth_p_holm"] == pytest.approx(
        2 * flat["vlp_gain_probe_acc_1pct_real_synth_p"])
    assert flat["vlp_gain_probe_acc_1pct_synth_p_holm"] == pytest.approx(flat["vlp_gain_probe_acc_1pct_synth_p"])
    assert summarise(runs, items, draws=2000, seed=0)[1] == flat  # seeded
    key, p_key = headline(["real", "real_synth", "synth"], [0.01], flat)
    assert key == "vlp_gain_probe_auc_1pct_real_synth" and p_key == key + "_p_holm"  # the names dvc exp show has

    chance = {"i2t_candidates": 46, "t2i_candidates": 46, "i2t_r10_chance": 0.217}
    text = report(table, ["real", "real_synth", "synth"], [0.01], 2, 5, "test", chance, [], 2000)
    assert "### `real_synth` - `real`" in text and "### `synth` - `real`" in text
    assert "| probe_acc_1pct | 46 | +0." in text and "2000 draws" in text and "80 % power" in text
    assert f"| {row['gain_probe_auc_1pct_min_detectable']:.3f} |" in text
