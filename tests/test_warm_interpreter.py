"""The mutant runs' warm interpreter: each run must be as fresh as ``python -m pytest`` would be.

A run that saw the previous run's patches, environment or imports could be caught (or missed)
because of another mutant's bug; one that outlived its timeout would hang the mutant tier.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.mutants import warm_interpreter
from tests.mutants.warm_interpreter import ROOT, WarmInterpreter

PROBE = """
import os
import sys
import time

import fuser
import torch


def test_run_is_fresh():
    assert os.environ["WARM_PROBE"] == os.environ["WARM_PROBE_EXPECTED"]
    assert "WARM_PROBE_LEFT_BEHIND" not in os.environ
    assert os.getcwd() == os.environ["WARM_PROBE_ROOT"]
    # pytest puts this file's folder first; then what a fresh interpreter starts with.
    assert sys.path.index(os.environ["PYTHONPATH"]) == sys.path.index(os.getcwd()) + 1 <= 2
    assert not hasattr(fuser, "left_behind") and torch.get_default_dtype() == torch.float32
    assert "tests.mutants.fold_math_bugs" not in sys.modules
    # Leave traces a later run would see if runs shared a process.
    fuser.left_behind = True
    torch.set_default_dtype(torch.float64)
    os.environ["WARM_PROBE_LEFT_BEHIND"] = "1"
    import tests.mutants.fold_math_bugs
    print("probe ran in", os.getpid())


def test_sleeps_when_asked():
    if os.environ.get("WARM_PROBE_SLEEP"):
        time.sleep(60)
"""


@pytest.fixture(scope="module")
def interpreter():
    """One server for the module: its runs must not see each other (whichever order they run in)."""
    warm = WarmInterpreter()
    yield warm
    warm.close()


def _probe_environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.update(WARM_PROBE_ROOT=str(ROOT), PYTHONPATH=str(tmp_path / "first"), **variables)
    return env


def _probe(tmp_path: Path) -> str:
    path = tmp_path / "test_probe.py"
    path.write_text(PROBE)
    return str(path)


def test_each_run_is_a_fresh_process_with_its_own_environment(tmp_path, interpreter) -> None:
    probe, log = _probe(tmp_path), tmp_path / "log.txt"
    pids = set()
    for value in ("a", "b"):
        env = _probe_environment(tmp_path, WARM_PROBE=value, WARM_PROBE_EXPECTED=value)
        status, seconds, cpu_seconds = interpreter.run([probe, "-q", "-s"], env, log, 120.0)
        output = log.read_text()
        assert status == 0, output
        assert "2 passed" in output and seconds > 0 and cpu_seconds > 0
        pids.add(output.split("probe ran in ")[1].split()[0])
    assert len(pids) == 2 and str(os.getpid()) not in pids

    env = _probe_environment(tmp_path, WARM_PROBE="a", WARM_PROBE_EXPECTED="b")
    status, _, _ = interpreter.run([probe, "-q"], env, log, 120.0)
    assert status == 1 and "1 failed, 1 passed" in log.read_text()


def test_a_run_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path, interpreter) -> None:
    probe, log = _probe(tmp_path), tmp_path / "log.txt"
    env = _probe_environment(
        tmp_path, WARM_PROBE="a", WARM_PROBE_EXPECTED="a", WARM_PROBE_SLEEP="1"
    )
    start = time.perf_counter()
    status, seconds, _ = interpreter.run([probe, "-q"], env, log, 5.0)
    assert status is None and 5.0 <= seconds < 30.0
    assert time.perf_counter() - start < 30.0

    del env["WARM_PROBE_SLEEP"]
    status, _, _ = interpreter.run([probe, "-q"], env, log, 120.0)
    assert status == 0, log.read_text()


def test_a_run_that_kills_itself_is_reported_and_the_server_survives(tmp_path, interpreter) -> None:
    log = tmp_path / "log.txt"
    path = tmp_path / "test_dies.py"
    path.write_text(
        "import os, signal\n\ndef test_dies():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = _probe_environment(tmp_path)
    status, _, _ = interpreter.run([str(path), "-q"], env, log, 120.0)
    assert status == -9
    status, _, _ = interpreter.run([str(path), "-q", "--collect-only"], env, log, 120.0)
    assert status == 0, log.read_text()


def _sleeping_run(tmp_path: Path, interpreter: WarmInterpreter) -> int:
    """Start a run of the probe that sleeps a minute, without waiting for its answer; return
    the child's pid once the server has forked it."""
    env = _probe_environment(
        tmp_path, WARM_PROBE="a", WARM_PROBE_EXPECTED="a", WARM_PROBE_SLEEP="1"
    )
    return interpreter.start([_probe(tmp_path), "-q"], env, tmp_path / "log.txt")


def _gone(pid: int) -> bool:
    """The process has ended: reaped, or a zombie whose parent has not reaped it yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_until_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.perf_counter() + seconds
    while not _gone(pid):
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_whose_client_goes_away_is_killed_with_its_server(tmp_path) -> None:
    """A runner killed mid-run (its end of the pipe closed) used to leave the run's child going
    to its end, and the server waiting for it."""
    interpreter = WarmInterpreter()
    pid = _sleeping_run(tmp_path, interpreter)
    server = interpreter._server
    server.stdin.close()
    try:
        assert server.wait(timeout=20) == 0
    finally:
        server.kill()
        server.stdout.close()
    assert _wait_until_gone(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_whose_server_is_killed_dies_with_it(tmp_path) -> None:
    interpreter = WarmInterpreter()
    pid = _sleeping_run(tmp_path, interpreter)
    time.sleep(0.5)  # the child asks for the signal first thing; give it the moment
    interpreter._server.kill()
    interpreter._server.wait()
    interpreter._server.stdout.close()
    interpreter._server.stdin.close()
    assert _wait_until_gone(pid)


def test_a_run_ending_as_its_deadline_passes_keeps_its_status(
    tmp_path, interpreter, monkeypatch
) -> None:
    """The deadline passes, but the run ends and is reaped before the client's kill: the kill
    finds no process, and the run's own status is its answer, not a timeout."""
    kills = []

    def already_reaped(pid: int, sig: int) -> None:
        kills.append(pid)
        raise ProcessLookupError(pid)

    monkeypatch.setattr(warm_interpreter.os, "kill", already_reaped)
    probe, log = _probe(tmp_path), tmp_path / "log.txt"
    env = _probe_environment(tmp_path, WARM_PROBE="a", WARM_PROBE_EXPECTED="a")
    status, _, _ = interpreter.run([probe, "-q"], env, log, 0.0)
    assert kills and status == 0, log.read_text()
