import pandas as pd
import pytest

from synthmed.errors import PipelineError
from synthmed.text.paraphrase import RuleParaphraser, augment_pairs, make_offline_paraphraser
from synthmed.text.salient import keeps_salient, missing_salient, salient_terms

CAPTIONS = [
    "Lateral left sagittal T1-weighted brain MRI slice at x = -66 mm; 71% grey matter, 10% white matter",
    "Superior axial T1-weighted brain MRI slice at z = +40 mm; 52% grey matter, 38% white matter",
    "Generate an image containing a polyp in the upper-left with a green box",
    "Colonoscopy image showing 2 polyps, one in the lower-right; black box in the lower-left",
    "Chest X-ray image shows right lower lobe consolidation",
]


def test_rule_paraphraser_is_deterministic_distinct_and_keeps_salient_terms():
    para = RuleParaphraser(seed=7).paraphrase(CAPTIONS, n=3)
    assert para == RuleParaphraser(seed=7).paraphrase(CAPTIONS, n=3)
    assert sum(len(v) for v in para.values()) >= 2 * len(CAPTIONS)
    for original, alts in para.items():
        assert len(set(alts)) == len(alts) and original not in alts
        for alt in alts:
            assert salient_terms(original) <= salient_terms(alt), (original, alt)


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
    add = augment_pairs(PAIRS, PARA, "rule", "add", 0.5, seed=0)
    assert add["text"].tolist() == ["cap a", "a1", "a2", "cap b"]
    assert add["caption_source"].tolist() == ["original", "rule", "rule", "original"]
    rep = augment_pairs(PAIRS, PARA, "rule", "replace_all", 0.5, seed=0)
    assert rep["text"].tolist() == ["a1", "a2", "cap b"]  # b keeps its original: it has no paraphrase
    never = augment_pairs(PAIRS, PARA, "rule", "replace_some", 0.0, seed=0)
    assert never["text"].tolist() == ["cap a", "cap b"]


def test_backend_choice():
    assert make_offline_paraphraser("none", 0).paraphrase(["x"], 2) == {"x": []}
    with pytest.raises(PipelineError, match="not an offline backend"):
        make_offline_paraphraser("openai", 0)
