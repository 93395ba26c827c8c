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

from synthmed.core.errors import PipelineError
from synthmed.core.provenance import derive_seed
from synthmed.text.salient import keeps_salient

# Word-level substitutions that never touch numbers, positions or colours: (pattern, choices). The
# patterns carry their context, so "MRI slice" and "an MRI" each get synonyms that fit there.
_SYNONYMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"slice", ("section", "cut", "slice")),
    (r"MRI(?= (?:slice|scan|image|study|section|sequence)\b)", ("MR", "magnetic resonance", "MRI")),
    (r"MRI", ("MR image", "magnetic resonance image", "MRI")),
    (r"(?<=MR |CT )image", ("scan", "image")),
    (r"image", ("picture", "image")),
    (r"T1-weighted", ("T1w", "T1-weighted")),
    (r"grey matter", ("gray matter", "grey matter")),
    (r"white matter", ("white matter", "cerebral white matter")),
    (r"shows", ("depicts", "displays", "shows")),
    (r"showing", ("depicting", "displaying", "showing")),
    (r"at(?= [xyz] = )", ("located at", "taken at", "at")),  # only before a coordinate: "look at" stays
)
# An indefinite article before a substituted word is part of the match, so it can follow the new word.
_PHRASE = re.compile(r"(?:\b(?P<art>[Aa]n?) )?\b(?:"
                     + "|".join(f"(?P<s{i}>{pattern})" for i, (pattern, _) in enumerate(_SYNONYMS)) + r")\b")
_CLAUSE_SPLIT = re.compile(r"\s*;\s*")
_TOKEN = re.compile(r"[\w%+=-]+")

# Framings, chosen by what the caption's first noun phrase names. {det}: the article of the phrase.
_IMAGE_FRAMES = ("This is {det} {np}", "{Det} {np}", "An example of {det} {np}")  # "a CT scan of ..."
_FINDING_FRAMES = ("Image showing {np}", "Image depicting {np}", "{Np}, as seen on the image")  # "mild cardiomegaly"
# Head nouns that name an image (or the exam that made it), so "This is a <phrase>" is true of the picture.
_IMAGE_NOUNS = frozenset("""image scan slice section cut picture photo photograph radiograph x-ray xray film view
    projection frame tile patch crop mri ct angiogram mammogram sonogram ultrasound echocardiogram colonoscopy
    endoscopy gastroscopy study exam examination snapshot rendering micrograph slide""".split())

# Why a caption is not a noun phrase the framings can wrap: it then gets no rule paraphrase at all.
_NEGATIONS = frozenset("no not without none neither nor never nothing".split())
_NON_NP_STARTS = frozenset("""this these that those it its there here they we i you he she please what which where
    how why who when while if and or but in on at with from of for to by after before during within under over
    above below near along generate create make produce render draw synthesize synthesise show depict display
    give find identify segment locate detect describe visualize visualise illustrate simulate add remove place
    put take use let is are was were be has have had do does did can could will would shall should may might
    must""".split())
_FINITE = frozenset("""is are was were am has have had does do did can could will would shall should may might must
    shows demonstrates reveals depicts displays contains suggests indicates represents remains appears seems
    measures extends involves persists exhibits includes""".split())
# Participles that make a report sentence of a noun phrase: "Small effusion noted."
_PREDICATES = frozenset("noted seen identified visualized visualised demonstrated observed present unchanged "
                        "stable resolved improved worsened again".split())
# Words that end a noun phrase's head: "<head> of/at/in/with/showing ...".
_POSTMODIFIERS = frozenset("of at in on with from for to by near along within without under over above below "
                           "showing depicting containing demonstrating located taken and".split())


def decline_reason(caption: str) -> str:
    """"" if the rule backend can rephrase ``caption`` grammatically, else why not.

    Only noun phrases are wrapped in a framing ("Chest X-ray of ..." -> "This is a chest X-ray of ...");
    sentences, prompts and negations are left alone rather than garbled ("This is a no definite ...").
    """
    stem = caption.strip().removesuffix(".")
    if "?" in stem:
        return "a question"
    if re.search(r"[a-z)]\.\s+\S", stem):
        return "several sentences"
    for clause in _CLAUSE_SPLIT.split(stem):
        words = [w.lower() for w in _TOKEN.findall(clause)]
        if not words:
            return "an empty clause"
        first = words[1] if words[0] in ("a", "an", "the") and len(words) > 1 else words[0]
        if first in _NEGATIONS:
            return "a negation"
        if first in _NON_NP_STARTS or first.endswith("ing"):
            return "a sentence or prompt, not a noun phrase"
        if _FINITE.intersection(words) or words[-1] in _PREDICATES:
            return "a sentence with a verb"
    return ""


def _indefinite(word: str) -> str:
    """"a" or "an" for the sound ``word`` starts with."""
    if re.match(r"[A-Z](?:[A-Z0-9-]|$)", word):  # read letter by letter: an MRI, an X-ray, a CT, a T1w
        return "an" if word[0] in "AEFHILMNORSX" else "a"
    if re.match(r"8|1[18](?!\d)", word):  # eight..., eleven, eighteen
        return "an"
    lower = word.lower()
    if re.match(r"uni|use|usu|ure|uri|uro|ute|eu|one\b|once", lower):  # a unilateral, a ureteric, a one-...
        return "a"
    if re.match(r"hour|honest|heir", lower):
        return "an"
    return "an" if lower[:1] in ("a", "e", "i", "o", "u") else "a"


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless it starts an acronym or code (MRI, CT, X-ray, T1w)."""
    if len(text) > 1 and (text[1].isupper() or text[1].isdigit() or text[1] == "-"):
        return text
    return text[:1].lower() + text[1:]


def _split_article(clause: str) -> tuple[str, str]:
    """("a" | "an" | "the" | "", the rest) of a noun phrase."""
    first, _, rest = clause.partition(" ")
    return (first.lower(), rest) if first.lower() in ("a", "an", "the") and rest else ("", clause)


def names_an_image(clause: str) -> bool:
    """Whether a noun phrase's head noun (the word before its first post-modifier or comma) names an
    image: "axial CT scan showing ..." does, "mild cardiomegaly with ..." does not."""
    words = _split_article(clause)[1].lower().split()
    head = words[-1]
    for i, word in enumerate(words):
        if i and (word in _POSTMODIFIERS or word.endswith("ing")):
            head = words[i - 1]
            break
        if word.endswith(","):
            head = word
            break
    return head.strip(",.") in _IMAGE_NOUNS


def _frame(clause: str, image: bool, rng: random.Random) -> str:
    """Wrap a noun-phrase clause in a framing that fits what it names (an image, or a finding)."""
    article, bare = _split_article(clause)
    if image:
        det = "the" if article == "the" else _indefinite(bare)
        np = _lower_first(bare)
        return rng.choice(_IMAGE_FRAMES).format(det=det, Det=det.capitalize(), np=np)
    np = f"{article} {bare}" if article else bare
    return rng.choice(_FINDING_FRAMES).format(np=_lower_first(np), Np=np[:1].upper() + np[1:])


class Paraphraser(Protocol):
    name: str  # written to the caption_source column

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]: ...


class RuleParaphraser:
    """Deterministic offline paraphraser: synonyms, clause order and framing of noun-phrase captions.

    Captions it cannot rephrase grammatically (see ``decline_reason``) get no paraphrase; they are
    listed in ``declined`` with the reason.
    """

    name = "rule"

    def __init__(self, seed: int, vocabulary: frozenset[str] = frozenset(), attempts_per_output: int = 12):
        self.seed = seed
        self.vocabulary = vocabulary  # finding/anatomy terms a variant must keep, as for LLM replies
        self.attempts = attempts_per_output
        self.declined: dict[str, str] = {}  # caption -> why it got no paraphrase

    @staticmethod
    def _substitute(m: re.Match, rng: random.Random) -> str:
        choice = rng.choice(_SYNONYMS[int(m.lastgroup[1:])][1])
        article = m.group("art")
        if not article:
            return choice
        new = _indefinite(choice)  # "an MRI" -> "a magnetic resonance image"
        return f"{new.capitalize() if article[0].isupper() else new} {choice}"

    def _variant(self, caption: str, rng: random.Random) -> str:
        # One pass over all phrases, so a substituted phrase is never rewritten again.
        text = _PHRASE.sub(lambda m: self._substitute(m, rng), caption.strip())
        stop = "." if text.endswith(".") else ""
        clauses = [c for c in _CLAUSE_SPLIT.split(text.removesuffix(".")) if c]
        if len(clauses) > 1 and rng.random() < 0.5:
            clauses = [_lower_first(c) for c in clauses[1:] + clauses[:1]]
        else:  # judged on the original: synonyms may turn "showing" into a word the head search misses
            clauses[0] = _frame(clauses[0], names_an_image(_CLAUSE_SPLIT.split(caption.strip())[0]), rng)
        text = "; ".join(clauses)
        return text[0].upper() + text[1:] + stop

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]:
        out = {}
        for caption in captions:
            why = decline_reason(caption)
            if why:
                self.declined[caption] = why
                out[caption] = []
                continue
            rng = random.Random(derive_seed(self.seed, caption))
            found: list[str] = []
            for _ in range(self.attempts * n):
                v = self._variant(caption, rng)
                if _same(v, caption) or any(_same(v, f) for f in found):
                    continue
                if keeps_salient(caption, v, self.vocabulary):
                    found.append(v)
                if len(found) == n:
                    break
            out[caption] = found
        return out


def _same(a: str, b: str) -> bool:
    """Equal but for case and spacing: "An axial CT" is no paraphrase of "an axial CT"."""
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


class NoParaphraser:
    name = "none"

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]:
        return {c: [] for c in captions}


def make_offline_paraphraser(backend: str, seed: int, vocabulary: frozenset[str] = frozenset()) -> Paraphraser:
    """The backends that need no network; the LLM one lives in synthmed.text.llm."""
    if backend == "rule":
        return RuleParaphraser(seed, vocabulary)
    if backend == "none":
        return NoParaphraser()
    raise PipelineError(f"params.yaml: paraphrase.backend={backend!r} is not an offline backend; use rule or none")


def augment_pairs(
    pairs: pd.DataFrame, paraphrases: dict[str, list[str]], source: str, strategy: str,
    p_replace: float, rng: random.Random,
) -> pd.DataFrame:
    """Apply a strategy to (image, caption) rows; every row gets a caption_source.

    add: originals plus paraphrases; replace_all: paraphrases only (the original
    is kept where none exists, so no image loses its caption); replace_some:
    each original is replaced by its paraphrases with probability ``p_replace``, drawn from ``rng`` (one
    generator across the chunks of a table: the same draws as the whole table at once).
    """
    take, texts, sources = [], [], []  # positions of the rows repeated, their captions: no dict per pair
    for i, text in enumerate(pairs["text"].tolist()):
        alts = paraphrases.get(text, [])
        if strategy == "add":
            keep_original, use_alts = True, True
        elif strategy == "replace_all":
            keep_original, use_alts = not alts, True
        else:  # replace_some
            replaced = bool(alts) and rng.random() < p_replace
            keep_original, use_alts = not replaced, replaced
        picked = ([text] if keep_original else []) + (alts if use_alts else [])
        take += [i] * len(picked)
        texts += picked
        sources += ["original"] * keep_original + [source] * (len(picked) - keep_original)
    return pairs.iloc[take].assign(text=texts, caption_source=sources).reset_index(drop=True)
