"""DVC stage `paraphrase`: augment captions; write the (image, caption) pair table.

With `scrub: true` (default) each caption is scrubbed (synthmed.text.scrub) before it is paraphrased, so the
paraphrases come from the scrubbed text and never repeat an identifier; only scrubbed text is sent to an LLM
that is not on this machine, and only with `openai.allow_remote: true`. The original rows keep ingest's
captions: every later stage (prompts, evaluate) reads those, so scrubbing them belongs to ingest, not here."""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from synthmed.data.imagefolder import metadata_chunks
from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path
from synthmed.core.stage import Stage, run_stage
from synthmed.text.backend import backend_used, make_paraphraser, report_declined, report_scrubbed
from synthmed.text.llm import LLMStats, OpenAIParams
from synthmed.text.paraphrase import augment_pairs
from synthmed.text.scrub import scrub_captions, scrub_figures


@dataclass
class ParaphraseParams:
    backend: Literal["rule", "none", "openai"]
    n_per_caption: int
    strategy: Literal["add", "replace_some", "replace_all"]
    p_replace: float
    splits: list[str]  # which splits get paraphrases; others keep their originals only
    prompt_template: str  # versioned prompt file (a DVC dependency)
    vocabulary: str  # finding/anatomy terms a paraphrase must keep
    min_length_ratio: float
    max_length_ratio: float
    scrub: bool  # scrub each caption before it is paraphrased; always true for an endpoint off this machine
    openai: OpenAIParams


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    dataset = stage.dep("ingest/dataset")
    paraphraser = make_paraphraser(p, seed)
    print(f"paraphrase: backend={paraphraser.name}"
          + (f" model={p.openai.model} at {p.openai.base_url or 'OpenAI'}" if paraphraser.name == "llm" else ""))
    # the caption table is read in chunks, so memory grows with the distinct captions, not with the pairs
    before, eligible = set(), set()
    for chunk in metadata_chunks(dataset):
        before.update(chunk["text"])
        eligible.update(chunk.loc[chunk["split"].isin(p.splits), "text"])
    unique = sorted(eligible - {""})  # an image without a caption has nothing to rephrase
    scrubbed, found = scrub_captions(unique) if p.scrub else (unique, Counter())
    scrub_metrics = scrub_figures(unique, scrubbed, found)
    report_scrubbed(scrub_metrics["scrubbed_captions"], len(unique), found)
    # captions that differ only in what was scrubbed share one request; one that was nothing else gets none
    sent = sorted(set(scrubbed) - {""})
    replies = paraphraser.paraphrase(sent, p.n_per_caption)
    paraphrases = {c: replies.get(s, []) for c, s in zip(unique, scrubbed)}
    declined = getattr(paraphraser, "declined", {})
    report_declined(declined, len(sent))
    rng, after, n_pairs = random.Random(seed), set(), 0
    columns = ["file_name", "text", "caption_source", "split", "label", "group"]
    with atomic_path(stage.out_path("pairs.csv")) as tmp:
        for augmented in (True, False):  # the paraphrased splits' rows first, then the others' as they are
            for chunk in metadata_chunks(dataset):
                rows = chunk[chunk["split"].isin(p.splits) == augmented]
                out = (augment_pairs(rows, paraphrases, paraphraser.name, p.strategy, p.p_replace, rng)
                       if augmented else rows.assign(caption_source="original"))
                out[columns].to_csv(tmp, index=False, mode="a", header=not tmp.exists())
                n_pairs += len(out)
                after.update(out["text"])
        if n_pairs == 0:
            raise PipelineError(f"{dataset}/metadata.csv: no pairs left after paraphrasing; check paraphrase.splits")
    used = backend_used(paraphraser)
    # the backend that ran beside the one asked for: they differ under paraphrase.openai.fallback: rule
    stage.write_provenance(backend_used=used)
    stats = getattr(paraphraser, "stats", LLMStats())
    n_para = sum(len(v) for v in paraphrases.values())
    reasons = ("empty", "malformed", "refusal", "identical", "duplicate", "length", "salient")
    stage.write_metrics({
        "unique_captions_before": len(before),
        "unique_captions_after": len(after),
        "paraphrases_per_caption": n_para / max(len(unique), 1),
        "pairs": n_pairs,
        "llm": int(paraphraser.name == "llm"),  # the backend that ran (1: LLM); its name is in provenance.json
        "rule_declined": len(declined),
        "requests": stats.requests,
        "cache_hits": stats.cache_hits,
        "tokens": stats.prompt_tokens + stats.completion_tokens,
        **{f"rejected_{r}": stats.rejected.get(r, 0) for r in reasons},
        **scrub_metrics,  # what the scrubber removed from the unique captions before paraphrasing
    }, headline=["unique_captions_after"])
    print(f"paraphrase: {len(unique)} unique captions -> {n_para} paraphrases; {n_pairs} pairs; "
          f"{stats.requests} requests, {stats.cache_hits} cache hits, {sum(stats.rejected.values())} rejected")


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, ParaphraseParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
