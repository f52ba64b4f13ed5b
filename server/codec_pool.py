"""The threads that run CPU-bound codec work off the event loop (image decode / encode, tensor parsing,
response rendering), with a lane that large work cannot block.

    pool = CodecPool(threads=2)
    await pool.run(cost, fn, *args)        # cost: about the bytes of work (decoded pixels x 3, body bytes)

``threads`` general threads take every task in arrival order. One more thread takes only *light* tasks
(``cost <= light_cost``): a small JPEG or a tensor response never waits behind the decode of a 4096x4096
PNG, whatever arrives in a burst. Pure Python and clock-free, so it is tested without a server.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

log = logging.getLogger("tokserve.codec")

LIGHT_COST = 4 << 20  # bytes of work: a 1-megapixel RGB image, a 4 MiB body


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: hands freed heap pages back to the OS (after large decodes the allocator
    otherwise keeps them, and the process stays hundreds of MB larger after a burst). A no-op elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        return lambda: None
    fn.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        fn(0)

    return trim


class CodecPool:
    def __init__(self, threads: int, light_cost: int = LIGHT_COST, name: str = "tokserve-codec") -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.light_cost = light_cost
        self._tasks: deque[tuple[Future[Any], Callable[[], Any], bool]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._heavy_running = 0
        self._trim = _malloc_trim()
        self._threads = [threading.Thread(target=self._work, args=(False,), name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        self._threads.append(threading.Thread(target=self._work, args=(True,), name=f"{name}-light", daemon=True))
        for t in self._threads:
            t.start()

    def submit(self, cost: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the codec pool is shut down")
            self._tasks.append((future, partial(fn, *args, **kwargs), cost <= self.light_cost))
            self._cond.notify_all()
        return future

    async def run(self, cost: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.submit(cost, fn, *args, **kwargs))

    def queued(self) -> int:
        with self._cond:
            return len(self._tasks)

    def _next(self, light_only: bool) -> tuple[Future[Any], Callable[[], Any], bool] | None:
        """The oldest task this thread may take (the light thread: the oldest light one); None when closed."""
        with self._cond:
            while True:
                if light_only:
                    for i, task in enumerate(self._tasks):
                        if task[2]:
                            del self._tasks[i]
                            return task
                elif self._tasks:
                    return self._tasks.popleft()
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self, light_only: bool) -> None:
        while (task := self._next(light_only)) is not None:
            future, fn, light = task
            if not future.set_running_or_notify_cancel():
                continue
            if not light:
                with self._cond:
                    self._heavy_running += 1
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: B036 - delivered to the awaiting request
                future.set_exception(e)
            finally:
                if not light:
                    with self._cond:
                        self._heavy_running -= 1
                        idle = self._heavy_running == 0 and not any(not t[2] for t in self._tasks)
                    if idle:  # the last large task of a burst: give its memory back
                        self._trim()

    def shutdown(self, cancel_futures: bool = True) -> None:
        """Stop taking tasks (queued ones are cancelled); running ones finish in their daemon threads."""
        with self._cond:
            self._closed = True
            if cancel_futures:
                while self._tasks:
                    self._tasks.popleft()[0].cancel()
            self._cond.notify_all()
