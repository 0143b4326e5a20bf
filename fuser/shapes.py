"""Running the model on ``example_inputs`` without leaving a trace on it.

The fuser runs the model for two reasons: shape propagation (to prove a Linear's input is 2-D) and,
for a model FX cannot trace whole, recording what each submodule is called with. A run must not
change the model: a BN left in training mode would update its running statistics, and a dropout
would draw random numbers, so buffers and the RNG state are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import FuserError


@contextlib.contextmanager
def state_preserved(module: nn.Module) -> Iterator[None]:
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    devices = sorted({b.device.index for b, _ in saved if b.is_cuda and b.device.index is not None})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield
        finally:
            for buffer, value in saved:
                buffer.copy_(value)


def _run_failed(error: Exception) -> FuserError:
    return FuserError(f"example_inputs could not be run through the model: {error}")


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Record each node's output shape in ``node.meta["tensor_meta"]``; False if it could not.

    FX's interpreter can fail where the model runs fine (it hands wrapped functions immutable
    lists, which torchvision's Swin3D writes to). Then the shapes stay unknown and only sites
    that need them are left; only inputs the model itself rejects are an error.
    """
    try:
        with state_preserved(gm):
            ShapeProp(gm).propagate(*example_inputs)
        return True
    except Exception:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
    gm.recompile()  # a traced module has no code yet (``tracing.TracedGraphModule``)
    try:
        with state_preserved(gm):
            gm(*example_inputs)
    except Exception as error:
        raise _run_failed(error) from error
    return False


def record_module_inputs(model: nn.Module, example_inputs: tuple) -> dict[int, tuple]:
    """Positional arguments of each submodule's first call, keyed by the submodule's id."""
    recorded: dict[int, tuple] = {}

    def remember(module: nn.Module, args: tuple) -> None:
        recorded.setdefault(id(module), args)

    scripted = {
        id(m) for s in model.modules() if isinstance(s, torch.jit.ScriptModule) for m in s.modules()
    }
    handles = [
        m.register_forward_pre_hook(remember)
        for m in model.modules()
        if m is not model and id(m) not in scripted  # compiled modules take no Python hooks
    ]
    try:
        with state_preserved(model):
            model(*example_inputs)
    except Exception as error:
        raise _run_failed(error) from error
    finally:
        for handle in handles:
            handle.remove()
    return recorded
