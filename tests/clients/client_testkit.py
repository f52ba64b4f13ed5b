"""Helpers for the client tests: a small scripted HTTP server (real sockets, real HTTP) on a free port.

The scripted server answers each path with a handler ``fn(request) -> Reply | DROP``; it records every
request it receives, so tests can count attempts and read the headers the SDK sent. ``fake_tokserve``
builds one that speaks enough of docs/API.md (with made-up tensors) for load-test and CLI tests that do not
need the real models.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
from PIL import Image


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    received: float = field(default_factory=time.monotonic)

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict | list = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


DROP = object()  # close the connection without answering
Handler = Callable[[Request], "Reply | object"]


class ScriptedServer:
    """A threaded ``http.server`` whose answers tests script per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class _H(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(
                    self.command,
                    split.path,
                    parse_qs(split.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with outer._lock:
                    outer.requests.append(req)
                handler = outer.routes.get(split.path)
                reply = (
                    handler(req) if handler else Reply(404, {"error": {"type": "not_found", "message": "no"}})
                )
                if reply is DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                assert isinstance(reply, Reply)
                if reply.delay:
                    time.sleep(reply.delay)
                data = reply.body
                ctype = reply.headers.get("Content-Type")
                if isinstance(data, (dict, list)):
                    data, ctype = json.dumps(data).encode(), ctype or "application/json"
                elif isinstance(data, str):
                    data, ctype = data.encode(), ctype or "text/plain"
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        if k != "Content-Type":
                            self.send_header(k, v)
                    self.send_header("Content-Type", ctype or "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def sequence(self, path: str, replies: list[Reply | object]) -> None:
        """Answer ``path`` with ``replies`` in order; the last one repeats."""
        it = iter(range(10**9))

        def handler(_: Request) -> Reply | object:
            return replies[min(next(it), len(replies) - 1)]

        self.routes[path] = handler

    def calls(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def png_bytes(size: int = 8, color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


TIMING = {"x-queue-time": "1.5", "x-compute-time": "2.5", "x-total-time": "4.25", "x-request-id": "rid-1"}
FAKE_L, FAKE_D = 4, 8


def fake_tokserve_routes(server: ScriptedServer, latency: float = 0.0) -> None:
    """Routes answering like tokserve (docs/API.md) with fixed tensors; ``latency`` seconds per call."""
    models = {
        "models": [
            {"name": "fake-tok", "kind": "tokenizer", "image_size": 8, "token_shape": [FAKE_L, FAKE_D]},
            {"name": "fake-gen", "kind": "generator", "tokenizer": "fake-tok", "classes": [1, 207]},
        ],
        "default_tokenizer": "fake-tok",
        "default_generator": "fake-gen",
    }
    server.route("/v1/models", lambda r: Reply(200, models))
    server.route("/healthz", lambda r: Reply(200, {"status": "ok"}))
    server.route("/readyz", lambda r: Reply(200, {"status": "ready"}))

    def encode(req: Request) -> Reply:
        n = req.body.count(b'name="image"') if req.headers["content-type"].startswith("multipart/") else 1
        arr = np.full((n, FAKE_L, FAKE_D), 0.5, dtype=np.float32)
        return Reply(200, npy_bytes(arr), {"Content-Type": "application/x-npy", **TIMING}, latency)

    def decode(req: Request) -> Reply:
        arr = np.load(io.BytesIO(req.body))
        n = 1 if arr.ndim == 2 else arr.shape[0]
        if n == 1:
            return Reply(200, png_bytes(), {"Content-Type": "image/png", **TIMING}, latency)
        images = [base64.b64encode(png_bytes()).decode() for _ in range(n)]
        return Reply(200, {"model": "fake-tok", "format": "png", "images": images}, TIMING, latency)

    def generate(req: Request) -> Reply:
        body = req.json()
        assert isinstance(body, dict)
        n, seed = int(body.get("num_images", 1)), int(body.get("seed", 7))
        images = [
            {"seed": seed + i, "format": "png", "data": base64.b64encode(png_bytes()).decode()}
            for i in range(n)
        ]
        out = {"model": "fake-gen", "class": body["class"], "seed": seed, "images": images}
        return Reply(200, out, TIMING, latency)

    server.route("/v1/encode", encode)
    server.route("/v1/decode", decode)
    server.route("/v1/generate", generate)


# ------------------------------------------------------------------------------------------ the real server
ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
LIVE_MODELS = "softvq-tiny-64,sit-tiny-64x32"
LIVE_API_KEY = "client-tests-key"


def documented_metrics() -> list[str]:
    """The metric names docs/DEPLOY.md promises (the Grafana dashboard reads exactly these)."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    block = text.split("<!-- metrics:begin -->")[1].split("<!-- metrics:end -->")[0]
    return re.findall(r"^\| `(tokserve_[a-z_]+)` \|", block, flags=re.M)


def server_importable() -> bool:
    """Whether ``import server`` gives the real server package (an empty folder is a namespace package)."""
    try:
        import server
    except ImportError:
        return False
    return getattr(server, "__file__", None) is not None


def compose_argv(service: str, **flags: str) -> list[str]:
    """The command of a docker-compose.yml service, run by this interpreter, with ``--flag value`` replaced.

    The tests start processes through this so that they run exactly what the compose stack runs.
    """
    import yaml

    command = list(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["command"])
    assert command[0] == "python"
    command[0] = sys.executable
    for flag, value in flags.items():
        option = "--" + flag.replace("_", "-")
        command[command.index(option) + 1] = value
    return command


@dataclass
class LiveProcess:
    """A started server process: its URL, log file and Popen handle."""

    url: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_process(argv: list[str], env: dict[str, str | None], log: Path, url: str) -> LiveProcess:
    """Start ``argv`` in the project root with ``env`` over this environment (``None`` removes a variable)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
    return LiveProcess(url, proc, log)


class ProcessExited(RuntimeError):
    """A watched process ended before the server was ready; ``log`` holds its output."""

    def __init__(self, live: LiveProcess) -> None:
        self.log = live.log.read_text(errors="replace")
        super().__init__(f"{live.proc.args} exited with {live.proc.returncode}:\n{live.log_tail()}")


def wait_ready(live: LiveProcess, timeout: float = 240.0, watch: tuple[LiveProcess, ...] = ()) -> None:
    """Poll ``/readyz`` until 200; raise :class:`ProcessExited` if ``live`` or a ``watch`` process ends,
    ``RuntimeError`` (with the log) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in (live, *watch):
            if p.proc.poll() is not None:
                raise ProcessExited(p)
        try:
            if httpx.get(live.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    live.stop()
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{live.log_tail()}")


def real_images(n: int) -> list[bytes]:
    """``n`` JPEGs (64x64) of the Tiny ImageNet validation split, as stored."""
    import pyarrow.parquet as pq

    path = SHARED_DATA / "tiny-imagenet-64" / "validation-00000-of-00001.parquet"
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=n, columns=["image"]))
    return [row["bytes"] for row in batch.column("image").to_pylist()]
