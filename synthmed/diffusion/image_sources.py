"""The conditions of an image-conditioned model's plan (DiNO-Diffusion): the frozen encoder's embedding of each
row's source image, or its mix with the partner's at the row's r."""

from __future__ import annotations

import pandas as pd
import torch

from synthmed.data.dataset import image_rows
from synthmed.data.imagefolder import read_metadata
from synthmed.core.errors import PipelineError
from synthmed.core.provenance import derive_seed
from synthmed.models.image_encoder import mix
from synthmed.viz import to_array


class SourceEmbeddings:
    """The frozen encoder's embedding of every source image an image-conditioned plan names, computed once."""

    def __init__(self, pipe, plan: pd.DataFrame, real_folder: str, how: str, where: str):
        real = read_metadata(real_folder).drop_duplicates("file_name").set_index("file_name", drop=False)
        names = sorted(set(plan["source_file_name"]) | set(plan.get("partner_file_name", pd.Series(dtype=str))) - {""})
        missing = [n for n in names if n not in real.index]
        if missing:
            raise PipelineError(f"{where}: source image {missing[0]} is not in {real_folder}; rerun `dvc repro prompts`")
        self.index = {n: i for i, n in enumerate(names)}
        self.images = image_rows(real_folder, real.loc[names])  # on disk: read a batch at a time
        # one image at a time: an embedding, and so an image, must not depend on which others a run embeds
        self.emb, self.how = pipe.embed_images(self.images, batch_size=1), how

    def __call__(self, rows: pd.DataFrame) -> torch.Tensor:
        """Each row's condition: its source's embedding, or its mix with the partner's at r."""
        a = self.emb[[self.index[n] for n in rows["source_file_name"]]]
        if "partner_file_name" not in rows or not (rows["mode"] == "interpolation").any():
            return a
        mixed = rows["mode"].to_numpy() == "interpolation"
        b = self.emb[[self.index[n or s] for n, s in zip(rows["partner_file_name"], rows["source_file_name"])]]
        r = torch.tensor([float(x) if m else 0.0 for x, m in zip(rows["r"], mixed)])
        return torch.where(torch.as_tensor(mixed)[:, None, None], mix(a, b, r, self.how), a)

    def source(self, name: str):
        return to_array(self.images[self.index[name]])


def image_grid_rows(pipe, plan: pd.DataFrame, sources: SourceEmbeddings, p, seed: int):
    """What an image-conditioned model's grid shows: sources beside variants of them, and interpolation strips
    (source, the mixes at each r, partner); rendered for the figure, from seeds of their own."""
    width = len(p.image.fractions) + 2
    tiles, captions = [], []
    picks = plan.drop_duplicates("source_file_name")
    picks = picks.iloc[torch.linspace(0, len(picks) - 1, min(4, len(picks))).round().long().unique().tolist()]
    kw = dict(num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale, batch_size=p.batch_size)
    for k, row in enumerate(picks.itertuples()):
        if "reconstruction" in p.image.modes:
            rows = pd.DataFrame({"source_file_name": [row.source_file_name] * (width - 1)})
            seeds = [derive_seed(seed, "grid", k, j) for j in range(width - 1)]
            tiles += [sources.source(row.source_file_name), *map(to_array, pipe.generate(sources(rows), seeds, **kw))]
            captions += [f"source {row.label}"] + ["variant"] * (width - 1)
        if "interpolation" in p.image.modes:
            partner = plan[(plan["mode"] == "interpolation") & (plan["source_file_name"] == row.source_file_name)]
            if partner.empty:
                continue
            b = partner["partner_file_name"].iloc[0]
            rows = pd.DataFrame({"source_file_name": row.source_file_name, "partner_file_name": b,
                                 "mode": "interpolation", "r": p.image.fractions})
            images = pipe.generate(sources(rows), [derive_seed(seed, "grid-mix", k)] * len(rows), **kw)
            tiles += [sources.source(row.source_file_name), *map(to_array, images), sources.source(b)]
            captions += ["source"] + [f"r={r:g}" for r in p.image.fractions] + ["partner"]
    return tiles, captions, width
