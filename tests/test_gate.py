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
    env = suite_environment()
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def suite_environment(**variables: str) -> dict[str, str]:
    """The suite's environment for a subprocess: the ``smoke`` profile, this checkout first on the
    path, ``variables``, and none of this process's pytest-xdist variables (under ``pytest -n``
    they would make the subprocess's controller take itself for a worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.update(HYPOTHESIS_PROFILE="smoke", **variables)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


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


def test_a_fuser_that_crashes_its_process_is_reported_with_the_network(tmp_path: Path):
    """A segfault in a fuser's (or torch's) native code kills the pytest-xdist worker before any
    report: with ``CONVBN_FAILURE_LOG`` and ``CONVBN_LAST_NETWORK_DIR`` the failure log still
    shows the crash and the network the worker was on, as a runnable program."""
    log = tmp_path / "failures.log"
    command = [
        sys.executable, "-m", "pytest", "tests/test_properties.py",
        "--fuser=tests.broken_fusers:crashes", "-k", "test_fused_matches_original and cpu",
        "-n", "1", "--maxfail=1", "--max-worker-restart=0", "-p", "no:cacheprovider", "-q",
    ]  # fmt: skip
    env = suite_environment(CONVBN_FAILURE_LOG=str(log), CONVBN_LAST_NETWORK_DIR=str(tmp_path))
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:]
    failures = log.read_text()
    assert "worker 'gw0' crashed while running" in failures, failures[-3000:]
    assert "the network worker gw0 was on when it crashed" in failures
    network = (tmp_path / "gw0.py").read_text()
    assert "class Net(nn.Module)" in network and network in failures
