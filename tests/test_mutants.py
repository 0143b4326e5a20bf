"""The suite's power: the property suite must catch every mutant in ``tests/mutants``.

Two tiers:

- Always (fast): every mutant is a working fuser where its bug cannot show. On a network without
  BatchNorm each must return an equivalent model without raising, which proves that every name it
  patches still exists in ``fuser/`` (``mock.patch`` raises otherwise) and that nothing but its
  one bug differs from our fuser. A stale mutant would otherwise crash the suite and be "caught".
- ``pytest -m mutants -n 2 tests/test_mutants.py`` (``tox -e mutants``): for each mutant, run
  ``pytest tests/test_properties.py --fuser=<mutant> -x`` in a process of its own (a fork of a warm
  interpreter, ``tests/mutants/warm_interpreter.py``) with the ``ci`` Hypothesis
  profile (derandomized, so the time to catch is reproducible) and assert that a property failed on
  a network our real fuser passes (see ``tests/mutants/run.py``). Each is a suite run, too slow for
  the default ``pytest`` run. ``-rP`` prints each time to catch; ``python -m tests.mutants -j 2``
  prints the same as a table (docs/mutants.md). Mutants the suite is known to miss are strict
  xfails naming why (none at present); the three it missed until issue 4 keep their
  example-based tests below, showing that each bug is real.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch
from compat import requires_cpu_float16
from torch import nn

from fuser import fuse_with_report
from tests.mutants import Mutant, all_mutants
from tests.mutants.ast_mutation import MUTATED_PACKAGE, AstMutant, edits, mutated_source
from tests.mutants.fold_math_bugs import input_side_groups_interleaved
from tests.mutants.matcher_bugs import input_side_with_several_users
from tests.mutants.rewriter_bugs import float16_overflow_unchecked
from tests.mutants.run import run_mutant

MUTANTS = all_mutants()

#: Mutants the ci profile does not catch: findings about the strategies, kept visible (docs/mutants.md).
#: Empty since the strategies draw float16 folds that overflow, pre-activation residual taps and
#: input-side folds into grouped convs with several outputs per group.
#: Strict: once the strategies reach them, the XPASS fails the tier until the entry is removed.
KNOWN_MISSES: dict[str, str] = {}


def _with_known_misses(mutants: list[Mutant]) -> list:
    return [
        pytest.param(
            mutant,
            marks=pytest.mark.xfail(strict=True, reason=f"missed: {KNOWN_MISSES[mutant.name]}"),
        )
        if mutant.name in KNOWN_MISSES
        else mutant
        for mutant in mutants
    ]


def _no_batch_norm_network() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    return model.eval(), (torch.randn(2, 3, 4, 4),)


def test_corpus_is_large_and_spread_over_the_fuser() -> None:
    assert set(KNOWN_MISSES) <= {mutant.name for mutant in MUTANTS}
    assert len(MUTANTS) >= 20
    assert {mutant.module for mutant in MUTANTS} == {
        "fold_math_bugs",
        "matcher_bugs",
        "rewriter_bugs",
        "bookkeeping_bugs",
    }
    for mutant in MUTANTS:
        assert mutant.doc.startswith("Bug"), f"{mutant.name}: the docstring must state the bug"
        assert mutant.expected_catch, f"{mutant.name}: the docstring must say what catches it"


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda mutant: mutant.name)
def test_mutant_is_a_working_fuser_where_its_bug_cannot_show(mutant: Mutant) -> None:
    model, inputs = _no_batch_norm_network()
    with torch.no_grad():
        expected = model(*inputs)
    fused, report = mutant.load()(model, example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), expected)
    assert report.sites == []


@requires_cpu_float16
def test_float16_overflow_mutant_is_a_real_bug() -> None:
    """``float16_overflow_unchecked`` is a real bug (the strategies reach it with amplifying BNs,
    ``Norm.gain``; ordinary drawn BN scales are at most 2, so no other drawn fold comes near
    float16's 65504). This network shows it by hand: a "dead" channel whose conv
    output sits at the BN's running mean (so the original is finite) and whose BN scale is large
    (gamma 1e3, running_var 1e-4). Our fuser leaves the fold; the mutant folds it into inf."""
    conv, bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
    with torch.no_grad():
        conv.weight.fill_(10.0)
        conv.bias.fill_(3.0)
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(1e-4)
        bn.weight.fill_(1e3)
        bn.bias.fill_(0.5)
    model = nn.Sequential(conv, bn).half().eval()
    inputs = (torch.zeros(2, 1, 3, 3, dtype=torch.float16),)
    with torch.no_grad():
        expected = model(*inputs)
    assert torch.isfinite(expected).all()

    fused, report = fuse_with_report(model, example_inputs=inputs)
    assert not report.site("1").folded and "overflow" in report.site("1").reason
    mutant_fused, _ = float16_overflow_unchecked(model, example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), expected)
        assert not torch.isfinite(mutant_fused(*inputs)).all()


class _PreActivationResidual(nn.Module):
    """``y = bn(x); conv(y) + y``: the BN's output is read by a conv *and* by the residual add,
    as in a pre-activation ResNet block whose shortcut reads the normalised input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.conv(y) + y


def test_several_readers_mutant_is_a_real_bug() -> None:
    """``input_side_with_several_users`` is a real bug (the strategies reach it with their
    pre-activation residual template): our fuser leaves the BN; the mutant folds it into the conv,
    and the residual add then reads the un-normalised input."""
    torch.manual_seed(0)
    model = _PreActivationResidual().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(0.5, 1.5)
        model.bn.running_var.uniform_(0.1, 4.0)
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1.0, 1.0)
    inputs = (torch.randn(2, 3, 4, 4),)
    with torch.no_grad():
        expected = model(*inputs)

    fused, report = fuse_with_report(model, example_inputs=inputs)
    assert not report.site("bn").folded
    mutant_fused, mutant_report = input_side_with_several_users(model, example_inputs=inputs)
    assert mutant_report.site("bn").folded
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), expected)
        assert not torch.allclose(mutant_fused(*inputs), expected, atol=1e-3)


def test_grouped_input_side_mutant_is_a_real_bug() -> None:
    """``input_side_groups_interleaved`` is a real bug (the strategies' input-side templates
    draw grouped convs with several outputs per group): a BN at the network input folding into
    one; output channel 1 belongs to group 0, not group 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1, groups=2)).eval()
    bn = model[0]
    with torch.no_grad():
        bn.running_mean.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.1, 4.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    inputs = (torch.randn(2, 4, 3, 3),)
    with torch.no_grad():
        expected = model(*inputs)

    fused, report = fuse_with_report(model, example_inputs=inputs)
    assert report.site("0").folded and report.site("0").side == "input"
    mutant_fused, _ = input_side_groups_interleaved(model, example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), expected)
        assert not torch.allclose(mutant_fused(*inputs), expected, atol=1e-3)


def _mutant_tier_selected(config: pytest.Config) -> bool:
    return "mutants" in (config.option.markexpr or "")


@pytest.mark.mutants
@pytest.mark.parametrize("mutant", _with_known_misses(MUTANTS), ids=lambda mutant: mutant.name)
def test_property_suite_catches_mutant(mutant: Mutant, request: pytest.FixtureRequest) -> None:
    if not _mutant_tier_selected(request.config):
        pytest.skip("the mutant tier runs with `pytest -m mutants` (tox -e mutants)")
    run = run_mutant(mutant)
    print(run.describe())
    assert run.caught, (
        f"the property suite did not catch {mutant.target} ({run.verdict}: {run.detail}).\n"
        f"bug: {mutant.bug}\nexpected to be caught by: {mutant.expected_catch}\n"
        f"suite output (tail):\n{run.output[-4000:]}"
    )


def test_machine_made_mutants_touch_code_not_messages() -> None:
    source = (
        "def f(a, b):\n"
        "    if a is None:\n"
        "        return 0\n"
        "    if a < b and not b:\n"
        "        raise ValueError(f'{a + b} is too big')\n"
        "    return a * b\n"
    )
    found = edits(ast.parse(source))
    assert sorted((edit.line, edit.kind) for edit in found) == [
        (2, "compare"),
        (2, "guard"),
        (4, "boolean"),
        (4, "compare"),
        (4, "not"),
        (6, "arithmetic"),
    ]
    assert "a - b" not in "".join(mutated_source(source, edit) for edit in found)
    guardless = mutated_source(source, found[0])
    assert "return 0" not in guardless and "a * b" in guardless


def test_machine_made_mutant_is_the_fuser_with_one_edit(tmp_path, monkeypatch) -> None:
    source = Path("fuser/fold_math.py").read_text()
    edit = next(edit for edit in edits(ast.parse(source)) if edit.kind == "arithmetic")
    mutant = AstMutant("fold_math.py", edit, tmp_path)
    mutant.load()  # writes the mutated package; every module of it compiles
    assert mutant.python_path == (str(tmp_path),)
    written = (tmp_path / MUTATED_PACKAGE / "fold_math.py").read_text()
    assert written == mutated_source(source, edit) != ast.unparse(ast.parse(source))
    others = sorted(path.name for path in (tmp_path / MUTATED_PACKAGE).glob("*.py"))
    assert others == sorted(path.name for path in Path("fuser").glob("*.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mutated = importlib.import_module(MUTATED_PACKAGE)
        model, inputs = _no_batch_norm_network()
        fused = mutated.fuse(model, example_inputs=inputs)
        with torch.no_grad():
            assert torch.equal(fused(*inputs), model(*inputs))
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == MUTATED_PACKAGE]:
            del sys.modules[name]
