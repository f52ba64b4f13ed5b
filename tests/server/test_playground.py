"""The playground page (``/ui``; ``/`` redirects there) against a live server with the shipped default models
(``weights/default/*``, as ``make serve``) and an API key configured.

The HTTP tests check what the page is made of (package files only, its CSP, the class names route). The
browser test drives the page in headless Chromium from the system (Debian's ``chromium`` package) through
playwright, with ``executable_path`` set to that browser (nothing is downloaded): it enters the API key after
seeing the 401 shown in the page, uploads ``docs/examples/scene.png`` and drops a larger, elongated copy on the page, and checks
that the reconstruction and the token heatmap render (pixels read back from canvases), the shape text, and
that the page preprocesses the original exactly as the server does (``models.preprocess``, pixel for
pixel) and shows the PSNR computed here from the same API answers; then it generates (an invalid request first, whose JSON error must be shown, then 2
samples at 4 steps) and checks the grid's images render and that per-step progress was shown.

Set ``TOKSERVE_PLAYGROUND_SCREENSHOT=docs/playground.png`` to save the README's screenshot from this run (after
one more grid of 8 samples at the default steps).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from server_testkit import REPO, RunningServer, start_server

from models.preprocess import preprocess_image

KEY = "playground-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
SCENE = REPO / "docs" / "examples" / "scene.png"
STATIC = REPO / "server" / "static" / "playground"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHARED_CLASSES = REPO.parent / "shared" / "data" / "imagenet-classes.json"

# The pixels of an <img> (drawn into a canvas) or a <canvas>: size and the number of distinct colours.
PIXELS = """(el) => {
  let canvas = el;
  if (el.tagName === 'IMG') {
    canvas = document.createElement('canvas');
    canvas.width = el.naturalWidth;
    canvas.height = el.naturalHeight;
    if (canvas.width) canvas.getContext('2d').drawImage(el, 0, 0);
  }
  if (!canvas.width || !canvas.height) return {w: 0, h: 0, colours: 0};
  const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  return {w: el.naturalWidth ?? canvas.width, h: el.naturalHeight ?? canvas.height, colours: seen.size};
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(tmp_path_factory.mktemp("playground"), env={"TOKSERVE_MODELS": "", "TOKSERVE_API_KEYS": KEY})
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def models(server: RunningServer) -> dict:
    return httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).json()


def test_page_is_served_from_the_package_and_loads_nothing_from_outside(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        root = c.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui"
        page = c.get("/ui")  # open without a key, like /docs; the API behind it is not
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assets = [r for r in refs if r.startswith("/ui/assets/")]
        assert {a.rsplit("/", 1)[1] for a in assets} == {"playground.js", "playground.css"}
        assert set(refs) - set(assets) == {"/docs", "/redoc", "/metrics", "data:,"}
        for path in ["/ui", *assets]:
            body = c.get(path)
            assert body.status_code == 200 and len(body.content) > 1000, path
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body.text, re.I), f"external URL in {path}"
        for open_route in ("/docs", "/redoc", "/metrics", "/openapi.json", "/healthz"):
            assert c.get(open_route).status_code == 200, open_route
        assert c.get("/v1/classes").status_code == 401  # the API still wants the key
        assert "/ui" not in c.get("/openapi.json").json()["paths"]


def test_package_data_ships_every_playground_file() -> None:
    """A non-editable install keeps only what ``[tool.setuptools.package-data]`` names."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["server"]
    files = sorted(p.relative_to(REPO / "server").as_posix() for p in STATIC.iterdir() if p.is_file())
    assert "static/playground/index.html" in files
    assert [f for f in files if not any(fnmatch(f, g) for g in globs)] == []


def test_class_names_cover_every_served_class(server: RunningServer, models: dict) -> None:
    body = httpx.get(f"{server.url}/v1/classes", headers=AUTH, timeout=30).json()
    names = {c["id"]: c["name"] for c in body["classes"]}
    assert sorted(names) == list(range(1000)) and all(names.values())
    assert names[207] == "golden retriever" and names[1] == "goldfish"
    assert len(set(names.values())) == 1000  # the two duplicate WordNet names are told apart
    for m in models["models"]:
        if m["kind"] == "generator":
            assert m["classes"] and set(m["classes"]) <= set(names)
    if SHARED_CLASSES.exists():  # the same list as the project's data (which is never copied into the repo)
        for c in json.loads(SHARED_CLASSES.read_text()):
            assert names[c["id"]] == c["name"] or names[c["id"]].startswith(c["name"] + " "), c


def canvas_rgb(page, selector: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A canvas's pixels as (H, W, 3) uint8."""
    got = page.eval_on_selector(selector, "c => ({w: c.width, h: c.height, data: Array.from("
                                "c.getContext('2d').getImageData(0, 0, c.width, c.height).data)})")
    return np.array(got["data"], dtype=np.uint8).reshape(got["h"], got["w"], 4)[..., :3]


def reference_psnr(url: str, image: bytes, model: str, size: int, mode: str) -> float:
    """The PSNR the page should show: the same encode -> decode through the API, against the original
    preprocessed by ``models.preprocess`` (what the server does)."""
    enc = httpx.post(f"{url}/v1/encode", params={"model": model, "preprocess": mode},
                     files={"image": ("image.png", image, "image/png")},
                     headers={**AUTH, "accept": "application/x-npy"}, timeout=60)
    assert enc.status_code == 200, enc.text
    dec = httpx.post(f"{url}/v1/decode", params={"model": model}, content=enc.content,
                     headers={**AUTH, "content-type": "application/x-npy", "accept": "image/png"}, timeout=60)
    assert dec.status_code == 200, dec.text
    recon = np.asarray(Image.open(io.BytesIO(dec.content)).convert("RGB"), dtype=np.float64)
    original = preprocess_image(Image.open(io.BytesIO(image)).convert("RGB"), size, mode).astype(np.float64)
    return 10 * math.log10(255**2 / float(np.mean((recon - original) ** 2)))


@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium on PATH (Debian: apt-get install chromium; "
                    ".ci/run installs it when it runs as root): the playground browser test needs one")
def test_playground_in_headless_chromium(server: RunningServer, models: dict, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    specs = {m["name"]: m for m in models["models"]}
    tok = specs[models["default_tokenizer"]]
    gen = specs[models["default_generator"]]
    size = tok["image_size"]
    wide = tmp_path / "wide.png"  # larger and elongated: the page's own centre crop and resize are exercised
    Image.open(SCENE).convert("RGB").resize((200, 131), Image.Resampling.LANCZOS).save(wide)
    requests: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})  # the page's own CSP applies
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/")
            assert page.url == f"{server.url}/ui"

            # no key yet: the API's JSON error is shown, not a blank page
            page.wait_for_selector("#global-error:not([hidden])", timeout=60_000)
            shown = page.inner_text("#global-error")
            assert "401 unauthorized" in shown and "API key" in shown, shown
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_selector("#global-error", state="hidden", timeout=30_000)
            page.wait_for_selector(f"#tokenizer option[value='{tok['name']}']", state="attached")
            assert page.input_value("#tokenizer") == tok["name"]

            # reconstruction of the documented example image
            page.set_input_files("#file-input", str(SCENE))
            page.wait_for_selector("#recon-results[data-state=done]", timeout=120_000)
            recon = page.eval_on_selector("#recon-img", PIXELS)
            assert recon["w"] == size and recon["h"] == size and recon["colours"] > 20, recon
            original = page.eval_on_selector("#orig-canvas", PIXELS)
            assert original["w"] == size and original["colours"] > 20, original
            heat = page.eval_on_selector("#heatmap", PIXELS)
            assert heat["w"] > 0 and heat["colours"] > 20, heat
            L, D = tok["token_shape"]
            assert page.inner_text("#token-shape").startswith(f"tokens (1, {L}, {D}) float32"), \
                page.inner_text("#token-shape")
            want = reference_psnr(server.url, SCENE.read_bytes(), tok["name"], size, "center-crop")
            assert abs(float(page.get_attribute("#psnr", "data-psnr")) - want) < 1e-6
            assert f"PSNR {want:.2f} dB" == page.inner_text("#psnr")

            # a larger elongated image: centre crop, then plain resize, computed in the page as the server does
            drop = page.evaluate_handle("""(b64) => {  // dropped on the drop zone this time
              const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
              const dt = new DataTransfer();
              dt.items.add(new File([bytes], 'wide.png', {type: 'image/png'}));
              return dt;
            }""", base64.b64encode(wide.read_bytes()).decode())
            page.dispatch_event("#drop-zone", "drop", {"dataTransfer": drop})
            page.wait_for_selector("#recon-results[data-state=done]", timeout=120_000)
            for mode in ("center-crop", "resize"):
                if mode == "resize":
                    page.select_option("#preprocess", "resize")  # runs again on the same file
                    page.wait_for_selector("#recon-results[data-state=done]", timeout=120_000)
                expected = preprocess_image(Image.open(wide).convert("RGB"), size, mode)
                assert np.array_equal(canvas_rgb(page, "#orig-canvas"), expected), mode  # Pillow's pixels exactly
                want = reference_psnr(server.url, wide.read_bytes(), tok["name"], size, mode)
                assert abs(float(page.get_attribute("#psnr", "data-psnr")) - want) < 1e-6, mode

            # a discrete tokenizer: its integer codes as the heatmap
            discrete = [m for m in models["models"] if m["kind"] == "tokenizer" and m["token_dtype"] == "int64"]
            if discrete:
                d = discrete[0]
                page.select_option("#tokenizer", d["name"])
                page.wait_for_selector("#recon-results[data-state=done]", timeout=120_000)
                shape = ", ".join(str(n) for n in [1, *d["token_shape"]])
                assert page.inner_text("#token-shape").startswith(f"codes ({shape}) int64")
                assert page.eval_on_selector("#heatmap", PIXELS)["colours"] > 20
                assert page.eval_on_selector("#recon-img", PIXELS)["colours"] > 20
                page.select_option("#tokenizer", tok["name"])
                page.select_option("#preprocess", "center-crop")
                page.set_input_files("#file-input", str(SCENE))
                page.wait_for_selector("#recon-results[data-state=done]", timeout=120_000)

            # generation: an invalid request shows the API's error, then two samples at 4 steps
            page.select_option("#generator", gen["name"])
            assert page.input_value("#class-id") and page.locator("#class-id option").count() == len(gen["classes"])
            page.fill("#steps", "100000")
            page.fill("#num-samples", "1")
            page.click("#gen-button")
            page.wait_for_selector("#grid[data-state=done]", timeout=60_000)
            assert page.get_attribute(".cell", "data-state") == "failed"
            shown = page.inner_text("#gen-error")
            assert shown.startswith("422 invalid_value:") and "steps" in shown, shown

            page.evaluate("""() => {
              window.captions = [];
              new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes)
                window.captions.push(n.textContent); }).observe(document.getElementById('grid'),
                {childList: true, subtree: true, characterData: true});
            }""")
            page.fill("#steps", "4")
            page.fill("#num-samples", "2")
            page.fill("#seed", "3")
            page.click("#gen-button")
            page.wait_for_selector("#grid[data-state=running]", timeout=10_000)
            page.wait_for_selector("#grid[data-state=done]", timeout=300_000)
            assert page.is_hidden("#gen-error")
            states = page.eval_on_selector_all(".cell", "cells => cells.map(c => c.dataset.state)")
            assert states == ["done", "done"], page.inner_text("#grid")
            for i in (1, 2):
                px = page.eval_on_selector(f".cell:nth-child({i}) img", PIXELS)
                assert px["w"] == gen["image_size"] and px["colours"] > 20, px
            captions = page.evaluate("() => window.captions")
            assert any(re.fullmatch(r"seed [34]: step \d+ / \d+", c) for c in captions), captions

            assert page.is_hidden("#global-error") and page.is_hidden("#recon-error")
            assert errors == []
            outside = [u for u in requests if not u.startswith((server.url, "data:", "blob:"))]
            assert outside == [], outside
            shot = os.environ.get("TOKSERVE_PLAYGROUND_SCREENSHOT")
            if shot:  # the README's picture: a full grid at the generator's default steps
                page.fill("#steps", str(gen["defaults"]["steps"]))
                page.fill("#num-samples", "8")
                page.fill("#seed", "0")
                page.click("#gen-button")
                page.wait_for_selector("#grid[data-state=running]", timeout=10_000)
                page.wait_for_selector("#grid[data-state=done]", timeout=300_000)
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
