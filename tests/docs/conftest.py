"""The docs test's summary: how many documentation blocks ran and which were skipped, with their reasons."""

from __future__ import annotations

import pytest

DOCS_TEST = "tests/docs/test_docs_blocks.py::test_docs_block"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    def ours(key: str) -> list[pytest.TestReport]:
        return [r for r in terminalreporter.stats.get(key, ()) if getattr(r, "nodeid", "").startswith(DOCS_TEST)
                and r.when in ("call", "setup")]

    passed, failed, skipped = ours("passed"), ours("failed") + ours("error"), ours("skipped")
    if not (passed or failed or skipped):
        return
    tr = terminalreporter
    tr.section("documentation blocks")
    tr.write_line(f"docs blocks: {len(passed) + len(failed)} ran ({len(passed)} passed, {len(failed)} failed), "
                  f"{len(skipped)} skipped")
    for r in skipped:
        where = r.nodeid.split("[", 1)[-1].rstrip("]")
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        reason = reason.removeprefix("Skipped: ").removeprefix(f"{where}: ")
        tr.write_line(f"  skipped {where}: {reason}")
    for r in failed:
        tr.write_line(f"  FAILED {r.nodeid.split('[', 1)[-1].rstrip(']')}")
