"""Integration, real HTTP against ``python -m server`` (subprocess): the generated hostile corpus
(``hostile_corpus.py``) gets its documented 4xx with a reason, case by case, and the server's memory comes
back after it; plus the regressions of issue 18 that need more than one request (jobs with non-finite
deadlines, 405 Allow, schemas, docs assets, disconnects, start-up refusals)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hostile_corpus import BODY_LIMIT, Case, cases
from server_testkit import REPO, TINY_MODELS, RunningServer, free_port, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("hostile"), {"TOKSERVE_MAX_BODY_BYTES": str(BODY_LIMIT)})
    yield s
    s.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = {k: v.encode("utf-8") for k, v in case.headers.items()}
    return client.request(case.method, case.path, content=case.body or None, headers=headers)


def check(case: Case, r: httpx.Response) -> str | None:
    """None when ``r`` is the documented answer to ``case``, else what is wrong."""
    if r.status_code != case.status:
        return f"{case.name}: {r.status_code} (expected {case.status}): {r.text[:200]}"
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{case.name}: not a JSON error body: {r.text[:200]}"
    if err.get("type") != case.type or err.get("request_id") != r.headers.get("x-request-id"):
        return f"{case.name}: error {err}"
    if not err.get("message") or not re.search(case.match, err["message"], re.IGNORECASE):
        return f"{case.name}: message {err.get('message')!r} does not match {case.match!r}"
    if case.status == 405 and not r.headers.get("allow"):
        return f"{case.name}: 405 without Allow"
    return None


def test_hostile_corpus_gets_its_4xx_and_memory_comes_back(server: RunningServer) -> None:
    corpus = list(cases())
    assert len(corpus) >= 200
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for case in corpus[:20]:  # warm up every code path once before measuring
            send(c, case)
        before = _rss_mb(server.proc.pid)
        problems = [p for case in corpus if (p := check(case, send(c, case)))]
        after = _rss_mb(server.proc.pid)
        assert not problems, "\n".join(problems)
        assert c.get("/readyz").status_code == 200
        metrics = c.get("/metrics").text
    print(f"RSS {before:.0f} MB -> {after:.0f} MB over {len(corpus)} hostile requests")
    assert after - before < 50, f"RSS {before:.0f} MB -> {after:.0f} MB over the corpus"
    five = re.findall(r'tokserve_requests_total\{op="([a-z]+)",status="(5\d\d)"\}', metrics)
    assert five == [("readyz", "503")] or not five, five  # 503 only while it started
    assert "Traceback" not in server.log()


def test_non_finite_deadlines_are_refused_and_jobs_stay_readable(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for h in ("inf", "1e300", "nan"):
            r = c.post("/v1/jobs", json={"op": "generate", "class": 1, "steps": 2}, headers={"x-deadline-ms": h})
            assert r.status_code == 422 and "x-deadline-ms" in r.json()["error"]["message"]
        ok = c.post("/v1/jobs", json={"op": "generate", "class": 1, "steps": 2, "deadline_ms": 86_400_000})
        assert ok.status_code == 202, ok.text
        job = ok.json()["id"]
        assert c.get(f"/v1/jobs/{job}").status_code == 200
        assert c.post(f"/v1/jobs/{job}/cancel").status_code == 200
        assert abs(c.get(f"/v1/jobs/{job}").json()["deadline"] - time.time() - 86_400) < 60


def test_integer_codes_never_wrap(server: RunningServer) -> None:
    """int8 300 used to be decoded as code 44: every integer dtype refuses what it cannot hold."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for dtype, bad in (("int8", 128), ("int16", 40000), ("uint8", 256), ("int32", 2**31)):
            r = c.post("/v1/decode", json={"shape": [1, 64, 32], "dtype": dtype, "data": [bad] * 2048})
            assert r.status_code == 422 and f"does not fit dtype {dtype}" in r.json()["error"]["message"], r.text


def test_binary_tokens_in_either_byte_order_and_layout_decode_alike(server: RunningServer) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((1, 64, 32)).astype("<f4")

    def decode(arr: np.ndarray) -> bytes:
        import io

        buf = io.BytesIO()
        np.save(buf, arr)
        r = httpx.post(f"{server.url}/v1/decode?format=npy", content=buf.getvalue(),
                       headers={"content-type": "application/x-npy"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.content

    little = decode(tokens)
    assert decode(tokens.astype(">f4")) == little  # big-endian used to be a 500
    assert decode(np.asfortranarray(tokens)) == little
    assert decode(tokens.astype("<f8")) == little


def test_405_has_allow_and_a_json_body(server: RunningServer) -> None:
    for method, path, allowed in (("GET", "/v1/generate", "POST"), ("POST", "/v1/models", "GET"),
                                  ("POST", "/healthz", "GET"), ("DELETE", "/v1/jobs/abc", "GET")):
        r = httpx.request(method, f"{server.url}{path}")
        assert r.status_code == 405 and r.headers["allow"] == allowed, (path, r.headers)
        assert r.json()["error"]["type"] == "method_not_allowed"


def test_schema_and_code_agree_on_jobs_and_headers(server: RunningServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    accepted = spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["schema"]
    assert accepted == {"$ref": "#/components/schemas/JobAccepted"}
    assert set(spec["components"]["schemas"]["JobAccepted"]["required"]) == {"id", "op", "model", "status",
                                                                            "priority", "links"}
    headers = {p["name"]: p["schema"] for p in spec["paths"]["/v1/generate"]["post"]["parameters"]
               if p["in"] == "header"}
    key = headers["idempotency-key"]["anyOf"][0]
    assert key["minLength"] == 1 and key["maxLength"] == 255
    assert "pattern" in headers["x-deadline-ms"]["anyOf"][0]
    # what the schema allows, the server takes
    r = httpx.post(f"{server.url}/v1/generate", json={"class": 1, "steps": 2, "seed": 1},
                   headers={"idempotency-key": "k", "x-deadline-ms": "60000.5", "x-priority": "-100"}, timeout=60)
    assert r.status_code == 200, r.text
    body = httpx.post(f"{server.url}/v1/jobs", json={"op": "generate", "class": 1, "steps": 2}).json()
    assert set(body) == {"id", "op", "model", "status", "priority", "links"}


def test_docs_load_nothing_from_outside(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url) as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page)
            assert html.status_code == 200 and "text/html" in html.headers["content-type"]
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", html.text), html.text
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
            assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
            for a in assets:
                r = c.get(a)
                assert r.status_code == 200 and len(r.content) > 1000, a
        assert "validatorUrl" in c.get("/docs").text


def test_disconnects_are_not_server_errors(server: RunningServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # gone in the middle of the body
        s.sendall(b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                  + b"x" * 1000)
        time.sleep(0.3)
    body = json.dumps({"class": 1, "steps": 1000, "seed": 1}).encode()
    with socket.create_connection((host, int(port))) as s:  # gone while its generation runs
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.5)
    end = time.time() + 30
    while time.time() < end:
        text = httpx.get(f"{server.url}/metrics").text
        if 'op="generate",status="499"' in text and 'op="encode",status="499"' in text:
            break
        time.sleep(0.2)
    assert 'op="generate",status="499"' in text and 'op="encode",status="499"' in text
    # the abandoned generation left its batch: the next one does not wait for 1000 steps
    r = httpx.post(f"{server.url}/v1/generate", json={"class": 1, "steps": 2}, timeout=60)
    assert r.status_code == 200 and float(r.headers["x-queue-time"]) < 2000
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------------------------------------- start-up


def _serve(env: dict[str, str], tmp_path: Path, timeout: float = 120) -> tuple[int, str, float]:
    """Run ``python -m server`` until it exits by itself: (exit status, output, seconds)."""
    full = {**os.environ, "TOKSERVE_TORCH_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    full.pop("REDIS_URL", None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "server", "--port", str(free_port()), "--log-level", "warning"],
                       cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr, time.time() - t0


def _pickle_folder(tmp_path: Path, payload: object) -> Path:
    """A model folder whose weights are a pickle (``model.pt``) holding ``payload``."""
    from models.hub import save_pretrained
    from models.registry import create_model

    folder = tmp_path / "pickled"
    save_pretrained(create_model("softvq-tiny-64"), folder)
    (folder / "model.safetensors").unlink()
    torch.save(payload, folder / "model.pt")
    return folder


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_refused_pickle_fails_start_up_without_showing_paths(tmp_path: Path) -> None:
    folder = _pickle_folder(tmp_path, {"w": torch.zeros(1)})
    code, out, took = _serve({"TOKSERVE_MODELS": f"tok={folder}"}, tmp_path)
    assert code == 1 and "pickle" in out and "failed to load" in out, out
    assert took < 60


def test_allow_pickle_never_runs_code_from_a_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _pickle_folder(tmp_path, {"w": torch.zeros(1), "x": _RunsCode(marker)})
    code, out, _ = _serve({"TOKSERVE_MODELS": f"tok={folder}", "TOKSERVE_ALLOW_PICKLE": "true"}, tmp_path)
    assert code == 1 and "failed to load" in out, out
    assert not marker.exists(), "the checkpoint ran code"


@pytest.mark.parametrize("keys", [" , ", "key1,,key2", "key1,"])
def test_api_keys_that_hold_no_key_refuse_to_start(tmp_path: Path, keys: str) -> None:
    code, out, _ = _serve({"TOKSERVE_MODELS": TINY_MODELS, "TOKSERVE_API_KEYS": keys}, tmp_path)
    assert code == 2 and "TOKSERVE_API_KEYS" in out and "Traceback" not in out, out


def test_non_finite_settings_refuse_to_start(tmp_path: Path) -> None:
    code, out, _ = _serve({"TOKSERVE_MODELS": TINY_MODELS, "TOKSERVE_SHUTDOWN_GRACE_S": "inf"}, tmp_path)
    assert code == 2 and "shutdown_grace_s" in out, out
