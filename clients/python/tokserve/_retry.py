"""Retry policy shared by the sync and async clients: what to retry, and how long to wait."""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({429, 503})

# Transport failures after which retrying is safe: the request never reached the server, or the
# connection broke before an answer (the idempotency key makes a repeat return the first result).
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, honouring ``Retry-After``.

    Attempt ``n`` (0-based) waits ``min(max_delay, initial_delay * 2**n)``, scaled by a random factor in
    ``[1 - jitter, 1]``. When the server sent ``Retry-After`` the wait is that value (capped at
    ``max_retry_after``) plus up to ``jitter * 10%`` of it, so synchronised clients spread out.

    Attributes:
        max_retries: retries after the first attempt (0 disables retrying).
        initial_delay, max_delay: backoff bounds in seconds.
        jitter: fraction of the delay that is randomised (0 = none, 1 = "full jitter").
        max_retry_after: the longest ``Retry-After`` honoured; a longer one is not waited for (the error is
            raised at once), so a client is never parked for minutes.
    """

    max_retries: int = 3
    initial_delay: float = 0.25
    max_delay: float = 8.0
    jitter: float = 0.5
    max_retry_after: float = 60.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry ``attempt + 1`` when the server gave no ``Retry-After``."""
        r = (rng or random).random()
        base = min(self.max_delay, self.initial_delay * (2.0**attempt))
        return base * (1.0 - self.jitter * r)

    def delay(
        self, attempt: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` if no retry should happen."""
        if attempt >= self.max_retries:
            return None
        if retry_after is None:
            return self.backoff(attempt, rng)
        if retry_after > self.max_retry_after:
            return None
        r = (rng or random).random()
        return retry_after * (1.0 + 0.1 * self.jitter * r)
