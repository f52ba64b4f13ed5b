"""Helpers for the Redis tests: a real ``redis-server`` on a free port (AOF on, so accepted jobs survive a
restart), real worker processes (``python -m server.worker``), and small Redis inspections."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from server_testkit import REPO, TINY_MODELS, free_port

PREFIX = "tokserve"


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server): the redis tests need it")
    return binary


class RedisServer:
    """``redis-server --port N --save '' --appendonly yes --dir <tmp>``; stop / start keep the same port and
    data folder, so the AOF brings accepted jobs back."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--dir", str(self.folder)],
            stdout=(self.folder / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on {self.port}")

    def stop(self) -> None:
        """SIGTERM: Redis writes its AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to hand anything back."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Workers:
    """Worker processes of one test module, started with shared settings."""

    redis_url: str
    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    all: list[Worker] = field(default_factory=list)
    # what runs after the interpreter: the real worker, or a test launcher of it (poison_worker.py)
    program: list[str] = field(default_factory=lambda: ["-m", "server.worker"])

    def start(self, name: str, **env: str) -> Worker:
        full = {**os.environ, "REDIS_URL": self.redis_url, "TOKSERVE_MODELS": TINY_MODELS,
                "TOKSERVE_TORCH_THREADS": "1", "TOKSERVE_WORKER_ID": name, "PYTHONPATH": str(REPO),
                "TOKSERVE_WORKER_HEARTBEAT_S": "0.5", **self.env, **env}
        full.pop("TOKSERVE_REDIS_URL", None)
        log_path = self.folder / f"{name}.log"
        proc = subprocess.Popen([sys.executable, *self.program, "--log-level", "info"], cwd=REPO, env=full,
                                stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
        w = Worker(name, proc, log_path)
        self.all.append(w)
        return w

    def wait_announced(self, names: list[str], timeout: float = 120.0) -> None:
        r = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(r.exists(f"{PREFIX}:worker:{n}") for n in names):
                return
            latest = {w.name: w for w in self.all}  # a name restarted after a kill: its newest process
            dead = [latest[n] for n in names if n in latest and not latest[n].alive()]
            if dead:
                raise RuntimeError(f"worker {dead[0].name} exited:\n{dead[0].log()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"workers {names} not announced in {timeout} s")

    def stop_all(self) -> None:
        for w in self.all:
            w.stop(30)


def pending_of(r: redis.Redis, stream: str, consumer: str) -> int:
    """Deliveries ``consumer`` holds (unacknowledged) in ``stream``."""
    try:
        info = r.xpending(stream, "workers")
    except redis.ResponseError:
        return 0
    return sum(int(c["pending"]) for c in info.get("consumers", []) if c["name"].decode() == consumer)


def stream(kind: str, band: int = 1) -> str:
    return f"{PREFIX}:q:{kind}:p{band}"


def terminal_events(r: redis.Redis, job_id: str) -> list[str]:
    return [f[b"type"].decode() for _, f in r.xrange(f"{PREFIX}:ev:{job_id}")
            if f[b"type"] in (b"completed", b"failed", b"cancelled")]


def wait_for(cond, timeout: float, step: float = 0.05, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def port_closed() -> int:
    """A local port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
