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


def start_suite(fuser: str, marker: str, test: str) -> subprocess.Popen:
    """Start the property tests (on cpu) of ``marker`` whose names match ``test`` (all of them
    when it is empty) against ``fuser``."""
    selection = f"{test} and cpu" if test else "cpu"
    command = [
        sys.executable, "-m", "pytest", "tests/test_properties.py", f"--fuser={fuser}",
        "-m", marker, "-k", selection, "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
    ]  # fmt: skip
    env = dict(os.environ, HYPOTHESIS_PROFILE="smoke")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen) -> tuple[int, str]:
    stdout, _ = run.communicate(timeout=300)
    return run.returncode, stdout


def test_a_fuser_that_ignores_eps_fails_soundness():
    returncode, stdout = finish(
        start_suite("tests.broken_fusers:ignores_eps", "soundness", "matches")
    )
    assert returncode == 1, stdout[-3000:]
    assert "property fused_matches_original violated" in stdout
    assert "network (runnable Python" in stdout


def test_a_fuser_that_folds_nothing_is_sound_but_incomplete():
    """Every soundness property (not just one) passes a fuser that returns a plain copy: a
    property that fails it is the suite's bug, and would fail every correct fuser that leaves
    what it was given alone (as one did for a network with a training-mode BatchNorm drawn
    under a global hook, whose fresh copy to judge by was put in eval mode)."""
    sound = start_suite("tests.broken_fusers:folds_nothing", "soundness", "")
    complete = start_suite("tests.broken_fusers:folds_nothing", "completeness", "remains")
    (sound_code, sound_out), (complete_code, complete_out) = finish(sound), finish(complete)
    assert sound_code == 0, sound_out[-3000:]
    assert complete_code == 1, complete_out[-3000:]
    assert "property no_foldable_batchnorm_remains violated" in complete_out
