"""The suite's power: the property suite must catch every mutant in ``tests/mutants``.

Each test runs ``pytest tests/test_properties.py --fuser=<mutant> -x`` in a subprocess with the
``ci`` Hypothesis profile (derandomized, so the time to catch is reproducible) and asserts that a
property failed. This tier runs only when selected (``pytest -m mutants -n 2 tests/test_mutants.py``
or ``tox -e mutants``): each test is a whole suite run, too slow for the default ``pytest`` run.
The printed line of each test (``-rP`` or ``-s``) gives the time to catch and the property that
caught it; ``python -m tests.mutants -j 2`` prints the same as a table (see docs/mutants.md).
"""

from __future__ import annotations

import pytest

from tests.mutants import Mutant, all_mutants
from tests.mutants.run import run_mutant

pytestmark = pytest.mark.mutants


def _selected(config: pytest.Config) -> bool:
    return "mutants" in (config.option.markexpr or "")


@pytest.mark.parametrize("mutant", all_mutants(), ids=lambda mutant: mutant.name)
def test_property_suite_catches_mutant(mutant: Mutant, request: pytest.FixtureRequest) -> None:
    if not _selected(request.config):
        pytest.skip("the mutant tier runs with `pytest -m mutants` (tox -e mutants)")
    run = run_mutant(mutant)
    print(run.describe())
    assert run.caught, (
        f"the property suite did not catch {mutant.target} ({run.verdict}).\n"
        f"bug: {mutant.bug}\nexpected to be caught by: {mutant.expected_catch}\n"
        f"suite output (tail):\n{run.output[-4000:]}"
    )
