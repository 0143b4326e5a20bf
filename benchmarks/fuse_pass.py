"""The fuse pass itself: ``fuser.fuse`` vs torch's fx fuse, on real models and on long synthetic chains.

Two tables:

Times are medians over interleaved rounds in shuffled order (``interleave.py``), in this process's
CPU time by default, with a garbage collection before each call.

1. Models: median time of ``fuse(model)``, ``fuse(model, example_inputs)`` (which adds shape
   propagation, one forward run) and ``torch.fx.experimental.optimization.fuse(model)``, interleaved.
   Both fusers deep-copy the model first (neither modifies the caller's), so ``copy.deepcopy(model)``
   is timed too: it is the floor they share. Target: ours (without inputs) <= torch's on every model.
   Where torch's fuse folds fewer BNs than ours (it matches module types exactly), a like-for-like
   table follows: the BNs torch leaves are put in training mode, so both fusers do the same folds.
2. Chains of N ``Conv2d(2, 2, 1) -> BatchNorm2d(2)`` pairs, N = 100 ... 10,000: time per pair (flat
   when the pass is linear; the fitted exponent k of time ~ N^k says it in one number) and peak memory.

Peak memory is measured in a fresh subprocess per (fuser, N), so one measurement cannot inherit
another's heap: ``peak RSS delta`` is the process's resident-set high-water mark during the call
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before; Linux only,
else ``resource.getrusage`` max RSS minus RSS before) and so includes tensor storage;
``tracemalloc peak`` counts Python allocations only (graph nodes, dicts, generated code), from a
second call traced on its own.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Sequence

from interleave import interleaved_medians
from tables import environment_header, fix_threads, markdown_table, milliseconds, ratio
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fuse
from workloads import MODEL_NAMES, build_workload, chain_input, conv_bn_chain

from fuser import fuse, fuse_with_report

CHAIN_SIZES = (100, 300, 1000, 3000, 10000)

#: What each fuser column runs, given the model and its example inputs.
FUSERS: dict[str, Callable[[nn.Module, tuple], object]] = {
    "ours": lambda model, inputs: fuse(model),
    "ours + inputs": lambda model, inputs: fuse(model, example_inputs=inputs),
    "torch": lambda model, inputs: torch_fuse(model),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time fuser.fuse against torch's fx fuse on torchvision models and on synthetic "
            "conv/BN chains (time per pair, fitted exponent, peak memory); print Markdown tables."
        )
    )
    parser.add_argument("--models", nargs="*", default=list(MODEL_NAMES), metavar="NAME")
    parser.add_argument(
        "--model-repeats", type=int, default=7, help="timed rounds per model (default 7)"
    )
    parser.add_argument(
        "--chains",
        nargs="*",
        type=int,
        default=list(CHAIN_SIZES),
        metavar="N",
        help="chain lengths in conv/BN pairs (default 100 300 1000 3000 10000)",
    )
    parser.add_argument(
        "--chain-repeats", type=int, default=3, help="timed rounds per chain length (default 3)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-size memory subprocesses"
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this process's CPU time, steadier on a shared machine (default); wall",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    # Internal: run one memory measurement and print it as JSON (used by the parent process).
    parser.add_argument("--measure-memory", nargs=2, metavar=("FUSER", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def fuse_calls(model: nn.Module, inputs: tuple) -> dict[str, Callable[[], object]]:
    """One zero-argument call per fuser column, bound to this model and its inputs."""
    return {fuser: functools.partial(run, model, inputs) for fuser, run in FUSERS.items()}


def model_table(names: Sequence[str], repeats: int, clock: str) -> str:
    rows = []
    for name in names:
        workload = build_workload(name)
        model, inputs = workload.model, workload.inputs
        calls = fuse_calls(model, inputs)
        calls["deepcopy"] = functools.partial(copy.deepcopy, model)
        medians = interleaved_medians(calls, repeats=repeats, clock=clock, before_each=gc.collect)
        rows.append(
            [
                name,
                milliseconds(medians["ours"]),
                milliseconds(medians["ours + inputs"]),
                milliseconds(medians["torch"]),
                milliseconds(medians["deepcopy"]),
                ratio(medians["ours"], medians["torch"]),
                ratio(medians["ours + inputs"], medians["torch"]),
                "met" if medians["ours"] <= medians["torch"] else "MISSED",
            ]
        )
    headers = (
        "model",
        "ours ms",
        "ours + inputs ms",
        "torch ms",
        "deepcopy ms",
        "ours/torch",
        "ours + inputs/torch",
        "ours <= torch",
    )
    return markdown_table(headers, rows)


def batch_norms_torch_leaves(model: nn.Module) -> list[str]:
    """Qualified names of the BatchNorm modules torch's fuse leaves as calls in its graph."""
    fused = torch_fuse(model)
    return [
        node.target
        for node in fused.graph.nodes
        if node.op == "call_module"
        and isinstance(fused.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)
    ]


def same_folds_table(names: Sequence[str], repeats: int, clock: str) -> str | None:
    """Where torch's fuse folds fewer BNs than ours: both timed on a copy of the model whose BNs
    torch leaves are in training mode, so that ours leaves them too (and says so in its report)
    and both fusers do the same folds."""
    rows = []
    for name in names:
        model = build_workload(name).model
        left = batch_norms_torch_leaves(model)
        if not left:
            continue
        total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        variant = copy.deepcopy(model)
        for bn in left:
            variant.get_submodule(bn).train()
        _, report = fuse_with_report(variant)
        folded = sum(site.folded for site in report.sites)
        calls = {
            "ours": functools.partial(fuse, variant),
            "torch": functools.partial(torch_fuse, variant),
        }
        calls["deepcopy"] = functools.partial(copy.deepcopy, variant)
        medians = interleaved_medians(calls, repeats=repeats, clock=clock, before_each=gc.collect)
        rows.append(
            [
                name,
                f"{folded} / {total - len(left)} of {total}",
                milliseconds(medians["ours"]),
                milliseconds(medians["torch"]),
                milliseconds(medians["deepcopy"]),
                ratio(medians["ours"], medians["torch"]),
                "met" if medians["ours"] <= medians["torch"] else "MISSED",
            ]
        )
    if not rows:
        return None
    headers = ("model", "BNs folded: ours / torch", "ours ms", "torch ms", "deepcopy ms")
    return markdown_table((*headers, "ours/torch", "ours <= torch"), rows)


def fitted_exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """k in time ~ N^k by least squares on log-log: 1.0 is linear, 2.0 quadratic."""
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in seconds]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


def chain_tables(sizes: Sequence[int], repeats: int, memory: bool, threads: int, clock: str) -> str:
    medians_by_size = {}
    for pairs in sizes:
        model, inputs = conv_bn_chain(pairs), chain_input()
        calls = fuse_calls(model, inputs)
        medians_by_size[pairs] = interleaved_medians(
            calls, repeats=repeats, clock=clock, before_each=gc.collect
        )

    per_pair_rows = []
    for pairs, medians in medians_by_size.items():
        row: list[object] = [pairs]
        row += [f"{1e6 * medians[fuser] / pairs:.0f}" for fuser in FUSERS]
        row.append(ratio(medians["ours"], medians["torch"]))
        per_pair_rows.append(row)
    if len(sizes) >= 2:
        exponents = [
            f"{fitted_exponent(sizes, [medians_by_size[n][fuser] for n in sizes]):.2f}"
            for fuser in FUSERS
        ]
        per_pair_rows.append(["exponent k (time ~ N^k)", *exponents, ""])
    headers = ["conv/BN pairs", *(f"{fuser} us/pair" for fuser in FUSERS), "ours/torch"]
    text = markdown_table(headers, per_pair_rows)

    if memory:
        memory_rows, methods = [], set()
        for pairs in sizes:
            row = [pairs]
            for fuser in FUSERS:
                measured = measure_memory_in_subprocess(fuser, pairs, threads)
                methods.add(measured["method"])
                row += [
                    f"{measured['rss_delta_kib'] / 1024:.1f}",
                    f"{measured['traced_kib'] / 1024:.1f}",
                ]
            memory_rows.append(row)
        headers = ["conv/BN pairs"]
        for fuser in FUSERS:
            headers += [f"{fuser} peak RSS delta MiB", f"{fuser} tracemalloc peak MiB"]
        text += (
            "\n\nPeak memory of one call, each in a fresh subprocess (peak RSS from "
            f"{' and '.join(sorted(methods))}; tracemalloc counts Python allocations only):\n\n"
        )
        text += markdown_table(headers, memory_rows)
    return text


def measure_memory_in_subprocess(fuser: str, pairs: int, threads: int) -> dict[str, float]:
    """Run ``--measure-memory`` in a fresh interpreter and return what it printed."""
    command = [sys.executable, __file__, "--threads", str(threads)]
    command += ["--measure-memory", fuser, str(pairs)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_memory(fuser: str, pairs: int) -> dict[str, float]:
    """Peak memory of one fuse call on a fresh chain, in this (fresh) process.

    A call on a 10-pair chain runs first, so the lazy imports and caches any first call pays for
    are not counted as the pass's memory.
    """
    run = FUSERS[fuser]
    run(conv_bn_chain(10), chain_input())
    model, inputs = conv_bn_chain(pairs), chain_input()
    gc.collect()
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        run(model, inputs)
        rss_delta, method = _status_kib("VmHWM") - before, "VmHWM"
    else:
        before = _status_kib("VmRSS") or 0
        run(model, inputs)
        rss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        method = "ru_maxrss"
    gc.collect()
    tracemalloc.start()
    run(model, inputs)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rss_delta_kib": rss_delta, "traced_kib": traced_peak / 1024, "method": method}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    threads = fix_threads(args.threads)
    if args.measure_memory:
        fuser, pairs = args.measure_memory
        print(json.dumps(measure_memory(fuser, int(pairs))))
        return
    print(environment_header(threads))
    if args.models:
        print(
            f"\n#### Fuse time on models (median of {args.model_repeats} interleaved rounds, "
            f"{args.clock} time)\n\n"
            "`ours` is `fuse(model)`; `ours + inputs` is `fuse(model, example_inputs)` (adds shape "
            "propagation); `torch` is `torch.fx.experimental.optimization.fuse(model)`; `deepcopy` "
            "is `copy.deepcopy(model)`, which both fusers do first.\n"
        )
        print(model_table(args.models, args.model_repeats, args.clock))
        same_folds = same_folds_table(args.models, args.model_repeats, args.clock)
        if same_folds is not None:
            print(
                "\nLike for like: the BNs torch's fuse leaves are put in training mode, so our "
                "fuser leaves them too and both do the same folds.\n"
            )
            print(same_folds)
    if args.chains:
        print(
            f"\n#### Fuse time on conv/BN chains (median of {args.chain_repeats} interleaved "
            f"rounds, {args.clock} time)\n"
        )
        print(
            chain_tables(args.chains, args.chain_repeats, not args.no_memory, threads, args.clock)
        )


if __name__ == "__main__":
    main()
