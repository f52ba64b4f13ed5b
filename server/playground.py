"""The playground page: ``GET /ui`` (``GET /`` redirects there), plain HTML / JS / CSS shipped in the package
(``server/static/playground/``, served under ``/ui/assets/``): no build step, no CDN, no external fonts.

It talks to the public API only (``/v1/models``, ``/v1/classes``, ``/v1/encode``, ``/v1/decode``, ``/v1/jobs``
and its events), with the API key from its key field as ``Authorization: Bearer``; the page itself is open,
like ``/docs``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_DIR = Path(__file__).resolve().parent / "static" / "playground"
PAGE = "/ui"
ASSETS = "/ui/assets"
# everything from this server; images shown from blob: / data: URLs the page makes itself
CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
       "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'")


def playground_html() -> str:
    return (PLAYGROUND_DIR / "index.html").read_text(encoding="utf-8")


def install_playground(app: FastAPI) -> None:
    """Wire ``/`` (307 to ``/ui``), ``/ui`` (the page) and ``/ui/assets/*`` (its script and style)."""
    if not (PLAYGROUND_DIR / "index.html").is_file():
        raise RuntimeError(f"the playground files are missing from the package ({PLAYGROUND_DIR})")
    app.mount(ASSETS, StaticFiles(directory=PLAYGROUND_DIR), name="playground-assets")

    async def page() -> HTMLResponse:
        return HTMLResponse(playground_html(), headers={"content-security-policy": CSP,
                                                        "cache-control": "no-cache"})

    async def root() -> RedirectResponse:
        return RedirectResponse(PAGE, status_code=307)

    app.add_api_route(PAGE, page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
