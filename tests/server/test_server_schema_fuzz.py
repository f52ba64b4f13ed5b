"""Schema fuzzing (schemathesis) against a live ``python -m server`` and its own ``/openapi.json``, narrowed
the way a real client calls it: the served model names, classes the generator was trained on, small step
and image counts, real images as base64, and real tokens for decode. Every operation gets positive cases
(valid by the schema) and negative ones (violating it); every answer must be one the schema declares, with
a body that matches it, and no 5xx other than a JSON 503 / 504. Bounded: about 2,200 cases in all."""

from __future__ import annotations

import base64
import copy
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_testkit import RunningServer, real_jpegs, start_server

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Cases per operation and generation mode (operations with few distinct inputs yield fewer; GET /healthz,
# /readyz, /metrics, /v1/models have nothing to negate): about 2,400 in all.
EXAMPLES = 160
ALLOWED_5XX = {503: {"not_ready", "shutting_down", "backend_unavailable"}, 504: {"deadline_exceeded"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("fuzz"), {
        "TOKSERVE_MAX_STEPS": "10", "TOKSERVE_MAX_IMAGES_PER_REQUEST": "4", "TOKSERVE_MAX_BODY_BYTES": "1048576",
        "TOKSERVE_MAX_WAIT_MS": "1", "TOKSERVE_JOB_TTL_S": "60"})
    yield s
    s.stop()


def narrowed(spec: dict[str, Any], client: httpx.Client) -> dict[str, Any]:
    """The live schema with the values a real client would send in place of free strings and numbers."""
    spec = copy.deepcopy(spec)
    models = client.get("/v1/models").json()
    tokenizers = [m["name"] for m in models["models"] if m["kind"] == "tokenizer"]
    generators = [m for m in models["models"] if m["kind"] == "generator"]
    classes = sorted({c for g in generators for c in g["classes"][:5]})
    v2_models = sorted([f"{t}.{op}" for t in tokenizers for op in ("encode", "decode")]
                       + [g["name"] for g in generators])
    images = [base64.b64encode(data).decode() for data, _ in real_jpegs(3)]
    enc = client.post("/v1/encode", json={"image": images[0]}).json()
    tensor = {"shape": enc["shape"], "dtype": "float32", "data": enc["data"]}
    schemas = spec["components"]["schemas"]

    enc_req = schemas["EncodeJSONRequest"]["properties"]
    enc_req["image"] = {"enum": images}
    enc_req["images"] = {"type": "array", "items": {"enum": images}, "minItems": 1, "maxItems": 3}
    enc_req["model"] = {"enum": tokenizers}
    dec = schemas["DecodeJSONRequest"]
    dec["properties"].update({"shape": {"enum": [tensor["shape"]]}, "data": {"enum": [tensor["data"]]},
                              "dtype": {"enum": ["float32", "float16", "float64"]}, "model": {"enum": tokenizers}})
    schemas["GenerateParams"]["required"] = ["class"]  # optional in the schema (query or body), not for a client
    gen = schemas["GenerateParams"]["properties"]
    gen["class"] = {"enum": classes}
    gen["steps"] = {"type": "integer", "minimum": 1, "maximum": 4}
    gen["num_images"] = {"type": "integer", "minimum": 1, "maximum": 2}
    gen["model"] = {"enum": [g["name"] for g in generators]}
    gen["sampler"] = {"enum": sorted({s for g in generators for s in g["samplers"]})}
    for path, op in ((p, o) for p, ops in spec["paths"].items() for o in ops.values()):
        for param in op.get("parameters", []):
            name, where = param["name"], param["in"]
            if where == "query" and name == "model":
                param["schema"] = {"enum": tokenizers if "generate" not in path else [g["name"] for g in generators]}
            elif where == "query" and name in ("class", "class_id"):
                param["schema"] = {"enum": classes}
            elif where == "query" and name == "steps":
                param["schema"] = {"type": "integer", "minimum": 1, "maximum": 4}
            elif where == "query" and name == "num_images":
                param["schema"] = {"type": "integer", "minimum": 1, "maximum": 2}
            # hypothesis reads `$` as Python does (a trailing newline matches): give header values outright
            elif where == "header" and name == "x-deadline-ms":
                param["schema"] = {"enum": ["60000", "30000.5", "86400000"]}
            elif where == "header" and name == "x-priority":
                param["schema"] = {"enum": ["-100", "0", "7", "+100"]}
            elif name in ("last-event-id", "after"):
                param["schema"] = {"enum": ["1", "2"]}  # in-process event ids
            elif where == "path" and name == "name" and path.startswith("/v2/models/"):
                param["schema"] = {"enum": v2_models}  # Open Inference Protocol model names
    # Open Inference Protocol: one real input tensor of each kind (the model name decides which fit)
    v2 = schemas["V2InferRequest"]["properties"]
    v2["inputs"] = {"type": "array", "minItems": 1, "maxItems": 1, "items": {"enum": [
        {"name": "IMAGE", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": list(range(12))},
        {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": [images[0]]},
        {"name": "TOKENS", "datatype": "FP32", "shape": enc["shape"], "data": enc["data"]},
        {"name": "CLASS", "datatype": "INT64", "shape": [1], "data": [classes[0]]}]}}
    v2["parameters"] = {"type": "object", "additionalProperties": False, "properties": {
        "steps": {"enum": [1, 2]}, "seed": {"type": "integer", "minimum": 0, "maximum": 2**31},
        "binary_data_output": {"type": "boolean"}}}
    v2["outputs"] = {"type": "array", "maxItems": 2, "items": {"type": "object", "required": ["name"],
                     "additionalProperties": False, "properties": {
                         "name": {"enum": ["IMAGE", "IMAGE_BYTES", "TOKENS"]},
                         "parameters": {"type": "object", "additionalProperties": False,
                                        "properties": {"binary_data": {"type": "boolean"}}}}}}
    # a job is the body of a synchronous route plus its op
    op_bodies = []
    for op, ref, extra in (("encode", "EncodeJSONRequest", {}), ("decode", "DecodeJSONRequest", {}),
                           ("generate", "GenerateParams", {"steps": {"enum": [1, 2]}})):
        body = copy.deepcopy(schemas[ref])
        body["properties"] = {**body["properties"], **extra, "op": {"const": op},
                              "priority": {"type": "integer", "minimum": -100, "maximum": 100},
                              "deadline_ms": {"type": "number", "exclusiveMinimum": 1000, "maximum": 86_400_000}}
        body["required"] = sorted({*body.get("required", []), "op"})
        op_bodies.append(body)
    spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {"oneOf": op_bodies}
    spec["paths"]["/v1/generate"]["post"]["requestBody"]["required"] = True  # where the class goes
    return spec


class _Tally:
    """What the fuzzing saw: statuses per operation and mode, failures, a few 422 messages of valid cases."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.per_op: defaultdict[str, Counter[int]] = defaultdict(Counter)
        self.samples: defaultdict[str, list[str]] = defaultdict(list)
        self.failures: list[str] = []
        self.unsatisfiable: list[str] = []
        self.cases = 0


def _error_of(response: Any) -> tuple[str | None, str]:
    """(type, message) of an error body: ``{"error": {"type", "message", ...}}``, or the Open Inference
    Protocol's ``{"error": "<message>"}`` (``/v2``), which carries no type: its 503 / 504 count as an allowed
    kind of that status (its routes raise the same errors), any other 5xx still fails."""
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None, ""
    if isinstance(err, str):
        allowed = sorted(ALLOWED_5XX.get(response.status_code, ()))
        return (allowed[0] if allowed else None), err
    if isinstance(err, dict):
        return err.get("type"), str(err.get("message", ""))
    return None, ""


CHECKS = [response_schema_conformance, status_code_conformance, content_type_conformance]


def _fuzz(op: Any, mode: GenerationMode, url: str, tally: _Tally) -> None:
    from hypothesis import HealthCheck, given, settings

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        tally.cases += 1
        response = case.call(base_url=url, timeout=60)
        where = f"{case.method} {case.path} ({mode.value})"
        tally.statuses[response.status_code] += 1
        tally.per_op[where][response.status_code] += 1
        if response.status_code == 422 and mode == GenerationMode.POSITIVE and len(tally.samples[where]) < 3:
            tally.samples[where].append(_error_of(response)[1][:120])
        if response.status_code >= 500:
            kind, _ = _error_of(response)
            if kind not in ALLOWED_5XX.get(response.status_code, ()):
                tally.failures.append(f"{where}: {response.status_code} {response.text[:300]}\n"
                                      f"  {case.as_curl_command()[:600]}")
                return
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as e:  # a schema mismatch: keep going, report them all
            tally.failures.append(f"{where}: {type(e).__name__}: {str(e)[:400]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # nothing to negate (an operation without inputs)
        tally.unsatisfiable.append(f"{op.method.upper()} {op.path} ({mode.value})")


def test_schema_fuzzing_finds_no_server_error(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        spec = narrowed(client.get("/openapi.json").json(), client)
    schema = schemathesis.openapi.from_dict(spec)
    tally = _Tally()
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(result.ok(), mode, server.url, tally)
    took = time.monotonic() - t0
    print(f"schemathesis: {tally.cases} cases over {len(spec['paths'])} paths in {took:.0f} s; statuses "
          f"{dict(sorted(tally.statuses.items()))}; nothing to generate for {tally.unsatisfiable}")
    for where, counts in tally.per_op.items():
        print(f"  {where}: {dict(sorted(counts.items()))} {tally.samples.get(where, '')}")
    assert not tally.failures, f"{len(tally.failures)} failures:\n" + "\n".join(tally.failures[:30])
    assert tally.cases >= 2000, tally.cases
    assert "Traceback" not in server.log()
