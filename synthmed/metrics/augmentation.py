"""Does synthetic data help a classifier? The DiNO-Diffusion protocol, each arm with the information it used.

Regimes: stratified fractions of the real train split (e.g. 5 %): the regime's labelled real subset. Arms in
each regime, all built on that subset:

- `real`: the subset alone (the control);
- real + synthetic at ratios of the real count (`0p5x`, `1x`, `2x`);
- `synth`: synthetic images only, as many as the subset has real ones;
- `synth_then_real`: the classifier pretrained on the subset's synthetic images, then fine-tuned on the subset
  by the same rule (real val picks the fine-tune's weights): RoentGen-v2's best arm;

and once, whatever the fractions, the ceiling: `real` at `100pct`, every labelled real train image.

An arm's synthetic images are those conditioned on its own subset alone: the real image whose caption (or,
for an image-conditioned model, embedding) made each one, and an interpolation's partner, lie in the subset
(metadata `source_file_name`, `partner_file_name`). So no label outside the subset reaches a classifier
through the pool, and val captions never feed it (val only picks weights). The generator itself trained on
every train caption; that is stated beside every arm, with the rest of its information budget: real images
it trained on, labels it saw (directly or through its pool's conditions), the generator's train captions, the
pool's conditions and splits, and a one-line claim in words built from those numbers (augmentation.csv).
Every arm of a regime uses the same real subset and classifier seed for a given repetition, so arms are
compared pairwise by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from synthmed.data.disk_array import Rows, as_rows
from synthmed.metrics.downstream import ClassifierConfig, predict, score_classifier, train_classifier
from synthmed.metrics.stats import bootstrap_ci, summarise_arms
from synthmed.core.config import require_at_least_one, require_fractions, require_non_negative
from synthmed.core.provenance import derive_seed
from synthmed.core.progress import progress

METRICS = ("auc", "acc", "bacc")
ADHERENCE_COLUMNS = ["rep", "split", "prompt_label", "predicted_label"]
# an arm's information budget: what it trained on, and what it learned labels from
BUDGET = ["n_real_images", "n_synth", "n_synth_requested", "n_labels", "n_generator_captions", "n_pool_conditions",
          "pool_splits"]
RUN_COLUMNS = ["regime", "arm", "rep", *BUDGET, *METRICS]
SYNTHETIC_ARMS = ("real_synth", "synth", "synth_then_real")
NONE = -1  # a condition that is not there (a reconstruction's partner)
OUTSIDE = -2  # a condition that is a real image outside the labelled real train set


def regime_name(fraction: float) -> str:
    return f"{fraction * 100:g}pct".replace(".", "p")


def ratio_name(ratio: float) -> str:
    return f"{ratio:g}x".replace(".", "p")


@dataclass
class AugmentationParams:
    """evaluate.augmentation: the study's design."""
    fractions: list[float]  # regimes: stratified fractions of real train
    ratios: list[float]  # real_synth arms: synthetic per real image, drawn from the subset's own pool
    arms: list[Literal["real_synth", "synth", "synth_then_real"]]  # beside the real-only control and ceiling
    seeds: int

    def __post_init__(self):
        require_at_least_one(self, "seeds")
        require_fractions(self, "fractions")
        if not all(r > 0 for r in self.ratios):
            raise ValueError(f"augmentation.ratios must be positive, got {self.ratios}")


@dataclass
class AdherenceParams:
    """evaluate.adherence: the judge of prompt adherence, classifiers trained on all real train images by the
    classifier's rule with more steps and blur (a judge that reads texture takes any blurred image for one
    class, whatever its anatomy: docs/metrics.md)."""
    steps: int
    blur_sigma: float  # augmentation blur, sigma uniform in [0, blur_sigma] pixels
    seeds: int  # judges (classifier seeds); adherence is their mean

    def __post_init__(self):
        require_at_least_one(self, "steps", "seeds")
        require_non_negative(self, "blur_sigma")


BLUR_CHECK_SIGMA = 1.0  # the judge's accuracy on real test images blurred this much (pixels) says it reads anatomy


@dataclass
class Pool:
    """Synthetic images that may train a classifier, and what made each one."""
    images: Any  # uint8 [n, c, h, w]: a tensor, DiskArray or Rows
    labels: torch.Tensor  # class indices; -1 = unlabelled
    conditions: np.ndarray  # [n, 2] real train rows of each image's source and partner (NONE, OUTSIDE)
    splits: np.ndarray  # the split whose captions (or images) made each one
    kind: str = "captions"  # what conditioned the generator: captions | embeddings

    def __post_init__(self):
        self.conditions = two_columns(self.conditions)
        self.splits = np.asarray(self.splits, dtype=object).reshape(len(self.labels))

    def subset(self, mask) -> "Pool":
        mask = np.asarray(mask)
        return Pool(as_rows(self.images).subset(mask), self.labels[torch.as_tensor(mask)], self.conditions[mask],
                    self.splits[mask], self.kind)

    def __len__(self) -> int:
        return len(self.labels)


def two_columns(conditions) -> np.ndarray:
    """[n, 2] int conditions; a 1-D array of sources gets a NONE partner."""
    c = np.asarray(conditions, dtype=np.int64)
    return np.stack([c, np.full_like(c, NONE)], 1) if c.ndim == 1 else c


def condition_rows(synth_rows: pd.DataFrame, train_names) -> np.ndarray:
    """[n, 2] the real train rows (in ``train_names`` order) of each synthetic image's source and partner
    (metadata `source_file_name`, `partner_file_name`): NONE where there is none (a prompt file's or template's
    image has no source, a reconstruction no partner), OUTSIDE for a real image outside train."""
    row_of = {n: i for i, n in enumerate(train_names)}
    cols = [synth_rows[c].fillna("") if c in synth_rows else pd.Series("", index=synth_rows.index)
            for c in ("source_file_name", "partner_file_name")]
    return np.array([[row_of.get(n, OUTSIDE) if n else NONE for n in col] for col in cols],
                    dtype=np.int64).T.reshape(len(synth_rows), 2)


def synthetic_pools(synth_rows: pd.DataFrame, images, labels: torch.Tensor, train_names,
                    modes: dict[str, str]) -> dict[str, Pool]:
    """The augmentation pools, one per generation mode: the synthetic images made from train captions (or
    images), each with its conditions among ``train_names``. Images of val or test captions, and of prompt
    files or templates (no split), never enter: the cells then keep those of their own real subset."""
    split = synth_rows["split"].fillna("") if "split" in synth_rows else pd.Series("", index=synth_rows.index)
    image_model = "mode" in synth_rows and synth_rows["mode"].isin(["reconstruction", "interpolation"]).any()
    every = Pool(images, labels, condition_rows(synth_rows, train_names), split.to_numpy(),
                 "embeddings" if image_model else "captions")
    train = (split == "train").to_numpy()
    mode = synth_rows["mode"] if "mode" in synth_rows else pd.Series(next(iter(modes)), index=synth_rows.index)
    return {m: every.subset(train & (mode == m).to_numpy()) for m in modes}


def n_generator_captions(real_rows: pd.DataFrame, kind: str = "captions") -> int:
    """What the generator trained on, counted: the distinct train captions of the real metadata (every caption
    row), or for an image-conditioned model (``kind`` embeddings) the train images."""
    train = real_rows[real_rows["split"] == "train"]
    return int(train["file_name"].nunique() if kind == "embeddings" else train["text"].nunique())


@dataclass
class Cell:
    regime: str
    arm: str
    rep: int  # repetition: pairs arms within a regime
    clf_seed: int
    real_idx: np.ndarray
    synth_idx: np.ndarray
    synth_requested: int = 0
    pretrain: bool = False  # synth_then_real: train on the synthetic images first, then fine-tune on the real
    fraction: float = 1.0  # the regime's share of real train
    scores: dict = field(default_factory=dict)


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """round(fraction x class count) images of each class, at least one."""
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False))
    return np.sort(np.concatenate(picks))


def classifier_seed(seed: int, rep: int) -> int:
    return derive_seed(seed, "classifier", rep) % 2**31


def same_subset(conditions: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Pool rows conditioned on ``subset`` alone: their source lies in it, and their partner, if any, too."""
    conditions = two_columns(conditions)
    inside = np.isin(conditions, subset) | (conditions == NONE)
    return np.flatnonzero((conditions[:, 0] >= 0) & inside.all(1))


def draw_balanced(eligible: np.ndarray, sources: np.ndarray, want: int, rng: np.random.Generator) -> np.ndarray:
    """``want`` of the ``eligible`` pool rows (all when fewer), each source's k-th image before any source's
    (k+1)-th, in random order within a round: with one image per caption, 1x is each real image's own twin."""
    order = rng.permutation(eligible)
    rank, seen = np.zeros(len(order), dtype=np.int64), {}
    for i, s in enumerate(sources[order]):
        rank[i] = seen.get(s, 0)
        seen[s] = rank[i] + 1
    return np.sort(order[np.argsort(rank, kind="stable")][:want])


def plan_cells(real_labels: np.ndarray, pool_conditions: np.ndarray | dict[str, np.ndarray], fractions: list[float],
               ratios: list[float], arms: list[str], reps: int, seed: int, ceiling: bool = True) -> list[Cell]:
    """Every (regime, arm, repetition) with the indices of its real and synthetic training images.

    ``pool_conditions``: the synthetic pool's [n, 2] conditions (condition_rows: the real train rows whose
    captions or embeddings made each image), or several pools' by name (e.g. generation modes), laid end to end
    in that order; each pool gets its own arms, named ``<arm>_<pool>`` but for the first pool's, and all share
    one real control per regime and repetition. A cell draws only from the images of its own real subset
    (same_subset); `synth_then_real` pretrains on all of them. ``ceiling``: the real-only `100pct` regime,
    added when 1.0 is not among ``fractions`` (the same cells otherwise)."""
    pools = pool_conditions if isinstance(pool_conditions, dict) else {"": pool_conditions}
    pools = {k: two_columns(v) for k, v in pools.items()}
    offsets = np.cumsum([0, *(len(v) for v in pools.values())])
    none = np.array([], dtype=int)
    cells = []
    for f in [*fractions, *([1.0] if ceiling and 1.0 not in fractions else [])]:
        for rep in range(reps):
            real = stratified_subset(real_labels, f, np.random.default_rng(derive_seed(seed, "regime", f, rep)))
            clf_seed = classifier_seed(seed, rep)
            cells.append(Cell(regime_name(f), "real", rep, clf_seed, real, none, fraction=f))
            if f not in fractions:  # the ceiling: real only
                continue
            for k, (pool, conditions) in enumerate(pools.items()):
                eligible = same_subset(conditions, real)
                extra = [(ratio_name(r), r, real) for r in ratios] if "real_synth" in arms else []
                extra += [("synth", 1.0, none)] if "synth" in arms else []
                extra += [("synth_then_real", None, real)] if "synth_then_real" in arms else []
                for arm, ratio, keep in extra:
                    want = len(eligible) if ratio is None else int(round(ratio * len(real)))
                    rng = np.random.default_rng(derive_seed(seed, "synthetic", f, arm, rep, *([pool] if k else [])))
                    synth = draw_balanced(eligible, conditions[:, 0], want, rng) + offsets[k]
                    cells.append(Cell(regime_name(f), f"{arm}_{pool}" if k else arm, rep, clf_seed, keep, synth, want,
                                      pretrain=ratio is None, fraction=f))
    return cells


def budget(cell: Cell, pool: Pool, n_generator: int) -> dict:
    """A cell's information: the real images it trained on, the labelled real images it saw (its own and those
    whose captions or embeddings made its synthetic images), the generator's train captions (every arm's
    synthetic images come from a generator that saw them all), the pool's distinct real conditions and splits."""
    conditions = pool.conditions[cell.synth_idx]
    sources = set(conditions[conditions >= 0].tolist())
    splits = sorted(set(pool.splits[cell.synth_idx].tolist()))
    return {"n_real_images": len(cell.real_idx), "n_synth": len(cell.synth_idx),
            "n_synth_requested": cell.synth_requested, "n_labels": len(sources | set(cell.real_idx.tolist())),
            "n_generator_captions": n_generator, "n_pool_conditions": len(sources),
            "pool_splits": "+".join(splits) if splits else "none"}


def run_cells(cells: list[Cell], real_x, real_y, pool: Pool, test_x, test_y, n_classes: int, cfg: ClassifierConfig,
              val: tuple | None = None, n_generator: int = 0) -> pd.DataFrame:
    """Train (keeping the weights that score best on real ``val``, if given) and score every cell; one row each,
    with its budget. A `synth_then_real` cell trains on its synthetic images (the last step's weights), then from
    those weights on its real images with the classifier seed its regime's control uses."""
    rows = []
    for cell in progress(cells, desc="classifier cells"):
        synth_x, synth_y = as_rows(pool.images).subset(cell.synth_idx), pool.labels[cell.synth_idx]
        real = as_rows(real_x).subset(cell.real_idx), real_y[cell.real_idx]  # read by batch
        if cell.pretrain:
            init = train_classifier(synth_x, synth_y, n_classes, cfg, derive_seed(cell.clf_seed, "pretrain") % 2**31)
            model = train_classifier(*real, n_classes, cfg, cell.clf_seed, val, init=init.state_dict())
        else:
            model = train_classifier(real[0] + synth_x, torch.cat([real[1], synth_y]), n_classes, cfg,
                                     cell.clf_seed, val)
        cell.scores = score_classifier(model, test_x, test_y)
        rows.append({"regime": cell.regime, "arm": cell.arm, "rep": cell.rep, **budget(cell, pool, n_generator),
                     **cell.scores})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def encode(labels, classes: list[str]) -> torch.Tensor:
    """Class indices; -1 for unlabelled images and classes unseen in real train (left out of scoring)."""
    code = {c: i for i, c in enumerate(classes)}
    return torch.tensor([code.get(c, -1) for c in labels], dtype=torch.long)


@dataclass
class Study:
    runs: pd.DataFrame  # one row per (regime, arm, repetition)
    table: pd.DataFrame  # mean ± CI per (regime, arm), gains over `real` with raw and Holm p-values, budget, claim
    flat: dict[str, float]  # the table as flat metrics (aug_...)
    cells: list[Cell]


def subset(images_labels: tuple, mask) -> tuple[Rows, torch.Tensor]:
    """(images, labels) of the rows in ``mask``; the images stay where they are (a Rows: nothing is read)."""
    x, y = images_labels
    return as_rows(x).subset(mask), y[torch.as_tensor(mask)]


def _labelled(x, y):
    return subset((x, y), y >= 0)


def _concat(pools: list[Pool], empty: Rows) -> Pool:
    """The pools laid end to end (``empty``: no images, of the real images' shape)."""
    return Pool(sum((as_rows(p.images) for p in pools), start=empty),
                torch.cat([torch.zeros(0, dtype=torch.long), *(p.labels for p in pools)]),
                np.concatenate([np.zeros((0, 2), dtype=np.int64), *(p.conditions for p in pools)]),
                np.concatenate([np.array([], dtype=object), *(p.splits for p in pools)]),
                pools[0].kind if pools else "captions")


def _number(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"about {x:.1f}"  # a mean: the repetitions differ


def claim(arm: str, fraction: float, b: dict, kind: str = "captions") -> str:
    """One line in plain words: what an arm of a regime trained on and where its labels came from (``b``: its
    budget, mean over repetitions)."""
    pct, n_real, n_synth, n_pool = f"{fraction * 100:g} %", *(_number(b[k]) for k in (
        "n_real_images", "n_synth", "n_pool_conditions"))
    base = next((a for a in ("synth_then_real", "synth", "real") if arm == a or arm.startswith(a + "_")),
                arm.split("_")[0])  # a ratio arm (1x), or any arm of a second pool (1x_interpolation)
    what = f"synthetic ({arm[len(base) + 1:]})" if arm != base else "synthetic"
    of = f"the {kind} of {n_pool} of them" if b["n_pool_conditions"] < b["n_real_images"] else f"their {kind}"
    n_generator = _number(b["n_generator_captions"])
    generator = (f"; the generator was trained on the embeddings of {n_generator} train images" if kind == "embeddings"
                 else f"; the generator was trained on {n_generator} train {kind}")
    if base == "real":
        return (f"100 % real (the ceiling): all {n_real} labelled real train images, no synthetic" if fraction == 1.0
                else f"{pct} real: {n_real} labelled real images, no synthetic")
    if base == "synth":
        return (f"{pct} synthetic only: {n_synth} {what} from the {kind} of {n_pool} labelled real images, "
                f"which it never sees{generator}")
    if base == "synth_then_real":
        return (f"{pct} synthetic pretraining, real fine-tuning: {n_synth} {what} from {of}, then the "
                f"{n_real} labelled real images{generator}")
    return f"{pct} real + {base} synthetic: {n_real} labelled real images + {n_synth} {what} from {of}{generator}"


def run_study(real: tuple, pool: Pool | dict[str, Pool], test: tuple, n_classes: int, fractions: list[float],
              ratios: list[float], arms: list[str], reps: int, cfg: ClassifierConfig, seed: int,
              val: tuple | None = None, n_generator: int = 0) -> Study:
    """Every regime x arm x repetition on (images, class indices) of real train, the synthetic pool (or several,
    by name: plan_cells) and real test (and real val, which picks each classifier's weights); images with index
    -1 are left out. Without labelled synthetic images only the real arms run; an arm that finds no synthetic
    image conditioned on its subset alone in some repetition is left out of that regime. ``n_generator``: the
    train captions the generator trained on (n_generator_captions)."""
    (real_x, real_y), (test_x, test_y) = _labelled(*real), _labelled(*test)
    val = _labelled(*val) if val is not None else None
    keep = (real[1] >= 0).numpy()
    row = np.full(len(keep) + 2, OUTSIDE)  # conditions among all real train rows -> among the labelled ones
    row[np.flatnonzero(keep)] = np.arange(keep.sum())
    row[NONE] = NONE
    pools = {k: v.subset(v.labels >= 0) for k, v in (pool if isinstance(pool, dict) else {"": pool}).items()}
    pools = {k: Pool(v.images, v.labels, row[v.conditions], v.splits, v.kind) for k, v in pools.items() if len(v)}
    if arms and not pools:
        print("evaluate: no labelled synthetic images from train captions in the augmentation pool; real-only arms")
        arms = []
    merged = _concat(list(pools.values()), real_x.subset([]))
    cells = plan_cells(real_y.numpy(), {k: v.conditions for k, v in pools.items()}, fractions, ratios, arms, reps, seed)
    empty = {(c.regime, c.arm) for c in cells if c.arm != "real" and not len(c.synth_idx)}
    if empty:
        print(f"evaluate: {', '.join(f'{r} {a}' for r, a in sorted(empty))}: no synthetic image was made from its "
              "real subset alone (an interpolation's partner lies outside it); left out")
        cells = [c for c in cells if (c.regime, c.arm) not in empty]
    short = [c for c in cells if len(c.synth_idx) < c.synth_requested]
    if short:
        print(f"evaluate: {len(short)} cell(s) asked for more synthetic images than their real subset's captions "
              "made; they use all of them (n_synth in augmentation.csv). Raise prompts.images_per_prompt")
    runs = run_cells(cells, real_x, real_y, merged, test_x, test_y, n_classes, cfg, val, n_generator)
    table, flat = summarise(runs)
    fraction = {c.regime: c.fraction for c in cells}
    if not table.empty:
        table["claim"] = [claim(r["arm"], fraction[r["regime"]], r, merged.kind) for _, r in table.iterrows()]
    sizes = {f"n_synthetic_pool{'_' + k if i else ''}": len(v) for i, (k, v) in enumerate(pools.items())}
    return Study(runs, table, {**flat, "n_synthetic_pool": 0, **sizes, "aug_n_generator_captions": n_generator}, cells)


def train_judges(real: tuple, n_classes: int, cfg: ClassifierConfig, seeds: int, seed: int,
                 val: tuple | None = None) -> list:
    """The adherence judges: ``seeds`` classifiers trained on all labelled real train images by ``cfg``."""
    (x, y), val = _labelled(*real), (_labelled(*val) if val is not None else None)
    return [train_classifier(x, y, n_classes, cfg, classifier_seed(seed, rep), val)
            for rep in progress(range(seeds), desc="adherence judges")]


def prompt_adherence(judges: list, synth: tuple, test: tuple, n_classes: int, seed: int, resamples: int,
                     splits=None, report_split: str = "test") -> tuple[dict[str, float], pd.DataFrame]:
    """Share of labelled synthetic images that the judges assign to their prompt's label (their mean), with a
    bootstrap 95 % interval over the synthetic images; beside the judges' accuracy on real test (the ceiling)
    and on real test blurred by BLUR_CHECK_SIGMA (a judge that fails there reads texture, not anatomy). And
    which labels they are taken for: one row per (judge, synthetic image) with its prompt's label and the
    predicted one (class indices), the confusion table that says which levels a generator mixes up.

    ``splits``: whose captions made each synthetic image. Given, the figure to report (`adherence_acc`, its
    interval, `adherence_n`, `adherence_chance`) scores only images of ``report_split`` captions, and the figure to
    choose a recipe by (`val_adherence_acc`, ...) only those of val captions: images the generator never saw. The
    confusion rows are those of both. Images of train captions give `adherence_train_captions_acc` (and `_n`)
    apart, a diagnostic: a generator that copies its training images scores near 100 % there. Images of no split
    (prompt files, templates) are in none."""
    n = len(synth[1])
    split = np.full(n, report_split, dtype=object) if splits is None else np.asarray(splits, dtype=object)
    test_x, test_y = _labelled(*test)
    figures = {"adherence_real_test_acc": float(np.mean([score_classifier(m, test_x, test_y)["acc"] for m in judges])),
               "adherence_real_test_blurred_acc": float(np.mean([score_classifier(
                   m, test_x, test_y, blur_sigma=BLUR_CHECK_SIGMA)["acc"] for m in judges]))} if judges else {}
    rows = []
    for prefix, which in (("", report_split), ("val_", "val"), ("train_captions", "train")):
        x, y = _labelled(*subset(synth, split == which))
        if not len(y) or not judges or (prefix == "val_" and which == report_split):
            continue
        preds = [predict(model, x).argmax(1) for model in judges]
        hits = np.mean([pred == y.numpy() for pred in preds], axis=0)
        if which == "train":  # the diagnostic: no interval
            figures.update({"adherence_train_captions_acc": float(hits.mean()), "adherence_train_captions_n": len(y)})
            continue
        mean, low, high = bootstrap_ci(hits, resamples, derive_seed(seed, "adherence", which) % 2**31)
        figures.update({f"{prefix}adherence_acc": mean, f"{prefix}adherence_acc_ci_low": low,
                        f"{prefix}adherence_acc_ci_high": high, f"{prefix}adherence_n": len(y),
                        f"{prefix}adherence_chance": float(np.bincount(y.numpy(), minlength=n_classes).max() / len(y))})
        rows += [pd.DataFrame({"rep": rep, "split": which, "prompt_label": y.numpy(), "predicted_label": pred})
                 for rep, pred in enumerate(preds)]
    if not any(k.endswith("_n") for k in figures):  # no labelled synthetic image of any split
        return {}, pd.DataFrame(columns=ADHERENCE_COLUMNS)
    return figures, (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=ADHERENCE_COLUMNS))


def _same_or_mean(values: pd.Series):
    if values.nunique() <= 1:
        return values.iloc[0]
    return float(values.mean()) if pd.api.types.is_numeric_dtype(values) else "/".join(dict.fromkeys(values))


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI per (regime, arm) and the paired gain over `real` with its p-value, beside the arm's budget
    (the repetitions' mean where they differ).

    Returns the table and flat metrics: aug_<metric>_<regime>_<arm>, aug_gain_<metric>_<regime>_<arm>
    and aug_gain_<metric>_<regime>_<arm>_p.
    """
    return summarise_arms(runs, ["regime", "arm"], list(METRICS), "aug", lambda grp: {
        "seeds": len(grp), **{k: _same_or_mean(grp[k]) for k in BUDGET if k in grp}})


def plot(table: pd.DataFrame, path, metrics=("auc", "bacc"), empty_note: str = "") -> None:
    """Grouped bars (regime x arm) with 95 % CIs; * marks a gain over `real` with Holm-corrected p < 0.05.
    An empty table (no labels: no classifier) gives a figure that says why, so the declared plot exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthmed.viz import save_figure

    if table.empty:
        fig = plt.figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, empty_note or "no augmentation study", ha="center", va="center", wrap=True)
        save_figure(fig, path)
        return
    regimes, arms = list(dict.fromkeys(table["regime"])), list(dict.fromkeys(table["arm"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(arms)
    for ax, m in zip(axes[0], metrics):
        for j, arm in enumerate(arms):
            sub = table[table["arm"] == arm].set_index("regime").reindex(regimes)
            xs = np.arange(len(regimes)) + (j - (len(arms) - 1) / 2) * width
            ax.bar(xs, sub[m], width, yerr=sub[f"{m}_ci95"], capsize=3, label=arm)
            if arm != "real":
                for x, (mean, ci, p) in zip(xs, sub[[m, f"{m}_ci95", f"gain_{m}_p_holm"]].to_numpy()):
                    if p < 0.05:
                        ax.text(x, mean + ci + 0.01, "*", ha="center")
        ax.set_xticks(np.arange(len(regimes)), [r + ("\n(real: the ceiling)" if r == "100pct" else "") for r in regimes])
        ax.set_ylim(0, 1.1)
        ax.set_title({"auc": "macro AUC", "acc": "accuracy", "bacc": "balanced accuracy"}[m])
        ax.set_xlabel("real training data")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(arms), fontsize=8, frameon=False)
    fig.text(0.99, 0.01, "* gain over real, paired by seed, Holm-corrected p < 0.05", ha="right", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.92))
    save_figure(fig, path)
