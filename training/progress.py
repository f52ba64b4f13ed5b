"""Progress bars for the long steps of the training commands: image loading, latent encoding, evaluation.

``progress(total=..., desc=...)`` is a tqdm bar on stderr (stdout stays for results: the evaluation
commands print their JSON there). Where it draws depends on ``TOKSERVE_PROGRESS``:

* ``auto`` (default): a live bar when stderr is a terminal, else ``log``;
* ``tqdm``: always the live bar (carriage returns);
* ``log``: whole plain lines, one at the start, then at most one every ``TOKSERVE_PROGRESS_INTERVAL``
  seconds (default 5), and one at the end: a nohup or CI log gets a few readable lines instead of
  thousands of carriage returns;
* ``none``: nothing.

``desc=None`` gives a disabled bar (same methods, no output), so a helper can take an optional ``desc``
and always call ``update``. The training loop's own per-step display is ``run.progress`` (training/trainer.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

MODES = ("auto", "tqdm", "log", "none")


def mode() -> str:
    """The effective mode: ``tqdm``, ``log`` or ``none`` (``auto`` resolved against stderr)."""
    m = os.environ.get("TOKSERVE_PROGRESS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"TOKSERVE_PROGRESS={m!r}: use one of {MODES}")
    if m == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return "tqdm" if isatty is not None and isatty() else "log"
    return m


def log_interval() -> float:
    return float(os.environ.get("TOKSERVE_PROGRESS_INTERVAL", "5"))


class LineBar(tqdm):
    """tqdm writing whole lines (no carriage returns, no terminal control): for logs and pipes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line (close with leave=False): nothing to clear in a log
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        return False

    def close(self) -> None:
        if not self.disable and hasattr(self, "last_print_n") and self.n != self.last_print_n:
            self._ema_dt = lambda: None  # the final line: the overall rate, not the recent one
            self.display()
        self.leave = False  # already printed: tqdm's own close adds only a newline
        super().close()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None,
             unit: str = "img", initial: int = 0, **kwargs: Any) -> tqdm:
    """A bar over ``iterable`` or one advanced with ``update(n)`` (see the module docstring for where it draws)."""
    m = mode()
    common = dict(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, **kwargs)
    if desc is None or m == "none":
        return tqdm(iterable, disable=True, **common)
    if m == "log":
        return LineBar(iterable, mininterval=log_interval(), maxinterval=max(log_interval(), 10.0), ascii=True,
                       ncols=100, **common)
    return tqdm(iterable, dynamic_ncols=True, **common)


def note(text: str) -> None:
    """One status line on stderr (beside the bars), e.g. a cache reused."""
    print(text, file=sys.stderr, flush=True)
