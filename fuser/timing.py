"""Time the unfused model, the fused model and a BN-free bound against each other.

The BN-free bound is the unfused model with every BatchNorm replaced by ``nn.Identity``: it computes
something else, but it is as fast as a perfect fold could make the model, so it shows how much of
the BatchNorms' cost the fuser removed. Runs are interleaved (one run of each model per round), so
that a slow spell of the machine (another process, frequency scaling) lands on all models alike
instead of on whichever was being timed at that moment; the median per model ignores outliers.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fuser.zoo import BATCHNORM_TYPES


def without_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm module replaced by ``nn.Identity``."""
    bound = copy.deepcopy(model)
    batchnorm_names = [
        name
        for name, m in bound.named_modules(remove_duplicate=False)
        if isinstance(m, BATCHNORM_TYPES)
    ]
    for name in batchnorm_names:
        parent_name, _, child_name = name.rpartition(".")
        parent = bound.get_submodule(parent_name) if parent_name else bound
        setattr(parent, child_name, nn.Identity())
    return bound


def interleaved_medians(
    models: Mapping[str, Callable[..., object]],
    inputs: tuple[torch.Tensor, ...],
    *,
    repeats: int,
    warmup: int = 1,
) -> dict[str, float]:
    """Median wall time in seconds of each model on ``inputs``, timed round-robin under inference mode.

    ``warmup`` untimed rounds come first (first calls allocate and, on CUDA, pick kernels). On CUDA
    the device is synchronised around each timed call, so the time is the model's, not the launch's.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    on_cuda = any(x.is_cuda for x in inputs)

    def synchronize() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, model in models.items():
                synchronize()
                start = time.perf_counter()
                model(*inputs)
                synchronize()
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}
