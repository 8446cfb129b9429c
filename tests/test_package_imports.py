"""Imports point one way: smoothcache_fx -> passes -> kernels, smoothcache_fx -> schedules, and
no module of the package imports another that imports it back (no circles), counting imports
inside functions too (they run sooner or later) but not ``if TYPE_CHECKING:`` blocks (never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package setup.py installs it as.
PACKAGES = {
    ROOT / "smoothcache_fx": "smoothcache_fx",
    ROOT / "passes": "smoothcache_fx.passes",
    ROOT / "kernels": "smoothcache_fx.kernels",
    ROOT / "schedules": "smoothcache_fx.schedules",
}
# What each layer may import from the package, besides itself.
ALLOWED = {
    "smoothcache_fx.kernels": (),
    "smoothcache_fx.schedules": (),
    "smoothcache_fx.passes": ("smoothcache_fx.kernels",),
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


MODULES = _modules()


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    package = module if MODULES[module].stem == "__init__" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _package_of(module: str) -> str:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return "smoothcache_fx"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _package_of(m) in ALLOWED))
def test_lower_layers_import_only_below_them(module):
    layer = _package_of(module)
    outside = sorted(
        name
        for name in GRAPH[module]
        if _package_of(name) != layer and _package_of(name) not in ALLOWED[layer]
    )
    assert not outside, f"{module} imports {outside}; {layer} may import only {ALLOWED[layer] or 'itself'}"


def test_no_import_circles():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for name in sorted(GRAPH[module]):
            if name.endswith("__init__") or name in PACKAGES.values():
                continue  # a package's __init__ re-exports; importing the package is not a cycle edge
            if state.get(name) == "open":
                raise AssertionError(f"import circle: {' -> '.join([*path, name])}")
            if name not in state:
                visit(name, [*path, name])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
