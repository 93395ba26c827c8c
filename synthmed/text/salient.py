"""Clinically salient content a paraphrase must keep: numbers, positions, colours."""

from __future__ import annotations

import re

POSITIONS = {
    "left", "right", "upper", "lower", "anterior", "posterior", "superior", "inferior",
    "medial", "lateral", "midline", "central", "proximal", "distal", "bilateral",
}
COLOURS = {"red", "green", "blue", "yellow", "white", "black", "grey", "pink", "purple", "orange", "brown"}
_SPELLING = {"gray": "grey", "colour": "color"}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


def salient_terms(text: str) -> set[str]:
    """Numbers (sign kept), position and colour words, spelling-normalised."""
    lowered = text.lower()
    numbers = {n.lstrip("+") for n in _NUMBER.findall(lowered)}
    words = {_SPELLING.get(w, w) for w in _WORD.findall(lowered)}
    return numbers | (words & (POSITIONS | COLOURS))


def keeps_salient(original: str, paraphrase: str) -> bool:
    return salient_terms(original) <= salient_terms(paraphrase)
