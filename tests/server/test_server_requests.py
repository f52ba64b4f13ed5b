"""The request layer over real HTTP: query and body make one ``Valid*`` request (merged by field), the OpenAPI
query parameters and bodies are the pydantic models' fields and the server takes what they allow, and the
jobs API renders a result as the synchronous route does (one render module, the same quality settings)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from server_testkit import ThreadServer

from server.jobs import JOB_FIELDS
from server.schemas import GenerateParams, GenerateQuery


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadServer]:
    # a low WebP quality, so an answer encoded without the settings' quality could not pass for one encoded with
    with ThreadServer(max_wait_ms=2.0, webp_quality=20) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=60.0) as c:
        yield c


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _job_result(client: httpx.Client, body: dict[str, object]) -> dict[str, object]:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    end = time.monotonic() + 60
    while time.monotonic() < end:
        job = client.get(r.json()["links"]["self"]).json()
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "completed", job
            return job["result"]
        time.sleep(0.05)
    raise AssertionError("the job did not finish in 60 s")


def test_query_and_body_merge_by_field_the_body_winning(client: httpx.Client) -> None:
    alone = client.post("/v1/generate", json={"class": 207, "seed": 4, "steps": 2}).json()
    # the body's "class" replaces the query's class / class_id, whichever spelling each side used
    for query, body in (("class=1&steps=2", {"class": 207, "seed": 4}),
                        ("class_id=1&steps=2&seed=9", {"class": 207, "seed": 4}),
                        ("class=1&seed=4", {"class_id": 207, "steps": 2})):
        r = client.post(f"/v1/generate?{query}", json=body)
        assert r.status_code == 200, (query, body, r.text)
        got = r.json()
        assert (got["class"], got["seed"], got["steps"]) == (207, 4, 2), (query, body)
        assert got["images"][0]["data"] == alone["images"][0]["data"]
    # what the query alone gives is the query's
    q = client.post("/v1/generate?class=207&seed=4&steps=2").json()
    assert q["images"][0]["data"] == alone["images"][0]["data"]
    # the body is checked as GenerateParams: a wrong field is named, a query value it overrides is not used
    bad = client.post("/v1/generate?class=207&steps=2", json={"steps": "many"})
    assert bad.status_code == 422 and "steps" in bad.json()["error"]["message"], bad.text
    repeated = client.post("/v1/generate?class=207&class=3&steps=2")
    assert repeated.status_code == 422 and "given 2 times" in repeated.json()["error"]["message"]


def test_openapi_query_parameters_are_the_models_fields_and_all_accepted(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    gen = spec["paths"]["/v1/generate"]["post"]
    documented = {p["name"]: p for p in gen["parameters"] if p["in"] == "query"}
    fields = GenerateQuery.model_json_schema()["properties"]
    assert set(documented) == set(fields) and "class" in documented
    for name, p in documented.items():  # each parameter's schema is its field's
        assert p["schema"]["description"] == fields[name]["description"], name
    body = spec["components"]["schemas"]["GenerateParams"]["properties"]
    assert set(body) == set(fields) | {"guidance_interval"} == set(GenerateParams.model_json_schema()["properties"])
    # every documented query parameter is one the server takes (checked for its value, not refused as unknown)
    for path in ("/v1/encode", "/v1/decode", "/v1/generate"):
        names = [p["name"] for p in spec["paths"][path]["post"]["parameters"] if p["in"] == "query"]
        assert names, path
        for name in [*names, "class_id"] if path == "/v1/generate" else names:
            r = client.post(f"{path}?{name}=%00", content=b"")
            assert r.status_code in (400, 404, 415, 422), (path, name, r.text)
            assert "unknown query parameter" not in r.json()["error"]["message"], (path, name)
    r = client.post("/v1/generate?guidance_interval=0.1", json={"class": 207})
    assert r.status_code == 422 and "unknown query parameter" in r.json()["error"]["message"]


def test_a_job_renders_its_result_as_the_synchronous_route(client: httpx.Client) -> None:
    params = {"class": 207, "num_images": 2, "seed": 11, "steps": 2, "format": "webp"}
    sync = client.post("/v1/generate", json=params)
    assert sync.status_code == 200 and sync.headers["x-seed"] == "11"
    job = _job_result(client, {"op": "generate", **params})
    strip = {k: v for k, v in sync.json().items() if k != "images"}
    assert {k: v for k, v in job.items() if k != "images"} == strip
    for a, b in zip(job["images"], sync.json()["images"], strict=True):  # type: ignore[arg-type]
        assert (a["seed"], a["format"]) == (b["seed"], b["format"])
        ours, theirs = base64.b64decode(a["data"]), base64.b64decode(b["data"])
        assert ours[:4] == b"RIFF" and ours[8:12] == b"WEBP"
        # the same pixels, encoded at the same quality: within a level (batch-mates) and of the same size class
        assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 3
        assert abs(len(ours) - len(theirs)) <= 0.1 * len(theirs)

    latents = client.post("/v1/generate", json={**params, "return_latents": True}).json()["latents"]
    tokens = {"shape": latents["shape"], "dtype": "float32", "data": latents["data"]}
    arr = client.post("/v1/decode?format=npy", json=tokens)
    assert arr.status_code == 200 and arr.headers["content-type"] == "application/x-npy"
    expected = np.load(io.BytesIO(arr.content))
    npy_job = _job_result(client, {"op": "decode", **tokens, "format": "npy"})
    assert npy_job["format"] == "npy" and npy_job["array"]["shape"] == list(expected.shape)  # type: ignore[index]
    got = np.asarray(npy_job["array"]["data"], np.float32).reshape(expected.shape)  # type: ignore[index]
    assert expected.min() >= -1.0 and expected.max() <= 1.0
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_the_jobs_body_schema_is_each_synchronous_body_plus_the_job_fields(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobRequest"}
    job = schemas["JobRequest"]
    assert job["discriminator"]["propertyName"] == "op" and len(job["oneOf"]) == 3
    for op, sync in (("encode", "EncodeJSONRequest"), ("decode", "DecodeJSONRequest"), ("generate", "GenerateParams")):
        one = schemas[job["discriminator"]["mapping"][op].rsplit("/", 1)[1]]
        assert set(one["properties"]) == set(schemas[sync]["properties"]) | set(JOB_FIELDS), op
        assert one["properties"]["op"]["const"] == op and "op" in one["required"]
        assert one["additionalProperties"] is False
    # the server takes what the schema allows, and refuses what it does not
    priority = schemas["GenerateJob"]["properties"]["priority"]
    deadline = schemas["GenerateJob"]["properties"]["deadline_ms"]["anyOf"][0]
    ok = {"op": "generate", "class": 207, "steps": 1, "seed": 1}
    for fields in ({"priority": priority["maximum"], "deadline_ms": deadline["maximum"]},
                   {"priority": priority["minimum"], "deadline_ms": None}):
        r = client.post("/v1/jobs", json={**ok, **fields})
        assert r.status_code == 202, (fields, r.text)
    for fields in ({"priority": priority["maximum"] + 1}, {"deadline_ms": deadline["maximum"] + 1},
                   {"deadline_ms": 0}, {"priority": None}):
        r = client.post("/v1/jobs", json={**ok, **fields})
        assert r.status_code == 422 and next(iter(fields)) in r.json()["error"]["message"], (fields, r.text)
