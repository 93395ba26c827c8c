"""DVC stage `ingest`: read or build the dataset, check it, split it, audit the split for leakage, hash it,
describe it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from synthmed.core.config import as_dict
from synthmed.data.card import dataset_card
from synthmed.data.dicom import DicomParams
from synthmed.data.imagefolder import shard_file_names, write_imagefolder
from synthmed.data.leakage import audit as leakage_audit
from synthmed.data.leakage import check_max_distance, describe, stop_without_groups
from synthmed.data.manifest import (build_manifest, build_pairs, check_pixels_not_shared, dataset_stats,
                                    write_manifest)
from synthmed.data.nifti import NiftiParams
from synthmed.data.problems import Problems
from synthmed.data.sources import (Demo3DParams, DemoParams, group_unit, load_demo, load_samples, load_volumes,
                                   split_notes)
from synthmed.data.splits import SPLITS, assign_splits, check_no_leak
from synthmed.data.volumes import VolumeParams, check_volume_params
from synthmed.core.errors import PipelineError
from synthmed.core.io import write_text
from synthmed.core.provenance import seed_everything
from synthmed.core.stage import Stage, run_stage
from synthmed.text.scrub import scrub_captions, scrub_figures
from synthmed.viz import image_grid, save_png

@dataclass
class IngestParams:
    source: Literal["demo", "imagefolder", "imageclef", "nifti", "dicom"]
    path: str  # the dataset folder (or NIfTI file) for every source but demo
    resolution: int
    channels: Literal[1, 3]
    crop: Literal["pad", "crop"]
    split_fractions: dict[str, float]
    min_images: int
    on_error: Literal["fail", "skip"]
    workers: int  # decode processes; 0 = one per core
    max_image_pixels: int  # larger images are refused (decompression bombs)
    scrub_captions: bool  # dates, record numbers, names and de-identification markers out of every caption
    image_level_splits: bool  # accept a dataset without groups whose splits share near-duplicate images
    near_duplicate_bits: int  # two images whose 64-bit perceptual hashes differ in at most this many bits look alike
    demo: DemoParams
    nifti: NiftiParams
    dicom: DicomParams
    dims: Literal[2, 3]  # 3: one sample per volume (sources demo and nifti)
    volume: VolumeParams  # dims 3, source nifti
    demo3d: Demo3DParams  # dims 3, source demo


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    check_volume_params(p.dims, p.source, p.channels, p.resolution)
    check_max_distance(p.near_duplicate_bits)
    seed_everything(seed)
    problems = Problems(p.on_error)
    volume_notes: list[str] = []
    if p.dims == 3:
        samples, guard_dropped, volume_notes = load_volumes(p, seed, problems)
    else:
        samples, guard_dropped = load_demo(p, seed) if p.source == "demo" else (load_samples(p, problems), 0)
    scrubbed = _scrub(samples) if p.scrub_captions else {}
    if len(samples) < p.min_images:
        raise PipelineError(
            f"ingest found {len(samples)} usable images, fewer than ingest.min_images={p.min_images}; "
            "add images or lower the threshold"
        )
    # A split given by the dataset wins; the rest is assigned group-aware.
    for s in samples:
        if s.split and s.split not in SPLITS:
            raise PipelineError(f"{s.source}: split '{s.split}' is not one of {', '.join(SPLITS)}; fix the split column")
    todo = [s for s in samples if not s.split]
    for s, split in zip(todo, assign_splits([s.group for s in todo], [s.label for s in todo],
                                            p.split_fractions, seed)):
        s.split = split
    check_no_leak([s.group for s in samples], [s.split for s in samples])
    shard_file_names(samples)  # before the manifest: its ids are the file names
    images, pairs = build_manifest(samples), build_pairs(samples)
    check_pixels_not_shared(images)
    unit = group_unit(p, samples)
    leaks = leakage_audit(samples, p.near_duplicate_bits)
    if not unit.known and not p.image_level_splits:  # the split may cut patients: stop where it shows
        stop_without_groups(leaks, samples, alone=unit.alone, fix=unit.fix)
    for pair in leaks.listed:  # a report under either on_error: nothing is dropped
        problems.note("near_duplicate_across_splits", describe(pair, samples), file=samples[pair.a].file_name)
    stats = dataset_stats(images, pairs)
    notes, figures = split_notes(p, samples, guard_dropped)
    notes = volume_notes + notes + ([f"Captions scrubbed (`ingest.scrub_captions`): {scrubbed['scrubbed_captions']} "
                                     "changed (dates, record numbers, names, contacts, de-identification markers)"]
                                    if scrubbed else [])
    unit_text = unit.text + (" (accepted: `ingest.image_level_splits: true`)"
                             if not unit.known and p.image_level_splits else "")

    write_imagefolder(stage.out_path("dataset"), samples)
    write_manifest(stage.out_path("manifest"), images, pairs)
    problems.write(stage.out_path("problems.csv"))
    n = 8 if p.dims == 3 else 16  # a volume's tile is its three central planes
    preview = samples[:: max(1, len(samples) // n)][:n]
    save_png(image_grid([s.array() for s in preview], [s.captions[0] for s in preview], ncol=n // 2 if p.dims == 3 else 8),
             stage.out_path("samples.png"))
    write_text(stage.out_path("card.md"), dataset_card(source=p.source if p.source == "demo" else f"{p.source}: {p.path}",
                                              params=as_dict(p), stats=stats, images=images, pairs=pairs,
                                              problems=problems.counts(), notes=notes, volumes=p.dims == 3,
                                              split_unit=unit_text, near_duplicates=leaks.pairs,
                                              near_duplicate_bits=p.near_duplicate_bits))
    stage.write_provenance([p.path] if p.source != "demo" else [])
    stage.write_metrics({**stats, "rows_dropped": len(problems.items), "near_duplicates_across_splits": leaks.pairs,
                         **scrubbed, **figures}, headline=["images"])
    print(f"ingest: {stats['images']} {'volumes' if p.dims == 3 else 'images'}, {stats['pairs']} pairs "
          f"({stats['images_train']}/{stats['images_val']}/{stats['images_test']}) -> {stage.out}/dataset"
          + (f"; {len(problems.items)} rows dropped, see {stage.out}/problems.csv" if problems.items else "")
          + (f"; {leaks.pairs} near-duplicate pairs across splits, see {stage.out}/problems.csv" if leaks.pairs else "")
          + "".join(f"\n  {note}" for note in notes))


def _scrub(samples) -> dict[str, int]:
    """Scrub every caption in place (synthmed.text.scrub): the generator trains on what is left. Returns the
    captions changed and the removals per category, for the metrics."""
    before = [c for s in samples for c in s.captions]
    after, counts = scrub_captions(before)
    it = iter(after)
    for s in samples:
        s.captions = [next(it) for _ in s.captions]
    return scrub_figures(before, after, counts)


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, IngestParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
