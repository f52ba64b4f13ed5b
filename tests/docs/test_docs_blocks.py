"""Every fenced ``bash`` / ``sh`` / ``python`` block of the user-facing Markdown, run as written.

The blocks run against one live server with the shipped default models (``weights/default/*``), each in a
fresh folder that mirrors the repository root (``weights``, ``configs``, ``deploy`` and ``docs/examples`` as
links, the rest of ``docs`` copied, ``../shared`` linked), so relative paths in the docs work and nothing
writes into the checkout. bash blocks run with ``bash -euo pipefail``, python blocks with this interpreter; the
project's virtual environment is first on ``PATH``. The documented server address
(``http://127.0.0.1:8000``, ``localhost:8000``) is replaced by the test server's, and ``TOKSERVE_URL`` points
at it.

A block that cannot run here carries an HTML comment on the line right above its fence:

    <!-- docs-test: skip reason="trains for an hour" -->           not run; the reason is reported
    <!-- docs-test: env TOKSERVE_X=1 Y=2 -->                         extra environment variables
    <!-- docs-test: sub "-n 2000" "-n 20" -->                        a documented short override (text replaced;
                                                                    the old text must occur in the block)
    <!-- docs-test: run="hf download --help" -->                     a replacement command, run instead
    <!-- docs-test: timeout=120 -->                                   seconds (default 60)

A block without a comment must run. Each block is its own test, ``path:line`` of its fence; the terminal
summary (``tests/docs/conftest.py``) prints how many ran and every skip with its reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_testkit import RunningServer, start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOC_FILES = (
    "README.md",
    "clients/python/README.md",
    "models/README.md",
    "export/README.md",
    "training/README.md",
    "server/README.md",
    "bench/README.md",
    "docs/API.md",
    "docs/DEPLOY.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "weights" / "default").glob("*/MODEL_CARD.md")),
)
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
DOC_ADDRESS = re.compile(r"(?:http://)?(?:127\.0\.0\.1|localhost):8000\b")
DEFAULT_TIMEOUT = 60.0


class MarkerError(ValueError):
    """A ``docs-test`` comment that is malformed, unknown or attached to nothing runnable."""


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str  # "bash" or "python"
    code: str
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    subs: tuple[tuple[str, str], ...] = ()
    run: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    def script(self, url: str) -> tuple[str, str]:
        """(language, text) to execute: the block (or its replacement command) with the overrides applied and
        the documented address replaced by ``url``."""
        if self.run is not None:
            lang, text = "bash", self.run
        else:
            lang, text = self.lang, self.code
            for old, new in self.subs:
                text = text.replace(old, new)
        host = url.removeprefix("http://")
        return lang, DOC_ADDRESS.sub(lambda m: ("http://" if m.group(0).startswith("http") else "") + host, text)


def parse_marker(text: str) -> dict:
    """The options of one ``<!-- docs-test: ... -->`` comment (its inside, shell-quoted words)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise MarkerError(f"cannot parse {text!r}: {e}") from None
    opts: dict = {"env": {}, "subs": []}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "skip":
            opts["skip"] = True
        elif w.startswith("reason="):
            opts["reason"] = w.partition("=")[2]
        elif w.startswith("timeout="):
            opts["timeout"] = float(w.partition("=")[2])
        elif w.startswith("run="):
            opts["run"] = w.partition("=")[2]
        elif w == "env":
            while i + 1 < len(words) and re.fullmatch(r"[A-Za-z_]\w*=.*", words[i + 1]):
                k, _, v = words[i + 1].partition("=")
                opts["env"][k] = v
                i += 1
            if not opts["env"]:
                raise MarkerError(f"'env' without NAME=value in {text!r}")
        elif w == "sub":
            if i + 2 >= len(words):
                raise MarkerError(f"'sub' needs two quoted texts (old, new) in {text!r}")
            opts["subs"].append((words[i + 1], words[i + 2]))
            i += 2
        else:
            raise MarkerError(f"unknown word {w!r} in {text!r}")
        i += 1
    if opts.get("skip") and not opts.get("reason"):
        raise MarkerError(f"a skip needs reason=\"...\": {text!r}")
    if "reason" in opts and not opts.get("skip"):
        raise MarkerError(f"reason= without skip: {text!r}")
    return opts


def extract_blocks(text: str, path: str) -> list[Block]:
    """The runnable fenced blocks of one Markdown text, with the options of the comment lines right above."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: list[tuple[int, dict]] = []  # (line, options) of the marker lines just above
    i = 0
    while i < len(lines):
        m_marker = MARKER.match(lines[i])
        m_fence = FENCE.match(lines[i])
        if m_marker:
            pending.append((i + 1, parse_marker(m_marker.group(1))))
            i += 1
            continue
        if m_fence:
            fence, lang = m_fence.group(1), m_fence.group(2).lower()
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            if i >= len(lines):
                raise MarkerError(f"{path}:{start + 1}: unclosed code fence")
            i += 1
            if lang not in LANGS:
                if pending:
                    raise MarkerError(f"{path}:{pending[0][0]}: docs-test comment above a {lang or 'plain'} fence,"
                                      " which is never run")
                continue
            opts: dict = {"env": {}, "subs": []}
            for _, o in pending:
                opts["env"].update(o.pop("env"))
                opts["subs"].extend(o.pop("subs"))
                opts.update(o)
            pending = []
            code = "\n".join(body) + "\n"
            for old, _ in opts["subs"]:
                if old not in code:
                    raise MarkerError(f"{path}:{start + 1}: sub {old!r} does not occur in the block")
            blocks.append(Block(path, start + 1, LANGS[lang], code,
                                skip=opts["reason"] if opts.get("skip") else None, env=opts["env"],
                                subs=tuple(opts["subs"]), run=opts.get("run"),
                                timeout=opts.get("timeout", DEFAULT_TIMEOUT)))
            continue
        if pending and lines[i].strip():
            raise MarkerError(f"{path}:{pending[0][0]}: docs-test comment not directly above a code fence")
        i += 1
    if pending:
        raise MarkerError(f"{path}:{pending[0][0]}: docs-test comment at the end of the file")
    return blocks


def all_blocks() -> list[Block]:
    out: list[Block] = []
    for rel in DOC_FILES:
        p = REPO / rel
        if p.exists():
            out.extend(extract_blocks(p.read_text(), rel))
    return out


BLOCKS = all_blocks()


# ---- the workspace and the server


def shared_dir() -> Path | None:
    for p in (REPO.parent / "shared", Path("/work/shared")):
        if (p / "data").is_dir():
            return p
    return None


def make_workspace(root: Path) -> Path:
    """``root/repo``: what a block sees as the repository root. Read-only inputs are links (weights,
    configs, deploy, docs/examples), ``docs`` itself is a copy (a block may rewrite its figures), and
    ``root/shared`` links the shared data so that ``../shared/...`` resolves as in a checkout."""
    work = root / "repo"
    work.mkdir(parents=True)
    (work / "weights").mkdir()
    for sub in (REPO / "weights").iterdir():
        (work / "weights" / sub.name).symlink_to(sub)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "deploy").symlink_to(REPO / "deploy")
    shutil.copytree(REPO / "docs", work / "docs", ignore=shutil.ignore_patterns("examples"))
    (work / "docs" / "examples").symlink_to(REPO / "docs" / "examples")
    shared = shared_dir()
    if shared is not None:
        (root / "shared").symlink_to(shared)
    return work


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for every block: the shipped default models (``TOKSERVE_MODELS`` empty), as ``make serve``."""
    server = start_server(tmp_path_factory.mktemp("docs-server"), env={"TOKSERVE_MODELS": ""})
    yield server
    server.stop()


def run_block(block: Block, url: str, root: Path) -> subprocess.CompletedProcess[str]:
    work = make_workspace(root)
    lang, text = block.script(url)
    script = work / (".docs_block.py" if lang == "python" else ".docs_block.sh")
    script.write_text(text)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TOKSERVE_REDIS_URL", "TOKSERVE_MODELS")}
    env.update({"PATH": venv_bin + os.pathsep + env.get("PATH", ""), "PYTHONPATH": str(REPO),
                "TOKSERVE_URL": url, "TOKSERVE_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1", **block.env})
    argv = [sys.executable, script.name] if lang == "python" else ["bash", "-euo", "pipefail", script.name]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=block.timeout)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_block(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    server: RunningServer = request.getfixturevalue("docs_server")
    try:
        done = run_block(block, server.url, tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id} ran past {block.timeout:.0f} s\n--- block\n{block.code}\n--- stdout\n"
                    f"{(e.stdout or b'')[-3000:]!r}\n--- stderr\n{(e.stderr or b'')[-3000:]!r}")
    if done.returncode != 0:
        lang, text = block.script(server.url)
        pytest.fail(f"{block.id} exited {done.returncode}\n--- {lang} as run\n{text}--- stdout\n"
                    f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


# ---- the extraction itself


def test_every_documented_file_has_its_blocks_found() -> None:
    """The listed files exist, and the ones that hold runnable fences yield blocks (a broken fence pattern
    would otherwise make the whole docs test pass by running nothing)."""
    missing = [rel for rel in DOC_FILES if not (REPO / rel).exists()]
    assert not missing, f"documentation files gone: {missing}"
    for rel in DOC_FILES:
        text = (REPO / rel).read_text()
        fences = re.findall(r"^\s*```(?:bash|sh|python)\s*$", text, flags=re.M)
        assert len([b for b in BLOCKS if b.path == rel]) == len(fences), rel
    assert len(BLOCKS) >= 20 and sum(b.skip is None for b in BLOCKS) >= 10


def test_markers_are_parsed_and_checked() -> None:
    md = "\n".join([
        "text", "<!-- docs-test: skip reason=\"trains for hours\" -->", "```bash", "make train", "```",
        "<!-- docs-test: env A=1 B=two -->", "<!-- docs-test: sub \"-n 300\" \"-n 3\" timeout=5 -->",
        "```python", "print('-n 300')", "```", "```yaml", "a: 1", "```", "~~~sh", "echo ok", "~~~",
    ])
    skipped, overridden, plain = extract_blocks(md, "x.md")
    assert (skipped.line, skipped.skip, skipped.lang) == (3, "trains for hours", "bash")
    assert overridden.env == {"A": "1", "B": "two"} and overridden.timeout == 5
    assert overridden.script("http://127.0.0.1:1234") == ("python", "print('-n 3')\n")
    assert (plain.line, plain.lang, plain.code, plain.skip) == (14, "bash", "echo ok\n", None)
    url = "http://127.0.0.1:1234"
    addr = Block("x.md", 1, "bash", "curl http://127.0.0.1:8000/x; curl localhost:8000/readyz\n")
    assert addr.script(url)[1] == "curl http://127.0.0.1:1234/x; curl 127.0.0.1:1234/readyz\n"
    for bad in (
        "<!-- docs-test: skip -->\n```bash\nx\n```",  # no reason
        "<!-- docs-test: reason=\"x\" -->\n```bash\nx\n```",  # reason without skip
        "<!-- docs-test: frobnicate -->\n```bash\nx\n```",  # unknown word
        "<!-- docs-test: skip reason=\"x\" -->\n\nprose\n```bash\nx\n```",  # not right above the fence
        "<!-- docs-test: skip reason=\"x\" -->\n```yaml\nx\n```",  # a fence that never runs
        "<!-- docs-test: sub \"absent\" \"y\" -->\n```bash\nx\n```",  # stale override
        "```bash\nx\n",  # unclosed fence
        "<!-- docs-test: skip reason=\"x\" -->",  # nothing after it
    ):
        with pytest.raises(MarkerError):
            extract_blocks(bad, "bad.md")
