import random
import re

import pandas as pd
import pytest

from synthmed.core.errors import PipelineError
from synthmed.text.paraphrase import RuleParaphraser, augment_pairs, make_offline_paraphraser
from synthmed.text.salient import keeps_salient, load_vocabulary, missing_salient, salient_terms
from tests.conftest import REPO_ROOT

CAPTIONS = [
    "Lateral left sagittal T1-weighted brain MRI slice at x = -66 mm; 71% grey matter, 10% white matter",
    "Superior axial T1-weighted brain MRI slice at z = +40 mm; 52% grey matter, 38% white matter",
    "Colonoscopy image showing 2 polyps, one in the lower-right; black box in the lower-left",
    "an axial CT scan showing a 2 cm nodule in the right upper lobe",
    "Mild cardiomegaly with bibasilar atelectasis.",
]
VOCABULARY = load_vocabulary(REPO_ROOT / "prompts/salient_terms.txt")


def test_rule_paraphraser_is_deterministic_distinct_and_keeps_salient_terms():
    para = RuleParaphraser(seed=7, vocabulary=VOCABULARY).paraphrase(CAPTIONS, n=3)
    assert para == RuleParaphraser(seed=7, vocabulary=VOCABULARY).paraphrase(CAPTIONS, n=3)
    assert sum(len(v) for v in para.values()) >= 2 * len(CAPTIONS)
    for original, alts in para.items():
        assert len(set(alts)) == len(alts) and original not in alts
        for alt in alts:
            assert salient_terms(original, VOCABULARY) <= salient_terms(alt, VOCABULARY), (original, alt)


# Caption styles beyond the demo's: radiology report sentences, generation prompts, noun phrases with
# and without articles. True = the rule backend cannot rephrase it safely and must decline.
REAL_STYLE = {
    "No definite residual pneumothorax.": True,
    "Mild cardiomegaly with bibasilar atelectasis.": False,
    "Small left pleural effusion noted.": True,
    "There is a small left pleural effusion.": True,
    "The heart is enlarged.": True,
    "Is there a polyp?": True,
    "Generate a retinal fundus photograph tile from the upper-left region.": True,
    "Generate an image containing a polyp in the upper-left with a green box": True,
    "Showing a polyp in the upper-left": True,
    "Chest X-ray image shows right lower lobe consolidation": True,
    "Heart size normal. Lungs clear.": True,  # several sentences
    "an axial CT scan showing a 2 cm nodule in the right upper lobe": False,
    "Chest X-ray of a 45-year-old male": False,
    "An MRI of the left knee": False,
    "The chest X-ray of an 8-year-old girl": False,
    "A polyp in the upper-left with a green box": False,
    "Two polyps, one in the lower-right; black box in the lower-left": False,
    "Retinal fundus photograph tile from the upper-left region": False,
    # the demo's own style (synthmed/data/demo.py): band, side, plane, position, tissue shares
    "Lateral left sagittal T1-weighted brain MRI slice at x = -66 mm; 71% grey matter, 10% white matter": False,
    "Intermediate right sagittal T1-weighted brain MRI slice at x = +30 mm; 55% grey matter, 35% white matter": False,
    "Anterior coronal T1-weighted brain MRI slice at y = +52 mm; 60% grey matter, 24% white matter": False,
    "Central coronal T1-weighted brain MRI slice at y = +0 mm; 45% grey matter, 41% white matter": False,
    "Inferior axial T1-weighted brain MRI slice at z = -30 mm; 48% grey matter, 20% white matter": False,
    "Middle axial T1-weighted brain MRI slice at z = +10 mm; 50% grey matter, 38% white matter": False,
}
UNGRAMMATICAL = re.compile(
    r"\b(?:a|an|the) (?:a|an|the)\b"  # doubled articles: "a an", "a the"
    r"|\b(?:is|are) (?:a|an) no\b|\ban? (?:no|not|generate|show|showing|there)\b"  # "is a no", "a generate"
    r"|\ba (?:axial|intermediate|anterior|inferior|upper|MR|MRI|X-ray|8-year-old)\b"  # a/an agreement
    r"|\ban (?:lateral|chest|CT|central|medial|magnetic|retinal|45-year-old|T1)\b"
    r"|\.[;,]|,\.|\.\.$",  # punctuation left behind by re-framing
    re.IGNORECASE)


def test_rule_paraphrases_are_grammatical_or_declined_on_real_caption_styles():
    rule = RuleParaphraser(seed=3, vocabulary=VOCABULARY)
    para = rule.paraphrase(list(REAL_STYLE), n=2)
    assert set(rule.declined) == {c for c, declines in REAL_STYLE.items() if declines}
    for caption, declines in REAL_STYLE.items():
        alts = para[caption]
        assert alts == [] if declines else len(alts) == 2, (caption, alts)
        for alt in alts:
            assert not UNGRAMMATICAL.search(alt), (caption, alt)
            assert keeps_salient(caption, alt, VOCABULARY), (caption, alt)
            assert not alt[0].islower() and alt.endswith(".") == caption.endswith("."), (caption, alt)


def test_rule_framing_picks_the_article_of_the_noun_phrase():
    para = RuleParaphraser(seed=0).paraphrase(["an axial CT scan of the chest", "Chest X-ray of a 45-year-old male",
                                               "An MRI of the left knee"], n=6)
    texts = [t for alts in para.values() for t in alts]
    assert "This is an axial CT scan of the chest" in texts and "This is a chest X-ray of a 45-year-old male" in texts
    assert any(t.startswith(("This is an MR", "This is a magnetic resonance")) for t in texts), texts


def test_salient_terms_catch_dropped_content():
    assert {"-66", "71", "10", "left", "grey", "white"} <= salient_terms(CAPTIONS[0])
    assert not keeps_salient("a polyp in the upper-left", "a polyp in the upper-right")
    assert not keeps_salient("2 polyps", "polyps")
    assert keeps_salient("grey matter", "gray matter")


def test_salient_terms_are_counted_not_just_present():
    vocab = frozenset({"polyp", "polyps"})
    assert not keeps_salient("polyp in the left colon, polyp in the left rectum",
                             "polyp in the left colon, polyp in the rectum", vocab)
    assert not keeps_salient("a polyp and another polyp", "a polyp", vocab)
    assert not keeps_salient("2 polyps of 2 mm", "2 polyps of several mm", vocab)
    assert keeps_salient("polyp in the left colon, polyp in the left rectum",
                         "in the left colon a polyp; in the left rectum a polyp", vocab)
    assert keeps_salient("left colon", "left colon, left side", vocab)  # extra occurrences are fine
    assert missing_salient("left and left", "left") == {"left"}
    assert keeps_salient("Polyp in the colon", "In the colon, a polyp.", vocab)  # a full stop ends no term

PAIRS = pd.DataFrame({"file_name": ["a.png", "b.png"], "text": ["cap a", "cap b"], "split": ["train"] * 2})
PARA = {"cap a": ["a1", "a2"], "cap b": []}


def test_strategies_add_and_replace():
    add = augment_pairs(PAIRS, PARA, "rule", "add", 0.5, random.Random(0))
    assert add["text"].tolist() == ["cap a", "a1", "a2", "cap b"]
    assert add["caption_source"].tolist() == ["original", "rule", "rule", "original"]
    rep = augment_pairs(PAIRS, PARA, "rule", "replace_all", 0.5, random.Random(0))
    assert rep["text"].tolist() == ["a1", "a2", "cap b"]  # b keeps its original: it has no paraphrase
    never = augment_pairs(PAIRS, PARA, "rule", "replace_some", 0.0, random.Random(0))
    assert never["text"].tolist() == ["cap a", "cap b"]


def test_backend_choice():
    assert make_offline_paraphraser("none", 0).paraphrase(["x"], 2) == {"x": []}
    with pytest.raises(PipelineError, match="not an offline backend"):
        make_offline_paraphraser("openai", 0)
