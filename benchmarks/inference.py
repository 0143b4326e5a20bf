"""Fused inference speed: how close the fused model comes to the BN-free bound.

For each model this times, interleaved and under ``torch.inference_mode``:

- ``unfused``: the model as built (eval mode, randomised BN statistics);
- ``ours``: ``fuser.fuse(model, example_inputs)``;
- ``torch``: ``torch.fx.experimental.optimization.fuse(model)``, torch's own conv/BN fuser;
- ``bound``: the model with every BatchNorm replaced by ``nn.Identity`` (``fuser.timing``), as fast as
  any fold could make it, and ``bound again``, a second copy of it: ``bound again / bound`` shows
  how finely this machine resolves a ratio, which is what the 1.01 target has to be read against;
- ``bound+bias``: the bound with a zero bias on every conv and linear that has none. A fold must
  give the layer it folds into a bias (``beta - mean * scale``), so this is the fastest model a fold
  can produce from PyTorch's own layers. On the CPU a conv adds its bias inside the kernel and the two
  bounds agree; cuDNN convolutions in PyTorch add it in a separate elementwise kernel, and on CUDA
  ``ours / bound+bias`` is the ratio that measures the fuser.

Rounds are interleaved in a shuffled order and timed in CPU time by default (see ``interleave.py``
for why); the median per model is reported.

Every fused model is first checked against a float64 reference (``fuser.reference``): a fast model
that computes the wrong thing is reported as wrong, not timed as a win. torch's fuser only knows
``Conv{1,2,3}d -> BatchNorm{1,2,3}d`` module pairs, so it may leave BNs or fail; both are reported.

The target is ``ours / bound <= 1.01`` on every model.
"""

from __future__ import annotations

import argparse
import copy
import functools
from collections.abc import Sequence

import torch
from interleave import interleaved_medians
from tables import environment_header, fix_threads, markdown_table, milliseconds, ratio
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fuse
from workloads import MODEL_NAMES, Workload, batch_norm_calls, build_workload

from fuser import fuse
from fuser.reference import check_against_float64
from fuser.timing import without_batchnorm
from fuser.zoo import DEFAULT_FRAMES

#: ``ours / bound`` at or below this meets the target.
TARGET_RATIO = 1.01
BIASABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BIASABLE_LAYERS += (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time unfused, fuser.fuse, torch's fx fuse and the BN-free bound on torchvision models, "
            "interleaved, and print Markdown tables of medians and ratios to the bound."
        )
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), metavar="NAME")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--size", type=int, help="input height and width (default 224 images, 112 video)"
    )
    parser.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, help="video clip length (default 8)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: steadiest on a shared machine)",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=("cpu", "cuda"),
        help="devices to time on (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="CPU runs: cpu (this process's CPU time, steadier on a shared machine; default) "
        "or wall; CUDA runs always use synchronised wall time",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and BN statistics seed")
    return parser.parse_args(argv)


def correctness(original: nn.Module, fused: nn.Module, inputs: tuple) -> str:
    """``ok`` when ``fused`` passes the float64 reference check, else what went wrong."""
    check = check_against_float64(original, fused, inputs)
    if check.passed:
        return "ok"
    return f"WRONG: {check.reason}"


def with_zero_biases(model: nn.Module) -> nn.Module:
    """``model`` (a BN-free bound) with a zero bias on every conv and linear that has none: the
    layers a fold produces, without the fold."""
    biased = copy.deepcopy(model)
    for module in biased.modules():
        if isinstance(module, BIASABLE_LAYERS) and module.bias is None:
            outputs = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            module.bias = nn.Parameter(module.weight.new_zeros(outputs))
    return biased


def torch_fused(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """torch's fuse of ``model``, or None and the one-line reason it failed."""
    try:
        return torch_fuse(model), None
    except Exception as error:  # torch's fuser runs symbolic tracing: any failure is reported
        first_line = (str(error).splitlines() or [""])[0]
        return None, f"failed: {type(error).__name__}: {first_line}"[:120]


def time_forwards(
    models: dict[str, nn.Module], inputs: tuple, *, repeats: int, warmup: int, clock: str
) -> dict[str, float]:
    """Median forward time of each model under inference mode, interleaved in shuffled order.

    On CUDA the clock is wall time with the device synchronised around each call; CPU time would
    measure only the launches.
    """
    on_cuda = any(x.is_cuda for x in inputs)
    synchronize = torch.cuda.synchronize if on_cuda else None
    calls = {name: functools.partial(model, *inputs) for name, model in models.items()}
    with torch.inference_mode():
        return interleaved_medians(
            calls,
            repeats=repeats,
            warmup=warmup,
            clock="wall" if on_cuda else clock,
            before_each=synchronize,
            after_each=synchronize,
        )


def benchmark_model(
    workload: Workload, device: str, repeats: int, warmup: int, clock: str
) -> list[str]:
    """One table row: BN calls left, correctness, median times and ratios to the bound."""
    model = workload.model.to(device)
    inputs = tuple(x.to(device) for x in workload.inputs)
    ours = fuse(model, example_inputs=inputs)
    theirs, torch_problem = torch_fused(model)
    bound = without_batchnorm(model)
    ours_check = correctness(model, ours, inputs)
    torch_check = torch_problem or correctness(model, theirs, inputs)

    timed = {
        "bound": bound,
        "ours": ours,
        "unfused": model,
        "bound again": without_batchnorm(model),
        "bound+bias": with_zero_biases(bound),
    }
    if theirs is not None:
        timed["torch"] = theirs
    medians = time_forwards(timed, inputs, repeats=repeats, warmup=warmup, clock=clock)

    def bn_calls(m: nn.Module | None) -> str:
        return "-" if m is None else str(batch_norm_calls(m, inputs))

    def time_of(name: str) -> str:
        return milliseconds(medians[name]) if name in medians else "-"

    def to_bound(name: str) -> str:
        return ratio(medians[name], medians["bound"]) if name in medians else "-"

    ours_ratio = medians["ours"] / medians["bound"]
    return [
        f"{workload.name} {workload.input_shape}",
        f"{bn_calls(model)} / {bn_calls(ours)} / {bn_calls(theirs)}",
        time_of("unfused"),
        time_of("ours"),
        time_of("torch"),
        time_of("bound"),
        to_bound("ours"),
        to_bound("torch"),
        to_bound("unfused"),
        to_bound("bound again"),
        ratio(medians["ours"], medians["bound+bias"]),
        "met" if ours_ratio <= TARGET_RATIO else "MISSED",
        ours_check,
        torch_check,
    ]


HEADERS = (
    "model, input",
    "BN calls: unfused / ours / torch",
    "unfused ms",
    "ours ms",
    "torch ms",
    "bound ms",
    "ours/bound",
    "torch/bound",
    "unfused/bound",
    "bound again/bound",
    "ours/(bound+bias)",
    f"ours/bound <= {TARGET_RATIO}",
    "ours vs float64",
    "torch vs float64",
)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    threads = fix_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(environment_header(threads))
    print(
        f"\nMedian of {args.repeats} interleaved rounds in shuffled order ({args.warmup} warm-up "
        f"rounds), {args.clock} time on CPU, torch.inference_mode, batch {args.batch}. Ratios are "
        "to the BN-free bound; `bound again` is a second copy of the bound, so its ratio is the "
        "noise floor: a difference smaller than its distance from 1 is not resolved."
    )
    for device in devices:
        rows = []
        for name in args.models:
            workload = build_workload(
                name, batch=args.batch, size=args.size, frames=args.frames, seed=args.seed
            )
            rows.append(benchmark_model(workload, device, args.repeats, args.warmup, args.clock))
        print(f"\n#### {device.upper()}\n")
        print(markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
