"""The run report: self-contained HTML (every image inlined, no script) and GitHub markdown, checked in a real
headless Chromium: every image loads, the console stays clean."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from synthmed.report import Figure, Section, Table, curves_png, fmt, write_report
from tests.browser import CHROMIUM, visit


def tiny_png(value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sections() -> list[Section]:
    curve = curves_png({"train": ([0, 1, 2], [1.0, 0.5, 0.25])}, "loss", "loss", logy=True)
    return [Section("Fidelity <1>", "lower is `better`", ["A **bold** line & more.",
                                                           Table(["metric", "value"], [["fd", fmt(12.3456)]])]),
            Section("Pictures", "look at them", [Figure("grid", tiny_png(), "a grid"), Figure("curve", curve)])]


def check_self_contained(html: str) -> None:
    """No script, no external reference; every image a PNG inlined as a data URI."""
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    sources = re.findall(r"<img[^>]* src='([^']*)'", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()


def test_report_is_self_contained_html_and_github_markdown(tmp_path):
    write_report(tmp_path / "report", "a run", "subtitle", sections())
    html = (tmp_path / "report/report.html").read_text()
    check_self_contained(html)
    assert "Fidelity &lt;1&gt;" in html and "<code>better</code>" in html and "<b>bold</b>" in html
    assert "<td>12.3</td>" in html
    md = (tmp_path / "report/report.md").read_text()
    assert "| metric | value |" in md and "![grid](figures/grid.png)" in md
    assert (tmp_path / "report/figures/curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`make test` installs it where apt-get runs as root)")
def test_report_renders_in_headless_chromium(tmp_path):
    write_report(tmp_path / "report", "a run", "subtitle", sections())
    seen = visit((tmp_path / "report/report.html").as_uri())
    assert len(seen.images) == 2 and all(i["ok"] for i in seen.images), seen.images
    assert seen.errors == []
    shot = Image.open(io.BytesIO(seen.screenshot))
    assert shot.size[0] >= 800 and np.asarray(shot.convert("L")).std() > 0  # something was drawn
