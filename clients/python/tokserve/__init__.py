"""tokserve: the Python SDK of the tokserve image-tokenizer server.

>>> from tokserve import Client
>>> with Client("http://127.0.0.1:8000") as c:          # doctest: +SKIP
...     latents = c.encode("cat.png")                    # Latents: array (1, L, D), model, timings
...     image = c.decode(latents)                        # PIL.Image
...     result = c.generate(207, num_images=4, seed=0)   # GenerateResult: images, seed, latents

The SDK talks HTTP only (docs/API.md); it imports nothing of the server.
"""

from ._images import ImageInput
from ._retry import RetryPolicy
from .async_client import AsyncClient
from .client import Client
from .errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TokserveError,
    UnprocessableError,
)
from .types import DecodeResult, GenerateResult, Latents, ModelInfo, ModelList, Timings

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "DeadlineExceededError",
    "DecodeResult",
    "GenerateResult",
    "ImageInput",
    "Latents",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "RateLimitedError",
    "RetryPolicy",
    "ServerError",
    "Timings",
    "TokserveError",
    "UnprocessableError",
    "__version__",
]
