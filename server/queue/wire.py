"""Jobs and results as bytes, for queue backends that cross processes (Redis Streams).

Frame: ``u32 little-endian header length | JSON header | safetensors blob``. The JSON header carries every
non-tensor field; tensors go in the safetensors blob (no pickle anywhere, so a message cannot run code).
The in-process backend passes objects directly and never calls this module.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.sampling.base import SampleRequest
from server.queue.base import DecodePayload, EncodePayload, GeneratePayload, Job, JobResult, Payload

FORMAT_VERSION = 1


def _frame(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return struct.pack("<I", len(head)) + head + blob


def _unframe(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if len(data) < 4:
        raise ValueError("truncated message")
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + n])
    if header.get("v") != FORMAT_VERSION:
        raise ValueError(f"unsupported message version {header.get('v')!r}")
    return header, st_load(data[4 + n:])


def _payload_parts(p: Payload) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(p, EncodePayload):
        return {"op": "encode"}, {"images": p.images}
    if isinstance(p, DecodePayload):
        return {"op": "decode"}, {"tokens": p.tokens}
    return ({"op": "generate", "return_latents": p.return_latents,
             "requests": [dataclasses.asdict(r) for r in p.requests]}, {})


def _payload_from(h: dict[str, Any], t: dict[str, torch.Tensor]) -> Payload:
    op = h["op"]
    if op == "encode":
        return EncodePayload(images=t["images"])
    if op == "decode":
        return DecodePayload(tokens=t["tokens"])
    if op == "generate":
        return GeneratePayload(requests=[SampleRequest(**r) for r in h["requests"]],
                               return_latents=bool(h["return_latents"]))
    raise ValueError(f"unknown op {op!r}")


_JOB_FIELDS = ("model", "request_id", "id", "submitted_at", "deadline", "idempotency_key", "fingerprint",
               "taken_at")
_OPTIONAL_FIELDS = {"priority": 0, "tracked": False, "meta": {}}  # added later: absent in older messages


def job_to_bytes(job: Job) -> bytes:
    payload, tensors = _payload_parts(job.payload)
    header = {"v": FORMAT_VERSION, "payload": payload, **{f: getattr(job, f) for f in (*_JOB_FIELDS,
                                                                                     *_OPTIONAL_FIELDS)}}
    return _frame(header, tensors)


def job_from_bytes(data: bytes) -> Job:
    header, tensors = _unframe(data)
    optional = {f: header.get(f, default) for f, default in _OPTIONAL_FIELDS.items()}
    optional["meta"] = dict(optional["meta"])
    return Job(payload=_payload_from(header["payload"], tensors), **{f: header[f] for f in _JOB_FIELDS},
               **optional)


def result_to_bytes(result: JobResult) -> bytes:
    header = {"v": FORMAT_VERSION, "queue_ms": result.queue_ms, "compute_ms": result.compute_ms}
    return _frame(header, result.tensors)


def result_from_bytes(data: bytes) -> JobResult:
    header, tensors = _unframe(data)
    return JobResult(tensors=tensors, queue_ms=header["queue_ms"], compute_ms=header["compute_ms"])
