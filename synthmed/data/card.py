"""A dataset card in markdown: what was ingested, how it splits and what that split guarantees, what was
dropped, and how many near-duplicate images lie across splits."""

from __future__ import annotations

import pandas as pd


def _table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def dataset_card(*, source: str, params: dict, stats: dict, images: pd.DataFrame, pairs: pd.DataFrame,
                 problems: dict[str, int], split_unit: str, near_duplicates: int, near_duplicate_bits: int,
                 notes: list[str] | None = None, volumes: bool = False) -> str:
    """``split_unit``: what one group is (sources.group_unit), the only thing the split keeps apart;
    ``near_duplicates``: pairs of look-alike images across splits (leakage.audit). ``notes``: more bullets for
    the summary, e.g. what the split left out and why. ``volumes``: the samples are 3-D cubes (``ingest.dims: 3``)."""
    unit = "Volumes" if volumes else "Images"
    resolution = (f"{params['resolution']}^3 voxels, 1 channel, {params['crop']} to a cube" if volumes else
                  f"{params['resolution']} px, {params['channels']} channel(s), {params['crop']} to square")
    by_label = (images.assign(label=images["label"].replace("", "(none)"))
                .pivot_table(index="label", columns="split", values="id", aggfunc="count", fill_value=0)
                .reset_index())
    lengths = pairs["caption"].str.count(r"\S+")  # no list of words per caption
    examples = pairs.drop_duplicates("caption").head(5)["caption"].tolist()
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(problems.items())) or "none"
    plane = ", volumes by their central axial plane" if volumes else ""
    how = f"64-bit perceptual hashes at most {near_duplicate_bits} bits apart, mirror images included{plane}"
    alike = (f"{near_duplicates} pairs ({how}); each such image is listed with its closest match in `problems.csv`"
             if near_duplicates else f"none found ({how})")
    return f"""# Dataset card

- Source: `{source}`
- {unit}: {stats['images']} ({stats['images_train']} train / {stats['images_val']} val / {stats['images_test']} test), \
{stats['groups']} groups
- Group (the unit no split cuts): {split_unit}
- Near-duplicates across splits: {alike}
- Pairs (image, caption): {stats['pairs']}; unique captions: {stats['unique_captions']}; \
captions per image: {stats['captions_per_image']}
- Caption length (words): median {lengths.median():.0f}, min {lengths.min()}, max {lengths.max()}
- Resolution: {resolution}
- Rows dropped (`ingest.on_error: skip`): {dropped} (details in `problems.csv`)
""" + "".join(f"- {n}\n" for n in notes or []) + f"""
## {unit} per label and split

{_table(by_label)}

## Example captions

""" + "\n".join(f"- {c}" for c in examples) + """

![samples](samples.png)
"""
