import numpy as np
import pandas as pd
import pytest
import torch

from synthmed.metrics.augmentation import (plan_cells, plot, prompt_adherence, run_cells, run_study, summarise,
                                          train_judges)
from synthmed.metrics.downstream import ClassifierConfig
from synthmed.metrics.stats import holm


def test_regimes_and_arms_get_the_right_counts_and_pair_by_seed():
    labels = np.repeat([0, 1, 2], [50, 30, 20])  # 100 real train images
    cells = plan_cells(labels, pool_size=120, fractions=[0.1, 1.0], ratios=[0.5, 2.0], arms=["real_synth", "synth"],
                       reps=3, seed=0)
    assert len(cells) == 2 * 3 * 4  # regimes x seeds x (real, 0.5x, 2x, synth)
    by = {(c.regime, c.arm, c.rep): c for c in cells}
    small = by[("10pct", "real", 0)]
    assert np.bincount(labels[small.real_idx]).tolist() == [5, 3, 2]  # stratified
    assert len(by[("10pct", "0p5x", 0)].synth_idx) == 5 and len(by[("10pct", "2x", 0)].synth_idx) == 20
    assert len(by[("10pct", "synth", 0)].real_idx) == 0 and len(by[("10pct", "synth", 0)].synth_idx) == 10
    assert len(by[("100pct", "real", 1)].real_idx) == 100
    capped = by[("100pct", "2x", 1)]
    assert capped.synth_requested == 200 and len(capped.synth_idx) == 120  # the pool has only 120
    assert len(np.unique(capped.synth_idx)) == 120  # drawn without replacement
    for rep in range(3):  # within a repetition every arm shares the real subset and classifier seed
        arms = [c for c in cells if c.regime == "10pct" and c.rep == rep]
        assert len({c.clf_seed for c in arms}) == 1
        assert all(np.array_equal(c.real_idx, small.real_idx if rep == 0 else arms[0].real_idx)
                   for c in arms if c.arm != "synth")
    assert not np.array_equal(by[("10pct", "real", 0)].real_idx, by[("10pct", "real", 1)].real_idx)
    assert len({by[("10pct", "real", r)].clf_seed for r in range(3)}) == 3
    tiny = plan_cells(labels, 10, [0.01], [1.0], [], 1, 0)
    assert np.bincount(labels[tiny[0].real_idx]).tolist() == [1, 1, 1]  # at least one image per class


def test_summary_gains_and_p_values_on_known_runs():
    runs = pd.DataFrame({
        "regime": ["10pct"] * 6, "arm": ["real"] * 3 + ["1x"] * 3, "rep": [0, 1, 2] * 2,
        "n_real": 10, "n_synth": [0] * 3 + [10] * 3, "n_synth_requested": 0,
        "auc": [0.6, 0.7, 0.8, 0.7, 0.9, 1.1], "acc": [0.5] * 6, "bacc": [0.5, 0.5, 0.5, 0.6, 0.6, 0.6],
    })
    table, flat = summarise(runs)
    assert flat["aug_auc_10pct_real"] == pytest.approx(0.7)
    assert flat["aug_gain_auc_10pct_1x"] == pytest.approx(0.2)  # paired differences 0.1, 0.2, 0.3
    assert flat["aug_gain_auc_10pct_1x_p"] == pytest.approx(0.07418, abs=1e-4)  # t = 3.46 with 2 df
    assert flat["aug_gain_acc_10pct_1x_p"] == pytest.approx(1.0) and flat["aug_gain_bacc_10pct_1x_p"] == pytest.approx(0.25)
    row = table.set_index("arm").loc["1x"]
    assert row["gain_auc_ci95"] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-4)


def test_cells_train_and_score_on_the_real_test_set():
    g = torch.Generator().manual_seed(0)
    # two classes that differ in brightness: learnable in a few steps
    def make(n):
        y = torch.arange(n) % 2
        x = (torch.rand(n, 1, 16, 16, generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
        return x, y
    (rx, ry), (sx, sy), (tx, ty) = make(40), make(40), make(30)
    cells = plan_cells(ry.numpy(), len(sx), [0.5], [1.0], ["real_synth", "synth"], 2, 0)
    runs = run_cells(cells, rx, ry, sx, sy, tx, ty, 2, ClassifierConfig(steps=40, lr=0.01, batch_size=16))
    assert len(runs) == 6 and set(runs["arm"]) == {"real", "1x", "synth"}
    assert runs["auc"].min() > 0.9 and (runs["n_synth"] == [0, 20, 20, 0, 20, 20]).all()


def test_holm_adjusts_in_order_and_stays_monotone():
    # sorted 0.005, 0.01, 0.03, 0.04 scaled by 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_summary_corrects_p_values_over_every_cell_of_a_metric():
    runs = pd.DataFrame({
        "regime": ["10pct"] * 9, "arm": ["real"] * 3 + ["1x"] * 3 + ["synth"] * 3, "rep": [0, 1, 2] * 3,
        "n_real": 10, "n_synth": 0, "n_synth_requested": 0,
        "auc": [0.6, 0.7, 0.8, 0.7, 0.9, 1.1, 0.5, 0.7, 0.8], "acc": 0.5, "bacc": 0.5,
    })
    table, flat = summarise(runs)
    raw = [flat["aug_gain_auc_10pct_1x_p"], flat["aug_gain_auc_10pct_synth_p"]]
    assert [flat["aug_gain_auc_10pct_1x_p_holm"], flat["aug_gain_auc_10pct_synth_p_holm"]] == pytest.approx(holm(raw))
    assert flat["aug_gain_auc_10pct_1x_p_holm"] > flat["aug_gain_auc_10pct_1x_p"]  # two tests: stricter


def test_study_without_labelled_synthetic_images_runs_the_real_arm_and_adherence_scores_synthetic(tmp_path):
    g = torch.Generator().manual_seed(0)

    def make(n, labelled=True):
        y = torch.arange(n) % 2
        x = (torch.rand(n, 1, 16, 16, generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
        return x, y if labelled else torch.full_like(y, -1)
    cfg = ClassifierConfig(steps=40, lr=0.01, batch_size=16)
    real, test, synth = make(20), make(20), make(10)
    study = run_study(real, make(10, labelled=False), test, 2, [1.0], [1.0], ["real_synth", "synth"], 2, cfg, 0)
    assert set(study.runs["arm"]) == {"real"} and study.flat["n_synthetic_pool"] == 0
    adherence, confusion = prompt_adherence(train_judges(real, 2, cfg, 2, 0), synth, test, 2, 0, resamples=200)
    assert adherence["adherence_acc"] > 0.9 and adherence["adherence_real_test_acc"] > 0.9
    assert adherence["adherence_acc_ci_low"] <= adherence["adherence_acc"] <= adherence["adherence_acc_ci_high"]
    assert adherence["adherence_chance"] == pytest.approx(0.5)
    # one row per judge and synthetic image; its hits are the adherence figure
    assert len(confusion) == 2 * 10 and confusion["prompt_label"].tolist()[:10] == synth[1].tolist()
    hits = (confusion["prompt_label"] == confusion["predicted_label"]).mean()
    assert hits == pytest.approx(adherence["adherence_acc"])
    plot(pd.DataFrame(), tmp_path / "empty.png", empty_note="no labels")  # unlabelled data still gets its figure
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_a_judge_trained_with_blur_still_reads_blurred_images():
    # the label is the side of a bright bar (left or right): a layout, as a slice's level is. Fine noise texture
    # differs by class too, a shortcut that blur erases; the judge trained with blur must read the layout
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 2
        x = torch.full((n, 1, 24, 24), 40.0)
        for i in range(n):
            col = 4 + int(torch.randint(4, (1,), generator=g)) + 12 * int(y[i])
            x[i, :, 4:20, col : col + 4] = 200
        texture = torch.rand(n, 1, 24, 24, generator=g) * 60 * y.view(-1, 1, 1, 1)
        return (x + texture).clamp(0, 255).to(torch.uint8), y
    real, test = make(40), make(40)
    base = dict(steps=120, lr=0.01, batch_size=16)
    plain, judge = (prompt_adherence(train_judges(real, 2, ClassifierConfig(**base, blur_sigma=blur), 1, 0), test,
                                     test, 2, 0, resamples=0)[0] for blur in (0.0, 2.0))
    assert judge["adherence_real_test_acc"] > 0.9 and judge["adherence_real_test_blurred_acc"] > 0.9
    assert plain["adherence_real_test_blurred_acc"] < judge["adherence_real_test_blurred_acc"] - 0.2  # texture-bound
