"""Run the property suite against mutants, one subprocess each, and say which caught what.

A mutant counts as caught only when a property test *failed* against it: pytest exits 1 and its
summary names at least one ``FAILED`` test of the suite. A mutant that cannot be imported, a suite
that errors while collecting, or a run that times out is reported as such, never as caught, so a
broken harness cannot inflate the score.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import Mutant

ROOT = Path(__file__).resolve().parents[2]
SUITE = "tests/test_properties.py"
DEFAULT_TIMEOUT_S = 300.0
CAUGHT, MISSED, TIMED_OUT, BROKEN = "caught", "missed", "timed out", "broken"

_FAILED = re.compile(r"^FAILED (\S+?)(?: - (.*))?$", re.MULTILINE)


@dataclass(frozen=True)
class MutantRun:
    """What happened when the suite ran against one mutant."""

    mutant: Mutant
    verdict: str  # CAUGHT, MISSED, TIMED_OUT or BROKEN
    seconds: float
    failed: tuple[str, ...]  # the suite's failing test ids (``file::test[param]``)
    output: str

    @property
    def caught(self) -> bool:
        return self.verdict == CAUGHT

    @property
    def caught_by(self) -> str:
        """The failing properties' test names, without file or parameters."""
        names = [test.split("::")[-1].split("[")[0] for test in self.failed]
        return ", ".join(dict.fromkeys(names))

    def describe(self) -> str:
        detail = self.caught_by if self.caught else self.output.strip().splitlines()[-1:] or [""]
        detail = detail if isinstance(detail, str) else detail[0]
        return f"{self.verdict:9s} {self.seconds:7.1f}s  {self.mutant.target}  {detail}"


def suite_command(target: str, extra_args: Iterable[str] = ()) -> list[str]:
    """The pytest command line that runs the suite against ``target`` and stops at the first
    failure (``-x``: the time to catch is the time to the first failing example)."""
    return [
        sys.executable,
        "-m",
        "pytest",
        SUITE,
        f"--fuser={target}",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        *extra_args,
    ]


def suite_environment(profile: str) -> dict[str, str]:
    env = dict(os.environ, HYPOTHESIS_PROFILE=profile)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_mutant(
    mutant: Mutant,
    *,
    profile: str = "ci",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    extra_args: Iterable[str] = (),
) -> MutantRun:
    """Run the suite against one mutant in a fresh interpreter (patches never leak between runs)."""
    try:
        mutant.load()
    except Exception as error:  # a mutant that does not import is a broken corpus, not a catch
        return MutantRun(mutant, BROKEN, 0.0, (), f"cannot import: {error!r}")
    command = suite_command(mutant.target, extra_args)
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command,
            cwd=ROOT,
            env=suite_environment(profile),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout if isinstance(expired.stdout, str) else ""
        seconds = time.perf_counter() - start
        return MutantRun(mutant, TIMED_OUT, seconds, (), output + f"\nno failure in {timeout_s:g}s")
    seconds = time.perf_counter() - start
    output = completed.stdout + completed.stderr
    failed = tuple(match.group(1) for match in _FAILED.finditer(output))
    if completed.returncode == 1 and failed:
        verdict = CAUGHT
    elif completed.returncode == 0:
        verdict = MISSED
    else:
        verdict = BROKEN
    return MutantRun(mutant, verdict, seconds, failed, output)


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
    lines = [
        f"Mutation score: **{caught}/{len(runs)}** mutants caught "
        f"(`{command}`, {wall_s:.0f} s wall in total).",
        "",
        "| area | mutant | bug | verdict | time to catch (s) | caught by |",
        "|---|---|---|---|---:|---|",
    ]
    for run in runs:
        mutant = run.mutant
        bug = mutant.bug.replace("|", "\\|")
        by = run.caught_by if run.caught else ""
        lines.append(
            f"| {mutant.area} | `{mutant.name}` | {bug} | {run.verdict} | {run.seconds:.1f} | {by} |"
        )
    return "\n".join(lines) + "\n"
