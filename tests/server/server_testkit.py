"""Helpers for the server tests: real images from Tiny ImageNet, and a real server in a subprocess."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
VALIDATION = Path("/work/shared/data/tiny-imagenet-64/validation-00000-of-00001.parquet")
if not VALIDATION.exists():
    VALIDATION = REPO.parent / "shared" / "data" / "tiny-imagenet-64" / "validation-00000-of-00001.parquet"
TINY_MODELS = "softvq-tiny-64,sit-tiny-64x32"


def real_jpegs(n: int) -> list[tuple[bytes, int]]:
    """The first ``n`` validation JPEG files (64x64, real photos) with their ImageNet-1k labels."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(VALIDATION)
    batch = next(f.iter_batches(batch_size=n, columns=["image", "label"]))
    images = batch.column("image").to_pylist()
    labels = batch.column("label").to_pylist()
    return [(img["bytes"], int(lab)) for img, lab in zip(images, labels, strict=True)]


def png_bytes(arr: np.ndarray | Image.Image, **save: object) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 120.0) -> RunningServer:
    """``python -m server`` on a free port with the tiny random models; returns once /readyz is 200."""
    port = free_port()
    full_env = {**os.environ, "TOKSERVE_MODELS": TINY_MODELS, "TOKSERVE_TORCH_THREADS": "1",
                "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("REDIS_URL", None)
    log_path = tmp_path / f"server-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"],
                            cwd=REPO, env=full_env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log_path)
    if wait_ready(server.url, ready_timeout, alive=lambda: proc.poll() is None):
        return server
    server.stop()
    raise RuntimeError(f"server not ready in {ready_timeout} s (exit {proc.returncode}):\n{server.log()}")


def wait_ready(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``url``/readyz until 200 (True), the timeout, or ``alive()`` turning False."""
    end = time.time() + timeout
    while time.time() < end and alive():
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


class ThreadServer:
    """The real app under uvicorn in a thread of the test process (real HTTP; the engine is reachable for
    fault injection through ``app.state.tokserve``)."""

    def __init__(self, **settings: object) -> None:
        import uvicorn

        from server.app import create_app
        from server.settings import Settings

        base = {"models": TINY_MODELS.split(","), "torch_threads": 1}
        self.app = create_app(Settings(**{**base, **settings}))  # type: ignore[arg-type]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", access_log=False))
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.app.state.tokserve

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        if not wait_ready(self.url, 120, alive=self.thread.is_alive):
            raise RuntimeError("thread server not ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
