"""The synchronous tokserve client."""

from __future__ import annotations

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


class Client(BaseClient):
    """A blocking client for a tokserve server (HTTP only; see docs/API.md).

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
        http_client: an ``httpx.Client`` to use instead of one the client owns.

    Every POST carries an ``Idempotency-Key`` generated per call (or given as ``idempotency_key``) and
    reused by that call's retries, so a retried request runs once on the server.
    """

    _http: httpx.Client

    def _make_http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self.timeout, headers=self.headers)

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection pool (only if this client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------
    def send(self, spec: RequestSpec) -> httpx.Response:
        """Send one logical request, retrying per the policy; return the 2xx response or raise."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(spec.method, spec.path, **self._request_kwargs(spec))  # type: ignore[arg-type]
            except httpx.HTTPError as exc:
                outcome = self._after_exception(exc, attempt)
            else:
                outcome = self._after_response(resp, attempt)
            if outcome.response is not None:
                return outcome.response
            if outcome.error is not None:
                raise outcome.error
            time.sleep(outcome.delay or 0.0)
            attempt += 1

    # -- API -------------------------------------------------------------------------------------------
    def encode(
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
        return proto.parse_encode(self.send(spec), model)

    def decode_result(
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
        return proto.parse_decode(self.send(spec), model)

    def decode(
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
        result = self.decode_result(latents, model=model, format=format, idempotency_key=idempotency_key)
        array, _ = proto.latents_array(latents)
        return result.images[0] if array.ndim == 2 or array.shape[0] == 1 else result.images

    def generate(
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
        return proto.parse_generate(self.send(spec))

    def models(self) -> ModelList:
        """The served models with their image size, token shape, classes and defaults."""
        return proto.parse_models(self.send(proto.models_request()))

    def health(self) -> bool:
        """``True`` if the server process answers ``GET /healthz`` with 200 (no retries, never raises)."""
        return self._probe("/healthz")

    def ready(self) -> bool:
        """``True`` if ``GET /readyz`` answers 200: models loaded and warmed up (no retries, never raises)."""
        return self._probe("/readyz")

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> None:
        """Block until :meth:`ready`; raise ``DeadlineExceededError`` after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > end:
                raise DeadlineExceededError(f"{self.url} not ready after {timeout:.0f} s")
            time.sleep(interval)

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path).status_code == 200
        except httpx.HTTPError:
            return False
