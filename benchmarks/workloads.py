"""What the benchmarks measure: the five torchvision models, their inputs, and synthetic chains.

The models come from ``fuser.zoo`` (random weights, BatchNorm statistics redrawn to fit each BN's
input), never with default statistics: a default BN is the identity, and a benchmark of a fold that
did nothing would look perfect. The synthetic chains isolate the fuse pass's cost per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fuser.zoo import (
    BATCHNORM_TYPES,
    DEFAULT_FRAMES,
    DEFAULT_SIZE,
    build_model,
    example_input,
    model_family,
)

#: The models every table covers: plain and bottleneck ResNets, depthwise-separable nets
#: (MobileNetV2, EfficientNet-B0 with squeeze-excitation), and a 3-D video ResNet.
MODEL_NAMES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "r3d_18")


@dataclass
class Workload:
    """A model in eval mode with randomised BN statistics, and the input of one forward call."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]

    @property
    def input_shape(self) -> str:
        return "x".join(str(n) for n in self.inputs[0].shape)


def build_workload(
    name: str,
    *,
    batch: int = 1,
    size: int | None = None,
    frames: int = DEFAULT_FRAMES,
    seed: int = 0,
) -> Workload:
    """One of the zoo's models at its family's default input size (or ``size``), on the CPU."""
    family = model_family(name)
    size = DEFAULT_SIZE[family] if size is None else size
    model = build_model(name, size=size, frames=frames, seed=seed)
    x = example_input(family, batch=batch, size=size, frames=frames, seed=seed + 2)
    return Workload(name, model, (x,))


def conv_bn_chain(pairs: int, channels: int = 2) -> nn.Sequential:
    """``pairs`` times (Conv2d(c, c, 1) -> BatchNorm2d(c)) in one flat ``nn.Sequential``, in eval mode.

    Tiny layers keep the tensor work negligible, so the time measured is the pass's own per-node
    bookkeeping (tracing, matching, rewriting), which is what must grow linearly.
    """
    layers: list[nn.Module] = []
    for _ in range(pairs):
        layers += [nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers).eval()


def chain_input(channels: int = 2) -> tuple[torch.Tensor, ...]:
    """A small input for a ``conv_bn_chain``: shape propagation then costs little per node."""
    return (torch.randn(1, channels, 4, 4),)


def batch_norm_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """How many BatchNorm module calls one forward pass makes (0 for a fully folded model).

    Counted by running the model with pre-hooks, not by looking for BN modules: torch's fuse leaves
    folded BN modules in place as unused attributes, so their presence says nothing.
    """
    calls = 0

    def count(module: nn.Module, args: tuple) -> None:
        nonlocal calls
        calls += 1

    hooks = [
        m.register_forward_pre_hook(count)
        for m in model.modules()
        if isinstance(m, BATCHNORM_TYPES)
    ]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls
