"""Clinically salient content a paraphrase must keep: numbers, positions, colours, vocabulary terms."""

from __future__ import annotations

import re
from pathlib import Path

from synthmed.errors import PipelineError

POSITIONS = {
    "left", "right", "upper", "lower", "anterior", "posterior", "superior", "inferior",
    "medial", "lateral", "midline", "central", "proximal", "distal", "bilateral",
}
COLOURS = {"red", "green", "blue", "yellow", "white", "black", "grey", "pink", "purple", "orange", "brown"}
_SPELLING = {"gray": "grey", "colour": "color"}
# Counts written as words must survive as counts: "one polyp" == "1 polyp".
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


def _normalise(text: str) -> str:
    return " ".join(_SPELLING.get(w, w) for w in re.findall(r"[a-z0-9+\-.%]+", text.lower()))


def salient_terms(text: str, vocabulary: frozenset[str] = frozenset()) -> set[str]:
    """Numbers (sign kept), position and colour words, and vocabulary terms present in ``text``."""
    lowered = text.lower()
    words = {_SPELLING.get(w, w) for w in _WORD.findall(lowered)}
    numbers = {n.lstrip("+") for n in _NUMBER.findall(lowered)} | {_NUMBER_WORDS[w] for w in words & _NUMBER_WORDS.keys()}
    padded = f" {_normalise(text)} "
    terms = {t for t in vocabulary if f" {t} " in padded}
    return numbers | (words & (POSITIONS | COLOURS)) | terms


def missing_salient(original: str, paraphrase: str, vocabulary: frozenset[str] = frozenset()) -> set[str]:
    return salient_terms(original, vocabulary) - salient_terms(paraphrase, vocabulary)


def keeps_salient(original: str, paraphrase: str, vocabulary: frozenset[str] = frozenset()) -> bool:
    return not missing_salient(original, paraphrase, vocabulary)


def load_vocabulary(path: str | Path) -> frozenset[str]:
    """One term per line, '#' comments; terms are matched as whole words, spelling-normalised."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: vocabulary file not found; fix paraphrase.vocabulary")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return frozenset(_normalise(line) for line in lines if line)
