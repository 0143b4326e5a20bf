"""``python -m fuser MODEL``: fuse a torchvision model, check the result, and time it.

This is the demo the fusion tutorials end with, done so that it cannot mislead: the model's
BatchNorms carry random statistics (default ones make every BN the identity and hide wrong folds),
the fused model is judged against a float64 reference rather than against the float32 model it came
from, and the speed-up is put next to the best any fold could do (the model with no BatchNorm at all).

Exit status: 0 when the fused model passes the check, 1 when it does not, 2 for a bad command line
(unknown model, an input size the model cannot take, no CUDA device).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fuser import fuse_with_report
from fuser.reference import ReferenceCheck, check_against_float64
from fuser.report import FusionReport
from fuser.timing import interleaved_medians, without_batchnorm
from fuser.zoo import (
    DEFAULT_FRAMES,
    DEFAULT_SIZE,
    MODEL_INPUT_DEFAULTS,
    UnknownModelError,
    build_model,
    default_input_size,
    example_input,
    model_family,
    supported_models,
)

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

#: Benchmark entries, in the order they are timed each round and printed.
BENCHMARK_NAMES = ("unfused", "fused", "bn_free")


@dataclass
class ModelRun:
    """Everything one ``python -m fuser MODEL`` run found out, for printing or as JSON."""

    model: str
    family: str
    input_shape: tuple[int, ...]
    device: str
    seed: int
    report: FusionReport
    check: ReferenceCheck
    repeats: int
    median_seconds: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.check.passed

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "input_shape": list(self.input_shape),
            "device": self.device,
            "seed": self.seed,
            "passed": self.passed,
            "report": self.report.to_dict(),
            "check": self.check.to_dict(),
            "benchmark": {
                "repeats": self.repeats,
                "median_ms": {name: 1e3 * self.median_seconds[name] for name in BENCHMARK_NAMES},
            },
        }

    def __str__(self) -> str:
        shape = "x".join(str(n) for n in self.input_shape)
        unfused = self.median_seconds["unfused"]
        labels = {"unfused": "unfused", "fused": "fused", "bn_free": "BN-free"}
        notes = {"fused": "", "bn_free": ", the bound for a perfect fold"}
        lines = [
            f"{self.model} ({self.family}), input {shape} on {self.device}, seed {self.seed}",
            str(self.report),
            "",
            str(self.check),
            "",
            f"benchmark: median of {self.repeats} interleaved runs under torch.inference_mode",
        ]
        for name in BENCHMARK_NAMES:
            seconds = self.median_seconds[name]
            line = f"  {labels[name]:<8} {1e3 * seconds:10.3f} ms"
            if name != "unfused":
                line += f"  ({unfused / seconds:.2f}x the speed of unfused{notes[name]})"
            lines.append(line)
        return "\n".join(lines)


class UsageError(Exception):
    """A command line that names something this tool cannot run; reported with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fuser",
        description=(
            "Fold the BatchNorms of a torchvision classification, video or segmentation model "
            "(random weights and randomised BN statistics, nothing downloaded), check the fused "
            "model against a float64 reference, and time unfused, fused and BN-free runs."
        ),
    )
    parser.add_argument("model", nargs="?", help="torchvision model name, e.g. resnet18")
    parser.add_argument("--list", action="store_true", help="list the valid model names and exit")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    size_exceptions = ", ".join(
        f"{name} {size}" for name, (size, _) in MODEL_INPUT_DEFAULTS.items()
    )
    frame_exceptions = ", ".join(f"{name} {n}" for name, (_, n) in MODEL_INPUT_DEFAULTS.items())
    family_sizes = ", ".join(f"{size} for {family}" for family, size in DEFAULT_SIZE.items())
    parser.add_argument(
        "--size",
        type=positive_int,
        help=f"input height and width (default: {family_sizes}; except {size_exceptions})",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        help=f"clip length T of video inputs (N, 3, T, H, W) "
        f"(default {DEFAULT_FRAMES}, except {frame_exceptions})",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=20, help="timed runs per model (default 20)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights, BN statistics, input (default 0)"
    )
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, with a message that says so otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_model(
    name: str,
    *,
    batch: int = 1,
    size: int | None = None,
    frames: int | None = None,
    repeats: int = 20,
    device: str = "cpu",
    seed: int = 0,
) -> ModelRun:
    """Build, fuse, check and time one model. Raises ``UsageError`` for what the user must change."""
    try:
        family = model_family(name)
    except UnknownModelError as error:
        raise UsageError(str(error)) from error
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device here")
    default_size, default_frames = default_input_size(name)
    size = default_size if size is None else size
    frames = default_frames if frames is None else frames

    inputs = (example_input(family, batch=batch, size=size, frames=frames, seed=seed).to(device),)
    try:
        # Building runs the model once (to draw BN statistics), so a size it cannot take fails here.
        model = build_model(name, size=size, frames=frames, seed=seed).to(device)
    except Exception as error:  # the builder's or the model's own complaint about the input size
        shape = "x".join(str(n) for n in inputs[0].shape)
        options = "--size or --frames" if family == "video" else "--size"
        raise UsageError(
            f"{name} cannot run on an input of shape {shape}: {error} (try another {options})"
        ) from error

    fused, report = fuse_with_report(model, example_inputs=inputs)
    check = check_against_float64(model, fused, inputs)
    models = {"unfused": model, "fused": fused, "bn_free": without_batchnorm(model)}
    medians = interleaved_medians(models, inputs, repeats=repeats)
    return ModelRun(
        model=name,
        family=family,
        input_shape=tuple(inputs[0].shape),
        device=device,
        seed=seed,
        report=report,
        check=check,
        repeats=repeats,
        median_seconds=medians,
    )


def format_model_list() -> str:
    return "\n".join(
        f"{family}:\n" + "\n".join(f"  {name}" for name in names)
        for family, names in supported_models().items()
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fuser``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(format_model_list())
        return EXIT_OK
    if args.model is None:
        parser.error("a model name is required (or --list to see them)")

    try:
        result = run_model(
            args.model,
            batch=args.batch,
            size=args.size,
            frames=args.frames,
            repeats=args.repeats,
            device=args.device,
            seed=args.seed,
        )
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE

    if args.json:
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print(result)
    return EXIT_OK if result.passed else EXIT_CHECK_FAILED
