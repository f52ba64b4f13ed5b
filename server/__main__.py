"""``python -m server [--host H] [--port P] ...``: the API with an embedded worker (= ``tokserve serve``)."""

from __future__ import annotations

import sys

from server.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    raise SystemExit(main(argv if argv[:1] in (["serve"], ["worker"]) else ["serve", *argv]))
