"""synthmed.compare: recipes from `dvc exp show --json` rows, their spread over training runs and paired
comparisons; checked against numpy/scipy on hand-built rows and once on real DVC experiments."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy import stats

from synthmed import compare as cmp
from tests.conftest import REPO_ROOT


def _data(rev: str, params: dict, metrics: dict | None) -> dict:
    """One revision's `data` as DVC 3.67 writes it (`metrics` None: the files could not be read)."""
    files = {f: ({"data": d} if d is not None else {"error": {"type": "FileNotFoundError", "msg": "gone"}})
             for f, d in (metrics or {}).items()}
    return {"rev": rev, "timestamp": "2026-01-01T00:00:00", "params": {"params.yaml": {"data": params}},
            "metrics": files, "deps": {}, "outs": {}, "meta": {}}


def _params(lr: float = 0.001, seed_offset: int = 0, steps: int = 2000) -> dict:
    return {"seed": 42, "train_ldm": {"lr": lr, "seed_offset": seed_offset, "steps": steps}}


def _metrics(kid: float, precision: float, images: int = 303) -> dict:
    return {"metrics/evaluate.json": {"kid_effnet": kid, "kid_effnet_ci_low": kid - 0.01,
                                      "kid_effnet_ci_high": kid + 0.01, "precision": precision},
            "metrics/ingest.json": {"images": images}}


def _exp(name: str, params: dict, metrics: dict | None, state: str | None = None) -> dict:
    rev = hashlib.sha1(name.encode()).hexdigest()
    executor = None if state is None else {"state": state, "name": "dvc-task", "local": {}}
    return {"revs": [{"rev": rev, "name": name, "data": _data(rev, params, metrics), "error": None,
                      "experiments": None}], "executor": executor, "name": name}


def exp_show(experiments: list[dict], head: tuple[dict, dict] | None, workspace: tuple[dict, dict] | None = None):
    """`dvc exp show --json`: the workspace row, then HEAD's row with its experiments (newest first)."""
    head_params, head_metrics = head or (_params(), None)
    ws_params, ws_metrics = workspace or (head_params, head_metrics)
    return [{"rev": "workspace", "name": None, "data": _data("workspace", ws_params, ws_metrics), "error": None,
             "experiments": None},
            {"rev": "a" * 40, "name": "main", "data": _data("a" * 40, head_params, head_metrics), "error": None,
             "experiments": experiments}]


# kid and precision of recipe (lr) at seed_offset s
BASE = {0: (0.080, 0.52), 1: (0.071, 0.55), 2: (0.090, 0.50)}
LOW_LR = {0: (0.060, 0.58), 1: (0.066, 0.57), 2: (0.058, 0.61), 3: (0.070, 0.56)}
LONG = {0: (0.075, 0.50), 1: (0.072, 0.56)}


def sweep() -> list[dict]:
    """HEAD (seed 0) and experiments: two more seeds of it, four of lr=0.0005, two of steps=4000, a rerun, a queued
    run and one whose metrics are missing; the workspace repeats the newest experiment."""
    exps = [_exp("queued-one", _params(lr=0.002), {}, state="queued"),
            _exp("broken", _params(lr=0.003), {"metrics/evaluate.json": None}),
            _exp("rerun", _params(lr=0.0005, seed_offset=3), _metrics(*LOW_LR[3]))]
    exps += [_exp(f"low-{s}", _params(lr=0.0005, seed_offset=s), _metrics(*LOW_LR[s])) for s in (3, 2, 1, 0)]
    exps += [_exp(f"long-{s}", _params(seed_offset=s, steps=4000), _metrics(*LONG[s])) for s in (1, 0)]
    exps += [_exp(f"base-{s}", _params(seed_offset=s), _metrics(*BASE[s])) for s in (2, 1)]
    return exp_show(exps, head=(_params(), _metrics(*BASE[0])),
                    workspace=(_params(lr=0.0005, seed_offset=3), _metrics(*LOW_LR[3])))


def test_runs_and_recipes_from_the_exp_show_schema():
    runs, head, notes = cmp.runs_from_exp_show(sweep())
    assert head.name == "main" and head.params["train_ldm.lr"] == 0.001
    assert [r.name for r in runs] == ["main", "rerun", "low-3", "low-2", "low-1", "low-0", "long-1", "long-0",
                                      "base-2", "base-1"]  # no workspace: it repeats "rerun"
    assert runs[0].metrics["metrics/evaluate.json:kid_effnet"] == 0.08
    assert any("queued-one: queued" in n for n in notes) and any("broken: no metrics" in n for n in notes)

    recipes, notes = cmp.group_recipes(runs, head=head)
    assert [r.name for r in recipes] == ["baseline", "train_ldm.lr=0.0005", "train_ldm.steps=4000"]
    assert [r.seeds for r in recipes] == [[(0,), (2,), (1,)], [(3,), (2,), (1,), (0,)], [(1,), (0,)]]
    assert [r.name for r in recipes[1].runs] == ["rerun", "low-2", "low-1", "low-0"]
    assert notes == ["low-3: the same recipe and seed as rerun, left out"]


def test_the_workspace_counts_when_it_is_a_run_of_its_own():
    rows = exp_show([_exp("low-0", _params(lr=0.0005), _metrics(*LOW_LR[0]))], head=(_params(), _metrics(*BASE[0])),
                    workspace=(_params(seed_offset=1), _metrics(*BASE[1])))  # `dvc repro` after an edit
    runs, _, notes = cmp.runs_from_exp_show(rows)
    assert [r.name for r in runs] == ["main", "low-0", "workspace"]
    assert any("workspace" in n for n in notes)


def test_numbers_match_numpy_and_scipy():
    result = cmp.run(sweep(), ["kid_effnet", "evaluate.precision"])
    assert result["baseline"] == "baseline" and list(result["metrics"]) == ["kid_effnet", "precision"]
    ps = {}
    for metric, col in (("kid_effnet", 0), ("precision", 1)):
        rows = {r["recipe"]: r for r in result["metrics"][metric]["rows"]}
        for name, table in (("baseline", BASE), ("train_ldm.lr=0.0005", LOW_LR), ("train_ldm.steps=4000", LONG)):
            v = np.array([x[col] for x in table.values()])
            half = stats.t.ppf(0.975, len(v) - 1) * stats.sem(v)
            assert rows[name]["n"] == len(v)
            np.testing.assert_allclose(rows[name]["mean"], v.mean())
            np.testing.assert_allclose(rows[name]["ci95"], [v.mean() - half, v.mean() + half])
            if name == "baseline":
                assert "diff" not in rows[name]
                continue
            seeds = sorted(set(table) & set(BASE))  # paired by seed_offset; lr=0.0005's seed 3 has no partner
            a, b = np.array([table[s][col] for s in seeds]), np.array([BASE[s][col] for s in seeds])
            d = a - b
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
            assert rows[name]["pairs"] == len(seeds)
            np.testing.assert_allclose(rows[name]["diff"], d.mean())
            np.testing.assert_allclose(rows[name]["diff_ci95"], [lo, hi])
            np.testing.assert_allclose(rows[name]["p"], stats.ttest_rel(a, b).pvalue)
            ps[metric, name] = rows[name]
        # Holm over the two comparisons of this metric
        p = sorted(r["p"] for (m, _), r in ps.items() if m == metric)
        holm = [min(1, 2 * p[0]), min(1, max(2 * p[0], p[1]))]
        assert sorted(r["p_holm"] for (m, _), r in ps.items() if m == metric) == pytest.approx(holm)
    assert any("seed(s) 3 not in both" in n for n in result["notes"])


def test_baseline_can_be_another_recipe_or_an_experiment_of_it():
    by_name = cmp.run(sweep(), ["kid_effnet"], baseline="train_ldm.lr=0.0005")
    by_exp = cmp.run(sweep(), ["kid_effnet"], baseline="low-1")
    assert by_name == by_exp and by_name["baseline"] == "train_ldm.lr=0.0005"
    row = next(r for r in by_name["metrics"]["kid_effnet"]["rows"] if r["recipe"] == "baseline")
    seeds = [0, 1, 2]
    np.testing.assert_allclose(row["diff"], np.mean([BASE[s][0] - LOW_LR[s][0] for s in seeds]))
    with pytest.raises(cmp.CompareError, match="no recipe or experiment 'nope'; recipes: baseline, train_ldm"):
        cmp.run(sweep(), ["kid_effnet"], baseline="nope")


def test_one_run_per_recipe_has_no_interval():
    rows = exp_show([_exp("low-0", _params(lr=0.0005), _metrics(*LOW_LR[0]))], head=(_params(), _metrics(*BASE[0])))
    result = cmp.run(rows, ["kid_effnet"])
    low = result["metrics"]["kid_effnet"]["rows"][1]
    assert low["n"] == 1 and low["ci95"] is None and low["pairs"] == 1 and low["diff_ci95"] is None
    assert low["p"] is None and "p_holm" not in low
    md = cmp.to_markdown(result)
    assert "(1 run: no interval)" in md and "(1 pair: no interval)" in md


def test_metric_names_and_defaults():
    runs, _, _ = cmp.runs_from_exp_show(sweep())
    full = "metrics/evaluate.json:kid_effnet"
    assert cmp.resolve_metrics(["kid_effnet", "evaluate.kid_effnet", full], runs) == [full]
    with pytest.raises(cmp.CompareError, match=r"no metric 'fid'; the runs have: kid_effnet, kid_effnet_ci_low"):
        cmp.resolve_metrics(["fid"], runs)
    chosen, notes = cmp.default_metrics(runs)  # no within-run bounds, no image count equal everywhere
    assert chosen == [full, "metrics/evaluate.json:precision"]
    assert notes == ["left out (the same in every run): images"]
    twice = [cmp.Run("a", "a", {}, {"metrics/ingest.json:images": 1, "metrics/generate.json:images": 2}, "main")]
    with pytest.raises(cmp.CompareError, match="in several files"):
        cmp.resolve_metrics(["images"], twice)
    assert cmp.resolve_metrics(["generate.images"], twice) == ["metrics/generate.json:images"]


def test_seed_keys_and_recipe_names():
    runs, head, _ = cmp.runs_from_exp_show(sweep())
    # with steps treated as a seed, the steps=4000 runs are more training runs of the baseline
    recipes, notes = cmp.group_recipes(runs, ("train_ldm.seed_offset", "train_ldm.steps"), head)
    assert [r.name for r in recipes] == ["baseline", "train_ldm.lr=0.0005"]
    assert recipes[0].seeds == [(0, 2000), (1, 4000), (0, 4000), (2, 2000), (1, 2000)]
    lists = [cmp.Run("h", "h", {"x": [1, 2], "y": True}, {"m": 1.0}, "main"),
             cmp.Run("e", "e", {"x": [1], "z": None}, {"m": 2.0}, "main")]
    assert [r.name for r in cmp.group_recipes(lists)[0]] == ["baseline", "x=[1] y=(unset) z=null"]


def test_the_same_params_on_another_commit_are_another_recipe():
    rows = sweep()
    rows.append({"rev": "b" * 40, "name": "old", "data": _data("b" * 40, _params(), _metrics(0.1, 0.4)),
                 "error": None, "experiments": [_exp("old-1", _params(seed_offset=1), _metrics(0.11, 0.41))]})
    result = cmp.run(rows, ["kid_effnet"])
    assert [r["name"] for r in result["recipes"]][-1] == "@commit=old"
    old = result["metrics"]["kid_effnet"]["rows"][-1]
    assert old["n"] == 2 and old["pairs"] == 2
    np.testing.assert_allclose(old["diff"], np.mean([0.1 - BASE[0][0], 0.11 - BASE[1][0]]))


@pytest.mark.parametrize("rows, message", [
    ([], "no experiments with metrics"),
    (exp_show([], head=(_params(), None)), "no experiments with metrics"),
    (exp_show([_exp("s1", _params(seed_offset=1), _metrics(*BASE[1]))], head=(_params(), _metrics(*BASE[0]))),
     "fewer than two recipes: all 2 run(s) differ only in train_ldm.seed_offset"),
])
def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys, rows, message):
    (tmp_path / "exp.json").write_text(json.dumps(rows))
    assert cmp.main(["--input", str(tmp_path / "exp.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare: error: ") and message in err and err.count("\n") == 1


def test_a_missing_metric_names_the_ones_there(tmp_path, capsys):
    (tmp_path / "exp.json").write_text(json.dumps(sweep()))
    assert cmp.main(["--input", str(tmp_path / "exp.json"), "--metrics", "kid", "precision"]) == 2
    assert capsys.readouterr().err == ("compare: error: no metric 'kid'; the runs have: kid_effnet, kid_effnet_ci_low, "
                                       "kid_effnet_ci_high, precision, images\n")


# --- real DVC ------------------------------------------------------------------------------------------------

STAGE = """\
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))["train_ldm"]
s, low = p["seed_offset"], p["lr"] < 0.001
noise = ([0.001, 0.002, -0.004, 0.003] if low else [0.004, -0.003, 0.006])[s]
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"kid_effnet": round(0.08 - 0.015 * low + noise, 6), "precision": round(0.5 + 0.05 * low - noise, 6),
           "images": 46}, open("metrics/evaluate.json", "w"))
json.dump({"val_loss_ema": round(0.75 - 0.01 * low + noise / 2, 6)}, open("metrics/train_ldm.json", "w"))
"""
DVC_YAML = {"stages": {"fake": {"cmd": "python stage.py", "deps": ["stage.py"], "params": ["seed", "train_ldm"],
                                "metrics": [{"metrics/evaluate.json": {"cache": False}},
                                            {"metrics/train_ldm.json": {"cache": False}}]}}}


def _expected(lr: float, s: int) -> dict:
    low = lr < 0.001
    noise = ([0.001, 0.002, -0.004, 0.003] if low else [0.004, -0.003, 0.006])[s]
    return {"kid_effnet": round(0.08 - 0.015 * low + noise, 6), "precision": round(0.5 + 0.05 * low - noise, 6),
            "val_loss_ema": round(0.75 - 0.01 * low + noise / 2, 6)}


def test_real_dvc_experiments(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PYTHONPATH": str(REPO_ROOT)}

    def sh(*args: str) -> str:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 42, "train_ldm": {"lr": 0.001, "seed_offset": 0}}))
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    dvc = (sys.executable, "-m", "dvc")
    sh("git", "init", "-q", "-b", "main")
    sh(*dvc, "init", "-q")
    sh(*dvc, "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline, seed_offset 0")
    runs = [(0.001, 1), (0.001, 2), (0.0005, 0), (0.0005, 1), (0.0005, 2), (0.0005, 3)]
    for lr, s in runs:  # always both keys: -S edits the workspace's params.yaml, which keeps the last values
        sh(*dvc, "exp", "run", "-q", "-S", f"train_ldm.lr={lr}", "-S", f"train_ldm.seed_offset={s}")

    md = sh(sys.executable, "-m", "synthmed.compare")  # runs `dvc exp show --json` itself
    print(md)  # docs/compare.md's example
    result = json.loads(sh(sys.executable, "-m", "synthmed.compare", "--json"))
    assert [r["name"] for r in result["recipes"]] == ["baseline", "train_ldm.lr=0.0005"]
    assert [len(r["runs"]) for r in result["recipes"]] == [3, 4]
    assert list(result["metrics"]) == ["kid_effnet", "precision", "val_loss_ema"]  # images: 46 in every run
    assert "seed(s) 3 not in both" in " ".join(result["notes"])
    for metric, entry in result["metrics"].items():
        base, low = entry["rows"]
        b = np.array([_expected(0.001, s)[metric] for s in range(3)])
        a = np.array([_expected(0.0005, s)[metric] for s in range(4)])
        np.testing.assert_allclose([base["mean"], low["mean"]], [b.mean(), a.mean()])
        assert low["pairs"] == 3
        np.testing.assert_allclose(low["diff"], (a[:3] - b).mean())
        np.testing.assert_allclose(low["p"], cmp.paired_p(a[:3], b))
        np.testing.assert_allclose(low["p_holm"], low["p"])  # one comparison: Holm changes nothing
    assert "| kid_effnet | train_ldm.lr=0.0005 | 4 |" in md

    saved = sh(*dvc, "exp", "show", "--json")
    piped = subprocess.run([sys.executable, "-m", "synthmed.compare", "--input", "-", "--metrics", "kid_effnet"],
                           cwd=repo, env=env, input=saved, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert "| precision |" not in piped.stdout and "| kid_effnet | baseline | 3 |" in piped.stdout
