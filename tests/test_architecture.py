"""The import direction of ARCHITECTURE.md, enforced: models/ is pure PyTorch; clients/ talk HTTP only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages it must never import
FORBIDDEN = {
    "models": {"server", "training", "export", "clients", "fastapi", "redis", "prometheus_client", "uvicorn"},
    "training": {"server", "clients", "fastapi", "redis"},
    "export": {"server", "training", "clients", "fastapi", "redis"},
    "clients": {"server", "models", "training", "export", "torch"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"forbidden imports: {bad}"


def _family_modules() -> set[str]:
    """Modules of models/ that define a family: those that register a model class or a sampler family, and
    the sampler implementations the built-in sampler registrations import."""
    out = set()
    for f in (ROOT / "models").rglob("*.py"):
        text = f.read_text()
        if "@register_model_class" in text or "\nregister_sampler(" in text:
            out.add(".".join(f.relative_to(ROOT).with_suffix("").parts))
    families = ROOT / "models" / "sampling" / "families.py"
    out |= {m for m in _model_imports(families) if m.startswith("models.sampling.")
            and m.rsplit(".", 1)[-1] not in ("base", "registry")
            and ROOT.joinpath(*m.split(".")).with_suffix(".py").exists()}
    return out


def _model_imports(path: Path) -> set[str]:
    """Every ``models.*`` module ``path`` imports (``from models.x import y`` counts ``models.x.y`` too, which
    may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "models")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "models":
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_server_reaches_model_families_only_through_the_registries() -> None:
    """ISSUE 19: the server reads specs and registries, so it imports no family module (SoftVQ, SiT, MAR,
    a sampler family ...): a new family is served without touching server/."""
    families = _family_modules()
    assert {"models.softvq", "models.sit", "models.var", "models.sampling.families"} <= families
    bad = {str(f.relative_to(ROOT)): sorted(_model_imports(f) & families) for f in (ROOT / "server").rglob("*.py")}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"server modules importing model families: {bad}"


# ---------------------------------------------------------------------------------------------- one runner layer

RUNNER_LAYER = ROOT / "models" / "runtime"
ONE_ADAPTER_MODULE = ROOT / "server" / "engine" / "runtime.py"  # the server's per-kind adapters over runners
PACKAGES = ("models", "server", "export", "bench", "training")


def _classes(path: Path) -> list[str]:
    return [n.name for n in ast.walk(ast.parse(path.read_text(), filename=str(path))) if isinstance(n, ast.ClassDef)]


def test_one_runtime_layer() -> None:
    """ISSUE 17: the runners live in models/runtime/ only: no second ``Runtime`` class (the server's
    ``Runtime`` / ``TokenizerRuntime`` / ``GeneratorRuntime`` adapters are the only ones), no ``*Runner``
    class elsewhere, and no fast path of the benchmarks' own (``models/fastpath.py`` was folded in)."""
    runtime_classes, runner_classes = {}, {}
    for package in PACKAGES:
        for f in sorted((ROOT / package).rglob("*.py")):
            rel = str(f.relative_to(ROOT))
            for name in _classes(f):
                if name.endswith("Runtime") and f != ONE_ADAPTER_MODULE:
                    runtime_classes[f"{rel}:{name}"] = name
                # training's feature cache keeps its own in-memory ONNX runner for frozen training networks
                if name.endswith("Runner") and RUNNER_LAYER not in f.parents and package != "training":
                    runner_classes[f"{rel}:{name}"] = name
    assert not runtime_classes, f"Runtime classes outside {ONE_ADAPTER_MODULE.relative_to(ROOT)}: {runtime_classes}"
    assert not runner_classes, f"runner classes outside models/runtime/: {runner_classes}"
    assert not (ROOT / "models" / "fastpath.py").exists()


def test_benchmarks_have_no_fast_path_of_their_own() -> None:
    """bench/ measures the runners the server runs: it compiles, captures graphs and opens ONNX sessions only
    through models.runtime (via export.runtime.make_runner)."""
    bad = {}
    for f in sorted((ROOT / "bench").rglob("*.py")):
        text = f.read_text()
        hits = [s for s in ("torch.compile(", "CUDAGraph(", "torch.autocast(", "InferenceSession(", "jit.load(")
                if s in text]
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert not bad, f"bench-only fast paths: {bad}"
