"""LLM paraphrasing through any OpenAI-compatible endpoint: cached, validated, budgeted.

Every response is stored in a content-addressed cache (one JSON file per request,
written atomically as soon as it arrives), keyed by everything that determines
it: endpoint, model, prompt template hash, caption, temperature, n, seed and
attempt (two servers that call different models by one name never share a
reply). A rerun over an unchanged cache makes no request and yields the same
paraphrases. The API key is read from the environment variable named in the
params and is never written anywhere.

Captions leave this machine only when the user says so: an endpoint that is not
on it (``is_local``) needs ``allow_remote: true``, and is sent scrubbed captions
only (synthmed.text.scrub; the paraphrase stage scrubs them, this client checks).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path
from synthmed.core.progress import progress
from synthmed.text.salient import missing_salient
from synthmed.text.scrub import scrub

_sleep = time.sleep  # a seam, so tests can record waits instead of waiting
_REFUSAL = re.compile(r"\b(i'?m sorry|i cannot|i can'?t|i am unable|as an ai|i won'?t)\b", re.IGNORECASE)


@dataclass
class OpenAIParams:
    model: str
    base_url: str  # "" = OpenAI; e.g. http://localhost:8000/v1 for vLLM, http://localhost:11434/v1 for Ollama
    temperature: float
    max_concurrency: int
    timeout_s: float
    max_requests: int  # budget for this run; cache hits are free
    max_retries: int  # per request, on 429 / 5xx / timeouts / connection errors
    backoff_s: float  # first retry wait; doubles each time, plus jitter
    max_attempts: int  # requests per caption while replies are rejected
    api_key_env: str  # name of the environment variable holding the key
    # without the key: "none" stops the stage; "rule" runs the offline rule backend and records that it did
    fallback: Literal["none", "rule"]
    allow_remote: bool = False  # send (scrubbed) captions to an endpoint that is not on this machine
    local_hosts: list[str] = field(default_factory=list)  # names, IPs or networks treated as this machine


OPENAI_URL = "https://api.openai.com/v1"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def endpoint(base_url: str) -> str:
    """Where requests go, normalised (the cache key and messages use it): "" is OpenAI's API; the
    OPENAI_BASE_URL variable is not consulted, so that params.yaml alone says where captions go. Scheme and
    host lower-cased; user info, a default port and a trailing slash dropped."""
    url = urlsplit(base_url.strip() or OPENAI_URL)
    try:
        scheme, host, port = url.scheme.lower(), url.hostname, url.port
    except ValueError:
        scheme, host, port = "", None, None
    if scheme not in _DEFAULT_PORTS or not host:
        raise PipelineError(f"paraphrase.openai.base_url = {base_url!r} is not an http(s) URL; use e.g. "
                            "http://localhost:11434/v1 (a server on a unix socket: serve it on 127.0.0.1 instead)")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, url.path.rstrip("/"), url.query, ""))


def _network(entry: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """A local_hosts entry: an IP network (an address is a network of one), or a host name in lower case."""
    text = entry.strip().lower().rstrip(".")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if not text or not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", text):
        raise PipelineError(f"{where} = {entry!r} is neither a host name nor an IP address or network; "
                            "write e.g. gpu-box.internal, 10.0.0.5 or 10.0.0.0/8")
    return text


def is_local(base_url: str, local_hosts: list[str] = ()) -> bool:
    """Whether requests to ``base_url`` stay on this machine: host ``localhost``, an address in 127.0.0.0/8 or
    ::1; or whether its host is listed in ``local_hosts`` (the user's trust boundary: a hospital's LAN server).
    Names are not resolved (a DNS answer can change between this check and the request), so any other
    name, and every private LAN address not listed, counts as remote."""
    host = urlsplit(endpoint(base_url)).hostname.rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1
    listed_hosts = [_network(e, f"paraphrase.openai.local_hosts[{i}]") for i, e in enumerate(local_hosts)]
    if host == "localhost" or (address is not None and address.is_loopback):
        return True
    for listed in listed_hosts:
        if listed == host or (address is not None and not isinstance(listed, str)
                              and address.version == listed.version and address in listed):
            return True
    return False


def check_endpoint(p: OpenAIParams) -> None:
    """Before any request: an endpoint that is not on this machine needs the explicit opt-in."""
    if not p.allow_remote and not is_local(p.base_url, p.local_hosts):
        raise PipelineError(
            f"paraphrase.openai.base_url is {endpoint(p.base_url)}, not this machine: captions would leave it; set "
            "paraphrase.openai.allow_remote: true to send them (scrubbed), list the host in "
            "paraphrase.openai.local_hosts if it is inside your network, or serve the model on localhost")


@dataclass
class Validation:
    vocabulary: frozenset[str]
    min_length_ratio: float
    max_length_ratio: float


@dataclass
class LLMStats:
    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: Counter = field(default_factory=Counter)


def load_prompt(path: str | Path) -> tuple[dict, str]:
    """The versioned prompt file and its hash (part of every cache key)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: prompt template not found; fix paraphrase.prompt_template")
    raw = path.read_bytes()
    prompt = yaml.safe_load(raw)
    if not isinstance(prompt, dict) or not {"system", "user"} <= set(prompt):
        raise PipelineError(f"{path}: a prompt template needs 'system' and 'user' entries")
    return prompt, hashlib.sha256(raw).hexdigest()


class ResponseCache:
    """One JSON file per request key under ``folder``; safe against crashes mid-run."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def key(**fields) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, key: str, record: dict) -> None:
        with atomic_path(self._path(key)) as tmp:
            tmp.write_text(json.dumps(record, sort_keys=True, indent=1), encoding="utf-8")


def parse_reply(content: str | None) -> tuple[list[str], str]:
    """(paraphrases, "") or ([], rejection reason) for one reply's text."""
    if content is None or not content.strip():
        return [], "empty"
    text = content.strip()
    if _REFUSAL.search(text) and "{" not in text:
        return [], "refusal"
    fenced = re.search(r"\{.*\}", text, re.DOTALL)  # tolerate ```json fences and chatter around the object
    try:
        items = json.loads(fenced.group(0) if fenced else text)["paraphrases"]
        if not isinstance(items, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return [], "malformed"
    return [str(x).strip() for x in items], ""


def validate(original: str, candidate: str, accepted: list[str], rules: Validation) -> str:
    """"" if the paraphrase is usable, else the rejection reason."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    if not candidate:
        return "empty"
    if _REFUSAL.search(candidate):
        return "refusal"
    if norm(candidate) == norm(original):
        return "identical"
    if norm(candidate) in {norm(a) for a in accepted}:
        return "duplicate"
    ratio = len(candidate) / max(len(original), 1)
    if not rules.min_length_ratio <= ratio <= rules.max_length_ratio:
        return "length"
    if missing_salient(original, candidate, rules.vocabulary):
        return "salient"
    return ""


class OpenAIParaphraser:
    """Paraphrases unique captions with an OpenAI-compatible chat endpoint."""

    name = "llm"

    def __init__(self, params: OpenAIParams, prompt_path: str | Path, rules: Validation, cache: ResponseCache,
                 seed: int):
        import openai

        check_endpoint(params)
        self.endpoint, self.local = endpoint(params.base_url), is_local(params.base_url, params.local_hosts)
        key = os.environ.get(params.api_key_env, "")
        if not key:
            raise PipelineError(f"environment variable {params.api_key_env} is not set; export the API key there")
        self.p, self.rules, self.cache, self.seed = params, rules, cache, seed
        self.prompt, self.prompt_sha = load_prompt(prompt_path)
        # base_url given, never None: openai would otherwise read OPENAI_BASE_URL, a destination params don't show
        self.client = openai.OpenAI(api_key=key, base_url=params.base_url or OPENAI_URL, timeout=params.timeout_s,
                                    max_retries=0)  # retries are ours: Retry-After, budget, counting
        self.stats = LLMStats()
        self._lock = threading.Lock()
        self._jitter = random.Random(seed)

    def _check_budget(self, captions: list[str]) -> None:
        """Before the first request: a job the budget cannot cover even when every first reply is accepted
        stops here, not half-way (each caption without a cached first reply costs at least one request)."""
        needed = sum(1 for c in captions if self.cache.get(self._key(c, 0)) is None)
        if needed > self.p.max_requests:
            raise PipelineError(
                f"this run needs at least {needed} requests ({needed} of {len(captions)} captions have no cached "
                f"reply; up to {self.p.max_attempts} each when replies are rejected) but the budget is "
                f"{self.p.max_requests}: raise paraphrase.openai.max_requests to {needed} or more")

    def _key(self, caption: str, attempt: int) -> str:
        return self.cache.key(endpoint=self.endpoint, model=self.p.model, prompt_sha256=self.prompt_sha,
                              caption=caption, temperature=self.p.temperature, n=self.n, seed=self.seed,
                              attempt=attempt)

    # -- one HTTP request, with retries -------------------------------------------------
    def _spend(self) -> None:
        with self._lock:
            if self.stats.requests >= self.p.max_requests:
                raise PipelineError(
                    f"request budget exhausted (paraphrase.openai.max_requests={self.p.max_requests}); responses so "
                    "far are cached, so raise the budget and rerun to continue where it stopped")
            self.stats.requests += 1

    def _wait(self, retry: int, retry_after: str | None) -> None:
        try:
            seconds = float(retry_after) if retry_after is not None else None
        except ValueError:
            seconds = None
        if seconds is None:
            with self._lock:
                jitter = self._jitter.uniform(0, self.p.backoff_s)
            seconds = self.p.backoff_s * 2**retry + jitter
        _sleep(min(seconds, 300.0))

    def _request(self, caption: str, seed: int) -> dict:
        import openai

        messages = [
            {"role": "system", "content": self.prompt["system"]},
            {"role": "user", "content": self.prompt["user"].format(caption=caption, n=self.n)},
        ]
        for retry in range(self.p.max_retries + 1):
            self._spend()
            try:
                resp = self.client.chat.completions.create(model=self.p.model, messages=messages,
                                                           temperature=self.p.temperature, seed=seed)
            except (openai.AuthenticationError, openai.PermissionDeniedError):
                raise PipelineError(f"the endpoint refused the API key from ${self.p.api_key_env} "
                                    "(authentication failed); check that variable") from None
            except openai.RateLimitError as exc:
                self._wait(retry, exc.response.headers.get("retry-after"))
                continue
            except openai.APIStatusError as exc:
                if exc.status_code < 500:
                    raise PipelineError(f"the endpoint rejected the request (HTTP {exc.status_code}); "
                                        "check paraphrase.openai.model and base_url") from None
                self._wait(retry, None)
                continue
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError):
                self._wait(retry, None)  # timeouts, refused connections, unparseable bodies
                continue
            choice = resp.choices[0].message.content if resp.choices else None
            usage = resp.usage
            return {"content": choice,
                    "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                    "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        raise PipelineError(f"{self.p.base_url or 'OpenAI'}: no answer after {self.p.max_retries + 1} tries "
                            "(rate limits, server errors or timeouts); rerun later, cached answers are kept")

    # -- one caption: cache, parse, validate, retry --------------------------------------
    def _one(self, caption: str) -> list[str]:
        accepted: list[str] = []
        for attempt in range(self.p.max_attempts):
            key = self._key(caption, attempt)
            record = self.cache.get(key)
            if record is None:
                record = self._request(caption, self.seed + attempt)
                self.cache.put(key, record)
                with self._lock:
                    self.stats.prompt_tokens += record["prompt_tokens"]
                    self.stats.completion_tokens += record["completion_tokens"]
            else:
                with self._lock:
                    self.stats.cache_hits += 1
            candidates, reason = parse_reply(record["content"])
            reasons = [reason] if reason else []
            for cand in candidates:
                why = validate(caption, cand, accepted, self.rules)
                if why:
                    reasons.append(why)
                elif len(accepted) < self.n:
                    accepted.append(cand)
            with self._lock:
                self.stats.rejected.update(reasons)
            if len(accepted) >= self.n:
                break
        return accepted

    def _check_scrubbed(self, captions: list[str]) -> None:
        """Before the first request to a remote endpoint: every caption must be one the scrubber leaves alone."""
        if self.local:
            return
        raw = sum(1 for c in captions if scrub(c)[1])
        if raw:
            raise PipelineError(f"{raw} of {len(captions)} captions still hold dates, identifiers or de-identification "
                                f"markers and {self.endpoint} is not this machine: set paraphrase.scrub: true")

    def paraphrase(self, captions: list[str], n: int) -> dict[str, list[str]]:
        self.n = n
        self._check_scrubbed(captions)
        self._check_budget(captions)
        with ThreadPoolExecutor(max_workers=self.p.max_concurrency) as pool:
            results = list(progress(pool.map(self._one, captions), total=len(captions), desc="paraphrase"))
        return dict(zip(captions, results))
