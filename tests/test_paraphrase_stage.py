"""The real `paraphrase` stage with the openai backend against a local server, and its fallback; what
leaves the machine: scrubbed captions only, and to an endpoint off it only with the opt-in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import StageRun, run_stage_here
from tests.text.fake_openai import FakeOpenAI
from tests.text.test_llm import ENV, KEY, caption_of, good

CAPTIONS = ["one polyp in the upper-left", "two polyps in the lower-right", "no polyp; green box in the lower-left"]


def setup(workdir: Path, url: str, captions: list[str] = CAPTIONS, scrub: bool = True, **openai) -> None:
    if not (workdir / "prompts").exists():
        shutil.copytree(REPO_ROOT / "prompts", workdir / "prompts")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["paraphrase"].update(backend="openai", scrub=scrub)
    params["paraphrase"]["openai"].update(base_url=url, api_key_env=ENV, backoff_s=0.01, **openai)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    ds = workdir / "data/ingest/dataset"
    ds.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,text,label,group,split"] + [f'{i}.png,"{c}",x,{i},train' for i, c in enumerate(captions)]
    (ds / "metadata.csv").write_text("\n".join(rows + ['9.png,"held out",x,9,test']) + "\n")


def run(workdir: Path, with_key: bool, **env: str | None) -> StageRun:
    return run_stage_here(workdir, "paraphrase", env={ENV: KEY if with_key else None, **env})


def test_llm_stage_caches_reproduces_and_never_writes_the_key(tmp_path):
    with FakeOpenAI(good) as server:
        setup(tmp_path, server.url)
        first = run(tmp_path, with_key=True)
        assert first.returncode == 0, first.stderr
        pairs_first = (tmp_path / "data/paraphrase/pairs.csv").read_bytes()
        metrics = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
        second = run(tmp_path, with_key=True)
        assert second.returncode == 0, second.stderr
    assert len(server.requests) == 3  # unique train captions only, once each
    assert metrics["llm"] == 1 and metrics["requests"] == 3 and metrics["cache_hits"] == 0
    assert metrics["rule_declined"] == 0
    assert metrics["unique_captions_after"] == 4 + 6 and metrics["tokens"] == 150
    again = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
    assert again["requests"] == 0 and again["cache_hits"] == 3
    assert (tmp_path / "data/paraphrase/pairs.csv").read_bytes() == pairs_first
    assert b",llm," in pairs_first and b"held out,original" in pairs_first
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"API key written to {path}"
    for proc in (first, second):
        assert KEY not in proc.stdout + proc.stderr


def test_without_a_key_the_stage_stops_and_names_the_variable(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1")
    proc = run(tmp_path, with_key=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and ENV in error, error
    assert f"export {ENV}" in error and "paraphrase.openai.fallback: rule" in error
    assert not (tmp_path / "data/paraphrase/pairs.csv").exists()


def test_an_explicit_rule_fallback_labels_and_records_the_backend_that_ran(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1", fallback="rule")
    proc = run(tmp_path, with_key=False)
    assert proc.returncode == 0, proc.stderr
    assert f"${ENV} is not set" in proc.stdout and "backend=rule" in proc.stdout
    pairs = pd.read_csv(tmp_path / "data/paraphrase/pairs.csv")
    assert set(pairs["caption_source"]) == {"original", "rule"}
    metrics = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
    assert metrics["llm"] == 0 and metrics["requests"] == 0
    assert metrics["paraphrases_per_caption"] > 0
    # "no polyp; ..." is a negation the rule backend declines, and says so
    assert metrics["rule_declined"] == 1 and "the rule backend declined 1 of 3 captions" in proc.stdout
    assert set(pairs.loc[pairs["file_name"] == "2.png", "caption_source"]) == {"original"}
    provenance = json.loads((tmp_path / "data/paraphrase/provenance.json").read_text())
    assert provenance["params"]["backend"] == "openai" and provenance["params"]["backend_used"] == "rule"


def test_fallback_is_a_checked_choice(tmp_path):
    setup(tmp_path, "http://127.0.0.1:9/v1", fallback="rules")
    proc = run(tmp_path, with_key=False)
    assert proc.returncode == 2 and "paraphrase.openai.fallback = 'rules' is not supported" in proc.stderr


# Planted identifiers: a name after a title, record numbers and a date. The first two captions differ only
# in them, so they are one caption once scrubbed: one request.
PLANTED = ["8675309", "8675310", "A55501", "Gregory", "House", "03/04/2021", "MRN"]
PHI_CAPTIONS = ["one polyp in the upper-left; MRN 8675309; Dr. Gregory House, 03/04/2021",
                "one polyp in the upper-left; MRN 8675310", "two polyps in the lower-right, Acc# A55501"]
SCRUBBED = {"one polyp in the upper-left", "two polyps in the lower-right"}


def sent_text(server: FakeOpenAI) -> str:
    return json.dumps([r["body"] for r in server.requests])


def test_captions_reach_the_server_scrubbed_and_the_changes_are_counted(tmp_path):
    with FakeOpenAI(good) as server:
        setup(tmp_path, server.url, PHI_CAPTIONS)
        proc = run(tmp_path, with_key=True)
    assert proc.returncode == 0, proc.stderr
    assert {caption_of(r["body"]) for r in server.requests} == SCRUBBED and len(server.requests) == 2
    leaked = [s for s in PLANTED if s in sent_text(server)]
    assert not leaked, f"sent to the LLM: {leaked}"
    metrics = json.loads((tmp_path / "metrics/all/paraphrase.json").read_text())
    assert (metrics["scrubbed_ids"], metrics["scrubbed_names"], metrics["scrubbed_dates"]) == (3, 1, 1)
    assert metrics["scrubbed_total"] == 5 and metrics["scrubbed_captions"] == 3 and metrics["scrubbed_markers"] == 0
    assert "scrubbed 3 of 3 captions before paraphrasing" in proc.stdout
    pairs = pd.read_csv(tmp_path / "data/paraphrase/pairs.csv")
    llm_rows = pairs[pairs["caption_source"] == "llm"]
    assert len(llm_rows) == 2 * 3  # each image's caption got the paraphrases of its scrubbed form
    assert not any(s in " ".join(llm_rows["text"]) for s in PLANTED)
    # the original rows keep ingest's captions: scrubbing what every stage trains on is ingest's option
    assert set(pairs.loc[pairs["caption_source"] == "original", "text"]) == set(PHI_CAPTIONS) | {"held out"}
    cached = list((tmp_path / ".synthmed/cache/llm").rglob("*.json"))  # the reply cache
    assert len(cached) == 2
    for path in cached:
        assert not any(s.encode() in path.read_bytes() for s in PLANTED), path
    assert not any(s in proc.stdout + proc.stderr for s in PLANTED)


def proxied(server: FakeOpenAI) -> dict[str, str | None]:
    """The environment that routes plain-HTTP requests through ``server`` as a proxy: a request to a remote
    host name arrives there (with that host name), so the test sees what would have left the machine."""
    env: dict[str, str | None] = {k: None for k in ("http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")}
    return {**env, "HTTP_PROXY": server.url.removesuffix("/v1")}


def test_a_remote_endpoint_needs_the_opt_in_and_gets_scrubbed_captions(tmp_path):
    remote = "http://llm.example.org/v1"
    with FakeOpenAI(good) as server:
        setup(tmp_path, remote, PHI_CAPTIONS)
        refused = run(tmp_path, with_key=True, **proxied(server))
        setup(tmp_path, remote, PHI_CAPTIONS, scrub=False, allow_remote=True)
        unscrubbed = run(tmp_path, with_key=True, **proxied(server))
        assert server.requests == [] and not (tmp_path / "data/paraphrase/pairs.csv").exists()  # no request made
        setup(tmp_path, remote, PHI_CAPTIONS, allow_remote=True)
        allowed = run(tmp_path, with_key=True, **proxied(server))
    assert refused.returncode == 2
    error = refused.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert "http://llm.example.org/v1" in error and "paraphrase.openai.allow_remote: true" in error
    assert unscrubbed.returncode == 2 and "set paraphrase.scrub: true" in unscrubbed.stderr
    assert len(unscrubbed.stderr.strip().splitlines()) == 1
    assert allowed.returncode == 0, allowed.stderr
    assert {r["headers"]["host"] for r in server.requests} == {"llm.example.org"}
    assert {caption_of(r["body"]) for r in server.requests} == SCRUBBED
    assert not any(s in sent_text(server) for s in PLANTED)
