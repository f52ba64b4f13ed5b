"""The HTTP server process of ``tokserve serve``: uvicorn, with the app's drain on the first signal.

uvicorn alone closes its listening socket on SIGTERM, waits for open connections, and only then runs the
app's lifespan shutdown (which waits again): new requests get "connection refused", and work that outlives
its timeout gets uvicorn's plain-text 500. Here the first SIGTERM / SIGINT runs
:func:`server.app.shutdown` while the socket stays open (new requests: JSON 503 + Retry-After; accepted ones
finish within ``SHUTDOWN_GRACE_S`` or are answered 503), then uvicorn stops with nothing left to wait for.
A second signal stops at once. A fatal start-up error (models that cannot load) stops the server too.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import uvicorn

from server.app import shutdown


class DrainingServer(uvicorn.Server):
    _loop: asyncio.AbstractEventLoop | None = None
    _draining = False

    async def serve(self, sockets: Any = None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.config.app.state.tokserve.request_exit = lambda: loop.call_soon_threadsafe(self._exit)
        await super().serve(sockets)

    def _exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining or self._loop is None or not self.started:
            if self._draining and sig == signal.SIGINT:
                self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised once stopped, as uvicorn does
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        task = asyncio.ensure_future(shutdown(self.config.app.state.tokserve))
        task.add_done_callback(lambda _: self._exit())
