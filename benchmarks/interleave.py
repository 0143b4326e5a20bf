"""Interleaved timing for the benchmarks: round-robin in a shuffled order, median, a chosen clock.

``fuser.timing.interleaved_medians`` (the command line's) times forward passes in a fixed order
with wall time, which suits a one-off demo. The benchmark tables need finer resolution on a machine
other people share, which two changes give:

- ``clock="cpu"`` measures this process's CPU time (``time.process_time``, every thread), so time
  spent descheduled while someone else's job runs is not counted. On the shared two-core machine
  this is what brought two copies of the same model from several percent apart to within about
  one percent. It is meaningless for CUDA work (the GPU's time is not the process's), so CUDA uses
  wall time with synchronisation.
- The order within each round is shuffled (seeded), so no entry always runs right after the same
  other one (cache state, allocator state), which a fixed order turns into a systematic bias.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved_medians(
    calls: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    clock: str = "cpu",
    before_each: Callable[[], object] | None = None,
    after_each: Callable[[], object] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Median time in seconds of each zero-argument call, over ``repeats`` shuffled rounds.

    ``warmup`` untimed rounds come first. ``before_each`` and ``after_each`` run inside the timed
    region's edges but outside the measurement (a garbage collection before, a CUDA synchronise on
    both sides).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    now = CLOCKS[clock]
    order = list(calls)
    shuffle = random.Random(seed).shuffle
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        shuffle(order)
        for name in order:
            if before_each is not None:
                before_each()
            start = now()
            calls[name]()
            if after_each is not None:
                after_each()
            elapsed = now() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(samples) for name, samples in times.items()}
