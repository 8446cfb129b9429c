"""Model coverage: the contract suite of `coverage_checks.py` on a subset of diffusers families (the
branch pattern's generalisations on hand-written blocks are in test_pass_branches.py).

The full table (every family, inductor) is `python tests/coverage_report.py`, written to
COVERAGE.md; here DiT, PixArt, SD3 and Flux run eagerly and DiT also compiles (aot_eager: the check
is about graph breaks and recompiles, which do not depend on the backend), in about 50 s on 2 cores.
"""

from __future__ import annotations

import coverage_checks as checks
import coverage_report
import pytest
import torch
from coverage_families import FAMILIES, Family

pytest.importorskip("diffusers")

# The expectation, written out per block path (the module's table states it with globs).
EXPECTED = {
    "dit": {"transformer_blocks.0": ("attn1", "ff"), "transformer_blocks.1": ("attn1", "ff")},
    "pixart": {
        "transformer_blocks.0": ("attn1", "attn2", "ff"),
        "transformer_blocks.1": ("attn1", "attn2", "ff"),
    },
    "sd3": {
        "transformer_blocks.0": ("attn", "ff", "ff_context"),
        "transformer_blocks.1": ("attn", "ff"),  # context_pre_only: no context residuals
    },
    "flux": {
        "transformer_blocks.0": ("attn", "ff", "ff_context"),
        "single_transformer_blocks.0": ("proj_out",),  # attention and MLP inside one residual
    },
}
COMPILED = {"dit": "aot_eager"}


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared 2-core machine
    try:
        yield {name: checks.run_family(name, COMPILED.get(name), bf16=False) for name in EXPECTED}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", EXPECTED)
def test_family_is_green(results, family):
    result = results[family]
    assert not result.errors
    assert result.branches == EXPECTED[family]
    assert result.expected_ok
    assert result.all_compute_diff <= checks.ALL_COMPUTE_TOL
    assert result.cached_diff <= checks.CACHED_TOL
    assert result.counts_ok
    assert result.cache_effect > checks.MIN_CACHE_EFFECT
    assert result.graph_form_diff <= checks.CACHED_TOL
    assert result.green


def test_compiled_family_has_no_graph_breaks_or_recompiles(results):
    result = results["dit"]
    assert result.compile_backend == "aot_eager"
    assert result.compiled_graphs == 2  # one structure, two masks (compute all / reuse all)
    assert result.graph_breaks == 0
    assert result.recompiles == 0
    assert result.compile_diff <= checks.COMPILED_TOL


def test_table_has_the_command_and_one_row_per_family(results):
    table = coverage_report.render_table(list(results.values()), "python tests/coverage_report.py --out X.md")
    assert "python tests/coverage_report.py --out X.md" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(EXPECTED)
    assert "**4 of 4 families green.**" in table
    assert "`FluxSingleTransformerBlock` ×1 (single_transformer_blocks.0): proj_out" in table


def test_a_wrong_expectation_is_reported_not_raised(monkeypatch):
    family = FAMILIES["dit"]
    wrong = Family(family.model_class, family.config, family.inputs, {"*": ("attn1", "attn2", "ff")})
    monkeypatch.setitem(FAMILIES, "dit", wrong)
    result = checks.run_family("dit", compile_backend=None, bf16=False)
    assert result.expected_ok is False and not result.green
    assert result.branches["transformer_blocks.0"] == ("attn1", "ff")
    assert result.all_compute_diff is not None  # rerun on the branches that were found
    assert "expected {" in coverage_report.render_table([result], "cmd")


def test_cli_rejects_unknown_families():
    with pytest.raises(SystemExit):
        coverage_report.main(["--families", "dit,nope"])
