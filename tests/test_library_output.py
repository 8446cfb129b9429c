"""Library code speaks through the `smoothcache_fx` logger (or a Python warning where the caller
should change something), never by printing; only the command line and its demo print."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import models
from helpers import dit_call, run_steps

import smoothcache_fx
from smoothcache_fx import Schedule

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("smoothcache_fx", "passes", "kernels", "schedules")
# What may write to the terminal: the CLI, the demo it runs, and calibrate's progress bar (which
# writes to stderr only when stderr is a terminal).
PRINTING = {
    "smoothcache_fx/cli.py",
    "smoothcache_fx/cli_pipeline.py",
    "smoothcache_fx/demo/job.py",
    "smoothcache_fx/demo/train.py",
    "smoothcache_fx/calibrate_record.py",
}


def _writes_to_terminal(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        prints = isinstance(func, ast.Name) and func.id == "print"
        writes = isinstance(func, ast.Attribute) and func.attr == "write" and "std" in ast.unparse(func.value)
        if prints or writes:
            lines.append(node.lineno)
    return lines


def test_library_modules_do_not_print():
    offenders = {}
    for folder in LIBRARY:
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if relative in PRINTING:
                continue
            found = _writes_to_terminal(ast.parse(path.read_text(encoding="utf-8")))
            if found:
                offenders[relative] = found
    assert offenders == {}, (
        f"print/stdout writes in library code (use the smoothcache_fx logger): {offenders}"
    )


def test_the_scan_finds_prints():
    assert _writes_to_terminal(ast.parse("print('x')\nimport sys\nsys.stderr.write('y')\n")) == [1, 3]


def test_library_loggers_are_the_smoothcache_fx_logger():
    names = set()
    for folder in LIBRARY:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger":
                    names.add(ast.unparse(node.args[0]) if node.args else "")
    # kernels/compat.py silences one of torch's loggers by name; everything else logs as smoothcache_fx
    assert names == {"'smoothcache_fx'", "_TRITON_OP_LOGGER"}


def test_a_transform_and_generation_log_only_on_the_smoothcache_fx_logger(caplog, capsys):
    with caplog.at_level(logging.DEBUG):
        model = smoothcache_fx.transform(models.diffusers_dit(), Schedule.uniform(2, 2, ["attn", "mlp"]))
        run_steps(model, dit_call, 2)
    ours = [r for r in caplog.records if r.name == "smoothcache_fx"]
    assert [r.levelno for r in ours] == [logging.INFO] and "renamed" in ours[0].getMessage()
    assert capsys.readouterr() == ("", "")
