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
