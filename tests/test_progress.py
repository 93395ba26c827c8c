"""Without a terminal, long loops print plain progress lines (step/total, loss, rate, ETA) every few seconds."""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from tqdm.auto import tqdm

from synthmed.diffusion.shards import write_shards
from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.loop import train_ldm
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.core.errors import PipelineError
from synthmed.models.autoencoder import train_autoencoder
from synthmed.core.progress import LineProgress, progress
from tests.helpers import PLAIN, tiny_unet, tiny_vae, toy_latent_pairs, vae_train_config

LINE = re.compile(r"^(\w+): (\w+) (\d+)/(\d+) \(\d+\.\d%\), (?:loss ([\d.e+-]+), )?[\d.e+-]+ \w+/s, "
                  r"(?:ETA \w+|\w+ elapsed)$")


@pytest.fixture
def plain_lines(monkeypatch):
    """No terminal (as under pytest's capture) and a line after every update."""
    monkeypatch.delenv("SYNTHMED_PROGRESS", raising=False)
    monkeypatch.setenv("SYNTHMED_PROGRESS_EVERY_S", "1e-9")


def lines_of(out: str, desc: str) -> list[re.Match]:
    found = [LINE.match(line) for line in out.splitlines() if line.startswith(f"{desc}: ")]
    assert found and all(found), out
    return found


def test_lines_every_interval_with_the_mean_loss_since_the_last_line():
    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(range(100), desc="train", total=100, unit="step", every=10, stream=out, clock=lambda: now[0])
    for i in bar:
        now[0] += 1.0
        bar.set_postfix(loss=i)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # at 10 s, 20 s, ... 100 s; the last one is the closing line
    assert lines[0] == "train: step 10/100 (10.0%), loss 4.5, 1 step/s, ETA 1m30s"  # mean of steps 0..9
    assert lines[-1] == "train: step 100/100 (100.0%), loss 94.5, 1 step/s, 1m40s elapsed"


def test_a_resumed_loop_counts_its_rate_from_where_it_resumed():
    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(range(50, 60), desc="train", total=60, initial=50, unit="step", every=5, stream=out,
                       clock=lambda: now[0])
    for _ in bar:
        now[0] += 0.5
    assert out.getvalue().splitlines()[0] == "train: step 60/60 (100.0%), 2 step/s, 5s elapsed"


def test_train_ldm_prints_progress_lines_without_a_terminal(plain_lines, capsys):
    cfg = LDMTrainConfig(steps=4, batch_size=4, lr=1e-3, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **PLAIN)
    log, _ = train_ldm(tiny_unet(), make_noise_scheduler(1000), toy_latent_pairs(), cfg, torch.Generator().manual_seed(0))
    found = lines_of(capsys.readouterr().out, "train_ldm")
    assert [(m[2], int(m[3]), int(m[4])) for m in found] == [("step", i, 4) for i in range(1, 5)]
    for m, row in zip(found, log):  # one step per line: the line's loss is that step's
        assert float(m[5]) == pytest.approx(row["loss"], rel=1e-3)


def test_train_vae_prints_progress_lines_without_a_terminal(plain_lines, capsys):
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    log = train_autoencoder(tiny_vae(), images, vae_train_config(steps=3, batch_size=2), torch.Generator().manual_seed(0))
    found = lines_of(capsys.readouterr().out, "train_vae")
    assert [int(m[3]) for m in found] == [1, 2, 3]
    assert float(found[-1][5]) == pytest.approx(log[-1]["loss"], rel=1e-3)


def test_generate_prints_image_progress_without_a_terminal(plain_lines, capsys, tmp_path):
    plan = pd.DataFrame({"image_index": range(5), "text": list("abcde"), "seed": range(5)})

    def render(rows):
        yield from (np.zeros((8, 8), np.uint8) for _ in range(len(rows)))

    write_shards(plan, tmp_path / "out", 2, "fp", render)
    found = lines_of(capsys.readouterr().out, "generate")
    assert [(m[2], int(m[3]), int(m[4])) for m in found] == [("image", i, 5) for i in range(1, 6)]


def test_interval_zero_is_silent_and_a_bad_interval_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("SYNTHMED_PROGRESS", raising=False)
    monkeypatch.setenv("SYNTHMED_PROGRESS_EVERY_S", "0")
    for _ in progress(range(3), desc="quiet"):
        pass
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("SYNTHMED_PROGRESS_EVERY_S", "soon")
    with pytest.raises(PipelineError, match="SYNTHMED_PROGRESS_EVERY_S='soon'"):
        progress(range(3), desc="x")


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(progress(range(3), desc="x"), tqdm)
