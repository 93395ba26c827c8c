"""LLM paraphrasing throughput against `paraphrase.openai.max_concurrency`; prints JSON.

The real openai client and the real OpenAIParaphraser against the tests' local OpenAI-compatible server,
which answers each request after ``--latency`` seconds (a hosted model's time per reply is 0.5-3 s) and, as
a hosted endpoint does past its rate limit, with HTTP 429 + Retry-After once more than ``--server-limit``
requests are in flight. Throughput grows with concurrency until the endpoint is busy; past its limit the
retries cost time and budget.

    .venv/bin/python benchmarks/llm_concurrency.py [--captions 200] [--latency 0.5] [--server-limit 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synthmed.text.llm import OpenAIParams, OpenAIParaphraser, ResponseCache, Validation  # noqa: E402
from synthmed.text.salient import load_vocabulary  # noqa: E402
from tests.text.fake_openai import FakeOpenAI, paraphrases  # noqa: E402

ENV = "SYNTHMED_BENCH_KEY"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--server-limit", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    os.environ[ENV] = "sk-bench"
    in_flight, lock = [0], threading.Lock()

    def handler(body, n):
        with lock:
            in_flight[0] += 1
            busy = in_flight[0] > args.server_limit
        try:
            if busy:
                return 429, {"Retry-After": "1"}, '{"error": {"message": "rate limit"}}'
            time.sleep(args.latency)
            caption = body["messages"][1]["content"].split("Caption:")[-1].strip()
            return paraphrases(f"Image: {caption}", f"{caption}, as seen on the image")
        finally:
            with lock:
                in_flight[0] -= 1

    rules = Validation(load_vocabulary(REPO / "prompts/salient_terms.txt"), 0.5, 2.0)
    captions = [f"a polyp in the upper part of the image, case {i}" for i in range(args.captions)]
    rows = []
    with FakeOpenAI(handler) as server:
        for c in args.concurrency:
            with tempfile.TemporaryDirectory() as cache:
                params = OpenAIParams(model="m", base_url=server.url, temperature=0.7, max_concurrency=c, timeout_s=30,
                                      max_requests=100 * args.captions, max_retries=8, backoff_s=0.5, max_attempts=1,
                                      api_key_env=ENV, fallback="none")
                para = OpenAIParaphraser(params, REPO / "prompts/paraphrase_v1.yaml", rules, ResponseCache(Path(cache)), 0)
                t0 = time.perf_counter()
                para.paraphrase(captions, 2)
                seconds = time.perf_counter() - t0
            rows.append({"max_concurrency": c, "s": round(seconds, 2), "captions_per_s": round(args.captions / seconds, 1),
                         "requests": para.stats.requests, "retried": para.stats.requests - args.captions})
            print(rows[-1], file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "llm_concurrency", "captions": args.captions, "latency_s": args.latency,
                      "server_limit": args.server_limit, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
