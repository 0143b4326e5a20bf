"""The property suite's own speed: random networks checked per second per core, and where it goes.

Four measurements:

1. Throughput: ``strategies.properties.check_random_networks`` draws, builds, fuses and checks N
   random networks with every property (the body of the property suite, without pytest). The rate
   is networks per CPU-second of this process with torch pinned to one thread, i.e. per core;
   CPU time rather than wall time, because on a shared machine wall time counts other people's
   processes. Wall time is shown too. Target: >= 100 networks/s/core.
2. Where the time goes: the same run with timers around the suite's and the fuser's stages. Time
   is charged to the innermost stage running (a fuse's trace counts as ``fuse: trace``, not also
   as ``fuse: rest``); what runs outside the body of the check is Hypothesis drawing specs.
3. The floor: what checking one network costs at the least, whatever the suite's own code does.
   Every network is fused (``fused_matches_original``), its fused model fused again
   (``idempotent``), deep-copied and saved and loaded (``survives_copy_and_save``), and drawn by
   Hypothesis; on the smallest network the strategy draws (one conv and its BN), those calls
   alone are timed, for our fuser and for a fuser that did nothing but one FX trace. The rate
   they allow is the most the suite could reach on this machine with these properties.
4. The ``ci`` profile: ``pytest tests/test_properties.py`` with ``HYPOTHESIS_PROFILE=ci`` and
   ``-n 1`` / ``-n 2`` (pytest-xdist), in a subprocess, wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import os
import re
import subprocess
import sys
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hypothesis import given, seed, settings
from interleave import interleaved_medians
from tables import environment_header, fix_threads, markdown_table
from torch import fx, nn

from fuser import fuse, fuse_with_report
from strategies import properties
from strategies.build import freeze_startup_objects
from strategies.draw import net_specs
from strategies.fuser_under_test import FuserUnderTest
from strategies.kernel_bugs import avoid_known_kernel_bugs
from strategies.properties import OutOfRange, PropertyViolation

REPO = Path(__file__).resolve().parents[1]
TARGET_RATE = 100.0

#: Timed stages: (stage, module, attribute or Class.method). Each one is wrapped in place while measuring
#: (modules look these names up at call time), then restored. A target that no longer exists is
#: skipped and named in the output, so a renamed function shows up instead of silently vanishing.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("checks: rest", "strategies.properties", "check_network"),
    ("build: render source", "strategies.properties", "render_source"),
    ("build: exec source", "strategies.properties", "build_from_source"),
    ("oracle", "strategies.properties", "foldable_sites"),
    ("reference: rest", "strategies.properties", "measure_reference"),
    ("reference: rounding-noise run", "strategies.tolerance", "rounding_noise_output"),
    ("forward: models and float64 reference", "strategies.properties", "evaluate"),
    ("forward: models and float64 reference", "strategies.tolerance", "evaluate"),
    ("checks: torch.save then torch.load", "strategies.properties", "_saved_and_loaded"),
    ("forward: count BN calls", "strategies.properties", "batchnorm_calls"),
    ("checks: compare outputs", "strategies.properties", "Trial.compare"),
    ("checks: snapshot input model", "strategies.properties", "snapshot"),
    ("checks: snapshot input model", "strategies.properties", "touched_by_fusing"),
    ("fuse: deepcopy", "fuser.fuse", "deep_copy"),
    ("fuse: trace", "fuser.fuse", "trace_with_opaque_submodules"),
    ("fuse: fold pass", "fuser.fuse", "fold_batch_norms"),
    ("fuse: shape propagation", "fuser.fuse", "propagate_shapes"),
    ("fuse: record submodule inputs", "fuser.fuse", "record_module_inputs"),
    ("fuse: read children's source (child_usage)", "fuser.fuse", "child_usage"),
)

#: ``copy.deepcopy`` is reached through each module's ``copy`` global; wrapping the function
#: itself would time every step of its recursion.
DEEPCOPY_STAGES: tuple[tuple[str, str], ...] = (
    ("reference: deepcopy", "strategies.tolerance"),
    ("checks: deepcopy fused model", "strategies.properties"),
)

DRAW_STAGE = "Hypothesis: draw specs, engine"
FUSE_REST = "fuse: rest"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure the property suite: random networks checked per second per core, a "
            "breakdown by stage, and the wall time of the ci profile under pytest -n 1 and -n 2."
        )
    )
    parser.add_argument(
        "--networks", type=int, default=300, help="random networks per measurement (default 300)"
    )
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument(
        "--workers",
        nargs="*",
        type=int,
        default=[1, 2],
        metavar="N",
        help="pytest -n values for the ci profile run; none to skip (default 1 2)",
    )
    parser.add_argument(
        "--profile", default="ci", help="Hypothesis profile of the pytest runs (default ci)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    return parser.parse_args(argv)


class StageClock:
    """Charges CPU time to the innermost running stage; the rest goes to ``outside``.

    CPU time of this process (``time.process_time``), not wall time: on a shared machine a stage's
    wall time depends on who else was running. With torch on one thread the two agree otherwise.
    """

    def __init__(self, outside: str) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack = [outside]
        self.since = time.process_time()

    def _switch(self, now: float) -> None:
        self.totals[self.stack[-1]] += now - self.since
        self.since = now

    def wrap(self, stage: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._switch(time.process_time())
            self.stack.append(stage)
            self.calls[stage] += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._switch(time.process_time())
                self.stack.pop()

        return timed

    def finish(self) -> dict[str, float]:
        self._switch(time.process_time())
        return dict(self.totals)


@contextlib.contextmanager
def stages_timed(clock: StageClock, missing: list[str]) -> Iterator[None]:
    """Wrap every stage target with ``clock`` for the duration of the block."""
    restore: list[tuple[object, str, object]] = []
    try:
        for stage, module_name, path in STAGES:
            owner: object = importlib.import_module(module_name)
            *owners, attribute = path.split(".")  # "Trial.compare": a method of a class
            for name in owners:
                owner = getattr(owner, name, None)
            original = getattr(owner, attribute, None)
            if original is None:
                missing.append(f"{module_name}.{path}")
                continue
            restore.append((owner, attribute, original))
            setattr(owner, attribute, clock.wrap(stage, original))
        for stage, module_name in DEEPCOPY_STAGES:
            module = importlib.import_module(module_name)
            original = getattr(module, "copy", None)
            if not isinstance(original, types.ModuleType):
                missing.append(f"{module_name}.copy")
                continue
            proxy = types.SimpleNamespace(deepcopy=clock.wrap(stage, original.deepcopy))
            restore.append((module, "copy", original))
            module.copy = proxy
        yield
    finally:
        for module, attribute, original in reversed(restore):
            setattr(module, attribute, original)


def fuser_under_test(clock: StageClock | None) -> FuserUnderTest:
    """Our fuser as the suite sees it, its entry points timed as ``fuse: rest`` when clocked."""
    if clock is None:
        return FuserUnderTest("fuser:fuse", fuse, fuse_with_report)
    return FuserUnderTest(
        "fuser:fuse", clock.wrap(FUSE_REST, fuse), clock.wrap(FUSE_REST, fuse_with_report)
    )


class Outcome:
    """How many drawn networks passed every property, and the first line of each violation."""

    def __init__(self) -> None:
        self.checked = 0
        self.violations: list[str] = []


def check_random_networks(fuser: FuserUnderTest, count: int, *, seed_value: int) -> Outcome:
    """Like ``strategies.properties.check_random_networks``, but a violation does not stop the run.

    That function raises the first violation after shrinking it, which is right for a test and
    wrong for a benchmark: the run would end early and time the shrinking. Here a violating network
    is counted (as checked: it was drawn, built, fused and checked) and the run goes on.
    ``properties.check_network`` is looked up at each call so that ``stages_timed`` can wrap it.
    """
    outcome = Outcome()

    @seed(seed_value)
    @settings(max_examples=count, database=None, deadline=None)
    @given(net_specs())
    def check_one(spec) -> None:
        try:
            properties.check_network(spec, fuser)
        except OutOfRange:
            return
        except PropertyViolation as violation:
            outcome.violations.append((str(violation).splitlines() or [""])[0])
        outcome.checked += 1

    check_one()
    return outcome


def throughput(networks: int, seed: int) -> tuple[Outcome, float, float]:
    """Networks checked, CPU seconds and wall seconds of one uninstrumented run.

    Hypothesis draws the same networks for the same seed, so this run and ``breakdown`` measure
    the same work.
    """
    fuser = fuser_under_test(None)
    check_random_networks(fuser, 5, seed_value=seed + 1)  # imports, first-call caches
    freeze_startup_objects()  # as the suite's conftest.py does after collection
    cpu, wall = time.process_time(), time.perf_counter()
    outcome = check_random_networks(fuser, networks, seed_value=seed)
    return outcome, time.process_time() - cpu, time.perf_counter() - wall


def breakdown(networks: int, seed: int) -> tuple[StageClock, list[str]]:
    """CPU seconds per stage over one instrumented run (same networks as ``throughput``)."""
    clock, missing = StageClock(DRAW_STAGE), []
    with stages_timed(clock, missing):
        check_random_networks(fuser_under_test(clock), networks, seed_value=seed)
    clock.finish()
    return clock, missing


class SmallestNetwork(nn.Module):
    """One conv and its BN: the least a drawn network holds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def floor_costs(repeats: int = 50) -> dict[str, float]:
    """Median CPU seconds of the calls every checked network makes at the least, on
    ``SmallestNetwork`` (interleaved, ``interleave.py``)."""
    model = SmallestNetwork().eval()
    fused = fuse(model)
    calls = {
        "fx.symbolic_trace": lambda: fx.symbolic_trace(model),
        "fuse": lambda: fuse(model),
        "fuse of the fused model": lambda: fuse(fused),
        "copy.deepcopy of the fused model": lambda: copy.deepcopy(fused),
        "torch.save then torch.load of the fused model": lambda: properties._saved_and_loaded(
            fused
        ),
    }
    return interleaved_medians(calls, repeats=repeats, warmup=3, clock="cpu")


def floor_table(costs: dict[str, float], draw_seconds: float) -> tuple[list[list], list[list]]:
    """Rows of the floor's two tables: each cost with the property needing it, and the floor
    of our fuser and of a fuser that only traces (its own fuse and re-fuse one FX trace each)."""
    needs = {
        "fx.symbolic_trace": "(the least any FX fuser does, once per fuse)",
        "fuse": "fused_matches_original",
        "fuse of the fused model": "idempotent",
        "copy.deepcopy of the fused model": "survives_copy_and_save",
        "torch.save then torch.load of the fused model": "survives_copy_and_save",
    }
    cost_rows = [[name, f"{1e3 * seconds:.2f}", needs[name]] for name, seconds in costs.items()]
    cost_rows.append([DRAW_STAGE + " (mean, from the breakdown)", f"{1e3 * draw_seconds:.2f}", ""])
    shared = (
        costs["copy.deepcopy of the fused model"]
        + costs["torch.save then torch.load of the fused model"]
        + draw_seconds
    )
    floors = {
        "our fuser": costs["fuse"] + costs["fuse of the fused model"] + shared,
        "a fuser that only traces": 2 * costs["fx.symbolic_trace"] + shared,
    }
    floor_rows = [
        [who, f"{1e3 * seconds:.2f}", f"{1 / seconds:.0f}", f"{1e3 / TARGET_RATE:.0f}"]
        for who, seconds in floors.items()
    ]
    return cost_rows, floor_rows


def pytest_run(workers: int, profile: str) -> tuple[float, int | None, str]:
    """Wall seconds, networks checked and pytest's summary line for ``-n workers``.

    The network count is the line the repository's conftest prints at the end of a session
    (None when it is absent).
    """
    command = [sys.executable, "-m", "pytest", "tests/test_properties.py", "-q", "-n", str(workers)]
    command += ["-p", "no:cacheprovider"]
    environment = {**os.environ, "HYPOTHESIS_PROFILE": profile}
    start = time.perf_counter()
    completed = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    summary = next(
        (line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)),
        f"exit status {completed.returncode}",
    )
    counted = re.search(r"property suite: (\d+) random networks", completed.stdout)
    return seconds, int(counted.group(1)) if counted else None, summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    avoid_known_kernel_bugs()  # as conftest.py does for the suite: before any convolution
    threads = fix_threads(args.threads)
    # Random networks make torch warn (padding='same' with even kernels, and the like): expected.
    warnings.simplefilter("ignore", UserWarning)
    print(environment_header(threads))

    outcome, cpu, wall = throughput(args.networks, args.seed)
    checked = outcome.checked
    rate = checked / cpu
    print(
        f"\n#### Throughput: {checked} random networks checked (Hypothesis seed {args.seed}), "
        "every property, our fuser\n"
    )
    rows = [
        [
            checked,
            f"{cpu:.1f}",
            f"{wall:.1f}",
            f"{rate:.1f}",
            f"{checked / wall:.1f}",
            len(outcome.violations),
            "met" if rate >= TARGET_RATE else "MISSED",
        ]
    ]
    headers = (
        "networks",
        "CPU s",
        "wall s",
        "networks/s/core (CPU)",
        "networks/s (wall)",
        "property violations",
        f">= {TARGET_RATE:.0f}/s/core",
    )
    print(markdown_table(headers, rows))
    for line in sorted(set(outcome.violations)):
        print(f"\n- violation found ({outcome.violations.count(line)}x): {line}")

    clock, missing = breakdown(args.networks, args.seed)
    total = sum(clock.totals.values())
    print(f"\n#### Where the time goes (same {args.networks} networks, instrumented, CPU time)\n")
    stage_rows = [
        [
            stage,
            f"{seconds:.2f}",
            f"{100 * seconds / total:.1f}%",
            f"{1e3 * seconds / checked:.2f}",
            f"{clock.calls[stage] / checked:.1f}" if stage in clock.calls else "",
        ]
        for stage, seconds in sorted(clock.totals.items(), key=lambda item: -item[1])
    ]
    headers = ("stage", "CPU s", "share", "ms per network", "calls per network")
    print(markdown_table(headers, stage_rows))
    if missing:
        print(f"\nNot timed (no longer found): {', '.join(missing)}")

    draw_seconds = clock.totals.get(DRAW_STAGE, 0.0) / checked
    cost_rows, floor_rows = floor_table(floor_costs(), draw_seconds)
    print(
        "\n#### The floor: the least one network costs (smallest network, median of 50 "
        "interleaved rounds, CPU time)\n"
    )
    print(markdown_table(("call", "ms", "needed by"), cost_rows))
    print()
    headers = ("fuser", "floor ms per network", "most networks/s/core", "target's ms per network")
    print(markdown_table(headers, floor_rows))

    if args.workers:
        print(f"\n#### The {args.profile} profile under pytest (wall time, one run each)\n")
        pytest_rows = []
        for workers in args.workers:
            seconds, networks, summary = pytest_run(workers, args.profile)
            rate = f"{networks / seconds:.1f}" if networks else "-"
            pytest_rows.append([f"-n {workers}", f"{seconds:.1f}", networks or "-", rate, summary])
        command = f"HYPOTHESIS_PROFILE={args.profile} pytest tests/test_properties.py -n N"
        headers = (f"`{command}`", "wall s", "networks", "networks/s (wall)", "result")
        print(markdown_table(headers, pytest_rows))


if __name__ == "__main__":
    main()
