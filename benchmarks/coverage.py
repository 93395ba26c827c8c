"""Empirical coverage of every nominal 95 % interval the pipeline emits, by simulation: many replicate data sets
drawn from a known distribution, and the share of replicates whose interval contains the true value.

Prints JSON: {study: {scenario: {n: {figure: coverage, ...}}}} with the replicates, the draws and the time.

- fidelity: FD, KID and PRDC of two feature sets (d = 32 Gaussians, as evaluate compares real test features
  with synthetic ones) through `set_figures` + `resampled_interval`, exactly as `fidelity_with_reference` calls
  them. Scenarios: `shifted` (the synthetic set's mean moved by 0.25 and its spread by 1.2 in every dimension) and
  `twin` (both sets from one distribution: the real-train-vs-test reference). The true value of a figure is its
  expectation at that n (the mean over all replicates): KID is unbiased, so for KID this is the population
  MMD^2; FD and PRDC depend on n by construction, and an interval is about the figure at the size measured.
  `clustered` draws the images in groups of 4 sharing a group effect (slices of one patient) and resamples by
  group, as evaluate does with a `group` column; `clustered_by_image` resamples the same data image by image.
- adherence: the share of synthetic images the judges take for their prompt's label (the mean of several
  judges' hits per image), with `bootstrap_ci` over images.
- memorization: the share of an honest generator's images below the audit's threshold, its Jeffreys
  interval, and its mean against the stated expected rate.
- gains: a gain of one arm over another scored on the same test items (augmentation: 5 seeds that also redraw the
  real subset; VLP: 2 seeds), with the t-interval over seeds and the paired bootstrap over items.

    python benchmarks/coverage.py                       # 500 replicates at n = 46, 200, 1000
    python benchmarks/coverage.py --replicates 100 --sizes 46 200 --studies adherence
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from multiprocessing import get_context

import numpy as np
import torch

from scipy import stats

from synthmed.metrics.fidelity import resampled_interval, set_figures
from synthmed.metrics.privacy import binomial_interval, threshold
from synthmed.metrics.stats import bootstrap_ci, mean_ci, paired_item_gain

DIMS = 32
PARAMS = {"kid_subset_size": 50, "kid_subsets": 100, "prdc_k": 5, "resamples": 200}  # params.yaml's evaluate
CLUSTER = 4  # images per group in the clustered scenario
ALPHA = 0.05  # params.yaml's evaluate.privacy.alpha


def _draw(scenario: str, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
    def gaussian(shift: float, scale: float) -> np.ndarray:
        if scenario.startswith("clustered"):  # a group effect shared by CLUSTER images: half the variance
            groups = rng.standard_normal((-(-n // CLUSTER), DIMS)).repeat(CLUSTER, axis=0)[:n]
            return shift + scale * (np.sqrt(0.5) * groups + np.sqrt(0.5) * rng.standard_normal((n, DIMS)))
        return shift + scale * rng.standard_normal((n, DIMS))

    real = gaussian(0.0, 1.0)
    fake = gaussian(0.0, 1.0) if scenario == "twin" else gaussian(0.25, 1.2)
    groups = np.arange(n) // CLUSTER if scenario == "clustered" else None
    return torch.from_numpy(real), torch.from_numpy(fake), groups


def _fidelity_replicate(args) -> dict:
    scenario, n, rep, draws = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([n, rep, zlib.crc32(scenario.encode())])
    real, fake, groups = _draw(scenario, n, rng)
    p = PARAMS

    def figures(r, f):
        return {k: v for k, v in set_figures(r, f, p["kid_subset_size"], p["kid_subsets"], p["prdc_k"], rep).items()
                if k not in ("kid_effnet_std", "kid_subset_size")}

    point = figures(real, fake)
    ci = resampled_interval(real, fake, figures, point, draws, rep, p["prdc_k"] + 1, groups=(groups, groups))
    return {k: (point[k], *ci[k]) for k in point}


def fidelity(scenario: str, n: int, replicates: int, draws: int, workers: int) -> dict:
    with get_context("spawn").Pool(workers) as pool:
        results = pool.map(_fidelity_replicate, [(scenario, n, rep, draws) for rep in range(replicates)], chunksize=4)
    out = {}
    for key in results[0]:
        values = np.array([r[key] for r in results])  # [replicates, (point, low, high)]
        truth = values[:, 0].mean()
        out[key] = {"coverage": float(((values[:, 1] <= truth) & (truth <= values[:, 2])).mean()),
                    "truth": float(truth), "mean_width": float((values[:, 2] - values[:, 1]).mean())}
    return out


def adherence(n: int, replicates: int, draws: int, judges: int = 3) -> dict:
    """Each synthetic image shows its prompt's label with its own probability (Beta(4, 1.5): mean 0.73); each judge
    sees it right with that probability; adherence = the mean over images of the judges' mean hit."""
    rng = np.random.default_rng(n)
    inside = []
    for rep in range(replicates):
        p = rng.beta(4, 1.5, n)
        hits = (rng.random((judges, n)) < p).mean(0)
        _, low, high = bootstrap_ci(hits, draws, rep)
        inside.append(low <= 4 / 5.5 <= high)
    return {"adherence_acc": {"coverage": float(np.mean(inside)), "truth": 4 / 5.5}}


def memorization(n: int, replicates: int) -> dict:
    """An honest generator: its n images' nearest-train distances and the m = n held-out reference distances come
    from one distribution (uniform: a distance's quantile is its value). The audit's threshold is the k-th smallest
    reference distance; the true rate of the generator behind the share below it is the threshold's quantile. The
    share's Jeffreys interval (binomial_interval), and the mean share against the stated expected rate k / (m + 1)."""
    rng = np.random.default_rng(n + 1)
    inside, shares, expected = [], [], 0.0
    for _ in range(replicates):
        cut, k = threshold(rng.random(n), ALPHA)
        x = int((rng.random(n) < cut).sum())
        low, high = binomial_interval(x, n)
        inside.append(low <= cut <= high)
        shares.append(x / n)
        expected = k / (n + 1)
    return {"mem_frac_below": {"coverage": float(np.mean(inside)), "mean_share": float(np.mean(shares)),
                               "expected_rate": expected}}


def _item_scores(rng, quality: np.ndarray, difficulty: np.ndarray) -> np.ndarray:
    """0/1 scores [models, items]: model r gets item i right with probability Phi(quality_r - difficulty_i)."""
    return (rng.random((len(quality), len(difficulty))) < stats.norm.cdf(quality[:, None] - difficulty)).astype(float)


def _p_right(quality: np.ndarray, spread: float = 0.0) -> np.ndarray:
    """P(right) of models of ``quality`` (each drawn N(quality, spread)) over items of difficulty N(0, 1)."""
    return stats.norm.cdf(np.asarray(quality) / np.sqrt(2 + spread**2))


def gains(n: int, replicates: int, draws: int, seeds: int, spread: float) -> dict:
    """Two arms scored on the same n test items (difficulty N(0, 1) per item) by models of ``seeds`` seeds (quality
    N(0.8, spread) for the control, 0.3 more for the treated arm; the augmentation study's seeds also redraw the
    real subset, hence its larger spread). Two estimands: the gain of the recipe (over new items and new training
    runs: `population`), and the gain of the models trained (over new items: `these_models`). Intervals: the
    t-interval over seeds of the per-seed differences (summarise_arms: augmentation) and the paired bootstrap over
    items (paired_item_gain: VLP)."""
    rng = np.random.default_rng(n + 2)
    population = float(_p_right(1.1, spread) - _p_right(0.8, spread))
    hits = {k: [] for k in ("seed_t_interval:population", "item_bootstrap:population", "item_bootstrap:these_models")}
    for rep in range(replicates):
        difficulty = rng.standard_normal(n)
        q_control, q_treated = 0.8 + spread * rng.standard_normal(seeds), 1.1 + spread * rng.standard_normal(seeds)
        control, treated = _item_scores(rng, q_control, difficulty), _item_scores(rng, q_treated, difficulty)
        these = float(np.mean(_p_right(q_treated) - _p_right(q_control)))
        mean, half = mean_ci(treated.mean(1) - control.mean(1))
        paired = paired_item_gain(treated, control, draws, rep)
        hits["seed_t_interval:population"].append(mean - half <= population <= mean + half)
        hits["item_bootstrap:population"].append(paired.ci_low <= population <= paired.ci_high)
        hits["item_bootstrap:these_models"].append(paired.ci_low <= these <= paired.ci_high)
    return {k: {"coverage": float(np.mean(v))} for k, v in hits.items()}


def markdown(report: dict) -> str:
    """One row per study, scenario and figure; one column per size."""
    studies = report["studies"]
    sizes = sorted({int(n) for st in studies.values() for sc in st.values() for n in sc})
    lines = ["| study | scenario | figure | " + " | ".join(f"n = {n}" for n in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for study, scenarios in studies.items():
        for scenario, by_size in scenarios.items():
            figures = list(dict.fromkeys(f for cells in by_size.values() for f in cells))
            for figure in figures:
                cells = [by_size.get(n, by_size.get(str(n), {})).get(figure, {}).get("coverage") for n in sizes]
                lines.append(f"| {study} | {scenario} | {figure} | " +
                             " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[46, 200, 1000])
    ap.add_argument("--draws", type=int, default=PARAMS["resamples"])
    ap.add_argument("--studies", nargs="+", default=["fidelity", "adherence", "memorization", "gains"])
    ap.add_argument("--scenarios", nargs="+", default=["shifted", "twin", "clustered", "clustered_by_image"])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--markdown", metavar="JSON", help="print an earlier run's JSON as a Markdown table, and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.load(open(args.markdown))))
        return
    start = time.time()
    report = {"replicates": args.replicates, "draws": args.draws, "dims": DIMS, "studies": {}}
    if "fidelity" in args.studies:
        report["studies"]["fidelity"] = {s: {} for s in args.scenarios}
        for n in args.sizes:  # size by size, each cell on stderr as it ends (the largest take the longest)
            for s in args.scenarios:
                cell = report["studies"]["fidelity"][s][n] = fidelity(s, n, args.replicates, args.draws, args.workers)
                print(json.dumps({"scenario": s, "n": n, "seconds": round(time.time() - start),
                                  **{k: v["coverage"] for k, v in cell.items()}}), file=sys.stderr, flush=True)
    if "adherence" in args.studies:
        report["studies"]["adherence"] = {"beta": {n: adherence(n, args.replicates, args.draws) for n in args.sizes}}
    if "memorization" in args.studies:
        report["studies"]["memorization"] = {"honest": {n: memorization(n, args.replicates) for n in args.sizes}}
    if "gains" in args.studies:  # the augmentation study's 5 seeds (seeds redraw the subset), the VLP study's 2
        report["studies"]["gains"] = {
            "augmentation_5_seeds": {n: gains(n, args.replicates, 2000, 5, 0.3) for n in args.sizes},
            "vlp_2_seeds": {n: gains(n, args.replicates, 2000, 2, 0.1) for n in args.sizes}}
    report["seconds"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
