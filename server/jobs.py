"""The jobs API's work, apart from HTTP: turn a ``POST /v1/jobs`` JSON body (the JSON body of a synchronous
route plus ``op``) into a validated request and what its result is rendered with.

Validation is the synchronous routes' own (:mod:`server.validation`: ``valid_encode_json``,
``valid_decode_json``, ``valid_generate``) and so is rendering (:func:`server.render.job_result`), so a body
valid for ``POST /v1/<op>`` is valid here and gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import InvalidValue
from server.queue.base import OPS
from server.schemas import JobControl
from server.state import AppState
from server.validation import (
    ValidDecode,
    ValidEncode,
    ValidGenerate,
    valid_decode_json,
    valid_encode_json,
    valid_generate,
)

JOB_FIELDS = tuple(JobControl.model_fields)  # what a jobs body adds to a synchronous route's body


@dataclass
class Prepared:
    """A validated job: the request, and the metadata its result is rendered with (``Job.meta``)."""

    op: str
    request: ValidEncode | ValidDecode | ValidGenerate
    meta: dict[str, Any]

    @property
    def model(self) -> str:
        return self.request.model


async def prepare(op: object, body: dict[str, Any], state: AppState, idempotency_key: str | None) -> Prepared:
    """Validate ``body`` (without the jobs fields) as the JSON body of ``POST /v1/<op>``."""
    if op not in OPS:
        raise InvalidValue(f"op must be one of {list(OPS)}, got {op!r}")
    if op == "encode":
        enc = await valid_encode_json(state, body)
        return Prepared("encode", enc, {"model": enc.model})
    if op == "decode":
        dec = await valid_decode_json(state, body)
        return Prepared("decode", dec, {"model": dec.model, "format": dec.format})
    gen = valid_generate(state, body, idempotency_key)
    return Prepared("generate", gen, {"generate": gen.summary(), "format": gen.format or "png"})
