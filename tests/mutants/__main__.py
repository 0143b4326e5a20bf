"""``python -m tests.mutants``: run the property suite against every mutant, print the score.

Examples::

    python -m tests.mutants -j 2                      # all mutants, two at a time, ci profile
    python -m tests.mutants -j 2 --markdown out.md    # also write the results table
    python -m tests.mutants eps_ignored linear_rank_unchecked   # just these

Exits 0 only when every selected mutant was caught.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from . import all_mutants
from .run import DEFAULT_TIMEOUT_S, MutantRun, markdown_table, run_mutants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.mutants", description=__doc__.split("\n")[0]
    )
    parser.add_argument("names", nargs="*", help="mutant function names (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--profile", default="ci", help="Hypothesis profile (default: ci)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per mutant"
    )
    parser.add_argument(
        "--shrink", action="store_true", help="shrink the failing example (slower; readable repro)"
    )
    parser.add_argument(
        "--show-output", action="store_true", help="print the suite's output for every mutant"
    )
    parser.add_argument("--markdown", type=Path, help="write the results table to this file")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)

    mutants = all_mutants()
    if args.list:
        for mutant in mutants:
            print(f"{mutant.target}\n    {mutant.bug}\n    caught by: {mutant.expected_catch}")
        return 0
    if args.names:
        unknown = set(args.names) - {mutant.name for mutant in mutants}
        if unknown:
            parser.error(f"no such mutant: {', '.join(sorted(unknown))}")
        mutants = [mutant for mutant in mutants if mutant.name in args.names]

    def report(run: MutantRun) -> None:
        print(run.describe(), flush=True)

    start = time.perf_counter()
    runs = run_mutants(
        mutants,
        jobs=args.jobs,
        on_result=report,
        profile=args.profile,
        timeout_s=args.timeout,
        shrink=args.shrink,
    )
    wall_s = time.perf_counter() - start
    caught = sum(run.caught for run in runs)
    cpu_s = sum(run.cpu_seconds for run in runs)
    print(f"\nmutation score: {caught}/{len(runs)} caught; {wall_s:.0f} s wall, {cpu_s:.0f} s CPU")
    for run in runs:
        if args.show_output or not run.caught:
            print(f"\n--- {run.verdict}: {run.mutant.target}\n{run.output[-3000:]}")
    if args.markdown is not None:
        command = shlex.join(["python", "-m", "tests.mutants", *(argv or sys.argv[1:])])
        args.markdown.write_text(markdown_table(runs, command, wall_s))
    return 0 if caught == len(runs) else 1


if __name__ == "__main__":
    try:
        status = main()
    except BrokenPipeError:  # `python -m tests.mutants --list | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    sys.exit(status)
