"""`schedules/` is pure data and maths: it imports nothing of the runtime or plotting, and its own
modules import one way (schedule -> from_errors -> errors), so plots and the runtime build on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ROOT / "schedules"
PACKAGE = "smoothcache_fx.schedules"  # what setup.py's package_dir installs schedules/ as
MODULES = sorted(path.stem for path in SCHEDULES.glob("*.py"))
TYPE_CHECKING_TESTS = ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(module: str, type_only: bool) -> list[str]:
    """Absolute names of every module `module` imports anywhere in its source (function bodies
    included); `type_only=False` leaves out ``if TYPE_CHECKING:`` blocks, which never run."""
    tree = ast.parse((SCHEDULES / f"{module}.py").read_text(encoding="utf-8"))
    skipped = set()
    if not type_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) in TYPE_CHECKING_TESTS:
                skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    package = PACKAGE.split(".")
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.append(node.module)
                continue
            base = package[: len(package) - node.level + 1]
            if node.module:
                names.append(".".join([*base, node.module]))
            else:  # `from . import x`: each name may be a module of its own
                names += [".".join([*base, alias.name]) for alias in node.names]
    return names


def _local(name: str) -> str | None:
    """The schedules module `name` refers to (its stem), or None when it lies outside schedules."""
    if name == PACKAGE:
        return "__init__"
    if name.startswith(PACKAGE + "."):
        return name[len(PACKAGE) + 1 :].split(".")[0]
    return None


@pytest.mark.parametrize("module", MODULES)
def test_schedules_import_nothing_of_smoothcache_fx_outside_themselves(module):
    outside = [
        name
        for name in _imports(module, type_only=True)
        if name.split(".")[0] in ("smoothcache_fx", "schedules", "passes", "kernels") and _local(name) is None
    ]
    assert not outside, f"schedules/{module}.py imports {outside}; plotting and the runtime import schedules"


def test_schedule_and_from_errors_do_not_import_each_other_in_both_directions():
    schedule = {_local(name) for name in _imports("schedule", type_only=True)}
    from_errors = {_local(name) for name in _imports("from_errors", type_only=True)}
    assert not ("from_errors" in schedule and "schedule" in from_errors)


def test_schedules_modules_import_without_a_cycle():
    graph = {m: {_local(n) for n in _imports(m, type_only=False)} - {None, m} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle in schedules/: {' -> '.join([*path, module])}"
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, (*path, module))
            done.add(module)

    for module in MODULES:
        visit(module, ())


def test_schedules_load_without_the_runtime_torch_or_matplotlib():
    """Imported as a top-level package from the source tree, in a fresh interpreter: nothing beyond
    schedules itself, numpy and the standard library gets loaded."""
    code = (
        "import sys\n"
        f"import {', '.join(f'schedules.{m}' for m in MODULES if m != '__init__')}\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in "
        "('smoothcache_fx', 'torch', 'matplotlib', 'passes', 'kernels'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
