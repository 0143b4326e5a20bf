"""Run the property suite against mutants, one fresh process each, and say which caught what.

A mutant counts as caught only when a property of the suite failed against it *and* our real
fuser passes that property on the very network that failed (``suite_plugin`` checks it in the same
run). Everything
else is reported as what it is, never as caught, so a broken harness, a stale mutant or a bug of
the fuser itself cannot inflate the score:

- ``missed``: the whole suite passed;
- ``unattributed``: a property failed, but the real fuser fails it on that network too;
- ``stale``: the mutant's fuser raised a ``TypeError``/``AttributeError``/``NameError`` or
  ``ImportError`` on an eval-mode model, the mark of a mutant that no longer fits the fuser's code;
- ``timed out``, or ``broken`` (the suite errored, or no failure could be read back).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import Mutant
from .suite_plugin import SHRINK_ENV, VERDICT_ENV
from .warm_interpreter import WarmInterpreter

ROOT = Path(__file__).resolve().parents[2]
SUITE = "tests/test_properties.py"
PLUGIN = f"{__package__}.suite_plugin"
DEFAULT_TIMEOUT_S = 600.0
CAUGHT, MISSED, UNATTRIBUTED = "caught", "missed", "unattributed"
STALE, TIMED_OUT, BROKEN = "stale", "timed out", "broken"

_STALE = re.compile(r"^the fuser raised (TypeError|AttributeError|NameError|ImportError)\b")


@dataclass(frozen=True)
class MutantRun:
    """What happened when the suite ran against one mutant."""

    mutant: Mutant
    verdict: str
    seconds: float  # wall clock, start of pytest to its exit
    cpu_seconds: float = 0.0  # user + system time of that pytest process
    test: str | None = None  # the first failing test id
    prop: str | None = None  # the property it names
    detail: str = ""
    output: str = ""

    @property
    def caught(self) -> bool:
        return self.verdict == CAUGHT

    @property
    def caught_by(self) -> str:
        """The failing test and property: ``test_fused_matches_original (fused_matches_original)``."""
        if self.test is None:
            return ""
        test = self.test.split("::")[-1]
        return f"{test} ({self.prop})" if self.prop else test

    def describe(self) -> str:
        detail = self.caught_by if self.caught else f"{self.caught_by} {self.detail}".strip()
        times = f"{self.seconds:6.1f}s wall {self.cpu_seconds:6.1f}s CPU"
        return f"{self.verdict:12s} {times}  {self.mutant.name}  {detail}"


def suite_arguments(target: str, extra_args: Iterable[str] = ()) -> list[str]:
    """The pytest arguments that run the suite against ``target`` and stop at the first failing
    test (``-x``); the plugin stops Hypothesis at its first failing example."""
    return [
        SUITE,
        f"--fuser={target}",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        PLUGIN,
        *extra_args,
    ]


def suite_environment(
    profile: str, shrink: bool, verdict_path: Path, python_path: Iterable[str] = ()
) -> dict[str, str]:
    """The suite's environment; ``python_path`` (``Mutant.python_path``) goes first."""
    env = dict(os.environ, HYPOTHESIS_PROFILE=profile)
    env[VERDICT_ENV] = str(verdict_path)
    env[SHRINK_ENV] = "1" if shrink else "0"
    paths = [*python_path, str(ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def run_mutant(
    mutant: Mutant,
    *,
    profile: str = "ci",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    shrink: bool = False,
    extra_args: Iterable[str] = (),
) -> MutantRun:
    """Run the suite against one mutant in a process of its own (patches never leak between runs)."""
    try:
        mutant.load()
    except Exception as error:  # a mutant that does not import is a broken corpus, not a catch
        return MutantRun(mutant, BROKEN, 0.0, detail=f"cannot import: {error!r}")
    with tempfile.TemporaryDirectory(prefix="convbn-mutant-") as scratch:
        verdict_path = Path(scratch) / "verdict.json"
        env = suite_environment(profile, shrink, verdict_path, mutant.python_path)
        finished = _run_timed(suite_arguments(mutant.target, extra_args), env, timeout_s, scratch)
        failure = json.loads(verdict_path.read_text()) if verdict_path.exists() else None
    returncode, output, seconds, cpu_seconds = finished
    if returncode is None:
        detail = f"no failure in {timeout_s:g} s"
        return MutantRun(mutant, TIMED_OUT, seconds, cpu_seconds, detail=detail, output=output)
    if returncode == 0:
        return MutantRun(mutant, MISSED, seconds, cpu_seconds, output=output)
    if returncode != 1 or failure is None or failure["property"] is None:
        last = output.strip().splitlines()[-1:] or [""]
        return MutantRun(mutant, BROKEN, seconds, cpu_seconds, detail=last[0], output=output)
    verdict = CAUGHT
    detail = failure["detail"]
    if _STALE.match(detail):
        verdict = STALE
    elif failure["control"] != "passes":
        verdict = UNATTRIBUTED
        detail = f"real fuser on that network: {failure['control']}; mutant: {detail}"
    return MutantRun(
        mutant, verdict, seconds, cpu_seconds, failure["test"], failure["property"], detail, output
    )


def _run_timed(
    arguments: list[str], env: dict[str, str], timeout_s: float, scratch: str
) -> tuple[int | None, str, float, float]:
    """Run pytest with ``arguments`` in a fork of this thread's warm interpreter; return
    its exit status (None on timeout), output, wall and CPU seconds.

    CPU seconds (user + system of the run's process, start-up imports excluded: the warm
    interpreter did them once) are what a mutant costs whatever else the machine is doing; wall
    seconds on a shared machine mostly measure the neighbours.
    """
    log_path = Path(scratch) / "output.txt"
    status, seconds, cpu_seconds = WarmInterpreter.for_this_thread().run(
        arguments, env, log_path, timeout_s
    )
    output = log_path.read_text(errors="replace") if log_path.exists() else ""
    return status, output, seconds, cpu_seconds


def run_mutants(
    mutants: list[Mutant],
    *,
    jobs: int = 1,
    on_result: Callable[[MutantRun], None] | None = None,
    **options,
) -> list[MutantRun]:
    """Run every mutant, ``jobs`` at a time; results come back in the order of ``mutants``."""

    def one(mutant: Mutant) -> MutantRun:
        result = run_mutant(mutant, **options)
        if on_result is not None:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, mutants))


def markdown_table(runs: list[MutantRun], command: str, wall_s: float) -> str:
    """The mutation score and the time to catch each mutant, as a Markdown section."""
    caught = sum(run.caught for run in runs)
    cpu_s = sum(run.cpu_seconds for run in runs)
    lines = [
        f"Mutation score: **{caught}/{len(runs)}** mutants caught "
        f"(`{command}`: {wall_s:.0f} s wall, {cpu_s:.0f} s CPU in total).",
        "",
        "| area | mutant | bug | verdict | wall (s) | CPU (s) | first failing test (property) |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for run in runs:
        mutant = run.mutant
        bug = mutant.bug.replace("|", "\\|")
        by = run.caught_by if run.caught else f"{run.caught_by} {run.detail}".strip()
        lines.append(
            f"| {mutant.area} | `{mutant.name}` | {bug} | {run.verdict} "
            f"| {run.seconds:.1f} | {run.cpu_seconds:.1f} | {by} |"
        )
    return "\n".join(lines) + "\n"
