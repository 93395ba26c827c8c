"""A page opened in real headless Chromium (Debian's package), driven over the DevTools protocol: what loaded,
what the console said, and a screenshot. The `websockets` client comes with Prefect."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# a closed network refuses Chromium's background connections, many at a time, unless they are off
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1200,900"]

IMAGES = """JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0})))"""


@dataclass
class PageVisit:
    images: list[dict] = field(default_factory=list)  # {alt, ok} per <img>
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    screenshot: bytes = b""


def visit(url: str, timeout: float = 60.0) -> PageVisit:
    from websockets.sync.client import connect

    # its helper processes may still write to the profile as it goes down: leave what they leave
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + timeout
            while not port_file.is_file() or not port_file.read_text().strip():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.1)
            port = port_file.read_text().split()[0]
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            return _drive(connect(ws_url, max_size=None, open_timeout=timeout), url, timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helper processes
            proc.wait()


def _drive(ws, url: str, timeout: float) -> PageVisit:
    out, ids = PageVisit(), iter(range(1, 10**6))

    def call(method: str, **params):
        i = next(ids)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = _note(json.loads(ws.recv(timeout=timeout)))
            if msg.get("id") == i:
                return msg.get("result", {})

    loaded = []

    def _note(msg: dict) -> dict:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Page.loadEventFired":
            loaded.append(True)
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            out.errors.append(params["entry"].get("text", ""))
        return msg

    with ws:
        for domain in ("Page", "Runtime", "Log"):
            call(f"{domain}.enable")
        call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not loaded:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout} s")
            _note(json.loads(ws.recv(timeout=timeout)))
        result = call("Runtime.evaluate", expression=IMAGES, returnByValue=True)
        out.images = json.loads(result["result"]["value"])
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out.screenshot = base64.b64decode(shot["data"])
    return out
