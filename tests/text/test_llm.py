"""The OpenAI backend against a local OpenAI-compatible server: the real openai client, real HTTP."""

from __future__ import annotations

import re
import time

import pytest

import synthmed.text.llm as llm
from synthmed.core.errors import PipelineError
from synthmed.text.llm import (OpenAIParams, OpenAIParaphraser, ResponseCache, Validation, endpoint, is_local,
                               parse_reply)
from synthmed.text.salient import load_vocabulary
from tests.conftest import REPO_ROOT
from tests.text.fake_openai import FakeOpenAI, completion, paraphrases

KEY = "sk-test-SECRET-0123456789abcdef"
ENV = "SYNTHMED_TEST_OPENAI_KEY"
CAPTIONS = ["one polyp in the upper-left of the image", "Chest X-ray shows right lower lobe consolidation"]


def caption_of(body: dict) -> str:
    return re.search(r"Caption: (.*)", body["messages"][1]["content"]).group(1).strip()


def good(body: dict, n: int):
    c = caption_of(body)
    return paraphrases(f"Image: {c}", f"{c}, as seen on the image")


def make(tmp_path, url, monkeypatch, **overrides) -> OpenAIParaphraser:
    monkeypatch.setenv(ENV, KEY)
    params = dict(model="test-model", base_url=url, temperature=0.7, max_concurrency=2, timeout_s=5.0,
                  max_requests=50, max_retries=3, backoff_s=0.01, max_attempts=2, api_key_env=ENV, fallback="none")
    params.update(overrides)
    rules = Validation(load_vocabulary(REPO_ROOT / "prompts/salient_terms.txt"), 0.5, 2.0)
    return OpenAIParaphraser(OpenAIParams(**params), REPO_ROOT / "prompts/paraphrase_v1.yaml", rules,
                             ResponseCache(tmp_path / "cache"), seed=3)


@pytest.fixture
def sleeps(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(llm, "_sleep", waits.append)
    return waits


def test_happy_path_sends_unique_captions_with_key_header(tmp_path, monkeypatch):
    with FakeOpenAI(good) as server:
        para = make(tmp_path, server.url, monkeypatch)
        out = para.paraphrase(CAPTIONS, n=2)
    assert out[CAPTIONS[0]] == [f"Image: {CAPTIONS[0]}", f"{CAPTIONS[0]}, as seen on the image"]
    assert len(server.requests) == 2 and para.stats.requests == 2 and para.stats.cache_hits == 0
    assert para.stats.prompt_tokens + para.stats.completion_tokens == 100
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "test-model"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert {caption_of(r["body"]) for r in server.requests} == set(CAPTIONS)


def test_rate_limit_honours_retry_after(tmp_path, monkeypatch, sleeps):
    def handler(body, n):
        if n == 1:
            return 429, {"Retry-After": "1.5"}, '{"error": {"message": "slow down", "type": "rate_limit"}}'
        return good(body, n)

    with FakeOpenAI(handler) as server:
        out = make(tmp_path, server.url, monkeypatch).paraphrase(CAPTIONS[:1], n=2)
    assert len(out[CAPTIONS[0]]) == 2 and len(server.requests) == 2
    assert sleeps == [1.5]


def test_server_errors_back_off_exponentially_then_succeed(tmp_path, monkeypatch, sleeps):
    def handler(body, n):
        return (500, {}, '{"error": {"message": "boom"}}') if n <= 3 else good(body, n)

    with FakeOpenAI(handler) as server:
        para = make(tmp_path, server.url, monkeypatch)
        out = para.paraphrase(CAPTIONS[:1], n=2)
    assert len(out[CAPTIONS[0]]) == 2 and para.stats.requests == 4
    assert len(sleeps) == 3 and all(0.01 * 2**i <= w <= 0.01 * 2**i + 0.01 for i, w in enumerate(sleeps))


def test_persistent_failure_stops_with_a_clear_message(tmp_path, monkeypatch, sleeps):
    with FakeOpenAI(lambda body, n: (503, {}, "{}")) as server:
        with pytest.raises(PipelineError, match="no answer after 4 tries"):
            make(tmp_path, server.url, monkeypatch).paraphrase(CAPTIONS[:1], n=2)


def test_malformed_replies_are_rejected_and_retried(tmp_path, monkeypatch, sleeps):
    def handler(body, n):
        if n == 1:
            return 200, {}, "this is not json"  # broken HTTP body: a transient failure
        if n == 2:
            return completion("Sure! Here are some paraphrases: first, second")  # not the JSON asked for
        return good(body, n)

    with FakeOpenAI(handler) as server:
        para = make(tmp_path, server.url, monkeypatch)
        out = para.paraphrase(CAPTIONS[:1], n=2)
    assert len(out[CAPTIONS[0]]) == 2 and len(server.requests) == 3
    assert para.stats.rejected["malformed"] == 1


def test_timeout_is_retried(tmp_path, monkeypatch, sleeps):
    def handler(body, n):
        if n == 1:
            time.sleep(1.0)
        return good(body, n)

    with FakeOpenAI(handler) as server:
        para = make(tmp_path, server.url, monkeypatch, timeout_s=0.3)
        out = para.paraphrase(CAPTIONS[:1], n=2)
    assert len(out[CAPTIONS[0]]) == 2 and para.stats.requests == 2 and len(sleeps) == 1


def test_paraphrases_that_drop_salient_content_are_rejected(tmp_path, monkeypatch):
    def handler(body, n):
        return paraphrases("a growth in the upper-left of the image",  # drops the finding word 'polyp'
                           "one polyp in the lower-left of the image",  # wrong position
                           "two polyps in the upper-left of the image",  # wrong count
                           "one polyp in the upper-left of the image",  # identical
                           "polyp upper-left 1",  # too short
                           "I'm sorry, I can't help with that",
                           "In the image's upper-left there is one polyp")

    with FakeOpenAI(handler) as server:
        para = make(tmp_path, server.url, monkeypatch, max_attempts=1)
        out = para.paraphrase(CAPTIONS[:1], n=2)
    assert out[CAPTIONS[0]] == ["In the image's upper-left there is one polyp"]
    assert dict(para.stats.rejected) == {"salient": 3, "identical": 1, "length": 1, "refusal": 1}


def test_a_reply_that_drops_one_of_two_occurrences_is_rejected(tmp_path, monkeypatch):
    caption = "Polyp on the left wall and ulcer near the left flexure"

    def handler(body, n):
        return paraphrases("On the left wall a polyp, and an ulcer near the flexure",  # one 'left' lost
                           "A polyp on the left wall and an ulcer by the left flexure",
                           "A polyp on the left wall, left of centre, and an ulcer by the left flexure")

    with FakeOpenAI(handler) as server:
        para = make(tmp_path, server.url, monkeypatch, max_attempts=1)
        out = para.paraphrase([caption], n=3)
    # extra occurrences are allowed: repeating a side adds no new finding
    assert out[caption] == ["A polyp on the left wall and an ulcer by the left flexure",
                            "A polyp on the left wall, left of centre, and an ulcer by the left flexure"]
    assert dict(para.stats.rejected) == {"salient": 1}

def test_second_run_is_served_from_cache(tmp_path, monkeypatch):
    with FakeOpenAI(good) as server:
        first = make(tmp_path, server.url, monkeypatch).paraphrase(CAPTIONS, n=2)
        again = make(tmp_path, server.url, monkeypatch)
        second = again.paraphrase(CAPTIONS, n=2)
    assert second == first and len(server.requests) == 2
    assert again.stats.requests == 0 and again.stats.cache_hits == 2
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 and not any(KEY in f.read_text() for f in files)


def test_auth_failure_names_the_variable_not_the_key(tmp_path, monkeypatch):
    with FakeOpenAI(lambda b, n: (401, {}, '{"error": {"message": "bad key ' + KEY + '"}}')) as server:
        with pytest.raises(PipelineError) as err:
            make(tmp_path, server.url, monkeypatch).paraphrase(CAPTIONS[:1], n=2)
    assert ENV in str(err.value) and KEY not in str(err.value)


def test_a_budget_the_job_cannot_meet_stops_before_the_first_request(tmp_path, monkeypatch):
    with FakeOpenAI(good) as server:
        with pytest.raises(PipelineError, match=r"this run needs at least 2 requests \(2 of 2 captions have no cached "
                                                r"reply.*\) but the budget is 1: raise paraphrase.openai.max_requests"):
            make(tmp_path, server.url, monkeypatch, max_requests=1).paraphrase(CAPTIONS, n=2)
        assert server.requests == []
        make(tmp_path, server.url, monkeypatch, max_requests=1).paraphrase(CAPTIONS[:1], n=2)  # one caption: enough
        make(tmp_path, server.url, monkeypatch, max_requests=1).paraphrase(CAPTIONS, n=2)  # the first is cached now
    assert len(server.requests) == 2


def test_budget_is_a_hard_stop(tmp_path, monkeypatch):
    def rejected(body, n):  # never a usable reply: every caption spends all its attempts
        return paraphrases("", "")

    with FakeOpenAI(rejected) as server:
        with pytest.raises(PipelineError, match=r"budget exhausted \(paraphrase.openai.max_requests=2\)"):
            make(tmp_path, server.url, monkeypatch, max_requests=2, max_concurrency=1).paraphrase(CAPTIONS, n=2)
    assert len(server.requests) == 2


def test_missing_key_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    rules = Validation(frozenset(), 0.5, 2.0)
    with pytest.raises(PipelineError, match=f"environment variable {ENV} is not set"):
        OpenAIParaphraser(OpenAIParams("m", "http://127.0.0.1:9/v1", 0.5, 1, 1.0, 1, 0, 0.01, 1, ENV, "none"),
                          REPO_ROOT / "prompts/paraphrase_v1.yaml", rules, ResponseCache(tmp_path), 0)


def test_parse_reply_variants():
    assert parse_reply('```json\n{"paraphrases": ["a", "b"]}\n```') == (["a", "b"], "")
    assert parse_reply("") == ([], "empty")
    assert parse_reply("I'm sorry, but I cannot do that.") == ([], "refusal")
    assert parse_reply('{"paraphrase": "a"}') == ([], "malformed")


def test_the_cache_key_holds_the_endpoint(tmp_path, monkeypatch):
    def key(url):
        para = make(tmp_path, url, monkeypatch)
        para.n = 2
        return para._key(CAPTIONS[0], 0)

    assert key("http://127.0.0.1:8000/v1") != key("http://127.0.0.1:8001/v1")
    assert key("http://LOCALHOST:8000/v1/") == key("http://localhost:8000/v1")  # normalised
    # two servers answering to one model name never share a reply
    with FakeOpenAI(good) as a, FakeOpenAI(good) as b:
        make(tmp_path, a.url, monkeypatch).paraphrase(CAPTIONS, n=2)
        make(tmp_path, b.url, monkeypatch).paraphrase(CAPTIONS, n=2)
        make(tmp_path, a.url, monkeypatch).paraphrase(CAPTIONS, n=2)
    assert len(a.requests) == 2 and len(b.requests) == 2


@pytest.mark.parametrize(("url", "local"), [
    ("http://localhost:11434/v1", True), ("http://127.0.0.1:8000/v1", True), ("http://127.8.9.10/v1", True),
    ("http://[::1]:8000/v1", True), ("http://[::ffff:127.0.0.1]:8000/v1", True),
    ("", False),  # api.openai.com
    ("https://api.openai.com/v1", False), ("http://10.0.0.5:8000/v1", False), ("http://192.168.1.20/v1", False),
    ("http://0.0.0.0:8000/v1", False), ("http://gpu-box.internal:8000/v1", False),
    ("http://localhost.example.org/v1", False),
])
def test_what_counts_as_this_machine(url, local):
    assert is_local(url) is local


def test_listed_hosts_and_networks_count_as_local():
    listed = ["10.0.0.0/8", "GPU-Box.internal", "fd00::/8"]
    assert is_local("http://10.0.0.5:8000/v1", listed) and is_local("http://gpu-box.internal/v1", listed)
    assert is_local("http://[fd00::5]/v1", listed) and not is_local("http://192.168.1.20/v1", listed)
    with pytest.raises(PipelineError, match=r"local_hosts\[0\] = 'http://10.0.0.5' is neither a host name"):
        is_local("http://127.0.0.1/v1", ["http://10.0.0.5"])


def test_endpoint_normalisation_and_bad_urls():
    assert endpoint("") == "https://api.openai.com/v1"
    assert endpoint("https://user:secret@API.example.org:443/v1/") == "https://api.example.org/v1"
    assert endpoint("http://localhost:8000/v1") == "http://localhost:8000/v1"
    for bad in ("localhost:8000/v1", "unix:///run/llm.sock", "http://host:99999/v1"):
        with pytest.raises(PipelineError, match="is not an http\\(s\\) URL"):
            endpoint(bad)


def test_a_remote_endpoint_without_the_opt_in_is_refused_before_any_request(tmp_path, monkeypatch):
    for url in ("", "https://api.openai.com/v1", "http://10.0.0.5:8000/v1"):
        with pytest.raises(PipelineError, match="not this machine: captions would leave it; set "
                                                "paraphrase.openai.allow_remote: true"):
            make(tmp_path, url, monkeypatch)
    make(tmp_path, "http://10.0.0.5:8000/v1", monkeypatch, local_hosts=["10.0.0.0/8"])  # listed: no opt-in
    make(tmp_path, "", monkeypatch, allow_remote=True)


def test_an_unscrubbed_caption_never_goes_to_a_remote_endpoint(tmp_path, monkeypatch):
    """The client's own check, for callers that forget to scrub: a remote host (reached here through the
    local server as its proxy) gets no request while a caption still holds an identifier."""
    with FakeOpenAI(good) as server:
        for var in ("http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", server.url.removesuffix("/v1"))
        para = make(tmp_path, "http://llm.example.org/v1", monkeypatch, allow_remote=True)
        with pytest.raises(PipelineError, match=r"1 of 2 captions still hold dates, identifiers or de-identification "
                                                r"markers and http://llm.example.org/v1 is not this machine"):
            para.paraphrase([CAPTIONS[0], "Chest X-ray, MRN 1234567"], n=2)
        assert server.requests == []
        para.paraphrase(CAPTIONS, n=2)
    assert {r["headers"]["host"] for r in server.requests} == {"llm.example.org"} and len(server.requests) == 2
