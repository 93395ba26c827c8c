"""Caption augmentation: paraphrasing backends and the pair-table strategies.

A backend maps each *unique* caption to up to n paraphrases. The offline
default is a deterministic rule-based rewriter; the LLM backend
(synthmed.text.llm) implements the same `Paraphraser` protocol.
"""

from __future__ import annotations

import random
import re
from typing import Protocol

import pandas as pd

from synthmed.errors import PipelineError
from synthmed.provenance import derive_seed
from synthmed.text.salient import keeps_salient

# Word-level substitutions that never touch numbers, positions or colours.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "slice": ("section", "cut", "slice"),
    "MRI": ("MR image", "magnetic resonance image", "MRI"),
    "image": ("scan", "picture", "image"),
    "T1-weighted": ("T1w", "T1-weighted"),
    "grey matter": ("gray matter", "grey matter", "cortical grey matter"),
    "white matter": ("white matter", "cerebral white matter"),
    "shows": ("depicts", "displays", "shows"),
    "at": ("located at", "taken at", "at"),
}
_PHRASE = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in sorted(_SYNONYMS, key=len, reverse=True)))
_PREFIXES = ("", "An image of a ", "This is a ", "Example of a ")
_CLAUSE_SPLIT = re.compile(r"\s*[;]\s*")


class Paraphraser(Protocol):
    name: str  # written to the caption_source column

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]: ...


class RuleParaphraser:
    """Deterministic offline paraphraser: synonyms, clause order and framing."""

    name = "rule"

    def __init__(self, seed: int, attempts_per_output: int = 12):
        self.seed = seed
        self.attempts = attempts_per_output

    def _variant(self, caption: str, rng: random.Random) -> str:
        # One pass over all phrases, so a substituted phrase is never rewritten again.
        text = _PHRASE.sub(lambda m: rng.choice(_SYNONYMS[m.group(0)]), caption)
        clauses = [c for c in _CLAUSE_SPLIT.split(text) if c]
        if len(clauses) > 1 and rng.random() < 0.5:
            clauses = clauses[1:] + clauses[:1]
            text = "; ".join(c[0].lower() + c[1:] if i else c for i, c in enumerate(clauses))
        else:
            prefix = rng.choice(_PREFIXES)
            text = prefix + (text[0].lower() + text[1:] if prefix else text)
        return text[0].upper() + text[1:]

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]:
        out = {}
        for caption in captions:
            rng = random.Random(derive_seed(self.seed, caption))
            found: list[str] = []
            for _ in range(self.attempts * n):
                v = self._variant(caption, rng)
                if v != caption and v not in found and keeps_salient(caption, v):
                    found.append(v)
                if len(found) == n:
                    break
            out[caption] = found
        return out


class NoParaphraser:
    name = "none"

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]:
        return {c: [] for c in captions}


def make_offline_paraphraser(backend: str, seed: int) -> Paraphraser:
    """The backends that need no network; the LLM one lives in synthmed.text.llm."""
    if backend == "rule":
        return RuleParaphraser(seed)
    if backend == "none":
        return NoParaphraser()
    raise PipelineError(f"params.yaml: paraphrase.backend={backend!r} is not an offline backend; use rule or none")


def augment_pairs(
    pairs: pd.DataFrame, paraphrases: dict[str, list[str]], source: str, strategy: str,
    p_replace: float, seed: int,
) -> pd.DataFrame:
    """Apply a strategy to (image, caption) rows; every row gets a caption_source.

    add: originals plus paraphrases; replace_all: paraphrases only (the original
    is kept where none exists, so no image loses its caption); replace_some:
    each original is replaced by its paraphrases with probability ``p_replace``.
    """
    rng = random.Random(seed)
    rows = []
    for row in pairs.to_dict("records"):
        alts = paraphrases.get(row["text"], [])
        if strategy == "add":
            keep_original, use_alts = True, True
        elif strategy == "replace_all":
            keep_original, use_alts = not alts, True
        else:  # replace_some
            replaced = bool(alts) and rng.random() < p_replace
            keep_original, use_alts = not replaced, replaced
        if keep_original:
            rows.append({**row, "caption_source": "original"})
        if use_alts:
            rows.extend({**row, "text": alt, "caption_source": source} for alt in alts)
    return pd.DataFrame(rows)
