"""The asynchronous tokserve client.

Mirrors ``client.py`` method by method (same names, parameters and docstrings, awaitable); the request
building and parsing they share lives in ``_protocol.py``. tests/clients checks the signatures stay equal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType

import httpx
import numpy as np
from PIL import Image

from . import _protocol as proto
from ._base import BaseClient
from ._images import ImageInput
from ._protocol import ImageFormat, RequestSpec
from .errors import DeadlineExceededError
from .types import DecodeResult, GenerateResult, Latents, ModelList


class AsyncClient(BaseClient):
    """An asyncio client for a tokserve server (HTTP only; see docs/API.md); use ``async with``.

    Args:
        url: base URL; default ``$TOKSERVE_URL`` or ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``; default ``$TOKSERVE_API_KEY``.
        timeout: seconds to wait for a response (a client timeout raises ``DeadlineExceededError``).
        connect_timeout: seconds to wait for a connection.
        max_retries: retries on connection errors, 429 and 503 (0 disables them); ignored if
            ``retry_policy`` is given.
        retry_policy: full control of backoff, jitter and the longest ``Retry-After`` honoured.
        transport: how tokens travel: ``"npy"`` (default), ``"safetensors"`` or ``"json"``.
        deadline_ms: sent as ``x-deadline-ms`` so the server gives up (504) when the client would.
        headers: extra headers on every request.
        seed: seeds the jitter's random generator (for reproducible tests).
        http_client: an ``httpx.AsyncClient`` (with ``base_url`` set) to use instead of one the client owns.

    Every POST carries an ``Idempotency-Key`` generated per call (or given as ``idempotency_key``) and
    reused by that call's retries, so a retried request runs once on the server.
    """

    _http: httpx.AsyncClient

    def _make_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=self.headers)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the connection pool (only if this client created it)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- transport -------------------------------------------------------------------------------------
    async def send(self, spec: RequestSpec) -> httpx.Response:
        """Send one logical request, retrying per the policy; return the 2xx response or raise."""
        attempt = 0
        while True:
            try:
                resp = await self._http.request(spec.method, spec.path, **self._request_kwargs(spec))  # type: ignore[arg-type]
            except httpx.HTTPError as exc:
                outcome = self._after_exception(exc, attempt)
            else:
                outcome = self._after_response(resp, attempt)
            if outcome.response is not None:
                return outcome.response
            if outcome.error is not None:
                raise outcome.error
            await asyncio.sleep(outcome.delay or 0.0)
            attempt += 1

    # -- API -------------------------------------------------------------------------------------------
    async def encode(
        self,
        image: ImageInput | Sequence[ImageInput],
        *,
        model: str | None = None,
        preprocess: str | None = None,
        idempotency_key: str | None = None,
    ) -> Latents:
        """Encode one image (or a list / a ``(B, H, W, C)`` uint8 array) into latent tokens ``(B, L, D)``.

        ``preprocess`` is ``"center-crop"`` (server default) or ``"resize"``; ``model`` the tokenizer.
        """
        spec = proto.encode_request(
            image,
            model=model,
            preprocess=preprocess,
            transport=self.transport,
            idempotency_key=idempotency_key,
        )
        return proto.parse_encode(await self.send(spec), model)

    async def decode_result(
        self,
        latents: Latents | np.ndarray,
        *,
        model: str | None = None,
        format: ImageFormat = "png",
        idempotency_key: str | None = None,
    ) -> DecodeResult:
        """Decode tokens ``(B, L, D)`` or ``(L, D)`` into images, with the timings and request id."""
        array, own_model = proto.latents_array(latents)
        model = model or own_model
        spec = proto.decode_request(
            array, model=model, image_format=format, transport=self.transport, idempotency_key=idempotency_key
        )
        return proto.parse_decode(await self.send(spec), model)

    async def decode(
        self,
        latents: Latents | np.ndarray,
        *,
        model: str | None = None,
        format: ImageFormat = "png",
        idempotency_key: str | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Decode tokens into a PIL image; a list of images when the batch has ``B > 1`` rows.

        ``latents``: a :class:`Latents` (its model is used unless ``model`` is given) or an array
        ``(B, L, D)`` / ``(L, D)``.
        """
        result = await self.decode_result(
            latents, model=model, format=format, idempotency_key=idempotency_key
        )
        array, _ = proto.latents_array(latents)
        return result.images[0] if array.ndim == 2 or array.shape[0] == 1 else result.images

    async def generate(
        self,
        class_id: int,
        num_images: int = 1,
        *,
        cfg_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        return_latents: bool = False,
        model: str | None = None,
        format: ImageFormat | None = None,
        idempotency_key: str | None = None,
    ) -> GenerateResult:
        """Generate ``num_images`` images of ImageNet class ``class_id``.

        Unset parameters take the model's defaults (``models()``); ``seed`` is random when absent and is
        returned (image ``i`` uses ``seed + i``). ``return_latents`` adds the ``(B, L, D)`` latents.
        """
        spec = proto.generate_request(
            class_id,
            num_images=num_images,
            cfg_scale=cfg_scale,
            guidance_interval=guidance_interval,
            steps=steps,
            sampler=sampler,
            seed=seed,
            image_format=format,
            return_latents=return_latents,
            model=model,
            idempotency_key=idempotency_key,
        )
        return proto.parse_generate(await self.send(spec))

    async def models(self) -> ModelList:
        """The served models with their image size, token shape, classes and defaults."""
        return proto.parse_models(await self.send(proto.models_request()))

    async def health(self) -> bool:
        """``True`` if the server process answers ``GET /healthz`` with 200 (no retries, never raises)."""
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        """``True`` if ``GET /readyz`` answers 200: models loaded and warmed up (no retries, never raises)."""
        return await self._probe("/readyz")

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> None:
        """Block until :meth:`ready`; raise ``DeadlineExceededError`` after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() > end:
                raise DeadlineExceededError(f"{self.url} not ready after {timeout:.0f} s")
            await asyncio.sleep(interval)

    async def _probe(self, path: str) -> bool:
        try:
            return (await self._http.get(path)).status_code == 200
        except httpx.HTTPError:
            return False
