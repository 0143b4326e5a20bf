"""Which batch norms a module actually runs, observed while it runs.

Completeness asks that no foldable BatchNorm is left in the fused model. Watching ``F.batch_norm``
(and ``torch.batch_norm``) calls during a forward pass answers that for any fuser output, whether a
``GraphModule``, an untouched copy, or a module with opaque parts, where inspecting one particular
graph representation would miss BatchNorms hidden inside untraced submodules. Each call is named by
its ``running_mean`` tensor's qualified name in the module that ran.

torchvision's ``FrozenBatchNorm2d`` calls no batch norm: its forward computes ``x * scale + bias``
from its buffers, starting with ``self.running_mean.reshape(...)``, and a fuser tracing through it
(as FX does: it is no torch.nn module) records those same operations. So an operation whose first
argument is a ``running_mean`` buffer also counts as a call, named by that buffer; no BatchNorm
that calls ``F.batch_norm`` hands its running mean to anything first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from strategies.tolerance import fresh_copies


class _BatchNormRecorder(TorchFunctionMode):
    """Records the ``running_mean`` name of every batch norm call, in execution order."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.running_means = {key for key, name in names.items() if name.endswith("running_mean")}
        self.calls: list[str | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            self.calls.append(self._name(args, kwargs, 1))
        elif func is torch.batch_norm:
            self.calls.append(self._name(args, kwargs, 3))
        elif args and id(args[0]) in self.running_means:  # FrozenBatchNorm2d's arithmetic
            self.calls.append(self.names[id(args[0])])
        return func(*args, **kwargs)

    def _name(self, args: tuple, kwargs: dict, position: int) -> str | None:
        running_mean = args[position] if len(args) > position else kwargs.get("running_mean")
        if running_mean is None:
            return None
        return self.names.get(id(running_mean), "<unnamed tensor>")


def batchnorm_calls(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str | None]:
    """Run ``module(*inputs)`` and return, per batch norm call, the qualified name of its
    ``running_mean`` (``None`` when it has none)."""
    names: dict[int, str] = {}
    for name, tensor in module.named_buffers(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    recorder = _BatchNormRecorder(names)
    with torch.no_grad(), recorder:
        module(*fresh_copies(inputs))  # a network may change its input in place
    return recorder.calls
