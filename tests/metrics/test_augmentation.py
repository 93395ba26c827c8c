import numpy as np
import pandas as pd
import pytest
import torch

from synthmed.metrics import augmentation as aug
from synthmed.metrics.augmentation import (Pool, plan_cells, plot, prompt_adherence, run_cells, run_study, summarise,
                                          synthetic_pools, train_judges)
from synthmed.metrics.downstream import ClassifierConfig
from synthmed.metrics.stats import holm


def test_regimes_and_arms_get_the_right_counts_and_pair_by_seed():
    labels = np.repeat([0, 1, 2], [50, 30, 20])  # 100 real train images
    sources = np.concatenate([np.arange(100), np.arange(20)])  # one synthetic twin each, a second for images 0-19
    cells = plan_cells(labels, sources, fractions=[0.1, 1.0], ratios=[0.5, 2.0], arms=["real_synth", "synth"],
                       reps=3, seed=0)
    assert len(cells) == 2 * 3 * 4  # regimes x seeds x (real, 0.5x, 2x, synth); 1.0 is the ceiling's regime
    by = {(c.regime, c.arm, c.rep): c for c in cells}
    small = by[("10pct", "real", 0)]
    assert np.bincount(labels[small.real_idx]).tolist() == [5, 3, 2]  # stratified
    assert len(by[("10pct", "0p5x", 0)].synth_idx) == 5
    own = 10 + np.isin(np.arange(20), small.real_idx).sum()  # the subset's own synthetic images
    assert by[("10pct", "2x", 0)].synth_requested == 20 and len(by[("10pct", "2x", 0)].synth_idx) == own  # short
    synth = by[("10pct", "synth", 0)]
    assert len(synth.real_idx) == 0 and np.array_equal(np.sort(sources[synth.synth_idx]), small.real_idx)  # twins
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
    tiny = plan_cells(labels, sources, [0.01], [1.0], [], 1, 0)
    assert np.bincount(labels[tiny[0].real_idx]).tolist() == [1, 1, 1]  # at least one image per class
    ceiling = tiny[-1]  # 1.0 is not a fraction: the real-only ceiling is added once, with the same seed
    assert len(tiny) == 2 and (ceiling.regime, ceiling.arm, len(ceiling.real_idx)) == ("100pct", "real", 100)
    assert ceiling.clf_seed == tiny[0].clf_seed and len(plan_cells(labels, sources, [0.01], [1.0], [], 1, 0, False)) == 1


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
    pool = Pool(sx, sy, np.arange(40), ["train"] * 40)  # synthetic image i made from real image i's caption
    cells = plan_cells(ry.numpy(), pool.conditions, [0.5], [1.0], ["real_synth", "synth"], 2, 0)
    runs = run_cells(cells, rx, ry, pool, tx, ty, 2, ClassifierConfig(steps=40, lr=0.01, batch_size=16))
    assert len(runs) == 8 and set(runs["arm"]) == {"real", "1x", "synth"}  # + the ceiling's two
    assert runs["auc"].min() > 0.9 and (runs["n_synth"] == [0, 20, 20, 0, 20, 20, 0, 0]).all()


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
    unlabelled = make(10, labelled=False)
    study = run_study(real, Pool(*unlabelled, np.arange(10), ["train"] * 10), test, 2, [1.0], [1.0],
                      ["real_synth", "synth"], 2, cfg, 0)
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


def synthetic_metadata():
    """Ten train images (labels a/b), and the synthetic set an image-conditioned model makes of every split."""
    train = [f"t{i}.png" for i in range(10)]
    rows = [{"split": "train", "mode": "reconstruction", "source_file_name": f, "partner_file_name": "",
             "label": "ab"[i % 2]} for i, f in enumerate(train)]
    rows += [{"split": "train", "mode": "interpolation", "source_file_name": f,
              "partner_file_name": train[(i + 2) % 10], "label": "ab"[i % 2]} for i, f in enumerate(train)]
    rows += [{"split": "val", "mode": "reconstruction", "source_file_name": "v0.png", "partner_file_name": "",
              "label": "a"},
             {"split": "val", "mode": "reconstruction", "source_file_name": "t0.png", "partner_file_name": "",
              "label": "a"},  # a val caption can never feed a pool, whatever its source says
             {"split": "test", "mode": "interpolation", "source_file_name": "x0.png", "partner_file_name": "x1.png",
              "label": "b"},
             {"split": "", "mode": "reconstruction", "source_file_name": "", "partner_file_name": "", "label": "a"}]
    return train, pd.DataFrame(rows)


def test_each_cell_draws_synthetic_images_of_its_own_real_subset_and_never_of_val_captions():
    train, meta = synthetic_metadata()
    labels = aug.encode(meta["label"], ["a", "b"])
    modes = {"reconstruction": "", "interpolation": "_interpolation"}
    pools = synthetic_pools(meta, torch.zeros(len(meta), 1, 4, 4, dtype=torch.uint8), labels, train, modes)
    assert [len(p) for p in pools.values()] == [10, 10] and all(set(p.splits) == {"train"} for p in pools.values())
    assert pools["reconstruction"].conditions.tolist() == [[i, aug.NONE] for i in range(10)]
    assert pools["interpolation"].conditions[:, 1].tolist() == [(i + 2) % 10 for i in range(10)]
    assert pools["reconstruction"].kind == "embeddings"
    conditions = aug.condition_rows(meta, train)
    assert conditions[20:24].tolist() == [[aug.OUTSIDE, aug.NONE], [0, aug.NONE], [aug.OUTSIDE, aug.OUTSIDE],
                                          [aug.NONE, aug.NONE]]
    real_labels = np.arange(10) % 2
    merged = np.concatenate([p.conditions for p in pools.values()])
    cells = plan_cells(real_labels, {k: p.conditions for k, p in pools.items()}, [0.4, 0.6], [1.0, 2.0],
                       ["real_synth", "synth", "synth_then_real"], 3, 0)
    subset = {(c.regime, c.rep): c.real_idx for c in cells if c.arm == "real"}
    drew = 0
    for cell in cells:
        used = merged[cell.synth_idx]
        assert np.isin(used[used >= 0], subset[(cell.regime, cell.rep)]).all(), (cell.regime, cell.arm)
        assert (used[:, 0] >= 0).all()
        drew += len(cell.synth_idx)
    assert drew > 0
    by = {(c.regime, c.arm, c.rep): c for c in cells}
    real = by[("60pct", "real", 0)].real_idx
    assert sorted(merged[by[("60pct", "1x", 0)].synth_idx, 0]) == sorted(real)  # 1x: each image's own twin
    # an interpolation joins the subset's images only: its partner two rows on must be in the subset too
    inside = [i for i in real if (i + 2) % 10 in real]
    assert sorted(merged[by[("60pct", "synth_then_real_interpolation", 0)].synth_idx, 0]) == sorted(inside)


def brightness(n, g, labelled=True):
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 16, 16, generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return x, y if labelled else torch.full_like(y, -1)


def test_synth_then_real_fine_tunes_from_the_synthetic_pretrain(monkeypatch):
    g = torch.Generator().manual_seed(0)
    (rx, ry), (sx, sy), (tx, ty), val = brightness(20, g), brightness(20, g), brightness(20, g), brightness(8, g)
    pool = Pool(sx, sy, np.arange(20), ["train"] * 20)
    calls, train = [], aug.train_classifier

    def recording(images, labels, *args, init=None, **kw):
        model = train(images, labels, *args, init=init, **kw)
        calls.append({"images": images[:], "labels": labels, "init": init, "val": args[3] if len(args) > 3 else None,
                      "state": {k: v.clone() for k, v in model.state_dict().items()}})
        return model
    monkeypatch.setattr(aug, "train_classifier", recording)
    cells = plan_cells(ry.numpy(), pool.conditions, [0.5], [], ["synth_then_real"], 1, 0, ceiling=False)
    runs = run_cells(cells, rx, ry, pool, tx, ty, 2, ClassifierConfig(steps=30, lr=0.01, batch_size=8, val_every=10),
                     val=val)
    assert runs["arm"].tolist() == ["real", "synth_then_real"] and runs["auc"].min() > 0.9
    control, pretrain, finetune = calls
    cell = cells[1]
    assert cell.pretrain and len(cell.synth_idx) == 10  # all the subset's synthetic images
    assert torch.equal(pretrain["images"], sx[cell.synth_idx]) and pretrain["init"] is None and pretrain["val"] is None
    assert torch.equal(finetune["images"], rx[cell.real_idx]) and finetune["val"] is not None  # val picks weights
    assert all(torch.equal(finetune["init"][k], pretrain["state"][k]) for k in pretrain["state"])
    assert torch.equal(control["images"], finetune["images"]) and control["init"] is None


def test_every_arm_states_its_information_budget_and_claim():
    g = torch.Generator().manual_seed(1)
    real, test = brightness(20, g), brightness(10, g)
    sx, sy = brightness(24, g)
    # twins of the 20 real images (one made from an unlabelled real image's caption), two from val captions
    real = (real[0], torch.cat([real[1][:19], torch.tensor([-1])]))
    sources = np.concatenate([np.arange(20), [aug.OUTSIDE, aug.OUTSIDE], [0, 2]])
    splits = ["train"] * 20 + ["val", "val"] + ["train", "train"]  # two second captions of images 0 and 2
    sy = torch.cat([real[1][:20].clamp(min=0), sy[20:22], real[1][[0, 2]]])
    study = run_study(real, Pool(sx, sy, sources, splits), test, 2, [0.5], [1.0],
                      ["real_synth", "synth", "synth_then_real"], 2, ClassifierConfig(steps=3, lr=0.01, batch_size=4),
                      0, n_generator=17)
    runs = study.runs
    assert set(aug.BUDGET) <= set(runs.columns) and (runs["n_generator_captions"] == 17).all()
    assert runs.groupby("arm", sort=False).size().to_dict() == {"real": 4, "1x": 2, "synth": 2, "synth_then_real": 2}
    for rep in (0, 1):
        row = runs[runs["rep"] == rep].set_index(["regime", "arm"])
        real_idx = study.cells[[c.rep == rep and c.arm == "real" for c in study.cells].index(True)].real_idx
        n, extra = len(real_idx), int(np.isin([0, 2], real_idx).sum())  # the subset's second captions
        assert n == 9  # 5 of the 10 labelled 0, 4 of the 9 labelled 1 (image 19 is unlabelled)
        assert row.loc[("50pct", "real"), ["n_real_images", "n_synth", "n_labels", "n_pool_conditions"]].tolist() == [
            n, 0, n, 0] and row.loc[("50pct", "real"), "pool_splits"] == "none"
        assert row.loc[("50pct", "1x"), ["n_real_images", "n_synth", "n_labels", "n_pool_conditions"]].tolist() == [
            n, n, n, n] and row.loc[("50pct", "1x"), "pool_splits"] == "train"
        assert row.loc[("50pct", "synth"), ["n_real_images", "n_synth", "n_labels", "n_pool_conditions"]].tolist() == [
            0, n, n, n]
        assert row.loc[("50pct", "synth_then_real"), ["n_real_images", "n_synth", "n_labels"]].tolist() == [
            n, n + extra, n]
        assert row.loc[("100pct", "real"), ["n_real_images", "n_labels", "n_synth"]].tolist() == [19, 19, 0]
    claims = study.table.set_index(["regime", "arm"])["claim"]
    assert claims[("50pct", "1x")] == ("50 % real + 1x synthetic: 9 labelled real images + 9 synthetic from their "
                                       "captions; the generator was trained on 17 train captions")
    assert claims[("50pct", "synth")].startswith("50 % synthetic only: 9 synthetic from the captions of 9 labelled")
    assert claims[("100pct", "real")].startswith("100 % real (the ceiling): all 19 labelled real train images")
    assert "aug_gain_auc_50pct_synth_then_real" in study.flat and "aug_auc_100pct_real" in study.flat


def test_adherence_reports_test_captions_and_chooses_on_val_captions_apart_from_train_ones():
    g = torch.Generator().manual_seed(2)
    real, test = brightness(30, g), brightness(20, g)
    x, y = brightness(16, g)
    splits = np.array(["val"] * 4 + ["test"] * 4 + ["train"] * 6 + ["", ""], dtype=object)
    prompt = y.clone()
    prompt[8:] = 1 - y[8:]  # train captions' and unsplit images show the other label: the judges disagree
    cfg = ClassifierConfig(steps=40, lr=0.01, batch_size=16)
    judges = train_judges(real, 2, cfg, 2, 0)
    figures, confusion = prompt_adherence(judges, (x, prompt), test, 2, 0, resamples=50, splits=splits)
    assert figures["adherence_n"] == 4 and figures["adherence_acc"] > 0.9  # test captions only
    assert figures["val_adherence_n"] == 4 and figures["val_adherence_acc"] > 0.9  # val captions, to choose by
    assert figures["adherence_train_captions_n"] == 6 and figures["adherence_train_captions_acc"] < 0.1
    assert len(confusion) == 2 * 8 and set(confusion["split"]) == {"test", "val"}
    test_rows = confusion[confusion["split"] == "test"]
    assert test_rows["prompt_label"].tolist()[:4] == prompt[4:8].tolist()
    assert (test_rows["prompt_label"] == test_rows["predicted_label"]).mean() == pytest.approx(figures["adherence_acc"])
    assert figures["adherence_chance"] >= 0.5
    only_train, _ = prompt_adherence(judges, (x[8:14], prompt[8:14]), test, 2, 0, 0, splits=splits[8:14])
    assert "adherence_acc" not in only_train and only_train["adherence_train_captions_n"] == 6
