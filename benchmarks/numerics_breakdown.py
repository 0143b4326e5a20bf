"""Where the fold's error comes from in bfloat16 and float16: rounded parameters or arithmetic.

``numerics.py`` compares fused and unfused errors against a float64 reference. This script splits
each error in two, on the same models and inputs:

- ``params``: the model's rounded parameters evaluated in float64 arithmetic (``model.double()``
  after the cast), against the reference: what rounding the weights and BN statistics costs;
- ``arithmetic``: the model in the dtype against the same model in float64 arithmetic: what
  computing in the dtype costs, with the parameters it has.

for the three models of ``numerics.py`` (unfused, fuse then cast, cast then fuse) and a fourth,
``cast weights, fuse``: the layers' weights rounded to the dtype but the BN statistics and affine
parameters kept in float32 when folding (what a model whose BatchNorms stay in float32 gives). The
summary is the geometric mean (and worst) over models and seeds of each error divided by the
unfused model's, and how often it is at most 1.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Sequence

import torch
from tables import environment_header, fix_threads, markdown_table
from torch import nn
from workloads import MODEL_NAMES, build_workload

from fuser import fuse
from fuser.reference import float64_copy, max_abs_error
from strategies.kernel_bugs import avoid_known_kernel_bugs

VARIANTS = ("unfused", "fuse, cast", "cast, fuse", "cast weights, fuse")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Split fused and unfused errors in bfloat16/float16 into parameter rounding "
        "and arithmetic; print Markdown tables."
    )
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), metavar="NAME")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--seeds", type=int, default=4, help="BN statistics seeds (default 4)")
    parser.add_argument("--size", type=int, default=64, help="input size (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    return parser.parse_args(argv)


def variants(model: nn.Module, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The four models compared, all in ``dtype``."""
    weights_rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in weights_rounded.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                for parameter in module.parameters():
                    parameter.copy_(parameter.to(dtype).to(parameter.dtype))
    cast = copy.deepcopy(model).to(dtype)
    return {
        "unfused": cast,
        "fuse, cast": fuse(model).to(dtype),
        "cast, fuse": fuse(cast),
        "cast weights, fuse": fuse(weights_rounded).to(dtype),
    }


def errors(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per variant: total, params and arithmetic errors (see the module docstring)."""
    x = x.to(dtype)
    result = {}
    with torch.inference_mode():
        reference = float64_copy(model)(x.double())
        for name, variant in variants(model, dtype).items():
            in_float64 = copy.deepcopy(variant).double()(x.double())
            result[name] = {
                "total": max_abs_error(variant(x), reference),
                "params": max_abs_error(in_float64, reference),
                "arithmetic": max_abs_error(variant(x), in_float64),
            }
    return result


def summary(ratios: list[float]) -> str:
    wins = sum(r <= 1 for r in ratios)
    return (
        f"{statistics.geometric_mean(ratios):.2f} (worst {max(ratios):.2f}, {wins}/{len(ratios)})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    avoid_known_kernel_bugs()  # before any convolution: bfloat16 ones go wrong on AMX
    print(environment_header(fix_threads(args.threads)))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        measured = []
        for model_name in args.models:
            for seed in range(args.seeds):
                workload = build_workload(model_name, size=args.size, seed=seed)
                measured.append(errors(workload.model, workload.inputs[0], dtype))
        rows = []
        for variant in VARIANTS[1:]:
            row = [variant]
            for kind in ("total", "params", "arithmetic"):
                ratios = [
                    m[variant][kind] / m["unfused"][kind] for m in measured if m["unfused"][kind]
                ]
                row.append(summary(ratios))
            rows.append(row)
        print(
            f"\n#### {dtype_name}: error / unfused error, geometric mean (worst, cases <= 1) over "
            f"{len(args.models)} models x {args.seeds} seeds, input size {args.size}\n"
        )
        print(markdown_table(("variant", "total", "params", "arithmetic"), rows))


if __name__ == "__main__":
    main()
