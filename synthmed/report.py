"""One run's report, for people: a self-contained `report.html` (every image inlined, no script, so it opens
offline and from an e-mail) and a `report.md` for GitHub with its figures beside it.

A report is a list of sections; each has a title, one line on how to read it, and blocks: paragraphs,
tables (rows of cells) and figures (PNG bytes). Curves are drawn here with matplotlib, never by a script
fetched from a CDN (DVC's Vega plots render blank offline).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from synthmed.core.io import atomic_path
from synthmed.viz import save_figure


@dataclass
class Figure:
    name: str  # file name in figures/ (report.md) and alt text
    png: bytes
    caption: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    how_to_read: str
    blocks: list[str | Table | Figure] = field(default_factory=list)


def fmt(value, digits: int = 3) -> str:
    """A figure as people read it: 3 significant digits, integers as they are, missing as an en dash."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer() and abs(value) >= 10):
        return f"{int(value):,}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def frame_table(frame: pd.DataFrame, columns: list[str] | None = None) -> Table:
    columns = columns or list(frame.columns)
    return Table(columns, [[fmt(v) for v in row] for row in frame[columns].itertuples(index=False)])


def curves_png(series: dict[str, tuple[list, list]], title: str, ylabel: str, logy: bool = False) -> bytes:
    """Line plot of named (x, y) series, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, lw=1.2, marker="o" if len(x) < 30 else None, ms=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig)


def smoothed(values: pd.Series, window: int = 50) -> list[float]:
    return values.rolling(window, min_periods=1).mean().tolist()


def _inline_md(text: str) -> str:
    """The little markdown the report's own prose uses (`code`, **bold**), as HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def to_html(title: str, subtitle: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "color:#222}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}"
             ".how{color:#555;font-style:italic}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child,th:first-child"
             "{text-align:left}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}"
             "figcaption{color:#555;font-size:.9em}nav a{margin-right:1em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{_inline_md(subtitle)}</p><nav>"
             + "".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)) + "</nav>"]
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2><p class='how'>How to read it: "
                     f"{_inline_md(s.how_to_read)}</p>")
        for b in s.blocks:
            if isinstance(b, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode()
                parts.append(f"<figure><img alt='{html.escape(b.name)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{_inline_md(b.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p>{_inline_md(b)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def to_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    for s in sections:
        lines += [f"## {s.title}", "", f"*How to read it:* {s.how_to_read}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                lines += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
                lines += ["| " + " | ".join(r) + " |" for r in b.rows] + [""]
            elif isinstance(b, Figure):
                lines += [f"![{b.name}](figures/{b.name}.png)", "", f"*{b.caption}*" if b.caption else "", ""]
            else:
                lines += [b, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(folder: str | Path, title: str, subtitle: str, sections: list[Section]) -> None:
    """``folder``/report.html, report.md and figures/, replaced as one."""
    with atomic_path(folder, is_dir=True) as tmp:
        (tmp / "figures").mkdir()
        for s in sections:
            for b in s.blocks:
                if isinstance(b, Figure):
                    (tmp / "figures" / f"{b.name}.png").write_bytes(b.png)
        (tmp / "report.html").write_text(to_html(title, subtitle, sections), encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown(title, subtitle, sections), encoding="utf-8")
