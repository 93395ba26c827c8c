"""A local OpenAI-compatible chat-completions server for tests (127.0.0.1, random port).

Each request is answered by ``handler(body, n_seen) -> (status, headers, body_text)``;
the server records every request (path, headers, JSON body) for assertions.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Handler = Callable[[dict, int], tuple[int, dict, str]]


def completion(content: str, prompt_tokens: int = 20, completion_tokens: int = 30) -> tuple[int, dict, str]:
    body = {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return 200, {"Content-Type": "application/json"}, json.dumps(body)


def paraphrases(*items: str) -> tuple[int, dict, str]:
    return completion(json.dumps({"paraphrases": list(items)}))


class FakeOpenAI:
    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class _Req(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer._lock:
                    outer.requests.append({"path": self.path, "body": body,
                                           "headers": {k.lower(): v for k, v in self.headers.items()}})
                    n = len(outer.requests)
                status, headers, text = outer.handler(body, n)
                data = text.encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Req)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
