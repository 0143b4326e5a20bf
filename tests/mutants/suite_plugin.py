"""pytest plugin for mutant runs (``-p tests.mutants.suite_plugin``): fast, and honest verdicts.

Three jobs, configured by environment variables the runner sets:

- **Stop at the first failing example** (unless ``CONVBN_MUTANT_SHRINK=1``): the run's Hypothesis
  profile (``ci``: derandomized, the same networks every run) loses its shrink and explain phases.
  The verdict cannot change: Hypothesis shrinks only after an example has failed, and ``pytest -x``
  stops at the first failing test, so the examples tried up to the first failure are those of the
  profile itself. Only the time changes: shrinking takes several times longer than finding.
- **Run the most discriminating properties first**: the output check, then the pinned networks
  (about 4 s for all of them, where the two completeness checks before them cost a mutant that
  only a pin catches about 25 s: 14 of 68 at 033adab), then the two completeness checks, then the
  global-hook property
  (about 2 s: the real fuser refuses every network under a global hook), then the rest in file
  order. With ``-x`` a mutant is caught at its first failing test, so the order changes only how long a catch
  takes, never whether: a mutant counts as missed only when every test passed.
- **Attribute the failure** (``CONVBN_MUTANT_VERDICT=path``): the first failing property is checked
  again, on the same network (the spec literal its message ends with), against our real, unpatched
  fuser, and the result is written to ``path`` as JSON. A failure counts as the mutant's only if the
  real fuser passes that property there; otherwise a bug of the fuser or of the suite, not the
  mutant's bug, made the suite fail, and the mutant is not counted as caught.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import Phase, settings

SHRINK_ENV = "CONVBN_MUTANT_SHRINK"
VERDICT_ENV = "CONVBN_MUTANT_VERDICT"
SKIPPED_PHASES = (Phase.shrink, Phase.explain)
REAL_FUSER, REAL_FUSER_REPORT = "fuser:fuse", "fuser:fuse_with_report"

FIRST = (
    "test_fused_matches_original",
    "test_pinned_network_is_fused_soundly",
    "test_pinned_network_is_fused_completely",
    "test_no_foldable_batchnorm_remains",
    "test_report_agrees_with_oracle",
    "test_global_module_hooks_are_refused_or_honoured",  # 2 s: the real fuser refuses at once
)

_PINNABLE = re.compile(r"pin it in tests/pinned\.py:\s*\n\s*(NetSpec\(.*\))\s*$", re.MULTILINE)
_PROPERTY = re.compile(r"property (\w+) violated")
_GLOBAL_HOOK = re.compile(r"replay it under global hook '(\w+)'")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Runs after the root conftest has registered and loaded the profiles."""
    if os.environ.get(SHRINK_ENV) == "1":
        return
    name = settings.get_current_profile_name()
    profile = settings.get_profile(name)
    phases = tuple(phase for phase in profile.phases if phase not in SKIPPED_PHASES)
    settings.register_profile(f"{name}-first-failure", parent=profile, phases=phases)
    settings.load_profile(f"{name}-first-failure")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = getattr(item, "originalname", item.name)
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the rest keep their file order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get(VERDICT_ENV)
    if path is None or not report.failed or Path(path).exists():
        return  # only the first failure is attributed (the runner passes -x anyway)
    message = str(call.excinfo.value) if call.excinfo is not None else report.longreprtext
    Path(path).write_text(json.dumps(attribute_failure(item.nodeid, report.when, message)))


def attribute_failure(test: str, phase: str, message: str) -> dict:
    """What failed, and whether our real fuser fails the same network too."""
    found = _PROPERTY.search(message)
    first_lines = message.strip().splitlines()[:2]
    verdict = {
        "test": test,
        "phase": phase,
        "property": found.group(1) if found else None,
        "detail": " ".join(line.strip() for line in first_lines[1:]),
        "control": None,
    }
    spec_literal = _PINNABLE.search(message)
    if phase == "call" and found and spec_literal:
        hook = _GLOBAL_HOOK.search(message)
        verdict["control"] = check_real_fuser(
            spec_literal.group(1), found.group(1), hook.group(1) if hook else None
        )
    return verdict


def check_real_fuser(spec_literal: str, prop: str, global_hook: str | None = None) -> str:
    """``"passes"``, or how our real fuser fails property ``prop`` on the network (under the
    global module hook the failure was found under, if any)."""
    from strategies import properties
    from strategies import spec as spec_module
    from strategies.fuser_under_test import FuserUnderTest

    spec = eval(spec_literal, vars(spec_module).copy())  # the suite's own pinning literal
    real = FuserUnderTest.from_target(REAL_FUSER, REAL_FUSER_REPORT)
    check = getattr(properties, f"check_{prop}")
    try:
        if prop == "training_model_refused_or_equivalent":
            check(spec, real)
        elif prop == "global_hooks_refused_or_honoured":
            check(spec, real, global_hook)
        else:
            check(properties.run_trial(spec, real, with_report=True))
    except properties.OutOfRange as error:
        return f"inconclusive: {error}"
    except Exception as error:
        return f"fails too: {' '.join(str(error).splitlines()[:2])}"
    return "passes"
