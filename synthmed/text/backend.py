"""Which paraphrasing backend runs, from the paraphrase stage's params: the offline rules, none, or an
OpenAI-compatible LLM (its key checked first, with an explicit fallback; an endpoint off this machine only
with the opt-in, and only scrubbed captions); and what the stage reports of it."""

from __future__ import annotations

import os
from collections import Counter

from synthmed.core import store
from synthmed.core.errors import PipelineError
from synthmed.text.llm import (OpenAIParams, OpenAIParaphraser, ResponseCache, Validation, check_endpoint, endpoint,
                               is_local)
from synthmed.text.paraphrase import Paraphraser, make_offline_paraphraser
from synthmed.text.salient import load_vocabulary


def make_paraphraser(p, seed: int) -> Paraphraser:
    """The backend ``p`` (paraphrase's params) asks for, seeded; replies of an LLM cached in the local store."""
    backend = p.backend
    if backend == "openai" and not os.environ.get(p.openai.api_key_env):
        backend = _fallback_without_key(p.openai)
    vocabulary = load_vocabulary(p.vocabulary)
    if backend != "openai":
        return make_offline_paraphraser(backend, seed, vocabulary)
    check_endpoint(p.openai)  # before anything else: no opt-in, no request
    if not p.scrub and not is_local(p.openai.base_url, p.openai.local_hosts):
        raise PipelineError(f"paraphrase.scrub is false but {endpoint(p.openai.base_url)} is not this machine: captions "
                            "leave it scrubbed or not at all; set paraphrase.scrub: true")
    rules = Validation(vocabulary, p.min_length_ratio, p.max_length_ratio)
    # paid-for replies live in the local store, out of reach of DVC checkouts: never re-bought
    return OpenAIParaphraser(p.openai, p.prompt_template, rules, ResponseCache(store.cache_dir("llm")), seed)


def _fallback_without_key(o: OpenAIParams) -> str:
    """The backend to run when the key is missing; only an explicit opt-in turns openai into rule,
    so that an experiment labelled backend=openai never holds rule output unawares."""
    env = o.api_key_env
    if o.fallback == "none":
        raise PipelineError(f"paraphrase.backend=openai but ${env} is not set; export {env}=<your API key>, "
                            "or set paraphrase.openai.fallback: rule to run the offline rule backend instead")
    print(f"paraphrase: ${env} is not set; paraphrase.openai.fallback=rule, so the offline rule backend runs "
          "(rows labelled rule, backend_used=rule)")
    return o.fallback


def backend_used(paraphraser: Paraphraser) -> str:
    """The backend that actually ran, in params.yaml's names (rule | openai | none)."""
    return "openai" if paraphraser.name == "llm" else paraphraser.name


def report_declined(declined: dict[str, str], total: int) -> None:
    """One line on the captions the rule backend left alone rather than garble."""
    if declined:
        caption, why = next(iter(declined.items()))
        print(f"paraphrase: the rule backend declined {len(declined)} of {total} captions it cannot rephrase "
              f"grammatically (sentences, prompts, negations; e.g. {caption!r}: {why}); "
              "they keep only their original; paraphrase.backend: openai (any OpenAI-compatible endpoint, a local "
              "one too) rephrases them")


def report_scrubbed(changed: int, total: int, counts: Counter) -> None:
    """One line on what the scrubber took out of the captions before they were paraphrased."""
    if changed:
        what = ", ".join(f"{n} {category}" for category, n in sorted(counts.items()))
        print(f"paraphrase: scrubbed {changed} of {total} captions before paraphrasing ({what}); the paraphrases "
              "come from the scrubbed text, the original rows of pairs.csv keep ingest's captions (scrub those at "
              "ingest so that no stage trains on them)")
