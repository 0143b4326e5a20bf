"""Numerics of the fold: error against a float64 reference, unfused vs fused, per dtype.

A fold replaces ``BN(conv(x))`` by a conv with new weights. In float32 that changes rounding, not
accuracy; in bfloat16 and float16 it can go either way: the folded weights are rounded once (from a
float64 computation), while the unfused model rounds the conv output, then the BN's statistics and
its arithmetic. This script measures which way it goes, model by model.

For each model, seed and dtype:

- ``reference``: a float64 copy of the float32 model (``fuser.reference.float64_copy``), run on the
  input rounded to the dtype, so the error measured is the model's arithmetic, not input rounding;
- ``unfused``: the float32 model cast to the dtype;
- ``fuse, cast``: ``fuse(model)`` in float32, then cast (the usual deployment order);
- ``cast, fuse``: the model cast to the dtype, then fused (the fold math runs in float64 from the
  dtype's weights and is rounded to the dtype once).

The errors are max absolute differences of the logits from the reference (``max_abs_error``). The
target is fused <= unfused in every dtype. Whether a dtype is usable on this CPU at all is probed
first: float16 convolutions exist on CPU in recent torch, but may be far slower than float32.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tables import environment_header, fix_threads, markdown_table
from torch import nn
from workloads import MODEL_NAMES, build_workload

from fuser import fuse_with_report
from fuser.reference import float64_copy, max_abs_error, output_tensors
from strategies.kernel_bugs import avoid_known_kernel_bugs

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Max error against a float64 reference of unfused and fused torchvision models in "
            "float32, bfloat16 and float16; print Markdown tables."
        )
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), metavar="NAME")
    parser.add_argument(
        "--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES), metavar="DTYPE"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="random-statistics seeds per model (default 3)"
    )
    parser.add_argument(
        "--size", type=int, help="input height and width (default 224 images, 112 video)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the models run (default cpu); the fold itself is the same on either",
    )
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="CUDA: run float32 convolutions in float32, not in cuDNN's default TF32",
    )
    return parser.parse_args(argv)


def probe_dtype(dtype: torch.dtype, device: str = "cpu", samples: int = 5) -> str:
    """Whether a conv and an eval-mode BN run in ``dtype`` on ``device``, and how fast vs float32.

    The two dtypes are timed alternately (median of ``samples`` each), so a busy spell of a shared
    machine does not land on one of them only.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 56, 56, generator=generator).to(device)
    w = torch.randn(64, 64, 3, 3, generator=generator).to(device)
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    try:
        y = F.conv2d(x.to(dtype), w.to(dtype), padding=1)
        stats = (
            torch.zeros(64, dtype=dtype, device=device),
            torch.ones(64, dtype=dtype, device=device),
        )
        F.batch_norm(y, *stats, training=False)
    except (RuntimeError, NotImplementedError) as error:
        return f"unsupported on {device} ({(str(error).splitlines() or [''])[0][:80]})"
    if dtype == torch.float32:
        return "supported (the baseline)"
    times: dict[torch.dtype, list[float]] = {dtype: [], torch.float32: []}
    for _ in range(samples):
        for dt in times:
            xd, wd = x.to(dt), w.to(dt)
            synchronize()
            start = time.perf_counter()
            F.conv2d(xd, wd, padding=1)
            synchronize()
            times[dt].append(time.perf_counter() - start)
    slowdown = statistics.median(times[dtype]) / statistics.median(times[torch.float32])
    return f"supported; a 64-channel 3x3 conv on 56x56 takes {slowdown:.1f}x its float32 time"


@dataclass
class Errors:
    """Max absolute errors of one model, seed and dtype against the float64 reference."""

    unfused: float
    fuse_cast: float
    cast_fuse: float
    scale: float
    left: int  # BN sites the cast-then-fuse run left unfolded


def measure(model: nn.Module, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> Errors:
    rounded = tuple(x.to(dtype) for x in inputs)
    fused32, _ = fuse_with_report(model)
    cast_model = copy.deepcopy(model).to(dtype)
    fused_in_dtype, report = fuse_with_report(cast_model)
    with torch.inference_mode():
        reference = float64_copy(model)(*(x.double() for x in rounded))
        unfused = cast_model(*rounded)
        fuse_cast = fused32.to(dtype)(*rounded)
        cast_fuse = fused_in_dtype(*rounded)
    return Errors(
        unfused=max_abs_error(unfused, reference),
        fuse_cast=max_abs_error(fuse_cast, reference),
        cast_fuse=max_abs_error(cast_fuse, reference),
        scale=max(t.abs().max().item() for _, t in output_tensors(reference)),
        left=len(report.left),
    )


def error_ratios(fused: list[float], unfused: list[float]) -> list[float]:
    """fused/unfused error per seed (1.0 where both are exactly zero)."""
    return [
        f / u if u > 0 else (1.0 if f == 0 else math.inf)
        for f, u in zip(fused, unfused, strict=True)
    ]


def verdict(fused: list[float], unfused: list[float]) -> str:
    """How many seeds have fused error <= unfused error, and the worst fused/unfused ratio."""
    wins = sum(f <= u for f, u in zip(fused, unfused, strict=True))
    return f"{wins}/{len(fused)} (worst {max(error_ratios(fused, unfused)):.2f})"


def geometric_mean_ratio(fused: list[float], unfused: list[float]) -> str:
    """The typical fused/unfused error ratio: below 1 when the fold is more accurate on the whole.

    A max error over one output is a noisy statistic when both models are at rounding level, so a
    per-seed comparison is close to a coin toss there; the geometric mean shows a systematic
    difference when there is one.
    """
    return f"{statistics.geometric_mean(error_ratios(fused, unfused)):.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    avoid_known_kernel_bugs()  # before any convolution: bfloat16 ones go wrong on AMX
    threads = fix_threads(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    print(environment_header(threads))
    print(f"\nDtype support on {args.device}:\n")
    supported = []
    for name in args.dtypes:
        probe = probe_dtype(DTYPES[name], args.device)
        print(f"- {name}: {probe}")
        if probe.startswith("supported"):
            supported.append(name)

    rows = []
    summary: dict[str, list[tuple[float, float, float]]] = {name: [] for name in supported}
    for model_name in args.models:
        for dtype_name in supported:
            per_seed = []
            for seed in range(args.seeds):
                workload = build_workload(model_name, size=args.size, seed=seed)
                model = workload.model.to(args.device)
                inputs = tuple(x.to(args.device) for x in workload.inputs)
                per_seed.append(measure(model, inputs, DTYPES[dtype_name]))
            unfused = [e.unfused for e in per_seed]
            fuse_cast = [e.fuse_cast for e in per_seed]
            cast_fuse = [e.cast_fuse for e in per_seed]
            summary[dtype_name] += zip(unfused, fuse_cast, cast_fuse, strict=True)
            rows.append(
                [
                    f"{model_name} {workload.input_shape}",
                    dtype_name,
                    f"{max(e.scale for e in per_seed):.3g}",
                    f"{max(unfused):.3g}",
                    f"{max(fuse_cast):.3g}",
                    f"{max(cast_fuse):.3g}",
                    verdict(fuse_cast, unfused),
                    verdict(cast_fuse, unfused),
                    max(e.left for e in per_seed),
                ]
            )
    headers = (
        "model, input",
        "dtype",
        "max abs output",
        "unfused err",
        "fuse, cast err",
        "cast, fuse err",
        "fuse, cast <= unfused: seeds",
        "cast, fuse <= unfused: seeds",
        "BN left",
    )
    print(
        f"\n#### Max abs error vs float64 reference (worst of {args.seeds} seeds per cell)\n\n"
        "`seeds` counts the seeds where the fused error is at most the unfused error; `worst` is "
        "the largest fused/unfused error ratio over the seeds.\n"
    )
    print(markdown_table(headers, rows))

    summary_rows = []
    for dtype_name, triples in summary.items():
        unfused = [u for u, _, _ in triples]
        fuse_cast = [f for _, f, _ in triples]
        cast_fuse = [c for _, _, c in triples]
        met = all(f <= u for f, u in zip(fuse_cast + cast_fuse, unfused + unfused, strict=True))
        summary_rows.append(
            [
                dtype_name,
                verdict(fuse_cast, unfused),
                geometric_mean_ratio(fuse_cast, unfused),
                verdict(cast_fuse, unfused),
                geometric_mean_ratio(cast_fuse, unfused),
                "met" if met else "MISSED",
            ]
        )
    print("\n#### Target: fused <= unfused in every dtype (all models and seeds)\n")
    print(
        markdown_table(
            (
                "dtype",
                "fuse, cast <= unfused",
                "fuse, cast / unfused (geo. mean)",
                "cast, fuse <= unfused",
                "cast, fuse / unfused (geo. mean)",
                "target",
            ),
            summary_rows,
        )
    )


if __name__ == "__main__":
    main()
