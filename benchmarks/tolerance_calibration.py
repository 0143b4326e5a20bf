"""How much of the tolerance rule's allowance a correct fuser uses: the calibration table of
``docs/tolerance.md``.

For each dtype, random networks drawn as the property suite draws them (``net_specs``, a fixed
Hypothesis seed) are built, measured against their float64 reference (``measure_reference``) and
fused by ``fuser.fuse``, which is correct: every difference between its output and the original's is
rounding. For the networks whose fused output differs from the reference at all, the table gives

- ``err_fused / (err_unfused + err_rounding)``: the fused error in units of the rule's two
  estimates, largest and 99th percentile;
- ``err_fused / allowed``: the share of the allowance used, largest; at or above 1 the property
  suite would report a correct fuser (``over allowed`` counts those networks).

``--noise-samples`` overrides ``strategies.tolerance.NOISE_SAMPLES`` (how many draws of ``ref~``
``err_rounding`` is the largest of), to compare one draw with several on the same networks.
``--batch-norm-as-one-op`` leaves out the step-by-step rounding of batch-statistics batch norms
(``RoundingNoise``): with ``--noise-samples 1`` that is the rule before the GPU found a network it
measured too tightly. ``--device cuda`` draws the networks on the GPU, whose kernels round differently.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, seed, settings
from tables import environment_header, fix_threads, markdown_table

from strategies import tolerance
from strategies.draw import net_specs
from strategies.fuser_under_test import FuserUnderTest
from strategies.kernel_bugs import avoid_known_kernel_bugs
from strategies.properties import run_trial
from strategies.spec import NetSpec
from strategies.tolerance import OutOfRange, evaluate

DTYPES = ("float32", "float64", "bfloat16", "float16")
OUR_FUSER = FuserUnderTest.from_target("fuser:fuse")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Share of the tolerance rule's allowance that fuser.fuse uses on random networks."
    )
    parser.add_argument("--networks", type=int, default=1000, help="per dtype (default 1000)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    parser.add_argument(
        "--noise-samples",
        type=int,
        default=tolerance.NOISE_SAMPLES,
        help=f"draws of ref~ (default {tolerance.NOISE_SAMPLES}, the rule's)",
    )
    parser.add_argument(
        "--batch-norm-as-one-op",
        action="store_true",
        help="round a batch-statistics batch norm once, not step by step (the earlier rule)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    return parser.parse_args(argv)


@dataclass
class Tally:
    """What one dtype's networks gave."""

    checked: int = 0
    ratios: list[float] = field(default_factory=list)  # err_fused / (err_unfused + err_rounding)
    shares: list[float] = field(default_factory=list)  # err_fused / allowed
    worst: tuple[float, int] = (0.0, 0)  # largest share and the network's seed

    def add(self, spec: NetSpec) -> None:
        try:
            trial = run_trial(spec, OUR_FUSER)
        except OutOfRange:
            return
        if trial.fused is None:  # refused (a float16 fold that would overflow): nothing to compare
            return
        self.checked += 1
        comparison = trial.compare(evaluate(trial.fused, trial.inputs)[0])
        reference = comparison.reference
        if comparison.err_fused == 0:
            return
        estimate = reference.err_unfused + reference.err_rounding
        self.ratios.append(comparison.err_fused / estimate if estimate else float("inf"))
        share = comparison.err_fused / reference.allowed if reference.allowed else float("inf")
        self.shares.append(share)
        self.worst = max(self.worst, (share, spec.seed))


def calibrate(dtype: str, device: str, networks: int, seed_value: int) -> Tally:
    tally = Tally()

    @seed(seed_value)
    @settings(
        max_examples=networks,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(net_specs(dtypes=(dtype,), devices=(device,)))
    def one(spec: NetSpec) -> None:
        tally.add(spec)

    one()
    return tally


def percentile(values: list[float], fraction: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    avoid_known_kernel_bugs()  # before any convolution: bfloat16 ones go wrong on AMX
    warnings.filterwarnings("ignore", message="Using padding='same'")  # drawn on purpose
    threads = fix_threads(args.threads)
    tolerance.NOISE_SAMPLES = args.noise_samples
    if args.batch_norm_as_one_op:
        tolerance._batch_statistics_call = lambda func, args, kwargs: None
    print(environment_header(threads))
    print(f"- networks per dtype: {args.networks}, Hypothesis seed {args.seed}, on {args.device}")
    steps = "once" if args.batch_norm_as_one_op else "step by step"
    print(f"- err_rounding: the largest of {args.noise_samples} draws of ref~")
    print(f"- batch norms on batch statistics rounded {steps}")
    print()
    rows = []
    for dtype in args.dtypes:
        start = time.perf_counter()
        tally = calibrate(dtype, args.device, args.networks, args.seed)
        rows.append(
            (
                dtype,
                tally.checked,
                len(tally.ratios),
                f"{max(tally.ratios, default=0):.2f}",
                f"{percentile(tally.ratios, 0.99):.2f}",
                f"{tally.worst[0]:.2f} (seed {tally.worst[1]})",
                sum(share >= 1 for share in tally.shares),
                f"{time.perf_counter() - start:.0f}",
            )
        )
    headers = (
        "dtype",
        "networks",
        "fused output differs",
        "largest err_fused / (err_unfused + err_rounding)",
        "99th percentile",
        "largest err_fused / allowed",
        "over allowed",
        "wall s",
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
