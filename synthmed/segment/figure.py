"""The segment stage's figure: per image, the image, its mask, the attention segments and the classes they
were matched to (over the image), beside the baselines' matched classes; or a note saying why there is none."""

from __future__ import annotations

import numpy as np

from synthmed.segment.score import UNMATCHED


def _colours(labels: np.ndarray, palette: str = "tab10") -> np.ndarray:
    """Label map -> RGB in [0, 1], one fixed colour per index (classes: tab10; segments: tab20), UNMATCHED black."""
    import matplotlib

    table = np.asarray(matplotlib.colormaps[palette].colors)
    rgb = table[np.mod(labels, len(table))]
    rgb[labels == UNMATCHED] = 0
    return rgb


def overlay_figure(path, images: np.ndarray, segments: list[np.ndarray], truth: np.ndarray | None,
                   matched: dict[str, list[np.ndarray]] | None, names: list[str], classes: list[str],
                   note: str = "") -> None:
    """uint8 images [N, C, H, W] with their label maps (and masks, matched class maps per method) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from synthmed.viz import save_figure

    if note or not len(images):
        fig = plt.figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, note or "no images", ha="center", va="center", wrap=True)
        save_figure(fig, path)
        return
    columns = [("image", None)]
    if truth is not None:
        columns.append(("mask", None))
    columns.append(("attention segments", None))
    columns += [(f"{m}: matched classes", m) for m in (matched or {})]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(1.9 * len(columns), 1.9 * len(images) + 0.6),
                             squeeze=False)
    for i, image in enumerate(images):
        grey = image[0] / 255.0
        panels = [np.repeat(grey[..., None], 3, -1)]
        if truth is not None:
            panels.append(_colours(truth[i]))
        panels.append(_colours(segments[i], "tab20"))
        for _, method in columns[len(panels):]:
            panels.append(0.5 * panels[0] + 0.5 * _colours(matched[method][i]))
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j][0], fontsize=7)
        axes[i][0].set_ylabel(names[i], fontsize=5)
    if truth is not None:
        handles = [Patch(color=_colours(np.array([c]))[0], label=name) for c, name in enumerate(classes)]
        fig.legend(handles=handles + [Patch(color="black", label="no class (unmatched segment)")],
                   loc="lower center", ncol=len(handles) + 1, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if truth is not None else 0, 1, 1))
    save_figure(fig, path)
