"""The gate works end to end: ``pytest --fuser=...`` runs the suite against another fuser, and a
broken fuser makes it fail with a report that names the property.

The suite runs in a subprocess (the way CI and other teams run it) on the ``smoke`` profile: a few
dozen random networks, no shrinking, no example database (a broken fuser's failures must not be
saved for the real fuser's runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(fuser: str, marker: str, test: str) -> subprocess.CompletedProcess:
    """Run one property test (on cpu) of the suite against ``fuser``."""
    command = [
        sys.executable, "-m", "pytest", "tests/test_properties.py", f"--fuser={fuser}",
        "-m", marker, "-k", f"{test} and cpu", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
    ]  # fmt: skip
    env = dict(os.environ, HYPOTHESIS_PROFILE="smoke")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_fuser_that_ignores_eps_fails_soundness():
    result = run_suite("tests.broken_fusers:ignores_eps", "soundness", "matches")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "property fused_matches_original violated" in result.stdout
    assert "network (runnable Python" in result.stdout


def test_a_fuser_that_folds_nothing_is_sound_but_incomplete():
    sound = run_suite("tests.broken_fusers:folds_nothing", "soundness", "matches")
    assert sound.returncode == 0, sound.stdout[-3000:]
    complete = run_suite("tests.broken_fusers:folds_nothing", "completeness", "remains")
    assert complete.returncode == 1, complete.stdout[-3000:]
    assert "property no_foldable_batchnorm_remains violated" in complete.stdout
