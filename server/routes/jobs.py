"""The jobs API (long work, both queue backends): POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/events
(server-sent events, replayed after ``Last-Event-ID``), POST /v1/jobs/{id}/cancel."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import jobs, render
from server.deps import OptionsDep, StateDep
from server.errors import BadRequest, InvalidValue, NotFound, NotReady, TokservError
from server.queue.base import TERMINAL, Job, JobQueue
from server.routes.common import read_json, request_body, schema_ref
from server.schemas import ERROR_RESPONSES, JobAccepted, JobResponse
from server.state import AppState
from server.validation import parse_deadline_ms, parse_priority

router = APIRouter()
KEEPALIVE_S = 15.0
SSE_RETRY_MS = 1000

_BODY = request_body({"application/json": schema_ref("JobRequest")})


def _queue(state: AppState) -> JobQueue:
    if state.queue is None:
        raise NotReady("the server is starting", retry_after=state.settings.retry_after_s)
    return state.queue


@router.post("/v1/jobs", status_code=202, openapi_extra=_BODY, summary="Submit a job (202 + id)",
             responses={**ERROR_RESPONSES, 202: {"model": JobAccepted, "description": "accepted; Location: the job"}})
async def create_job(request: Request, state: StateDep, opts: OptionsDep) -> JSONResponse:
    """Accept a job and answer at once with its id; follow it with ``GET /v1/jobs/{id}`` or its events.
    With an ``Idempotency-Key`` a repeated submission returns the first job (it runs once)."""
    queue = state.check_ready()
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object with an \"op\" field")
    fields = {k: body.pop(k) for k in jobs.JOB_FIELDS if k in body}
    priority = parse_priority(fields["priority"]) if "priority" in fields else opts.priority
    deadline = opts.deadline
    if fields.get("deadline_ms") is not None:  # null: as absent (x-deadline-ms, else the default)
        deadline = time.time() + parse_deadline_ms(fields["deadline_ms"])
    key = None if opts.idempotency_key is None else f"jobs:{opts.idempotency_key}"
    p = await jobs.prepare(fields.get("op"), body, state, opts.idempotency_key)
    request.scope.setdefault("state", {})["model"] = p.model
    job = Job(model=p.model, payload=p.request.payload(), request_id=opts.request_id, deadline=deadline,
              idempotency_key=key, fingerprint=p.request.fingerprint(), priority=priority, tracked=True,
              meta=p.meta)
    job_id = await queue.enqueue(job)
    info = await queue.info(job_id)
    status = info.status if info is not None else "queued"
    links = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events",
             "cancel": f"/v1/jobs/{job_id}/cancel"}
    return JSONResponse({"id": job_id, "op": p.op, "model": p.model, "status": status, "priority": priority,
                         "links": links}, status_code=202, headers={"Location": links["self"]})


JobId = Annotated[str, Path(max_length=128, description="the id POST /v1/jobs returned")]


@router.get("/v1/jobs/{job_id}", response_model=JobResponse, responses=ERROR_RESPONSES,
            summary="A job's status and result")
async def get_job(job_id: JobId, state: StateDep) -> JSONResponse:
    info = await _queue(state).info(job_id)
    if info is None:
        raise NotFound(f"no job {job_id!r} (unknown, or expired after {state.settings.job_ttl_s:.0f} s)")
    result = None
    if info.result is not None:
        cost = sum(t.numel() for t in info.result.tensors.values())
        result = await state.codec(render.job_result, info, state.settings, cost=cost)
    return JSONResponse(render.job_body(info, result))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobResponse, responses=ERROR_RESPONSES,
             summary="Cancel a job")
async def cancel_job(job_id: JobId, state: StateDep) -> JSONResponse:
    """A queued job never runs; a running generation leaves its batch at the next step. A job that already
    ended is left as it is (its status says which)."""
    queue = _queue(state)
    before = await queue.info(job_id)
    info = await queue.cancel(job_id)
    if info is None:
        raise NotFound(f"no job {job_id!r}")
    if before is not None and before.status not in TERMINAL and info.status == "cancelled":
        state.metrics.cancelled.labels(info.op, "api").inc()
    return JSONResponse(render.job_body(info))


EVENT_ID = r"^[0-9]{1,20}(-[0-9]{1,20})?$"  # in-process: 1, 2, 3 ...; Redis: <ms>-<seq>
EventId = Annotated[str | None, Header(max_length=64, pattern=EVENT_ID,
                                       description="the last event id seen (resume after it)")]


@router.get("/v1/jobs/{job_id}/events", responses={**ERROR_RESPONSES, 200: {
    "description": "text/event-stream: queued, started, step (step i of n), completed | failed | cancelled",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}, summary="A job's events (server-sent events)")
async def job_events(job_id: JobId, state: StateDep, last_event_id: EventId = None,
                     after: Annotated[str | None, Query(max_length=64, pattern=EVENT_ID,
                                                        description="like Last-Event-ID")] = None,
                     ) -> StreamingResponse:
    """Every event of the job after ``Last-Event-ID`` (or ``after``; all when absent), then the new ones as
    they happen; the stream ends after the terminal event. Reconnect with the last id seen to resume."""
    queue = _queue(state)
    start = last_event_id or after
    if start is not None and not queue.valid_event_id(start):
        raise InvalidValue(f"Last-Event-ID / after {start[:64]!r} is not an event id of this server (ids are "
                           "the `id:` lines of the stream)")
    first = await queue.events(job_id, start, 0.0)
    if first is None:
        raise NotFound(f"no job {job_id!r}")
    return StreamingResponse(_stream(queue, job_id, start, first), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(event_id: str, type_: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(queue: JobQueue, job_id: str, after: str | None, first: list[Any]) -> AsyncIterator[str]:
    yield f"retry: {SSE_RETRY_MS}\n\n"
    batch = first
    try:
        while True:
            for e in batch:
                yield _sse(e.id, e.type, e.data)
                after = e.id
                if e.terminal:
                    return
            if not batch:
                info = await queue.info(job_id)
                if info is None or info.status in TERMINAL:
                    return
                yield ": keep-alive\n\n"
            got = await queue.events(job_id, after, KEEPALIVE_S)
            if got is None:
                return
            batch = got
    except TokservError:
        return  # the backend is unreachable: end the stream; the client resumes with Last-Event-ID
