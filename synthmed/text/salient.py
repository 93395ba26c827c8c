"""Clinically salient content a paraphrase must keep: numbers, positions, colours, vocabulary terms."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from synthmed.core.errors import PipelineError

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
    # dots stay inside tokens (decimals) but not at their ends: "pneumothorax." is "pneumothorax"
    words = (w.strip(".") for w in re.findall(r"[a-z0-9+\-.%]+", text.lower()))
    return " ".join(_SPELLING.get(w, w) for w in words if w)


def salient_counts(text: str, vocabulary: frozenset[str] = frozenset()) -> Counter[str]:
    """How often each salient term occurs: numbers (sign kept), position and colour words, vocabulary terms.

    Counted, not just present: "left ... left" paraphrased as "... left" has lost a side.
    """
    words = [_SPELLING.get(w, w) for w in _WORD.findall(text.lower())]
    counts = Counter(n.lstrip("+") for n in _NUMBER.findall(text.lower()))
    counts.update(_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS)
    counts.update(w for w in words if w in POSITIONS or w in COLOURS)
    tokens = _normalise(text).split()
    counts.update({t: c for t in vocabulary if (c := _occurrences(t.split(), tokens))})
    return counts


def _occurrences(term: list[str], tokens: list[str]) -> int:
    """Whole-word occurrences of a (multi-word) term in a token list."""
    k = len(term)
    return sum(tokens[i:i + k] == term for i in range(len(tokens) - k + 1))


def salient_terms(text: str, vocabulary: frozenset[str] = frozenset()) -> set[str]:
    """The salient terms present in ``text``, each once."""
    return set(salient_counts(text, vocabulary))


def missing_salient(original: str, paraphrase: str, vocabulary: frozenset[str] = frozenset()) -> set[str]:
    """Terms the paraphrase has fewer of than the original; extra occurrences are allowed (repeating
    a side or a count adds no finding, and the length-ratio check bounds padding)."""
    return set(salient_counts(original, vocabulary) - salient_counts(paraphrase, vocabulary))


def keeps_salient(original: str, paraphrase: str, vocabulary: frozenset[str] = frozenset()) -> bool:
    return not missing_salient(original, paraphrase, vocabulary)


def load_vocabulary(path: str | Path) -> frozenset[str]:
    """One term per line, '#' comments; terms are matched as whole words, spelling-normalised."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: vocabulary file not found; fix paraphrase.vocabulary")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return frozenset(_normalise(line) for line in lines if line)
