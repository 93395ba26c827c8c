"""Generation: prompt plans, per-image seeds, samplers, resumable shards and single-image regeneration."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from diffusers import DDIMScheduler

from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.prompts import expand, file_prompts, template_prompts
from synthmed.diffusion.regenerate import main as regenerate_cli, regenerate
from synthmed.diffusion.schedulers import SAMPLERS, make_sampler
from synthmed.diffusion.shards import write_shards
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_tree
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_unet, tiny_vae

PROMPTS = ["axial slice at z = +10 mm", "coronal slice", "left sagittal slice", "axial slice at z = -20 mm"]


def test_prompt_files_and_templates(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\nsecond prompt\n")
    assert file_prompts(tmp_path / "p.txt")["text"].tolist() == ["first prompt", "second prompt"]
    (tmp_path / "clef.csv").write_text("ID;Prompt\n1;an x-ray of the chest\n2;a CT of the head\n")  # ImageCLEF style
    assert file_prompts(tmp_path / "clef.csv")["text"].tolist() == ["an x-ray of the chest", "a CT of the head"]
    (tmp_path / "labelled.csv").write_text("text,label\nx,a\n,b\n")
    with pytest.raises(PipelineError, match=r"labelled.csv, row 3: empty prompt"):
        file_prompts(tmp_path / "labelled.csv")
    (tmp_path / "bad.csv").write_text("caption_text,label\nx,a\n")
    with pytest.raises(PipelineError, match="no prompt column"):
        file_prompts(tmp_path / "bad.csv")
    t = template_prompts({"a": ["one", "two"], "b": ["three"]})
    assert t["label"].tolist() == ["a", "a", "b"]


def test_each_image_seed_depends_only_on_the_global_seed_and_its_indices():
    plan = expand(pd.DataFrame({"text": ["a", "b"]}), 3, seed=42)
    assert plan[["prompt_index", "sample_index"]].values.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert plan["seed"].nunique() == 6
    longer = expand(pd.DataFrame({"text": ["a", "b", "c"]}), 3, seed=42)
    assert longer["seed"].iloc[:6].tolist() == plan["seed"].tolist()  # adding prompts changes no earlier image
    assert expand(pd.DataFrame({"text": ["a", "b"]}), 3, seed=43)["seed"].iloc[0] != plan["seed"].iloc[0]


def tiny_pipe(tmp_path):
    sched = DDIMScheduler.from_config(make_noise_scheduler(1000).config)
    pipe = SynthMedPipeline(tiny_unet(), tiny_vae().eval(), sched, text_max_length=8)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model")
    return pipe


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_regenerates_an_image_alone_from_its_seed(tmp_path, sampler):
    pipe = tiny_pipe(tmp_path)
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "epsilon"  # the trained objective is kept
    batch = pipe.generate(PROMPTS, [11, 12, 13, 14], num_inference_steps=5, batch_size=4)
    row = pd.Series({"text": PROMPTS[2], "seed": "13", "scheduler": sampler, "num_inference_steps": "5",
                     "guidance_scale": "3.0"})
    alone = regenerate(pipe, row)
    # ddpm draws fresh noise every step from the image's own generator; float rounding
    # that differs between batch sizes may move a pixel by one level there
    assert np.abs(alone.astype(int) - batch[2, 0]).max() <= (1 if sampler == "ddpm" else 0)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp"])
def test_a_flow_model_samples_with_its_own_solvers_and_refuses_the_others(tmp_path, sampler):
    from synthmed.diffusion.schedulers import default_sampler, is_flow

    pipe = SynthMedPipeline(tiny_unet(), tiny_vae().eval(), default_sampler(make_noise_scheduler(1000, "flow",
                                                                                                flow_shift=2.0)),
                            text_max_length=8)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "model")
    loaded = SynthMedPipeline.from_pretrained(tmp_path / "model")
    assert is_flow(loaded.scheduler)
    loaded.scheduler = make_sampler(sampler, loaded.scheduler.config)
    assert is_flow(loaded.scheduler)
    batch = loaded.generate(PROMPTS[:2], [1, 2], num_inference_steps=4, batch_size=2)
    assert batch.shape[0] == 2 and batch.std() > 0
    row = pd.Series({"text": PROMPTS[1], "seed": "2", "scheduler": sampler, "num_inference_steps": "4",
                     "guidance_scale": "3.0"})
    assert np.array_equal(regenerate(loaded, row), batch[1, 0])
    with pytest.raises(ValueError, match="cannot sample a rectified-flow model"):
        make_sampler("ddim", loaded.scheduler.config)


@pytest.mark.slow
def test_killed_generation_resumes_after_its_finished_shards(tmp_path):
    script = [sys.executable, "-m", "tests.diffusion.shard_script"]
    full = subprocess.run([*script, str(tmp_path / "full")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr
    assert "stats 10 0" in full.stdout

    proc = subprocess.Popen([*script, str(tmp_path / "out")], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = 0
    for line in proc.stdout:  # kill hard in the middle of the third shard (images 7 and 8 of 10)
        seen += line.startswith("rendered")
        if seen == 8:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert sorted(p.name for p in (tmp_path / "out").glob("shard_*")) == ["shard_00000", "shard_00001"]

    again = subprocess.run([*script, str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert "stats 4 6" in again.stdout  # two shards of 3 skipped, the last two shards rendered
    assert not list((tmp_path / "out").glob(".*"))  # the killed run's half shard is gone
    assert pd.read_csv(tmp_path / "out.csv").equals(pd.read_csv(tmp_path / "full.csv"))
    for name in pd.read_csv(tmp_path / "full.csv")["file_name"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_regenerate_cli_reproduces_a_generated_image(tmp_path, capsys):
    pipe = tiny_pipe(tmp_path)
    plan = expand(pd.DataFrame({"text": PROMPTS, "label": ""}), 1, seed=7).assign(
        image_index=range(4), scheduler="ddim", num_inference_steps=4, guidance_scale=3.0,
        model_sha256=sha256_tree(tmp_path / "model"))

    def render(rows):
        for _, imgs in pipe.generate_batches(rows["text"].tolist(), rows["seed"].tolist(), num_inference_steps=4,
                                             batch_size=4):
            yield from (img[0] for img in imgs.numpy())

    meta, _ = write_shards(plan, tmp_path / "dataset", 2, "fp", render)
    meta.to_csv(tmp_path / "dataset/metadata.csv", index=False)
    name = meta["file_name"].iloc[3].split("/")[-1]
    code = regenerate_cli([name, "--dataset", str(tmp_path / "dataset"), "--model", str(tmp_path / "model"),
                           "--out", str(tmp_path / "again.png")])
    assert code == 0 and "identical" in capsys.readouterr().out


def test_shard_workers_and_the_merge_write_what_a_single_run_writes(tmp_path):
    from synthmed.diffusion.shards import parse_shard, publish_shards

    plan = pd.DataFrame({"image_index": range(10), "text": [f"p{i}" for i in range(10)], "seed": range(100, 110)})
    calls = []

    def render(rows):
        calls.append(rows["image_index"].tolist())
        for seed in rows["seed"]:
            yield np.random.default_rng(int(seed)).integers(0, 256, (8, 8), dtype=np.uint8)

    single, _ = write_shards(plan, tmp_path / "single", 3, "fp", render)
    publish_shards(tmp_path / "single", single, tmp_path / "single_ds")
    calls.clear()
    for spec in ("2/2", "1/2"):  # any order; each renders its own shards only
        write_shards(plan, tmp_path / "sharded", 3, "fp", render, parse_shard(spec))
    assert calls == [[3, 4, 5], [9], [0, 1, 2], [6, 7, 8]]
    calls.clear()
    merged, stats = write_shards(plan, tmp_path / "sharded", 3, "fp", render)
    assert calls == [] and stats["rendered"] == 0 and stats["resumed"] == 10
    publish_shards(tmp_path / "sharded", merged, tmp_path / "sharded_ds")
    a, b = tmp_path / "single_ds", tmp_path / "sharded_ds"
    assert (a / "metadata.csv").read_bytes() == (b / "metadata.csv").read_bytes()
    for name in single["file_name"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for bad in ("3/2", "0/2", "2", "a/b"):
        with pytest.raises(PipelineError, match=f"--shard {bad}: give i/N with 1 <= i <= N"):
            parse_shard(bad)


@pytest.mark.slow
def test_workers_started_together_on_one_plan_render_every_shard_exactly_once(tmp_path):
    """Two whole runs and two shard workers at once on one folder: each shard is rendered by exactly one of them, no
    one deletes another's folder, and every whole run returns the single run's rows and bytes."""
    script = [sys.executable, "-m", "tests.diffusion.shard_script"]
    single = subprocess.run([*script, str(tmp_path / "single"), "--delay", "0"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    specs = ["1/1", "1/1", "1/2", "2/2"]
    procs = [subprocess.Popen([*script, str(tmp_path / "out"), "--shard", spec, "--csv", str(tmp_path / f"{k}.csv"),
                               "--go", str(tmp_path / "go"), "--delay", "0.1"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k, spec in enumerate(specs)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    (tmp_path / "go").touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    rendered = [int(line.split()[1]) for out, _ in outputs for line in out.splitlines() if line.startswith("rendered")]
    assert sorted(rendered) == list(range(100, 110))  # every image once, by one worker
    assert sum(int(out.split("stats ")[1].split()[0]) for out, _ in outputs) == 10
    expected = pd.read_csv(tmp_path / "single.csv")
    for k in (0, 1):  # the whole runs: every row, as one run writes them
        assert pd.read_csv(tmp_path / f"{k}.csv").equals(expected)
    for name in expected["file_name"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fingerprint.txt"] + [
        f"shard_{i:05d}" for i in range(4)]  # no claim, no half shard left


def test_a_folder_of_another_run_is_cleared_only_when_no_worker_is_in_it(tmp_path, capsys):
    from synthmed.core.io import FileLock

    plan = pd.DataFrame({"image_index": range(4), "text": ["p"] * 4, "seed": range(4)})

    def render(rows):
        yield from (np.full((8, 8), int(s), dtype=np.uint8) for s in rows["seed"])

    write_shards(plan, tmp_path / "out", 2, "run-a", render, (1, 2))  # shard 0 of run a
    worker = FileLock(tmp_path / ".out.lock")
    assert worker.acquire(shared=True)  # a worker of run a, still inside
    with pytest.raises(PipelineError, match=r"out: shards of another run are being written by pid \d+ on "):
        write_shards(plan, tmp_path / "out", 2, "run-b", render)
    assert (tmp_path / "out/shard_00000/shard.csv").is_file()  # its finished shard untouched
    worker.release()
    capsys.readouterr()
    meta, stats = write_shards(plan, tmp_path / "out", 2, "run-b", render)
    assert "/out: shards of another run (fingerprint run-a); starting fresh\n" in capsys.readouterr().out
    assert stats["rendered"] == 4 and (tmp_path / "out/fingerprint.txt").read_text() == "run-b"
