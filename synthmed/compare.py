"""The spread between training runs: each recipe's mean over its runs and how it compares with the baseline's.

A run is one row of `dvc exp show --json` (an experiment, the commit it started from, or an uncommitted workspace
run). A recipe is a run's params without its seed keys (default `train_ldm.seed_offset`): runs of the same recipe
that differ only in their seed are its training runs. For every recipe and metric this prints the number of runs,
their mean and its 95 % t-interval, and for every recipe beside the baseline recipe the mean paired difference
(runs paired by seed), its 95 % t-interval, the paired t-test's p and Holm's p over the recipes compared on that
metric.

    dvc exp run -S train_ldm.seed_offset=1
    dvc exp run -S train_ldm.lr=0.0005 -S train_ldm.seed_offset=0
    dvc exp run -S train_ldm.lr=0.0005 -S train_ldm.seed_offset=1
    python -m synthmed.compare --metrics kid_effnet precision
    dvc exp show -A --json | python -m synthmed.compare --input -
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from synthmed.metrics.stats import holm, mean_ci, paired_p

SEED_KEYS = ("train_ldm.seed_offset",)
PARAMS_FILE = "params.yaml"  # its keys are named without the file, as `dvc exp run -S` names them
COMMIT_KEY = "@commit"  # the commit a run started from: a recipe on other code is another recipe
BASELINE = "baseline"
UNFINISHED = {"queued", "running", "failed"}
WITHIN_RUN_BOUNDS = ("_ci_low", "_ci_high")  # a figure's interval over images, not a figure to compare


class CompareError(Exception):
    """A problem with the input or the request, reported in one line (exit status 2)."""


@dataclass
class Run:
    name: str                     # the experiment's name, the branch, a short rev or "workspace"
    rev: str
    params: dict[str, object]     # flat: "train_ldm.lr", or "other.yaml:key" for another params file
    metrics: dict[str, float]     # flat: "metrics/evaluate.json:kid_effnet"
    commit: str                   # the commit row it belongs to (name or short rev)


@dataclass
class Recipe:
    name: str
    params: dict[str, object]     # without the seed keys
    runs: list[Run] = field(default_factory=list)
    seeds: list[tuple] = field(default_factory=list)  # the seed keys' values of each run, in order


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _files(section: dict | None) -> dict[str, dict]:
    """{file: its data} of a `params` or `metrics` section; files that failed to load are left out."""
    return {f: (entry or {}).get("data") or {} for f, entry in (section or {}).items()
            if isinstance(entry, dict) and "data" in entry}


def _run(entry: dict, commit: str, label: str) -> Run | None:
    data = entry.get("data")
    if entry.get("error") or not data:
        return None
    params: dict[str, object] = {}
    for file, tree in _files(data.get("params")).items():
        for key, value in _flatten(tree).items():
            params[key if file == PARAMS_FILE else f"{file}:{key}"] = value
    metrics = {}
    for file, tree in _files(data.get("metrics")).items():
        for key, value in _flatten(tree).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"{file}:{key}"] = float(value)
    return Run(name=label, rev=entry.get("rev") or label, params=params, metrics=metrics, commit=commit)


def runs_from_exp_show(rows: list) -> tuple[list[Run], Run | None, list[str]]:
    """The finished runs in `dvc exp show --json` output, in its order (each commit, then its experiments), the
    first commit row (HEAD's in `dvc exp show`; its params name the baseline recipe, metrics or not) and notes on
    what was left out. The workspace counts as a run only when no listed run has its params and metrics (after
    `dvc exp run` it repeats the last experiment)."""
    if not isinstance(rows, list):
        raise CompareError("the input is not `dvc exp show --json` output (a JSON list of revisions)")
    runs, notes, workspace, head = [], [], None, None
    commits = [r for r in rows if isinstance(r, dict) and r.get("rev") != "workspace"]
    for row in rows:
        if not isinstance(row, dict):
            continue
        if row.get("rev") == "workspace":
            workspace = row
            continue
        commit = row.get("name") or str(row.get("rev", ""))[:7]
        run = _run(row, commit, commit)
        head = head or run
        if run is not None and run.metrics:
            runs.append(run)
        for exp in row.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            label = exp.get("name") or "?"
            if state in UNFINISHED:
                notes.append(f"{label}: {state}, left out")
                continue
            for rev in exp.get("revs") or []:
                run = _run(rev, commit, rev.get("name") or label)
                if run is None or not run.metrics:
                    notes.append(f"{label}: no metrics, left out")
                else:
                    runs.append(run)
    if workspace is not None:
        commit = (commits[0].get("name") or str(commits[0].get("rev", ""))[:7]) if commits else "workspace"
        run = _run(workspace, commit, "workspace")
        if run is not None and run.metrics and not any(
                r.params == run.params and r.metrics == run.metrics for r in runs):
            runs.append(run)
            notes.append("workspace: an uncommitted run, counted (its metrics are whatever metrics/ holds now)")
    return runs, head, notes


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def group_recipes(runs: list[Run], seed_keys=SEED_KEYS, head: Run | None = None) -> tuple[list[Recipe], list[str]]:
    """Runs with the same params but for ``seed_keys`` (and from the same commit) grouped into recipes, the
    baseline's (``head``'s params; default the first run's) first. Each recipe is named by the
    params where it differs from the baseline (``train_ldm.lr=0.0005``); the baseline is named "baseline". A
    second run of a recipe with the same seed is the same training run (`dvc exp run` twice) and is dropped."""
    notes: list[str] = []
    recipes: dict[str, Recipe] = {}
    for run in runs:
        params = {k: v for k, v in run.params.items() if k not in seed_keys}
        params[COMMIT_KEY] = run.commit
        seed = tuple(run.params.get(k) for k in seed_keys)
        recipe = recipes.setdefault(_key(params), Recipe(name="", params=params))
        if seed in recipe.seeds:
            twin = recipe.runs[recipe.seeds.index(seed)]
            notes.append(f"{run.name}: the same recipe and seed as {twin.name}, left out")
            continue
        recipe.runs.append(run)
        recipe.seeds.append(seed)
    if not recipes:
        return [], notes
    head = head or runs[0]
    base = {k: v for k, v in head.params.items() if k not in seed_keys}
    base[COMMIT_KEY] = head.commit
    for recipe in recipes.values():
        keys = [k for k in dict.fromkeys([*base, *recipe.params]) if base.get(k, ...) != recipe.params.get(k, ...)]
        recipe.name = " ".join(f"{k}={_show(recipe.params[k]) if k in recipe.params else '(unset)'}"
                               for k in keys) or BASELINE
    ordered = sorted(recipes.values(), key=lambda r: r.name != BASELINE)  # stable: the input's order otherwise
    return ordered, notes


def metric_catalogue(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(m for r in runs for m in r.metrics))


def short_names(metrics: list[str]) -> dict[str, str]:
    """Each metric's shortest unambiguous name: its key, or <file stem>.<key> when two files have that key."""
    keys = [m.split(":", 1)[1] for m in metrics]
    out = {}
    for m, key in zip(metrics, keys):
        out[m] = key if keys.count(key) == 1 else f"{Path(m.split(':', 1)[0]).stem}.{key}"
        if list(out.values()).count(out[m]) > 1:  # two files with the same stem in different folders
            out[m] = m
    return out


def resolve_metrics(names: list[str], runs: list[Run]) -> list[str]:
    """Full metric names for ``names``: full (``metrics/evaluate.json:kid_effnet``), bare (``kid_effnet``) or
    dotted with the file's stem (``evaluate.kid_effnet``)."""
    catalogue = metric_catalogue(runs)
    shown = short_names(catalogue)
    out = []
    for name in names:
        hits = [m for m in catalogue if m == name]
        hits = hits or [m for m in catalogue if m.split(":", 1)[1] == name]
        if not hits and "." in name:
            stem, key = name.split(".", 1)
            hits = [m for m in catalogue if m.split(":", 1)[1] == key and Path(m.split(":", 1)[0]).stem == stem]
        if not hits:
            raise CompareError(f"no metric {name!r}; the runs have: {', '.join(shown[m] for m in catalogue)}")
        if len(hits) > 1:
            raise CompareError(f"metric {name!r} is in several files ({', '.join(hits)}); "
                               f"name one, e.g. {shown[hits[0]]}")
        out.append(hits[0])
    return list(dict.fromkeys(out))


def default_metrics(runs: list[Run]) -> tuple[list[str], list[str]]:
    """The metrics every run has, less each figure's within-run interval bounds (``*_ci_low``, ``*_ci_high``)
    and the ones equal in every run (image counts); all shared ones if none varies. Also a note on what was
    left out."""
    shared = [m for m in metric_catalogue(runs) if all(m in r.metrics for r in runs)]
    shared = [m for m in shared if not m.endswith(WITHIN_RUN_BOUNDS)]
    varying = [m for m in shared if len({r.metrics[m] for r in runs}) > 1]
    notes = []
    if varying and len(varying) < len(shared):
        shown = short_names(metric_catalogue(runs))
        same = [shown[m] for m in shared if m not in varying]
        notes.append(f"left out (the same in every run): {', '.join(same)}")
    return (varying or shared), notes


def pick_baseline(recipes: list[Recipe], name: str | None) -> Recipe:
    if not name:
        return recipes[0]
    for recipe in recipes:
        if recipe.name == name:
            return recipe
    for recipe in recipes:  # an experiment's name or a rev prefix picks its recipe
        if any(r.name == name or (len(name) >= 4 and r.rev.startswith(name)) for r in recipe.runs):
            return recipe
    raise CompareError(f"no recipe or experiment {name!r}; recipes: {', '.join(r.name for r in recipes)}")


def _interval(values) -> dict:
    mean, half = mean_ci(values)
    n = len(values)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half] if n > 1 else None}


def compare(recipes: list[Recipe], metrics: list[str], baseline: Recipe) -> dict:
    """Per metric and recipe: n, mean and 95 % t-interval over its runs; beside ``baseline``: the paired
    differences (same seed in both), their mean, 95 % t-interval, paired t-test p and Holm's p over the recipes
    compared on that metric. Returns a JSON-ready dict."""
    names = short_names(metrics)
    notes: list[str] = []
    out = {"baseline": baseline.name, "metrics": {}, "notes": notes,
           "recipes": [{"name": r.name, "runs": [{"name": run.name, "rev": run.rev, "seed": list(seed)}
                                                  for run, seed in zip(r.runs, r.seeds)]} for r in recipes]}
    for metric in metrics:
        rows = []
        base = {s: run.metrics[metric] for run, s in zip(baseline.runs, baseline.seeds) if metric in run.metrics}
        for recipe in recipes:
            values = {s: run.metrics[metric] for run, s in zip(recipe.runs, recipe.seeds) if metric in run.metrics}
            row = {"recipe": recipe.name, **_interval(list(values.values()))} if values else \
                {"recipe": recipe.name, "n": 0, "mean": None, "ci95": None}
            if recipe is not baseline:
                pairs = [s for s in values if s in base]
                unpaired = [s for s in values if s not in base] + [s for s in base if s not in values]
                if unpaired:
                    seeds = ", ".join("/".join(_show(v) for v in s) for s in unpaired)
                    notes.append(f"{recipe.name} vs {baseline.name}: seed(s) {seeds} not in both, left out of the "
                                 f"paired comparison" + (f" of {names[metric]}" if len(values) < len(recipe.runs)
                                                         or len(base) < len(baseline.runs) else ""))
                treated, control = [values[s] for s in pairs], [base[s] for s in pairs]
                row["pairs"] = len(pairs)
                if pairs:
                    diff = _interval([a - b for a, b in zip(treated, control)])
                    row["diff"], row["diff_ci95"] = diff["mean"], diff["ci95"]
                row["p"] = paired_p(treated, control) if len(pairs) > 1 else None
            rows.append(row)
        tested = [row for row in rows if row.get("p") is not None]
        for row, adjusted in zip(tested, holm([row["p"] for row in tested]) if tested else []):
            row["p_holm"] = float(adjusted)
        out["metrics"][names[metric]] = {"metric": metric, "rows": rows}
    out["notes"] = list(dict.fromkeys(notes))
    return out


def _num(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def _pm(mean, ci, n, unit: str = "run") -> str:
    if mean is None:
        return "–"
    if ci is None:
        return f"{_num(mean)} (1 {unit}: no interval)" if n == 1 else _num(mean)
    return f"{_num(mean)} [{_num(ci[0])}, {_num(ci[1])}]"


def to_markdown(result: dict) -> str:
    base = result["baseline"]
    lines = ["Recipes (runs paired by seed):", ""]
    for recipe in result["recipes"]:
        runs = ", ".join(f"{r['name']} (seed {'/'.join(_show(s) for s in r['seed'])})" for r in recipe["runs"])
        lines.append(f"- {recipe['name']}{' (compared against)' if recipe['name'] == base else ''}: {runs}")
    lines += ["", f"| metric | recipe | runs | mean [95 % CI] | Δ vs {base} [95 % CI] | pairs | p | p (Holm) |",
              "|---|---|---:|---|---|---:|---:|---:|"]
    for name, entry in result["metrics"].items():
        for row in entry["rows"]:
            if row["recipe"] == base:
                cells = ["–", "–", "–", "–"]
            else:
                diff = _pm(row.get("diff"), row.get("diff_ci95"), row["pairs"], "pair") if row["pairs"] else "no pairs"
                cells = [diff, str(row["pairs"]), _num(row.get("p")), _num(row.get("p_holm"))]
            recipe = row["recipe"].replace("|", r"\|")
            lines.append(f"| {name} | {recipe} | {row['n']} | {_pm(row['mean'], row['ci95'], row['n'])} | "
                         + " | ".join(cells) + " |")
    if result["notes"]:
        lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"


def load_exp_show(source: str | None) -> list:
    """`dvc exp show --json` output: run here (``None``), read from stdin (``-``) or from a file."""
    try:
        if source == "-":
            text = sys.stdin.read()
        elif source:
            text = Path(source).read_text()
        else:
            proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise CompareError(f"`dvc exp show --json` failed: {last}")
            text = proc.stdout
    except OSError as err:
        raise CompareError(f"cannot read {source}: {err.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CompareError(f"the input is not JSON ({err.msg} at line {err.lineno})") from None


def run(rows: list, metrics: list[str] | None = None, baseline: str | None = None,
        seed_keys=SEED_KEYS) -> dict:
    """The whole comparison of `dvc exp show --json` output ``rows`` (see :func:`compare`)."""
    runs, head, notes = runs_from_exp_show(rows)
    if not runs:
        raise CompareError("no experiments with metrics in the input (run `dvc exp run` first)")
    recipes, more = group_recipes(runs, seed_keys, head)
    notes += more
    if recipes and recipes[0].name != BASELINE and not baseline:
        notes.append(f"HEAD's recipe has no finished run: compared against {recipes[0].name}")
    if len(recipes) < 2:
        raise CompareError(f"fewer than two recipes: all {sum(len(r.runs) for r in recipes)} run(s) differ only "
                           f"in {', '.join(seed_keys)}")
    if metrics:
        chosen = resolve_metrics(metrics, runs)
    else:
        chosen, more = default_metrics(runs)
        notes += more
        if not chosen:
            raise CompareError("the runs share no metric; name some with --metrics")
    result = compare(recipes, chosen, pick_baseline(recipes, baseline))
    result["seed_keys"] = list(seed_keys)
    result["notes"] = notes + result["notes"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synthmed.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", nargs="+", help="kid_effnet, evaluate.kid_effnet or metrics/evaluate.json:"
                    "kid_effnet (default: the metrics every run has that differ between runs)")
    ap.add_argument("--input", help="`dvc exp show --json` output; - for stdin (default: run it here)")
    ap.add_argument("--baseline", help="the recipe the others are compared against: its name, or an experiment "
                    "or rev of it (default: HEAD's, named baseline)")
    ap.add_argument("--seed-key", action="append", dest="seed_keys",
                    help=f"a param that only re-seeds a run (repeatable; default {' '.join(SEED_KEYS)})")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON instead of Markdown")
    args = ap.parse_args(argv)
    try:
        result = run(load_exp_show(args.input), args.metrics, args.baseline, tuple(args.seed_keys or SEED_KEYS))
    except CompareError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else to_markdown(result), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
